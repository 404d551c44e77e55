"""Worker and stack settings: one pydantic model, built once in ``main()`` and passed down."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from worker.logging import LogLevel


class Pool(StrEnum):
    """Worker pools, one per task queue (``all`` runs the three in one process)."""

    WORKFLOWS = "workflows"
    STEPS = "steps"
    TELEMETRY = "telemetry"
    ALL = "all"


POOLS = (Pool.WORKFLOWS, Pool.STEPS, Pool.TELEMETRY)
"""The pools a stack runs, one worker process each (``all`` is their union)."""

TelemetryExporter = Literal["log", "console", "otlp"]

STORE_FILE = "runslot.db"
"""The default run store: a SQLite file in the data directory."""


class WorkerSettings(BaseModel):
    temporal_address: str = "127.0.0.1:7233"
    namespace: str = "default"
    pool: Pool = Pool.ALL
    data_dir: Path = Path(".runslot")
    store_url: str | None = None
    """The run store's database URL (``sqlite:///path`` or ``postgresql+psycopg://...``);
    unset: the SQLite file ``runslot.db`` in ``data_dir``. Only the workflow pool uses it."""
    secrets_file: Path | None = None
    """A JSON or YAML mapping of secret name to value that steps' profiles may reference
    as ``{{ secret('NAME') }}`` (``RUNSLOT_SECRET_NAME`` variables work too)."""
    max_concurrent_steps: int = Field(default=4, ge=1)
    """Steps one worker runs at once: size it to the host (each dbt step is a process)."""
    step_activities_per_second: float | None = Field(default=20.0, gt=0)
    """Task-queue-wide rate limit on prep/step starts, so a backlog cannot stampede."""
    max_cached_workflows: int = Field(default=1000, ge=0)
    graceful_shutdown_seconds: float = Field(default=30.0, ge=0)
    connect_timeout_seconds: float = Field(default=30.0, ge=0)
    """How long to keep retrying the first connection (the server may still be starting)."""
    log_level: LogLevel = LogLevel.INFO
    parent_pid: int | None = None
    """Stop when this process is gone: set by ``runslot dev`` so a killed stack leaves no
    orphan workers behind."""
    telemetry_exporter: TelemetryExporter = "log"
    """Where the telemetry pool sends each finished run: ``log`` (one log line), ``console``
    (OpenTelemetry spans and metrics on stdout) or ``otlp`` (OTLP/HTTP to a collector)."""
    otlp_endpoint: str | None = None
    """The collector's base URL for ``otlp`` (``http://collector:4318``; ``/v1/traces`` and
    ``/v1/metrics`` are appended). Unset: OTEL_EXPORTER_OTLP_ENDPOINT, else localhost:4318."""
    telemetry_export_interval_seconds: float = Field(default=60.0, ge=1.0)
    """How often OpenTelemetry metrics are exported, and the live gauges (queue depth, slots
    in use) refreshed from Temporal."""

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and (
            not value.startswith(("http://", "https://")) or any(ch.isspace() for ch in value)
        ):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _otlp_endpoint_needs_otlp(self) -> WorkerSettings:
        if self.otlp_endpoint is not None and self.telemetry_exporter != "otlp":
            raise ValueError("otlp_endpoint is set: also set telemetry_exporter to 'otlp'")
        return self

    @property
    def store_database_url(self) -> str:
        return self.store_url or f"sqlite:///{(self.data_dir / STORE_FILE).resolve()}"

    @property
    def workspace_root(self) -> Path:
        return self.data_dir / "workspaces"

    @property
    def pool_names(self) -> tuple[str, ...]:
        """The pools this worker serves, as ``build_workers(which=...)`` names them."""
        pools = POOLS if self.pool == Pool.ALL else (self.pool,)
        return tuple(p.value for p in pools)
