"""A faithful fake of the outside system behind the executor: dbt on a warehouse.

Only the executor boundary is faked (``activities.executor.Executor``); Temporal, the
workers and the workflows are real. Steps are driven by their argv so a test can say what
"dbt" does: ``dbt run -s ok`` succeeds at once, ``dbt run -s fail`` exits 1,
``dbt run -s gate:NAME`` blocks until the test opens gate NAME, ``dbt run -s sleep:SECONDS``
takes that long in real time. Cancellation behaves like a killed process: the step stops.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

from activities.executor import Progress
from workflows.errors import step_failed
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


@dataclass
class Call:
    kind: str
    run_id: str
    argv: list[str] = field(default_factory=list)
    loop_time: float = 0.0


class FakeDbtExecutor:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.gates: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.running: set[str] = set()
        self.max_running = 0
        self.dropped_schemas: list[str] = []
        self.cancelled_steps: list[str] = []
        self.prepared: dict[str, PrepareInput] = {}

    def open(self, name: str) -> None:
        self.gates[name].set()

    def steps_of(self, run_id: str) -> list[list[str]]:
        return [c.argv for c in self.calls if c.kind == "step" and c.run_id == run_id]

    def started_runs(self) -> list[str]:
        return [c.run_id for c in self.calls if c.kind == "prepare"]

    def _log(self, kind: str, run_id: str, argv: list[str] | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.calls.append(Call(kind, run_id, argv or [], loop.time()))

    async def prepare(self, request: PrepareInput) -> PreparedRun:
        self._log("prepare", request.run_id)
        self.prepared[request.run_id] = request
        return PreparedRun(workspace=f"/fake/{request.account_id}/{request.run_id}")

    async def run_step(self, request: StepInput, progress: Progress) -> StepOutcome:
        self._log("step", request.run_id, request.argv)
        selector = request.argv[request.argv.index("-s") + 1] if "-s" in request.argv else "ok"
        self.running.add(request.run_id)
        self.max_running = max(self.max_running, len(self.running))
        try:
            if selector.startswith("gate:"):
                await self.gates[selector.removeprefix("gate:")].wait()
            elif selector.startswith("sleep:"):
                await asyncio.sleep(float(selector.removeprefix("sleep:")))
            progress(f"ran {' '.join(request.argv)}")
        except asyncio.CancelledError:
            self.cancelled_steps.append(request.run_id)
            raise
        finally:
            self.running.discard(request.run_id)
            self._log("step_end", request.run_id, request.argv)
        if selector == "fail":
            raise step_failed("dbt exited with code 1", 1)
        return StepOutcome(exit_code=0)

    async def collect_artifacts(self, request: ArtifactsInput) -> ArtifactsResult:
        self._log("artifacts", request.run_id)
        return ArtifactsResult(files=["run_results.json"])

    async def cleanup(self, request: CleanupInput) -> None:
        self._log("cleanup", request.run_id)

    async def drop_schema(self, request: DropSchemaInput) -> None:
        self._log("drop_schema", request.schema_name)
        self.dropped_schemas.append(request.schema_name)
