"""Worker and stack settings: one pydantic model, built once in ``main()`` and passed down."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, Field


class Pool(StrEnum):
    """Worker pools, one per task queue (``all`` runs the three in one process)."""

    WORKFLOWS = "workflows"
    STEPS = "steps"
    TELEMETRY = "telemetry"
    ALL = "all"


class WorkerSettings(BaseModel):
    temporal_address: str = "127.0.0.1:7233"
    namespace: str = "default"
    pool: Pool = Pool.ALL
    data_dir: Path = Path(".runslot")
    max_concurrent_steps: int = Field(default=4, ge=1)
    """Steps one worker runs at once: size it to the host (each dbt step is a process)."""
    step_activities_per_second: float | None = Field(default=20.0, gt=0)
    """Task-queue-wide rate limit on prep/step starts, so a backlog cannot stampede."""
    max_cached_workflows: int = Field(default=1000, ge=0)
    graceful_shutdown_seconds: float = Field(default=30.0, ge=0)

    @property
    def workspace_root(self) -> Path:
        return self.data_dir / "workspaces"
