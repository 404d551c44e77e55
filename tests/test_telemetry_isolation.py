"""Post-run telemetry can neither fail a run nor hold its slot (dbt Cloud, February 2026)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.telemetry import TelemetryQueue
from starter import jobs
from tests.builders import account, job, wait_for, wait_run
from tests.conftest import running_stack, unique
from tests.fakes import FakeDbtExecutor
from workflows import constants as c
from workflows.models import RunResult, RunStatus, TelemetryEvent, TriggerCause, TriggerRequest

pytestmark = pytest.mark.devserver


class RaisingSink:
    def __init__(self) -> None:
        self.attempts = 0

    async def emit(self, event: TelemetryEvent) -> None:
        self.attempts += 1
        raise RuntimeError("telemetry backend is down")


class HangingSink:
    """Never returns: the infinite recursion of the February 2026 incident, as a hang."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def emit(self, event: TelemetryEvent) -> None:
        self.started.set()
        await asyncio.Event().wait()


async def test_failing_telemetry_leaves_the_run_successful_with_bounded_attempts(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("telraise")
    sink = RaisingSink()
    async with running_stack(client, fake_dbt, telemetry=sink) as queues:
        await jobs.save_job(client, job(acct, "j"), account(acct), queues)
        runs = [await jobs.trigger(client, acct, "j", TriggerRequest()) for _ in range(3)]
        results = [await wait_run(client, acct, r.run_id, timeout=60) for r in runs]
    assert [r.status for r in results] == [RunStatus.SUCCESS] * 3
    assert sink.attempts == 3 * 2, "two attempts per run (TELEMETRY_RETRY), never more"


@pytest.mark.slow
async def test_hung_telemetry_never_holds_a_slot_and_the_next_run_starts_at_once(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("telhang")
    sink = HangingSink()
    async with running_stack(client, fake_dbt, telemetry=sink) as queues:
        await jobs.save_job(client, job(acct, "j"), account(acct, run_slots=1), queues)
        first = await jobs.trigger(client, acct, "j", TriggerRequest())
        await asyncio.wait_for(sink.started.wait(), 30)
        # Telemetry of the first run is hung; its slot is already free and the job moved on.
        slots = await jobs.describe_slots(client, acct)
        assert slots.holders == []
        second = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_for(lambda: second.run_id in fake_dbt.started_runs(), timeout=10,
                       what="second run starts while telemetry hangs")  # fmt: skip
        desc = await jobs.describe_job(client, acct, "j")
        assert desc.state.recent[0].status == RunStatus.SUCCESS
        # The run workflow itself ends once telemetry times out (2 attempts of 10 s).
        result = await wait_run(client, acct, first.run_id, timeout=60)
        await wait_run(client, acct, second.run_id, timeout=60)
    assert result.status == RunStatus.SUCCESS


class CountingHangingSink:
    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0

    async def emit(self, event: TelemetryEvent) -> None:
        self.calls += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def _event(run_id: str) -> TelemetryEvent:
    return TelemetryEvent(
        run=RunResult(
            run_id=run_id, account_id="a", job_id="j", status=RunStatus.SUCCESS,
            cause=TriggerCause.API, created_at=datetime(2026, 3, 1, tzinfo=UTC),
        )
    )  # fmt: skip


async def test_the_telemetry_queue_never_waits_drops_what_does_not_fit_and_bounds_each_emit() -> (
    None
):
    """What a run's report hands its telemetry to: ``submit`` returns at once, a full queue
    drops (and counts) instead of growing, and every hung emit is cut at its timeout, at
    most ``attempts`` times, ``concurrency`` at a time."""
    sink = CountingHangingSink()
    queue = TelemetryQueue(sink, capacity=3, concurrency=2, timeout=0.2, retry_after=0.05)
    accepted = [queue.submit(_event(str(i))) for i in range(10)]
    assert accepted == [True] * 3 + [False] * 7
    assert queue.dropped == 7
    await queue.aclose(within=10)
    assert sink.calls == 3 * c.TELEMETRY_RETRY.maximum_attempts
    assert sink.cancelled == sink.calls
    assert queue.failed == 3
