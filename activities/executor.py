"""The executor interface and the activities that drive it.

An executor prepares a run's environment, runs its dbt steps, collects artifacts and cleans
up. Two implementations share this interface: ``local`` (subprocesses, the embedded
default) and, later, ``k8s`` (a pod per run). The activities below are the only callers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from temporalio import activity

from workflows.errors import run_timed_out
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

T = TypeVar("T")
log = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""Called with a line of output, or a short note, whenever the step makes progress."""


class Executor(Protocol):
    """Where dbt runs. Errors are raised as ``ApplicationError`` from ``workflows.errors``."""

    async def prepare(self, request: PrepareInput) -> PreparedRun: ...

    async def run_step(self, request: StepInput, progress: Progress) -> StepOutcome: ...

    async def collect_artifacts(self, request: ArtifactsInput) -> ArtifactsResult: ...

    async def cleanup(self, request: CleanupInput) -> None: ...

    async def drop_schema(self, request: DropSchemaInput) -> None: ...


HEARTBEAT_EVERY = 1.0
"""Seconds between liveness heartbeats while a step runs without printing anything."""


class ExecutorActivities:
    """Temporal activities over an ``Executor``. Names are pinned: they are in histories."""

    def __init__(self, executor: Executor) -> None:
        self._executor = executor

    @activity.defn(name="prepare_run")
    async def prepare_run(self, request: PrepareInput) -> PreparedRun:
        return await self._with_heartbeats(self._executor.prepare(request))

    @activity.defn(name="run_step")
    async def run_step(self, request: StepInput) -> StepOutcome:
        lines = 0

        def progress(line: str) -> None:
            nonlocal lines
            lines += 1

        # Heartbeats say the worker is alive (a dead one times out on STEP_HEARTBEAT_TIMEOUT)
        # and carry progress as a line count, never output text: heartbeat details reach
        # history on a timeout, and dbt output can hold a DSN or a password. A hung dbt
        # process is bounded by the run timeout, which the executor also enforces.
        outcome = await self._with_heartbeats(
            _until_deadline(self._executor.run_step(request, progress), request),
            lambda: f"{lines} lines of output",
        )
        if request.cleanup_after:
            cleanup = CleanupInput(
                account_id=request.account_id, run_id=request.run_id, workspace=request.workspace
            )
            try:
                await self._with_heartbeats(self._executor.cleanup(cleanup))
            except Exception:  # the step succeeded: the run's own cleanup_run tries again
                log.warning("cleanup after %s's last step failed", request.run_id, exc_info=True)
            else:
                outcome = outcome.model_copy(update={"cleaned_up": True})
        return outcome

    @activity.defn(name="collect_artifacts")
    async def collect_artifacts(self, request: ArtifactsInput) -> ArtifactsResult:
        return await self._with_heartbeats(self._executor.collect_artifacts(request))

    @activity.defn(name="cleanup_run")
    async def cleanup_run(self, request: CleanupInput) -> None:
        await self._with_heartbeats(self._executor.cleanup(request))

    @activity.defn(name="drop_ci_schema")
    async def drop_ci_schema(self, request: DropSchemaInput) -> None:
        await self._with_heartbeats(self._executor.drop_schema(request))

    @staticmethod
    async def _with_heartbeats(work: Awaitable[T], details: Callable[[], str] = lambda: "") -> T:
        """Heartbeat while ``work`` runs so cancellation and a dead worker are noticed."""

        async def beat() -> None:
            while True:
                activity.heartbeat(details())
                await asyncio.sleep(HEARTBEAT_EVERY)

        ticker = asyncio.create_task(beat())
        try:
            return await work
        finally:
            ticker.cancel()


async def _until_deadline(work: Awaitable[T], request: StepInput) -> T:
    """Run ``work`` until the run's deadline, if it has one; then cancel it (the executor
    kills the step's process on cancellation) and fail with ``RunTimeout``.

    Enforced here, around every executor, rather than by a timer in the run workflow: the
    step's activity is what runs at the deadline, and a timer costs the run two events.
    """
    if request.deadline is None:
        return await work
    remaining = (request.deadline - datetime.now(UTC)).total_seconds()
    try:
        return await asyncio.wait_for(work, timeout=max(remaining, 0.0))
    except TimeoutError:
        raise run_timed_out(
            f"step {request.index} stopped at the run's deadline ({request.deadline:%H:%M:%S} UTC)"
        ) from None
