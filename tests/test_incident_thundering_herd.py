"""Thundering herd after an outage (issue 5, item 6; both dbt Cloud incidents' recovery).

200 scheduled jobs whose workers were down for 10 cron periods: each job's workflow is
started with the state it carries after such an outage (its last fire 10 ticks back, as in
tests/test_timers.py), on task queues no worker polls yet. Then the workers start, and the
whole herd is due at once. It must come back smoothly: each job runs once (one fire however
many ticks were missed), prep starts stay under the step queue's rate limit, and the
account's slots bound how many runs execute at once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.store import RunStore
from starter import jobs
from tests.builders import account, job, wait_for
from tests.conftest import fresh_queues, unique
from tests.fakes import FakeDbtExecutor
from tests.incident_helpers import (
    Figures,
    SlotSampler,
    duplicates,
    hourly_cron_far_from,
    server_now,
    start_job_with_state,
    workers,
)
from workflows import policy
from workflows.models import CronSchedule, JobState, JobTriggers, RunStatus, TriggerCause

pytestmark = [pytest.mark.incident, pytest.mark.devserver, pytest.mark.slow]

JOBS = 200
MISSED_TICKS = 10
CAPACITY = 16
"""The account's run slots: fewer than RATE, so the bucket's first burst cannot be all preps."""
STEP_QUEUE_KINDS = ("prepare", "step")
"""The executor calls that are step-queue activities here: every run succeeds, so its last
(only) step removes the workspace inside its own activity and no ``cleanup_run`` runs."""
RATE = 20.0
"""Step-queue activities per second (``build_workers(step_activities_per_second=...)``):
prep and step of every run share it (2 per run here)."""
JITTER = 2
"""Starts are timed where the fake executor sees them, on the worker, not where the server
dispatches them: a start at the edge of a window can be late by the poll's latency and land
in the next one. Two such starts per window are allowed."""


def max_in_window(times: list[float], window: float) -> int:
    """The most events in any half-open window of ``window`` seconds."""
    times = sorted(times)
    best, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


async def test_after_an_outage_each_job_runs_once_at_the_prep_rate_within_the_slots(
    dev_env: WorkflowEnvironment,
    fake_dbt: FakeDbtExecutor,
    run_store: RunStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client, acct = dev_env.client, unique("herd")
    settings = account(acct, run_slots=CAPACITY)
    run_store.upsert_account(settings)
    now = server_now()
    cron = hourly_cron_far_from(now)
    last_fire = now - timedelta(hours=MISSED_TICKS)
    missed = 0
    at = last_fire
    while (at := policy.next_cron_fire(cron, "UTC", at)) <= now:
        missed += 1
    assert missed == MISSED_TICKS
    queues = fresh_queues()
    started = time.monotonic()
    keys = [f"j{i:03d}" for i in range(JOBS)]
    # Workers are down: the job workflows exist, every one of them overdue, none can move.
    for batch in range(0, JOBS, 50):
        await asyncio.gather(
            *(
                start_job_with_state(
                    client,
                    job(
                        acct,
                        key,
                        ["dbt run -s sleep:1"],
                        triggers=JobTriggers(schedule=CronSchedule(cron=cron)),
                    ),
                    settings,
                    queues,
                    JobState(last_cron_fire=last_fire),
                )
                for key in keys[batch : batch + 50]
            )
        )
    await asyncio.sleep(1)
    assert fake_dbt.calls == []
    async with (
        workers(client, fake_dbt, store=run_store, queues=queues, step_activities_per_second=RATE),
        SlotSampler(client, acct) as slots,
    ):
        recovery = time.monotonic()

        def finished() -> int:
            page = run_store.list_runs(acct, limit=1000)
            return sum(r.status.is_finished for r in page.items)

        await wait_for(lambda: finished() >= JOBS, timeout=120, interval=0.5, what="the herd")
        done = time.monotonic()
        await asyncio.sleep(2)  # anything extra (a second fire of a job) would show by now
        descriptions = await asyncio.gather(*(jobs.describe_job(client, acct, k) for k in keys))
    runs = run_store.list_runs(acct, limit=1000).items
    preps = [call.loop_time for call in fake_dbt.calls if call.kind == "prepare"]
    starts = [call.loop_time for call in fake_dbt.calls if call.kind in STEP_QUEUE_KINDS]
    per_job = {
        k: len(d.state.recent) + len(d.state.queue) + len(d.state.in_flight)
        for k, d in zip(keys, descriptions, strict=True)
    }
    figures = Figures(
        "thundering-herd",
        runs=sum(r.status == RunStatus.SUCCESS for r in runs),
        faults=JOBS * MISSED_TICKS,
        lost=JOBS - sum(r.status == RunStatus.SUCCESS for r in runs),
        duplicates=duplicates(fake_dbt.started_runs()) + sum(n - 1 for n in per_job.values()),
        max_slot_overrun=max(slots.overrun(CAPACITY), fake_dbt.max_running - CAPACITY, 0),
        notes={
            "jobs": JOBS,
            "missed_ticks_per_job": MISSED_TICKS,
            "capacity": CAPACITY,
            "max_slots_in_use": slots.max_in_use,
            "max_concurrent_steps": fake_dbt.max_running,
            "rate_limit": RATE,
            "max_preps_1s": max_in_window(preps, 1.0),
            "max_preps_5s": max_in_window(preps, 5.0),
            "max_step_queue_starts_1s": max_in_window(starts, 1.0),
            "max_step_queue_starts_5s": max_in_window(starts, 5.0),
            "recovery_s": round(done - recovery, 1),
            "setup_s": round(recovery - started, 1),
        },
    )
    figures.report(capsys)
    assert len(runs) == JOBS and sorted(r.job_key for r in runs) == keys
    assert all(r.cause == TriggerCause.SCHEDULED for r in runs)
    assert all(n == 1 for n in per_job.values()), "missed ticks fire once, never a burst"
    assert all(d.next_cron_fire is not None and d.next_cron_fire > now for d in descriptions)
    assert len(preps) == JOBS
    # The step queue's limiter is a token bucket holding one second of tokens (Temporal's
    # matching: burst = rate x 1 s). Whatever the window, starts stay within its envelope.
    for window in (1.0, 5.0, 10.0):
        assert max_in_window(starts, window) <= RATE * window + RATE + JITTER, window
    # Preps alone stay under the rate itself. The bucket's burst is spent when the workers
    # start, on at most CAPACITY preps (a prep needs a slot, and no slot frees before a
    # run's 1-second step has ended); from then on the backlog keeps the bucket empty, and
    # each run takes 4 of its RATE tokens a second.
    assert CAPACITY < RATE
    assert max_in_window(preps, 1.0) <= RATE + JITTER
