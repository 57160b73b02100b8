# The Forgeline services image (gateway, worker, relay, projector); used by docker-compose.yml.
FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 forgeline
WORKDIR /app
COPY pyproject.toml README.md ./
COPY domain domain
COPY broker broker
COPY handlers handlers
COPY projections projections
COPY gateway gateway
COPY forgeline forgeline
RUN pip install --no-cache-dir .
USER forgeline
ENV FORGELINE_DATA_DIR=/home/forgeline/data
ENTRYPOINT ["forgeline"]
