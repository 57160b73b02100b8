"""Settings from FORGELINE_* environment variables, overridden by command-line flags."""

from __future__ import annotations

import base64
import binascii
import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "forgeline"


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value may be a secret (the cipher key): errors name the
    # setting and the rule, never the value.
    model_config = SettingsConfigDict(
        env_prefix="FORGELINE_", extra="ignore", hide_input_in_errors=True
    )

    # Where the embedded servers keep their data, and where local workspaces live.
    data_dir: Path = Field(default_factory=_default_data_dir)
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    # Set both to use external servers instead of the embedded ones.
    nats_url: str | None = None
    database_url: str | None = None
    # JetStream acknowledges before fsync by default; "always" survives a machine crash too.
    nats_sync_always: bool = False
    stream_replicas: int = Field(default=1, ge=1, le=5)

    worker_name: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    worker_slots: int = Field(default=4, ge=1, le=256)
    # Processes the worker's slots are spread over (forgeline/worker_processes.py): one event
    # loop keeps one core busy at most; set it to the cores a worker machine has to spare.
    worker_processes: int = Field(default=1, ge=1, le=64)
    # auto = docker when a Docker engine answers, else local (with a loud warning).
    provisioner: Literal["auto", "docker", "local"] = "auto"
    docker_url: str | None = None  # default: DOCKER_HOST or the local socket
    # The workspace image: used when present, else pulled, else built offline (debootstrap).
    workspace_image: str = "forgeline/workspace:bookworm-2"
    debian_mirror: str | None = None  # default: the first Debian mirror in apt's sources
    workspace_cpus: float = Field(default=2.0, gt=0)
    workspace_memory_mb: int = Field(default=2048, ge=64)
    workspace_pids: int = Field(default=512, ge=16)
    workspace_network: bool = False
    max_attempts: int = Field(default=3, ge=1, le=20)
    # Scheduling (docs/architecture.md, "Scheduling"): runs started at once across every
    # worker (0: no limit beyond each worker's slots), and the label whose values share
    # the workers round robin within a priority ("": first come, first served).
    global_slots: int = Field(default=0, ge=0, le=100_000)
    fairness_label: str = Field(default="project", max_length=63)
    # A run whose worker died: "retry" (requeue, up to max_attempts) or "fail" (worker_lost).
    lost_run_policy: Literal["retry", "fail"] = "retry"
    # Runs handed back because the workspace engine failed: how many times, first wait.
    infra_retries: int = Field(default=5, ge=0, le=100)
    infra_backoff_s: float = Field(default=2.0, ge=0.0, le=3600.0)
    # Engine failures in a row that pause provisioning, and how often it is probed then.
    engine_breaker_threshold: int = Field(default=3, ge=1, le=1000)
    engine_probe_interval_s: float = Field(default=5.0, ge=0.1, le=600.0)
    patch_max_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # A run whose worker stops heartbeating for this long is recovered by another worker.
    run_ack_wait_s: float = Field(default=15.0, ge=3.0, le=600.0)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # This process's own /metrics on this port (FORGELINE_HOST), for workers, relays and
    # projectors running without a gateway (forgeline/process_metrics.py); unset: none.
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    log_level: str = "INFO"

    # API keys (docs/operations.md, "Security"). An admin key made at start-up unless it is one
    # already (automation, compose); unset, the first start makes one and prints it once.
    admin_key: SecretStr | None = None
    # Per API key, in each gateway process: `burst` at once, then so many a minute (0: off).
    rate_limit_per_min: int = Field(default=1200, ge=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    # A key found valid is not looked up in Postgres again for so long, in each gateway
    # process (0: every request): revoked elsewhere, it keeps working that long there.
    api_key_cache_s: float = Field(default=2.0, ge=0.0, le=60.0)
    # Browser origins allowed to call the API (CORS), comma-separated; none by default.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # The LLM proxy (docs/llm-proxy.md): the providers LLM agents' calls go to, with the real
    # keys (secrets: never logged, never recorded). A provider without a key is not offered.
    llm_openai_base_url: str = "https://api.openai.com/v1"
    llm_openai_api_key: SecretStr | None = None
    llm_anthropic_base_url: str = "https://api.anthropic.com"
    llm_anthropic_api_key: SecretStr | None = None
    # USD per million tokens [input, output] by model-name prefix (JSON); default: a table of
    # public list prices. Models not in it cost llm_fallback_price.
    llm_prices: dict[str, tuple[float, float]] | None = None
    llm_fallback_price: tuple[float, float] = (15.0, 75.0)
    # Where the proxy listens for local workspaces (Docker workspaces use a unix socket).
    llm_proxy_host: str = "127.0.0.1"
    llm_proxy_port: int = Field(default=0, ge=0, le=65535)  # 0: a free port
    # Where the proxy's unix socket folder for Docker workspaces is made (one subfolder per
    # worker); the engine bind-mounts it, so a worker in a container needs it at the same path
    # on the host (docker-compose.yml). Default: a fresh folder under /tmp.
    llm_proxy_socket_dir: Path | None = None

    # Client commands (submit, status, logs, ...) talk HTTP to this gateway.
    url: str = "http://127.0.0.1:8080"
    api_key: SecretStr | None = None

    # Encryption at rest of event payloads (AES-GCM): a base64 key of 16, 24 or 32 bytes, the
    # same in every process of a deployment, set from the first start (docs/events.md).
    cipher_key: SecretStr | None = None

    @field_validator("cipher_key")
    @classmethod
    def _cipher_key_usable(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None  # FORGELINE_CIPHER_KEY="" means no encryption
        check_cipher_key(value.get_secret_value())
        return value

    @field_validator("admin_key")
    @classmethod
    def _admin_key_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        secret = value.get_secret_value()
        printable = all("!" <= char <= "~" for char in secret)  # what a Bearer header carries
        if not MIN_ADMIN_KEY_CHARS <= len(secret) <= 512 or not printable:
            raise ValueError(
                f"the admin key must be {MIN_ADMIN_KEY_CHARS} to 512 printable ASCII characters"
                " without spaces, and random (make one with: openssl rand -base64 32)"
            )
        return value

    @model_validator(mode="after")
    def _a_slot_for_every_worker_process(self) -> Settings:
        if self.worker_processes > self.worker_slots:
            raise ValueError(
                f"FORGELINE_WORKER_PROCESSES ({self.worker_processes}) is more than"
                f" FORGELINE_WORKER_SLOTS ({self.worker_slots}): every worker process needs a"
                " slot; raise the slots or lower the processes"
            )
        return self

    @field_validator("metrics_port", mode="before")
    @classmethod
    def _empty_port_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_from_a_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @property
    def workspaces_dir(self) -> Path:
        return self.data_dir / "workspaces"


MIN_ADMIN_KEY_CHARS = 24
CIPHER_KEY_ENV = "FORGELINE_CIPHER_KEY"
CIPHER_TOPIC = "eventsourcing.cryptography:AESCipher"  # AES-GCM, from the cryptography package


def check_cipher_key(key: str) -> None:
    """Raises ValueError (never showing the key) unless key is base64 of 16, 24 or 32 bytes."""
    try:
        raw = base64.b64decode(key.encode(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) not in (16, 24, 32):
        raise ValueError(
            "the cipher key must be base64 of 16, 24 or 32 random bytes "
            "(make one with: openssl rand -base64 32)"
        )


def eventsourcing_env(database_url: str, cipher_key: SecretStr | None = None) -> dict[str, str]:
    """The eventsourcing library's settings for a Postgres URL (socket dirs included).

    With a cipher key (default: FORGELINE_CIPHER_KEY from the environment), every event's
    state is encrypted before it is stored and decrypted when it is read.
    """
    from psycopg.conninfo import conninfo_to_dict  # servers only: keeps client commands quick

    params = conninfo_to_dict(database_url)
    env = {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        # The library's recorder, inserting in binary (forgeline/store_recorder.py).
        "APPLICATION_RECORDER_TOPIC": "forgeline.store_recorder:BinaryInsertRecorder",
        "POSTGRES_DBNAME": str(params.get("dbname") or "forgeline"),
        "POSTGRES_HOST": str(params.get("host") or "127.0.0.1"),
        "POSTGRES_PORT": str(params.get("port") or "5432"),
        "POSTGRES_USER": str(params.get("user") or "postgres"),
        "POSTGRES_PASSWORD": str(params.get("password") or ""),
        "CREATE_TABLE": "true",
        # Writers queue on a table lock: give up after a while instead of hanging forever.
        "POSTGRES_LOCK_TIMEOUT": "10",
        "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": "15",
        "POSTGRES_POOL_SIZE": "5",
        "POSTGRES_MAX_OVERFLOW": "10",
        # Connections are checked when one fails, not before each use: forgeline/store_recorder.py.
        "POSTGRES_PRE_PING": "n",
    }
    key = cipher_key.get_secret_value() if cipher_key else os.environ.get(CIPHER_KEY_ENV, "")
    if key:
        check_cipher_key(key)
        env["CIPHER_TOPIC"] = CIPHER_TOPIC
        env["CIPHER_KEY"] = key
    return env
