#!/usr/bin/env bash
# The gates and the test suite, as CI runs them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh

if timeout 15 docker info >/dev/null 2>&1; then
    # Built once and cached by the engine; a no-op when the image is current.
    echo "==> workspace image"
    .venv/bin/forgeline image build
fi

echo "==> ruff"
.venv/bin/ruff check .
echo "==> import contracts"
.venv/bin/lint-imports
echo "==> mypy"
.venv/bin/mypy
echo "==> pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"

if [ $# -eq 0 ]; then
    # The benchmark suite at tiny sizes (docs/benchmarks.md), so that it does not rot: no
    # thresholds, it only has to run end to end. Case 6 (Celery + Redis) needs the bench extra
    # and Debian's redis-server; the Docker row is left to the full run.
    echo "==> bench smoke"
    cases=1,2,3,4,5,7
    if .venv/bin/python -c 'import celery, redis' 2>/dev/null && command -v redis-server >/dev/null; then
        cases=$cases,6
    fi
    .venv/bin/python -m bench --quick --no-docker --cases "$cases" --out "$(mktemp -d)"
fi
