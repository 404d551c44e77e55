"""Post-run telemetry can neither fail a run nor hold its slot (dbt Cloud, February 2026)."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.testing import WorkflowEnvironment

from starter import jobs
from tests.builders import account, job, wait_for, wait_run
from tests.conftest import running_stack, unique
from tests.fakes import FakeDbtExecutor
from workflows.models import RunStatus, TelemetryEvent, TriggerRequest

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
