"""Helpers of the in-process incident replays (issue 5, items 1, 2, 3, 6 and 8).

* ``Figures``: what each replay reports (runs pushed through, faults injected, runs lost,
  duplicates, maximum slot overrun); the last three must be 0.
* ``workers``: real workers of every pool on fresh task queues, like ``running_stack``, with
  the step queue's rate limit and the worker sizes a replay needs.
* ``SlotSampler``: samples ``slots:{account}`` while a replay runs (holders, waiters).
* ``start_job_with_state``: a job workflow started with carried ``JobState``, which is what a
  job sees after an outage (tests/test_timers.py, "missed ticks fire once").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.executor import Executor
from activities.store import RunStore
from activities.telemetry import LogSink, TelemetryQueue, TelemetrySink
from starter import jobs
from tests.conftest import fresh_queues
from worker.registry import Pools, build_workers
from workflows import constants as c
from workflows.job import JobWorkflow, job_search_attributes
from workflows.models import (
    AccountSettings,
    JobDefinition,
    JobState,
    JobWorkflowInput,
    TaskQueues,
)

# --------------------------------------------------------------------------- figures


@dataclass
class Figures:
    """One replay's figures, as the docs table shows them."""

    scenario: str
    runs: int = 0
    """Runs pushed through (each reached a finished status)."""
    faults: int = 0
    """Faults injected (bad inputs, poison messages, hung or failing calls, ...)."""
    lost: int = 0
    """Runs that never reached a finished status, or whose status is not the expected one."""
    duplicates: int = 0
    """Runs executed (or stored) more than once, or more runs than triggers asked for."""
    max_slot_overrun: int = 0
    """Largest number of slot holders (or concurrent steps) above the account's capacity."""
    notes: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        notes = " ".join(f"{k}={v}" for k, v in self.notes.items())
        return (
            f"INCIDENT {self.scenario}: runs={self.runs} faults={self.faults} lost={self.lost} "
            f"duplicates={self.duplicates} max_slot_overrun={self.max_slot_overrun} {notes}"
        ).rstrip()

    def report(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Print the figures past pytest's capture (they are what the docs table shows),
        then hold the replay to account: nothing lost, nothing twice, no overrun."""
        with capsys.disabled():
            print(f"\n{self.line()}")
        assert (self.lost, self.duplicates, self.max_slot_overrun) == (0, 0, 0), self.line()


def duplicates(ids: Iterable[str]) -> int:
    """How many times ids repeat (0 when each appears once)."""
    return sum(n - 1 for n in Counter(ids).values() if n > 1)


def server_now() -> datetime:
    """The dev server shares this machine's clock."""
    return datetime.now(UTC)


def hourly_cron_far_from(now: datetime) -> str:
    """An hourly cron whose ticks are at least 25 minutes from ``now``: no real tick can fall
    inside a test, so every fire a test sees comes from the state it started a job with."""
    return f"{(now.minute + 30) % 60} * * * *"


# --------------------------------------------------------------------------- workers


@asynccontextmanager
async def workers(
    client: Client,
    executor: Executor,
    *,
    store: RunStore,
    queues: TaskQueues | None = None,
    telemetry: TelemetrySink | None = None,
    step_activities_per_second: float | None = None,
    max_concurrent_steps: int = 20,
) -> AsyncIterator[TaskQueues]:
    """Real workers of the three pools on ``queues`` (fresh ones by default)."""
    queues = queues or fresh_queues()
    async with AsyncExitStack() as stack:
        sink = telemetry or LogSink()
        queue = TelemetryQueue(sink)
        stack.push_async_callback(queue.aclose)  # after the workers stop
        for worker in build_workers(
            client,
            Pools(executor=executor, telemetry=sink, store=store, telemetry_queue=queue),
            queues=queues,
            max_concurrent_steps=max_concurrent_steps,
            step_activities_per_second=step_activities_per_second,
            graceful_shutdown_seconds=0.5,
        ):
            await stack.enter_async_context(worker)
        yield queues


async def start_job_with_state(
    client: Client,
    definition: JobDefinition,
    settings: AccountSettings,
    queues: TaskQueues,
    state: JobState,
) -> None:
    """Start a job's workflow as it is after an outage: with its carried state."""
    inp = JobWorkflowInput(job=definition, account=settings, state=state, queues=queues)
    await client.start_workflow(
        JobWorkflow.run,
        inp,
        id=c.job_workflow_id(definition.account_id, definition.job_id),
        task_queue=queues.workflows,
        search_attributes=job_search_attributes(inp),
    )


# --------------------------------------------------------------------------- slots


@dataclass(frozen=True)
class SlotSample:
    at: float
    """``time.monotonic()`` when the query was sent: the answer shows the workflow's state
    after everything delivered to it before then (a query waits for pending work)."""
    holders: tuple[str, ...]
    waiters: int
    capacity: int


class SlotSampler:
    """Samples ``slots:{account}`` every ``interval`` seconds while the block runs."""

    def __init__(self, client: Client, account_id: str, *, interval: float = 0.2) -> None:
        self.client, self.account_id, self.interval = client, account_id, interval
        self.samples: list[SlotSample] = []
        self.failed = 0
        """Samples that got no answer (a query timing out under load); not counted."""
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> SlotSample | None:
        """One sample now (None while the slots workflow does not exist yet)."""
        asked_at = time.monotonic()
        try:
            state = await jobs.describe_slots(self.client, self.account_id)
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return None
            raise
        found = SlotSample(
            at=asked_at,
            holders=tuple(h.request_id for h in state.holders),
            waiters=len(state.waiters),
            capacity=state.capacity,
        )
        self.samples.append(found)
        return found

    @property
    def max_in_use(self) -> int:
        return max((len(s.holders) for s in self.samples), default=0)

    def overrun(self, capacity: int) -> int:
        return max(0, self.max_in_use - capacity)

    async def _loop(self) -> None:
        while True:
            try:
                await self.sample()
            except RPCError:
                self.failed += 1
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> SlotSampler:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
