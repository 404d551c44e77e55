"""Incident replay 4: the step worker is SIGKILLed while a real dbt step runs.

Steps are never retried (``STEP_RETRY``: one attempt, dbt has side effects), so the run must
end in Error, saying its step worker stopped responding, once the step's heartbeat timeout
(``STEP_HEARTBEAT_TIMEOUT``, 30 s) passes; its slot goes to the next run of the account,
which runs on a new steps worker; the killed worker's dbt dies with it (it would otherwise
go on writing to the warehouse after its run ended, holding DuckDB's lock against the next
run); and the store has one row per run and per step.
"""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from starter import jobs
from tests.builders import wait_for
from tests.incident_stack import (
    ACCOUNT,
    incident_stack,
    report,
    scheduled_activities,
    sleepy_step,
    wait_gone,
)
from worker.settings import Pool
from workflows import constants as c
from workflows.models import RunResult, RunStatus

pytestmark = [pytest.mark.incident, pytest.mark.devserver, pytest.mark.slow]

HEARTBEAT = c.STEP_HEARTBEAT_TIMEOUT.total_seconds()
SLEEP_SECONDS = 600
"""Far longer than the test: the killed step can only end by the fault, never by itself."""
ORPHAN_GRACE = 5.0
"""How long the killed worker's dbt may outlive it (the kernel's death signal: ~at once)."""


async def test_a_step_worker_killed_mid_step_errors_the_run_frees_its_slot_and_leaves_no_dbt(
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    async with incident_stack(tmp_path, run_slots=1) as stack:
        victim_job = await stack.create_job("victim", [sleepy_step(SLEEP_SECONDS)])
        next_job = await stack.create_job("next", [sleepy_step(1)])
        victim = await stack.trigger(victim_job, "incident 4: its worker is killed mid-step")
        queued = await stack.trigger(next_job, "incident 4: queued behind it")

        # The model is sleeping inside dbt: the step is really under way.
        log = stack.step_log(victim, 1)
        await wait_for(
            lambda: log.exists() and b"sleeping" in log.read_bytes(),
            timeout=60,
            what="dbt to sleep in the model",
        )
        client = await stack.client()
        slots = await jobs.describe_slots(client, ACCOUNT)
        assert [h.request_id for h in slots.holders] == [str(victim)]
        assert [w.request_id for w in slots.waiters] == [str(queued)]

        dbt = await stack.kill_pool(Pool.STEPS, signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), datetime.now(UTC)
        assert dbt, "the steps worker had no dbt process running"
        dbt_gone_after = await wait_gone(dbt, timeout=ORPHAN_GRACE)
        # A supervisor (systemd, Kubernetes, `runslot dev` run again) brings one back.
        await stack.start_pool(Pool.STEPS)

        ended = (await stack.wait_finished([victim], timeout=HEARTBEAT + 30))[victim]
        ended_after = time.monotonic() - killed_at
        after = (await stack.wait_finished([queued], timeout=120))[queued]

        slots = await jobs.describe_slots(client, ACCOUNT)
        runs = await stack.runs()
        duplicates = await stack.duplicate_rows()
        step_attempts = await scheduled_activities(
            client, c.run_workflow_id(ACCOUNT, str(victim)), "run_step"
        )
        result: RunResult = await client.get_workflow_handle(
            c.run_workflow_id(ACCOUNT, str(victim)), result_type=RunResult
        ).result()

    assert after.dequeued_at is not None
    slot_freed_after = (after.dequeued_at - killed_wall).total_seconds()
    report(
        "4. steps worker SIGKILLed during a real dbt step",
        {
            "runs pushed through": len(runs),
            "faults injected": "1 SIGKILL of the steps worker (dbt sleeping in a model)",
            "killed run ended": f"{ended.status.humanized} {ended_after:.1f} s after the kill "
            f"(heartbeat timeout {HEARTBEAT:.0f} s)",
            "slot given to the queued run": f"{slot_freed_after:.1f} s after the kill",
            "queued run": f"{after.status.humanized} on the new steps worker",
            "killed worker's dbt processes": f"{len(dbt)}, gone "
            + (f"{dbt_gone_after:.1f} s after the kill" if dbt_gone_after is not None else "NOT"),
            "step attempts of the killed run": step_attempts,
            "runs lost": sum(not r.status.is_finished for r in runs),
            "duplicates": duplicates,
            "max slot overrun": max(0, len(slots.holders) - slots.capacity),
            "test time": f"{time.monotonic() - started:.0f} s",
        },
    )
    # A defined end, within the heartbeat timeout, saying why.
    assert ended.status == RunStatus.ERROR, ended.status_message
    assert "the step worker stopped responding" in ended.status_message
    assert ended_after <= HEARTBEAT + 5
    assert [(s.index, s.status) for s in ended.steps] == [(1, RunStatus.ERROR)]
    assert ended.steps[0].message.startswith("the step worker stopped responding")
    assert result.status == RunStatus.ERROR, "Temporal's result agrees with the store"
    # Its slot went to the queued run, which ran on the new worker: nothing is left behind.
    assert after.status == RunStatus.SUCCESS, after.status_message
    assert slot_freed_after <= HEARTBEAT + 5
    assert slots.holders == [] and slots.waiters == []
    assert slots.grants_total == 2
    # The killed worker's dbt did not outlive it (it would hold the DuckDB file's lock, and
    # the queued run would have failed with "Could not set lock on file").
    assert dbt_gone_after is not None, "dbt outlived its killed worker"
    # Nothing duplicated: one attempt of the step, one row per run and per step.
    assert step_attempts == 1
    assert sorted(r.id for r in runs) == sorted([victim, queued])
    assert [[s.index for s in r.steps] for r in runs] == [[1], [1]]
    assert duplicates == 0
    assert stack.leftovers == []
