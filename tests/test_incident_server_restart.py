"""Incident replay 5: the Temporal dev server restarts mid-load on the same SQLite file.

Runs of real dbt are queued and running (slots full, steps under way) when the server is
stopped, once with SIGTERM and once with SIGKILL, and started again on the same file and
port. The workers and the API reconnect by themselves; afterwards every run that was given
an id completes (Success, in the store and in Temporal), none is lost, and none is
duplicated: no run the test did not trigger, one attempt of each step, one row per run and
per step.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from activities.store import StoredRun
from starter import jobs
from tests.incident_stack import (
    ACCOUNT,
    IncidentStack,
    incident_stack,
    report,
    scheduled_activities,
    sleepy_step,
)
from workflows import constants as c
from workflows.models import RunResult, RunStatus


def _held(run: StoredRun) -> float:
    assert run.dequeued_at is not None and run.finished_at is not None
    return (run.finished_at - run.dequeued_at).total_seconds()


pytestmark = [pytest.mark.incident, pytest.mark.devserver, pytest.mark.slow]

JOBS = 4
"""Each on its own DuckDB file: two runs of the account execute at once."""
SLOTS = 2
WAVES = (5, 3)
"""Runs triggered before the first restart, and after it (before the second)."""
RESTARTS = (signal.SIGTERM, signal.SIGKILL)
SLEEP_SECONDS = 1.0


async def _mid_load(stack: IncidentStack, run_ids: list[int], done: int) -> dict[str, int]:
    """Wait until at least ``done`` runs have finished and a dbt step is under way while
    other runs queue; return the counts."""
    async with asyncio.timeout(90):
        while True:
            runs = [r for r in await stack.runs() if r.id in run_ids]
            counts = {
                status.humanized.lower(): sum(r.status == status for r in runs)
                for status in (RunStatus.QUEUED, RunStatus.STARTING, RunStatus.RUNNING)
            }
            counts["finished"] = sum(r.status.is_finished for r in runs)
            if counts["finished"] >= done and counts["running"] >= 1 and counts["queued"] >= 1:
                return counts
            await asyncio.sleep(0.1)


async def test_runs_queued_and_running_across_server_restarts_all_complete_once(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    environments = [f"e{n}" for n in range(JOBS)]
    async with incident_stack(tmp_path, run_slots=SLOTS, environments=environments) as stack:
        job_ids = [
            await stack.create_job(f"j{n}", [sleepy_step(SLEEP_SECONDS)], env)
            for n, env in enumerate(environments)
        ]
        triggered: list[int] = []
        at_restart: list[dict[str, int]] = []
        restarts: list[dict[str, float]] = []
        for wave, (size, sig) in enumerate(zip(WAVES, RESTARTS, strict=True)):
            for n in range(size):
                job_id = job_ids[(len(triggered)) % JOBS]
                triggered.append(await stack.trigger(job_id, f"incident 5: wave {wave} run {n}"))
            # The second restart waits for progress after the first: other runs in flight.
            at_restart.append(await _mid_load(stack, triggered, done=SLOTS * wave))
            restarts.append(await stack.restart_server(sig))

        finished = await stack.wait_finished(triggered, timeout=180)
        drained_after = time.monotonic() - started
        client = await stack.client()
        results = [
            await client.get_workflow_handle(
                c.run_workflow_id(ACCOUNT, str(run_id)), result_type=RunResult
            ).result()
            for run_id in triggered
        ]
        step_attempts = [
            await scheduled_activities(client, c.run_workflow_id(ACCOUNT, str(r)), "run_step")
            for r in triggered
        ]
        slots = await jobs.describe_slots(client, ACCOUNT)
        described = [await jobs.describe_job(client, ACCOUNT, f"j{n}") for n in range(JOBS)]
        runs = await stack.runs()
        duplicates = await stack.duplicate_rows()

    lost = [r for r in triggered if finished[r].status != RunStatus.SUCCESS]
    report(
        "5. Temporal dev server restarted mid-load (same SQLite file and port)",
        {
            "runs pushed through": f"{len(triggered)} (real dbt, {SLOTS} slots, {JOBS} jobs)",
            "faults injected": ", ".join(f"restart by {s.name}" for s in RESTARTS),
            **{
                f"restart {n + 1} ({sig.name})": f"{load['running']} running, "
                f"{load['starting']} starting, {load['queued']} queued, "
                f"{load['finished']} done; server down {times['downtime']:.2f} s, "
                f"all workers polling again after {times['workers_back']:.2f} s"
                for n, (sig, load, times) in enumerate(
                    zip(RESTARTS, at_restart, restarts, strict=True)
                )
            },
            "runs lost": len(lost),
            "duplicates": duplicates
            + sum(n - 1 for n in step_attempts if n > 1)
            + len({r.id for r in runs} - set(triggered)),
            "max slot overrun": max(0, len(slots.holders) - slots.capacity),
            "slot grants": slots.grants_total,
            "longest run (slot to end)": f"{max(_held(r) for r in finished.values()):.1f} s",
            "all runs finished after": f"{drained_after:.0f} s",
            "test time": f"{time.monotonic() - started:.0f} s",
        },
    )
    # None lost: every run given an id completed, in the store and in Temporal.
    assert lost == [], [(r, finished[r].status, finished[r].status_message) for r in lost]
    assert [r.status for r in results] == [RunStatus.SUCCESS] * len(triggered)
    assert all(d.state.queue == [] and d.state.in_flight == [] for d in described)
    assert slots.holders == [] and slots.waiters == []
    # None duplicated: only the triggered runs, each step attempted once, one row each.
    assert sorted(r.id for r in runs) == sorted(triggered)
    assert step_attempts == [1] * len(triggered)
    assert all([s.index for s in r.steps] == [1] for r in runs)
    assert duplicates == 0
    assert slots.grants_total == len(triggered)
    assert stack.leftovers == []
