"""Scheduling rules 2, 3, 5, 6, 7, 8 and 11 on the real dev server with real workers.

The executor is the fake dbt of tests/fakes.py, so a test decides when a step ends.
"""

from __future__ import annotations

import pytest
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from starter import jobs
from tests.builders import account, job, statuses, wait_for, wait_run
from tests.conftest import running_stack, temporal_cli, unique
from tests.fakes import FakeDbtExecutor
from workflows import constants as c
from workflows.models import (
    CompletionTrigger,
    JobTriggers,
    JobType,
    PullRequestClosed,
    RunStatus,
    TriggerCause,
    TriggerRequest,
)

pytestmark = pytest.mark.devserver


async def _queue(client: Client, acct: str, job_id: str) -> list[str]:
    desc = await jobs.describe_job(client, acct, job_id)
    return [q.run_id for q in desc.state.queue]


async def _in_flight(client: Client, acct: str, job_id: str) -> list[str]:
    desc = await jobs.describe_job(client, acct, job_id)
    return [r.run_id for r in desc.state.in_flight]


async def test_runs_of_one_job_never_overlap(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("serial")
    async with running_stack(client, fake_dbt) as queues:
        await jobs.save_job(
            client, job(acct, "j", ["dbt run -s gate:g1"]), account(acct, run_slots=5), queues
        )
        first = await jobs.trigger(client, acct, "j", TriggerRequest())
        second = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_for(lambda: fake_dbt.running == {first.run_id}, what="first run running")
        assert await _queue(client, acct, "j") == [second.run_id]
        fake_dbt.open("g1")
        r1 = await wait_run(client, acct, first.run_id)
        r2 = await wait_run(client, acct, second.run_id)
    assert (r1.status, r2.status) == (RunStatus.SUCCESS, RunStatus.SUCCESS)
    assert fake_dbt.max_running == 1
    assert r1.finished_at is not None and r2.dequeued_at is not None
    assert r2.dequeued_at >= r1.finished_at


async def test_newer_scheduled_run_cancels_older_queued_one_and_api_runs_are_kept(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("oversched")
    scheduled = TriggerRequest(cause=TriggerCause.SCHEDULED)
    async with running_stack(client, fake_dbt) as queues:
        await jobs.save_job(client, job(acct, "j", ["dbt run -s gate:slow"]), account(acct), queues)
        running = await jobs.trigger(client, acct, "j", scheduled)
        await wait_for(lambda: fake_dbt.running == {running.run_id}, what="first run")
        api = await jobs.trigger(client, acct, "j", TriggerRequest(cause=TriggerCause.API))
        older = await jobs.trigger(client, acct, "j", scheduled)
        newer = await jobs.trigger(client, acct, "j", scheduled)
        assert newer.cancelled_run_ids == [older.run_id]
        assert await _queue(client, acct, "j") == [api.run_id, newer.run_id]
        desc = await jobs.describe_job(client, acct, "j")
        cancelled = next(r for r in desc.state.recent if r.run_id == older.run_id)
        assert cancelled.status == RunStatus.CANCELLED
        assert (
            "over-scheduled" in cancelled.message and "schedule it less often" in cancelled.message
        )
        fake_dbt.open("slow")
        for run_id in (running.run_id, api.run_id, newer.run_id):
            assert (await wait_run(client, acct, run_id)).status == RunStatus.SUCCESS
    assert older.run_id not in fake_dbt.started_runs()


async def test_merge_job_keeps_only_the_newest_queued_merge_run(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("merge")
    merge = TriggerRequest(cause=TriggerCause.MERGE)
    async with running_stack(client, fake_dbt) as queues:
        await jobs.save_job(
            client, job(acct, "m", ["dbt build -s gate:merge"], job_type=JobType.MERGE),
            account(acct), queues,
        )  # fmt: skip
        first = await jobs.trigger(client, acct, "m", merge)
        await wait_for(lambda: fake_dbt.running == {first.run_id}, what="first merge run")
        queued = [await jobs.trigger(client, acct, "m", merge) for _ in range(3)]
        assert await _queue(client, acct, "m") == [queued[-1].run_id]
        fake_dbt.open("merge")
        assert (await wait_run(client, acct, queued[-1].run_id)).status == RunStatus.SUCCESS
        desc = await jobs.describe_job(client, acct, "m")
    st = statuses(desc)
    assert [st[q.run_id] for q in queued[:-1]] == [RunStatus.CANCELLED, RunStatus.CANCELLED]
    assert fake_dbt.started_runs() == [first.run_id, queued[-1].run_id]


async def test_ci_runs_take_no_slot_run_concurrently_and_a_new_commit_cancels_the_older_run(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("ci")
    async with running_stack(client, fake_dbt) as queues:
        # Zero slots: a CI run that needed one would wait forever.
        await jobs.save_job(
            client, job(acct, "ci", ["dbt build -s gate:ci"], job_type=JobType.CI),
            account(acct, run_slots=0), queues,
        )  # fmt: skip

        def pr(n: int) -> TriggerRequest:
            return TriggerRequest(cause=TriggerCause.PULL_REQUEST, pr_id=n)

        pr1_old = await jobs.trigger(client, acct, "ci", pr(1))
        pr2 = await jobs.trigger(client, acct, "ci", pr(2))
        await wait_for(lambda: fake_dbt.running == {pr1_old.run_id, pr2.run_id}, what="2 CI runs")
        pr1_new = await jobs.trigger(client, acct, "ci", pr(1))
        assert pr1_new.cancelled_run_ids == [pr1_old.run_id]
        old = await wait_run(client, acct, pr1_old.run_id)
        assert old.status == RunStatus.CANCELLED
        assert "newer commit was pushed to pull request #1" in old.status_message
        fake_dbt.open("ci")
        new = await wait_run(client, acct, pr1_new.run_id)
        assert (await wait_run(client, acct, pr2.run_id)).status == RunStatus.SUCCESS
        assert new.status == RunStatus.SUCCESS
        assert new.schema_name == "dbt_cloud_pr_ci_1"
        assert fake_dbt.prepared[pr1_new.run_id].schema_override == "dbt_cloud_pr_ci_1"
        assert pr1_old.run_id in fake_dbt.cancelled_steps
        # Closing the PR drops its temporary schema.
        await jobs.job_handle(client, acct, "ci").signal(
            c.SIGNAL_PR_CLOSED, PullRequestClosed(pr_id=1)
        )
        await wait_for(lambda: fake_dbt.dropped_schemas == ["dbt_cloud_pr_ci_1"], what="drop")
    assert fake_dbt.max_running >= 2


async def test_a_job_runs_when_an_upstream_job_run_ends_in_a_listed_status(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("chain")
    on_success = JobTriggers(on_job_completion=[CompletionTrigger(job_id="a")])
    async with running_stack(client, fake_dbt) as queues:
        settings = account(acct, run_slots=2)
        await jobs.save_job(client, job(acct, "a", ["dbt run -s fail"]), settings, queues)
        await jobs.save_job(client, job(acct, "b", triggers=on_success), settings, queues)
        failed = await jobs.trigger(client, acct, "a", TriggerRequest())
        assert (await wait_run(client, acct, failed.run_id)).status == RunStatus.ERROR
        # A's failure is not a listed status: B stays idle. Then A succeeds and B runs.
        await jobs.save_job(client, job(acct, "a"), settings, queues)
        ok = await jobs.trigger(client, acct, "a", TriggerRequest())
        assert (await wait_run(client, acct, ok.run_id)).status == RunStatus.SUCCESS

        async def b_ran() -> list[str]:
            return [r.run_id for r in (await jobs.describe_job(client, acct, "b")).state.recent]

        b_runs = await wait_for(b_ran, what="job b triggered by a")
        b_run = await wait_run(client, acct, b_runs[0])
    assert len(b_runs) == 1
    assert b_run.cause == TriggerCause.JOB_COMPLETION
    assert b_run.status == RunStatus.SUCCESS


async def test_an_upstream_run_that_never_reports_still_triggers_its_dependents(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    """A run's own final report signals the jobs that run on its job's completion. A run
    terminated from the Temporal CLI reports nothing: its job finds the end (the check on
    runs in flight) and sends the trigger itself."""
    client, acct = dev_env.client, unique("orphanchain")
    on_cancel = JobTriggers(
        on_job_completion=[CompletionTrigger(job_id="a", statuses=[RunStatus.CANCELLED])]
    )
    async with running_stack(client, fake_dbt) as queues:
        settings = account(acct, run_slots=2)
        await jobs.save_job(client, job(acct, "a", ["dbt run -s gate:never"]), settings, queues)
        await jobs.save_job(client, job(acct, "b", triggers=on_cancel), settings, queues)
        upstream = await jobs.trigger(client, acct, "a", TriggerRequest())
        await wait_for(lambda: fake_dbt.running == {upstream.run_id}, what="a running")
        await temporal_cli(
            client, "workflow", "terminate",
            "--workflow-id", c.run_workflow_id(acct, upstream.run_id), "--reason", "operator",
        )  # fmt: skip

        async def b_ran() -> list[str]:
            return [r.run_id for r in (await jobs.describe_job(client, acct, "b")).state.recent]

        b_runs = await wait_for(b_ran, what="job b triggered by a's terminated run")
        b_run = await wait_run(client, acct, b_runs[0])
    assert b_run.cause == TriggerCause.JOB_COMPLETION
    assert b_run.status == RunStatus.SUCCESS


async def test_consecutive_failures_deactivate_the_job_and_run_now_reactivates_it(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("deact")
    failing = job(acct, "j", ["dbt run -s fail"], deactivate_after_failures=3)
    async with running_stack(client, fake_dbt) as queues:
        await jobs.save_job(client, failing, account(acct), queues)
        for _ in range(3):
            res = await jobs.trigger(client, acct, "j", TriggerRequest())
            assert (await wait_run(client, acct, res.run_id)).status == RunStatus.ERROR
        await wait_for(lambda: jobs.describe_job(client, acct, "j"), what="describe")
        desc = await wait_for(lambda: _deactivated(client, acct), what="job deactivated")
        assert desc
        with pytest.raises(WorkflowUpdateFailedError) as info:
            await jobs.trigger(client, acct, "j", TriggerRequest(cause=TriggerCause.API))
        assert "deactivated after 3 consecutive failed runs" in str(info.value.cause)
        query = f"RunslotAccount = '{acct}' AND RunslotStatus = 'Deactivated'"
        found = await wait_for(lambda: _ids(client, query), what="deactivated job is listed")
        assert found == [c.job_workflow_id(acct, "j")]
        manual = await jobs.trigger(client, acct, "j", TriggerRequest(cause=TriggerCause.MANUAL))
        assert (await wait_run(client, acct, manual.run_id)).status == RunStatus.ERROR
        # Saving the job (fixed) reactivates it too.
        await jobs.save_job(
            client, job(acct, "j", deactivate_after_failures=3), account(acct), queues
        )
        fixed = await jobs.trigger(client, acct, "j", TriggerRequest())
        assert (await wait_run(client, acct, fixed.run_id)).status == RunStatus.SUCCESS


async def _ids(client: Client, query: str) -> list[str]:
    return [w.id async for w in client.list_workflows(query)]


async def _deactivated(client: Client, acct: str) -> bool:
    return (await jobs.describe_job(client, acct, "j")).state.deactivated


async def test_cancelling_a_queued_run_removes_it_and_a_running_run_stops_its_step(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("cancel")
    async with running_stack(client, fake_dbt) as queues:
        await jobs.save_job(
            client, job(acct, "j", ["dbt run -s gate:never"]), account(acct), queues
        )
        running = await jobs.trigger(client, acct, "j", TriggerRequest())
        queued = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_for(lambda: fake_dbt.running == {running.run_id}, what="running")
        assert await jobs.cancel_run(client, acct, "j", queued.run_id) == RunStatus.CANCELLED
        assert await _queue(client, acct, "j") == []
        await jobs.cancel_run(client, acct, "j", running.run_id, reason="stop it")
        result = await wait_run(client, acct, running.run_id, timeout=15)
        assert result.status == RunStatus.CANCELLED
        assert result.status_message == "stop it"
        assert fake_dbt.cancelled_steps == [running.run_id]
        slots = await jobs.describe_slots(client, acct)
        assert slots.holders == [] and slots.waiters == []
        with pytest.raises(WorkflowUpdateFailedError):
            await jobs.cancel_run(client, acct, "j", "no-such-run")
    assert queued.run_id not in fake_dbt.started_runs()


async def test_bad_trigger_update_is_rejected_and_a_bad_signal_is_recorded_not_raised(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("poison")
    async with running_stack(client, fake_dbt) as queues:
        await jobs.save_job(client, job(acct, "j"), account(acct), queues)
        handle = jobs.job_handle(client, acct, "j")
        with pytest.raises(WorkflowUpdateFailedError):
            await handle.execute_update(c.UPDATE_TRIGGER, {"overrides": {"env_vars": {"X": 1}}})
        await handle.signal(c.SIGNAL_TRIGGER, {"cause": "bogus"})
        await handle.signal(c.SIGNAL_TRIGGER, "not an object")
        await handle.signal("triger", {"cause": "api"})  # a typo'd signal name
        ok = await jobs.trigger(client, acct, "j", TriggerRequest())
        assert (await wait_run(client, acct, ok.run_id)).status == RunStatus.SUCCESS
        desc = await jobs.describe_job(client, acct, "j")
    assert [r.handler for r in desc.state.rejected] == ["trigger", "trigger", "triger"]
    assert [r.run_id for r in desc.state.recent] == [ok.run_id]


async def test_a_run_cancelled_with_the_temporal_cli_ends_cancelled_and_frees_its_slot(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("tcancel")
    async with running_stack(client, fake_dbt) as queues:
        await jobs.save_job(
            client, job(acct, "j", ["dbt run -s gate:never"]), account(acct), queues
        )
        running = await jobs.trigger(client, acct, "j", TriggerRequest())
        queued = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_for(lambda: fake_dbt.running == {running.run_id}, what="running")
        await temporal_cli(
            client, "workflow", "cancel", "--workflow-id", c.run_workflow_id(acct, running.run_id)
        )
        result = await wait_run(client, acct, running.run_id, timeout=15)
        # The job moves on to its next run: the slot came back and the queue is not stuck.
        await wait_for(lambda: queued.run_id in fake_dbt.running, timeout=15, what="next run")
        await jobs.cancel_run(client, acct, "j", queued.run_id)
        await wait_run(client, acct, queued.run_id, timeout=15)
    assert result.status == RunStatus.CANCELLED
    assert result.steps[0].status == RunStatus.CANCELLED
    assert fake_dbt.cancelled_steps == [running.run_id, queued.run_id]
