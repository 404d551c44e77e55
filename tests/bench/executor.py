"""A no-op executor (``activities.executor.Executor``): dbt that costs nothing.

Prep returns at once, a step starts no process and succeeds (after ``step_seconds`` of
sleep, for the slot-contention scenario), so what the benchmark measures is Runslot and
Temporal alone. Every call is logged with ``time.time()`` to the event log.
"""

from __future__ import annotations

import asyncio
import time

from activities.executor import Progress
from tests.bench.events import EventWriter
from workflows.models import (
    ArtifactsInput,
    ArtifactsResult,
    CleanupInput,
    DropSchemaInput,
    PreparedRun,
    PrepareInput,
    StepInput,
    StepOutcome,
)


class NoopExecutor:
    def __init__(self, events: EventWriter, step_seconds: float = 0.0) -> None:
        self.events = events
        self.step_seconds = step_seconds

    async def prepare(self, request: PrepareInput) -> PreparedRun:
        self.events.write(request.run_id, "prepare", time.time())
        return PreparedRun(workspace=f"/noop/{request.account_id}/{request.run_id}")

    async def run_step(self, request: StepInput, progress: Progress) -> StepOutcome:
        self.events.write(request.run_id, "step", time.time())
        if self.step_seconds > 0:
            await asyncio.sleep(self.step_seconds)
        self.events.write(request.run_id, "step_end", time.time())
        return StepOutcome(exit_code=0)

    async def collect_artifacts(self, request: ArtifactsInput) -> ArtifactsResult:
        self.events.write(request.run_id, "artifacts", time.time())
        return ArtifactsResult()

    async def cleanup(self, request: CleanupInput) -> None:
        self.events.write(request.run_id, "cleanup", time.time())

    async def drop_schema(self, request: DropSchemaInput) -> None:
        return None
