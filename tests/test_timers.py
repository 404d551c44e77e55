"""Rules 1 and 9: cron, missed ticks, queue and run timeouts.

Cron and queue waits run on the time-skipping server, where hours of timers pass in
milliseconds; the run timeout needs a step that really runs, so it uses the dev server.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from starter import jobs
from tests.builders import account, job, skip_time, wait_for, wait_run
from tests.conftest import running_stack, unique
from tests.fakes import FakeDbtExecutor
from workflows import constants as c
from workflows import policy
from workflows.job import JobWorkflow, job_search_attributes
from workflows.models import (
    CronSchedule,
    FinishedRun,
    JobState,
    JobTriggers,
    JobWorkflowInput,
    RunStatus,
    TriggerCause,
    TriggerRequest,
)


def _every(cron: str, tz: str = "UTC") -> JobTriggers:
    return JobTriggers(schedule=CronSchedule(cron=cron, timezone=tz))


async def _recent(client: Client, acct: str, job_id: str = "j") -> list[FinishedRun]:
    return (await jobs.describe_job(client, acct, job_id)).state.recent


async def test_cron_job_runs_on_each_tick(
    ts_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = ts_env.client, unique("cron")
    async with running_stack(client, fake_dbt) as queues:
        start = await ts_env.get_current_time()
        await jobs.save_job(
            client, job(acct, "j", triggers=_every("*/15 * * * *")), account(acct), queues
        )
        await skip_time(ts_env, timedelta(hours=1, minutes=1))
        end = await ts_env.get_current_time()
        ticks = _ticks("*/15 * * * *", start, end)
        runs = await wait_for(lambda: _n_recent(client, acct, len(ticks)), what="cron runs")
        await asyncio.sleep(0.5)
        runs = await _recent(client, acct)
        fired = await _describe_dedupe(client, acct)
    assert len(ticks) in (4, 5)  # an hour and a minute holds 4 or 5 quarter-hour ticks
    assert len(runs) == len(ticks)
    assert all(r.cause == TriggerCause.SCHEDULED and r.status == RunStatus.SUCCESS for r in runs)
    assert sorted(fired) == sorted(f"cron:{t.isoformat()}" for t in ticks)


def _ticks(cron: str, start: datetime, end: datetime) -> list[datetime]:
    ticks, at = [], start
    while (at := policy.next_cron_fire(cron, "UTC", at)) <= end:
        ticks.append(at)
    return ticks


async def _describe_dedupe(client: Client, acct: str) -> list[str]:
    state = (await jobs.describe_job(client, acct, "j")).state
    return [key for key in state.dedupe if key.startswith("cron:")]


async def _n_recent(client: Client, acct: str, n: int) -> list[FinishedRun] | None:
    runs = await _recent(client, acct)
    return runs if len(runs) >= n else None


@pytest.mark.devserver
async def test_ticks_missed_while_workers_were_down_fire_once_not_as_a_burst(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    """After an outage a job workflow wakes long after its tick, its state saying the last
    fire was long ago. We start it in exactly that state (last fire 5 days back, 5 daily
    ticks missed): the real workflow must fire once, then wait for the next tick.
    (The time-skipping server cannot model "workers down": a pending task freezes its clock.)
    """
    client, acct = dev_env.client, unique("missed")
    definition = job(acct, "j", triggers=_every("0 3 * * *"))
    now = await _server_now(client)
    state = JobState(last_cron_fire=now - timedelta(days=5))
    async with running_stack(client, fake_dbt) as queues:
        inp = JobWorkflowInput(job=definition, account=account(acct), state=state, queues=queues)
        await client.start_workflow(
            JobWorkflow.run, inp, id=c.job_workflow_id(acct, "j"), task_queue=queues.workflows,
            search_attributes=job_search_attributes(inp),
        )  # fmt: skip
        runs = await wait_for(lambda: _n_recent(client, acct, 1), what="the catch-up run")
        await asyncio.sleep(2)
        desc = await jobs.describe_job(client, acct, "j")
    assert len(desc.state.recent) == 1, "missed ticks fire once on recovery, never a burst"
    assert runs[0].cause == TriggerCause.SCHEDULED and runs[0].status == RunStatus.SUCCESS
    assert desc.state.queue == [] and desc.state.in_flight == []
    assert desc.next_cron_fire is not None and desc.next_cron_fire > now


async def _server_now(client: Client) -> datetime:
    del client  # the dev server shares this machine's clock
    return datetime.now(UTC)


@pytest.mark.devserver
async def test_a_run_waiting_longer_than_the_max_queue_wait_is_cancelled_with_the_wait(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    # On the dev server with a short wait: the time-skipping server sometimes drops its
    # sleep RPC when the run, the job and the slots workflow all wake on the same instant.
    client, acct = dev_env.client, unique("qwait")
    # No slots at all: the first run waits for a slot, the second waits behind the first.
    settings = account(acct, run_slots=0, max_queue_wait=timedelta(seconds=3))
    async with running_stack(client, fake_dbt) as queues:
        await jobs.save_job(client, job(acct, "j"), settings, queues)
        waiting_for_slot = await jobs.trigger(client, acct, "j", TriggerRequest())
        waiting_in_job = await jobs.trigger(client, acct, "j", TriggerRequest())
        result = await wait_run(client, acct, waiting_for_slot.run_id, timeout=20)
        recent = await wait_for(lambda: _n_recent(client, acct, 2), what="both cancelled")
    assert result.status == RunStatus.CANCELLED
    assert re.search(r"Cancelled after waiting [34]s in the queue", result.status_message)
    assert "maximum queue wait of 3s" in result.status_message
    second = next(r for r in recent if r.run_id == waiting_in_job.run_id)
    assert second.status == RunStatus.CANCELLED and "maximum queue wait" in second.message
    assert fake_dbt.started_runs() == []


@pytest.mark.devserver
async def test_a_run_over_its_timeout_is_stopped_and_ends_in_error(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("timeout")
    async with running_stack(client, fake_dbt) as queues:
        await jobs.save_job(
            client,
            job(acct, "j", ["dbt run -s sleep:120"], timeout_seconds=2),
            account(acct),
            queues,
        )
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        result = await wait_run(client, acct, res.run_id, timeout=30)
        slots = await jobs.describe_slots(client, acct)
    assert result.status == RunStatus.ERROR
    assert result.status_message.startswith("This run timed out after running for 2s")
    assert fake_dbt.cancelled_steps == [res.run_id]
    assert slots.holders == []
