"""History budget of a run: what a one-step run adds to the job, run and slots histories.

Issue 6 made the hot path cheap (the benchmark suite, ``scripts/bench``, reports the
figures against Temporal's floor); this keeps it cheap. Events are what the server stores
and what a workflow replays, so a change that adds a signal, an activity or a timer per run
shows up here as a failed budget, with the event types to look at.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from starter import jobs
from tests.builders import account, job, wait_run
from tests.conftest import running_stack, unique
from tests.fakes import FakeDbtExecutor
from workflows import constants as c
from workflows.models import RunStatus, TriggerRequest

RUNS = 5
RUN_BUDGET = 23
"""Events of a one-step run workflow (62 before issue 6) when a slot is free: start, slot
request answered with the grant (a marker), Starting snapshot and prep, Running report and
the step, the final report (release, snapshot, the job's signal, webhooks, telemetry
hand-off), completion. A run that has to queue adds the queue-wait timer and the grant
signal with its workflow task (6 events)."""
JOB_BUDGET_PER_RUN = 13
"""Events a run adds to its job: the trigger update, the start, the end (no child events;
job-completion triggers go with the run's final report)."""
SLOTS_BUDGET_PER_RUN = 12
"""Events a run adds to the slots workflow when runs come one at a time (unbatched): the
``acquire`` update answered with a grant in one workflow task, the release in another."""


async def _events(client: Client, workflow_id: str) -> Counter[str]:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return Counter(EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in history.events)


async def test_a_one_step_run_stays_within_its_history_budget(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client = dev_env.client
    acct = unique("budget")
    async with running_stack(client, fake_dbt) as queues:
        settings = account(acct, slot_reap_interval=timedelta(seconds=30))
        await jobs.save_job(client, job(acct, "j1"), settings, queues)
        job_id = c.job_workflow_id(acct, "j1")
        before = sum((await _events(client, job_id)).values())
        run_ids = []
        for _ in range(RUNS):
            res = await jobs.trigger(client, acct, "j1", TriggerRequest())
            assert (await wait_run(client, acct, res.run_id)).status == RunStatus.SUCCESS
            run_ids.append(res.run_id)
        job_events = await _events(client, job_id)
        slots_events = await _events(client, c.slots_workflow_id(acct))
        runs = [await _events(client, c.run_workflow_id(acct, r)) for r in run_ids]

    print(  # the figures, with -s
        f"run events {[sum(r.values()) for r in runs]}, job +{sum(job_events.values()) - before}"
        f" for {RUNS} runs {dict(job_events)}, slots {sum(slots_events.values())}"
    )
    for run in runs:
        assert sum(run.values()) <= RUN_BUDGET, run
    job_added = sum(job_events.values()) - before
    assert job_added <= JOB_BUDGET_PER_RUN * RUNS, job_events
    assert sum(slots_events.values()) <= SLOTS_BUDGET_PER_RUN * RUNS, slots_events
    # Runs are started from a local activity and report back by signal: no child events.
    assert not any(kind.startswith(("START_CHILD", "CHILD_")) for kind in job_events)
    # Two local activities per run (allocate in the trigger, start); one more for the job.
    assert job_events["MARKER_RECORDED"] <= 2 * RUNS + 1, job_events
    # One timer per run at most (the check on runs in flight, cancelled by the run's end).
    assert job_events["TIMER_CANCELED"] <= RUNS, job_events
    # Every slot was granted in the update's answer: no grant signals.
    assert slots_events["WORKFLOW_EXECUTION_UPDATE_COMPLETED"] == RUNS, slots_events
    assert slots_events["SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED"] == 0, slots_events
    for run in runs:
        # No telemetry activity (the final report hands it off), no run-timeout timer (the
        # step's deadline), no search attribute for Starting: Running and the final status.
        assert run["ACTIVITY_TASK_SCHEDULED"] == 2, run  # prep, the step
        assert run["TIMER_STARTED"] == 0, run  # granted at once: no queue-wait timer
        assert run["WORKFLOW_EXECUTION_SIGNALED"] == 0, run
        assert run["UPSERT_WORKFLOW_SEARCH_ATTRIBUTES"] == 2, run
