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
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from starter import jobs
from tests.builders import account, job, wait_for, wait_run
from tests.conftest import running_stack, unique
from tests.fakes import FakeDbtExecutor
from worker.registry import WORKFLOWS, workflow_runner
from workflows import constants as c
from workflows.models import JobDescription, RunStatus, TriggerRequest

RUNS = 5
RUN_BUDGET = 22
"""Events of a one-step run workflow (62 before issue 6) when a slot is free: start, slot
request answered with the grant and the Starting snapshot written (one marker), prep,
Running report and the step, the final report (release, snapshot, the job's signal,
webhooks, telemetry hand-off), completion. A run that has to queue adds the queue-wait
timer, the grant signal with its workflow task and its own Starting snapshot (7 events)."""
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
        # The slot request (with Starting), the Running report, the final report.
        assert run["MARKER_RECORDED"] == 3, run


async def test_a_job_keeps_its_timer_across_wake_ups_that_do_not_move_it(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    """Triggers and run ends that leave the job's next deadline where it was (here: the
    check on its runs in flight) do not re-arm the timer: each re-arm is a cancel and a
    start in the job's history, on every wake-up."""
    client = dev_env.client
    acct = unique("timer")
    async with running_stack(client, fake_dbt) as queues:
        settings = account(acct, slot_reap_interval=timedelta(seconds=30))
        await jobs.save_job(client, job(acct, "j", ["dbt run -s gate:held"]), settings, queues)
        job_id = c.job_workflow_id(acct, "j")
        before = await _events(client, job_id)
        first = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_for(lambda: first.run_id in fake_dbt.running, what="the first step")
        # Two more while the first runs (API runs all queue, rule 3), then all three end.
        others = [await jobs.trigger(client, acct, "j", TriggerRequest()) for _ in range(2)]
        fake_dbt.open("held")
        for res in (first, *others):
            assert (await wait_run(client, acct, res.run_id)).status == RunStatus.SUCCESS
        after = await _events(client, job_id)

    added = after - before
    # Four wake-ups besides the first start (two triggers, three run ends, some shared):
    # one timer for the check on runs in flight, armed once and cancelled once at the end.
    assert added["WORKFLOW_TASK_COMPLETED"] >= 4, added
    assert added["TIMER_STARTED"] == 1, added
    assert added["TIMER_CANCELED"] == 1, added


async def test_a_job_that_continued_as_new_with_its_timer_armed_replays(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    """The timer kept across wake-ups is cancelled before the job continues as new (the
    tests' server suggests it at 300 events), so the closed execution replays, from its
    history and for a query, exactly as it ran."""
    client = dev_env.client
    acct = unique("timercan")
    async with running_stack(client, fake_dbt) as queues:
        settings = account(acct, run_slots=3, slot_reap_interval=timedelta(seconds=30))
        await jobs.save_job(client, job(acct, "j"), settings, queues)
        handle = client.get_workflow_handle(c.job_workflow_id(acct, "j"))
        first = (await handle.describe()).run_id
        for _ in range(20):  # ~40 events a batch: continued as new well before the end
            if (await handle.describe()).run_id != first:
                break
            batch = [await jobs.trigger(client, acct, "j", TriggerRequest()) for _ in range(3)]
            for res in batch:
                assert (await wait_run(client, acct, res.run_id)).status == RunStatus.SUCCESS
        assert (await handle.describe()).run_id != first, "the job never continued as new"
        closed = client.get_workflow_handle(handle.id, run_id=first)
        history = await closed.fetch_history()
        # A query on the closed execution is answered by replaying it on the worker.
        described = await closed.query(c.QUERY_DESCRIBE, result_type=JobDescription)

    kinds = [EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in history.events]
    assert kinds[-1] == "WORKFLOW_EXECUTION_CONTINUED_AS_NEW", kinds[-8:]
    assert kinds.count("TIMER_STARTED") == kinds.count("TIMER_CANCELED") + kinds.count(
        "TIMER_FIRED"
    ), "a timer was left open at continue-as-new"
    assert described.state.generation == 1  # as it left: the state handed to the next
    replayer = Replayer(
        workflows=list(WORKFLOWS),
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(),
    )
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure
