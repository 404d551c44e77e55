"""Worker and stack settings: one pydantic model, built once in ``main()`` and passed down."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field

from worker.logging import LogLevel


class Pool(StrEnum):
    """Worker pools, one per task queue (``all`` runs the three in one process)."""

    WORKFLOWS = "workflows"
    STEPS = "steps"
    TELEMETRY = "telemetry"
    ALL = "all"


POOLS = (Pool.WORKFLOWS, Pool.STEPS, Pool.TELEMETRY)
"""The pools a stack runs, one worker process each (``all`` is their union)."""


class WorkerSettings(BaseModel):
    temporal_address: str = "127.0.0.1:7233"
    namespace: str = "default"
    pool: Pool = Pool.ALL
    data_dir: Path = Path(".runslot")
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

    @property
    def workspace_root(self) -> Path:
        return self.data_dir / "workspaces"

    @property
    def pool_names(self) -> tuple[str, ...]:
        """The pools this worker serves, as ``build_workers(which=...)`` names them."""
        pools = POOLS if self.pool == Pool.ALL else (self.pool,)
        return tuple(p.value for p in pools)
