"""The workflows and the run store together: ids come from the store, every transition is
written to it, and reruns from failure are planned from it (fake dbt, real Temporal, a real
SQLite store)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from temporalio.client import WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from activities.store import RunStore
from starter import jobs
from tests.builders import account, job, wait_for, wait_run
from tests.conftest import new_store, running_stack, unique
from tests.fakes import FakeDbtExecutor
from workflows import constants as c
from workflows.models import RunStatus, TriggerCause, TriggerOverrides, TriggerRequest


def _status(store: RunStore, acct: str, run_id: str) -> RunStatus | None:
    run = store.get_run_by_key(acct, run_id)
    return run.status if run is not None else None


async def test_run_ids_come_from_the_store_and_every_transition_is_written(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, acct = dev_env.client, unique("ids")
    steps = ["dbt seed -s ok", "dbt run -s gate:g"]
    async with running_stack(client, fake_dbt, store=run_store) as queues:
        await jobs.save_job(client, job(acct, "daily", steps), account(acct), queues)
        desc = await jobs.describe_job(client, acct, "daily")
        stored_job = run_store.get_job_by_key(acct, "daily")
        assert stored_job is not None and desc.state.store_id == stored_job.id
        res = await jobs.trigger(client, acct, "daily", TriggerRequest())
        assert res.run_id.isdigit(), "run ids are the store's integers"
        await wait_for(lambda: fake_dbt.running == {res.run_id})
        # Step 2 is running: the store shows it, with the wait and prep timestamps.
        running = await wait_for(
            lambda: (r := run_store.get_run_by_key(acct, res.run_id)) and len(r.steps) == 2 and r,
            what="the running snapshot",
        )
        assert running.id == int(res.run_id) and running.status == RunStatus.RUNNING
        assert running.created_at <= running.dequeued_at <= running.started_at
        assert [s.status for s in running.steps] == [RunStatus.SUCCESS, RunStatus.RUNNING]
        fake_dbt.open("g")
        result = await wait_run(client, acct, res.run_id)
    done = run_store.get_run_by_key(acct, res.run_id)
    assert done is not None and result.status == done.status == RunStatus.SUCCESS
    assert done.finished_at == result.finished_at and done.started_at == result.started_at
    assert [s.status for s in done.steps] == [RunStatus.SUCCESS, RunStatus.SUCCESS]
    assert done.steps[1].argv == ["dbt", "run", "-s", "gate:g"]


async def test_runs_the_job_ends_itself_are_written_to_the_store(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    """A superseded queued run and a terminated run never write their own end."""
    client, acct = dev_env.client, unique("ends")
    async with running_stack(client, fake_dbt, store=run_store) as queues:
        await jobs.save_job(client, job(acct, "j", ["dbt run -s gate:g"]), account(acct), queues)
        first = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_for(lambda: fake_dbt.running == {first.run_id})
        scheduled = TriggerRequest(cause=TriggerCause.SCHEDULED)
        older = await jobs.trigger(client, acct, "j", scheduled)
        newer = await jobs.trigger(client, acct, "j", scheduled)
        assert newer.cancelled_run_ids == [older.run_id]
        await wait_for(lambda: _status(run_store, acct, older.run_id) == RunStatus.CANCELLED)
        superseded = run_store.get_run_by_key(acct, older.run_id)
        assert superseded is not None and "newer scheduled run" in superseded.status_message
        await client.get_workflow_handle(c.run_workflow_id(acct, first.run_id)).terminate(
            "operator"
        )
        await wait_for(lambda: _status(run_store, acct, first.run_id) == RunStatus.CANCELLED)
        fake_dbt.open("g")
        await wait_run(client, acct, newer.run_id)
    terminated = run_store.get_run_by_key(acct, first.run_id)
    assert terminated is not None and "terminated" in terminated.status_message
    assert _status(run_store, acct, newer.run_id) == RunStatus.SUCCESS


async def test_rerun_from_failure_resumes_at_the_failed_step_on_the_same_commit(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, acct = dev_env.client, unique("rerun")
    steps = ["dbt seed -s ok", "dbt run -s fail", "dbt test -s ok"]
    async with running_stack(client, fake_dbt, store=run_store) as queues:
        await jobs.save_job(client, job(acct, "j", steps), account(acct), queues)
        pinned = TriggerOverrides(git_sha="abc1234")
        failed = await jobs.trigger(client, acct, "j", TriggerRequest(overrides=pinned))
        assert (await wait_run(client, acct, failed.run_id)).status == RunStatus.ERROR
        rerun = await jobs.trigger(client, acct, "j", TriggerRequest(rerun_of=failed.run_id))
        result = await wait_run(client, acct, rerun.run_id)
    assert result.status == RunStatus.SUCCESS, result.status_message
    assert fake_dbt.steps_of(rerun.run_id) == [["dbt", "retry"], ["dbt", "test", "-s", "ok"]]
    prepared = fake_dbt.prepared[rerun.run_id]
    assert prepared.retry_of_run_id == failed.run_id and prepared.git_sha == "abc1234"
    stored = run_store.get_run_by_key(acct, rerun.run_id)
    assert stored is not None and stored.trigger is not None
    assert stored.trigger.rerun_of == failed.run_id


async def test_a_rerun_of_a_run_that_did_not_fail_is_refused_with_the_reason(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, acct = dev_env.client, unique("norerun")
    async with running_stack(client, fake_dbt, store=run_store) as queues:
        await jobs.save_job(client, job(acct, "j"), account(acct), queues)
        ok = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_run(client, acct, ok.run_id)
        with pytest.raises(WorkflowUpdateFailedError) as info:
            await jobs.trigger(client, acct, "j", TriggerRequest(rerun_of=ok.run_id))
        assert "only a failed (Error) run can be rerun" in str(info.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as info:
            await jobs.trigger(client, acct, "j", TriggerRequest(rerun_of="999999"))
        assert "run 999999 is not a run of job j" in str(info.value.cause)
        # Nothing was queued by either refusal; the job still runs.
        again = await jobs.trigger(client, acct, "j", TriggerRequest())
        assert (await wait_run(client, acct, again.run_id)).status == RunStatus.SUCCESS
    assert run_store.list_runs(acct).total_count == 2


async def test_an_unreachable_store_refuses_triggers_clearly_and_loses_nothing_once_back(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("nostore")
    missing = tmp_path / "not-yet"
    store = RunStore(f"sqlite:///{missing / 'runslot.db'}")  # its directory does not exist
    async with running_stack(client, fake_dbt, store=store) as queues:
        # Saving still takes effect in Temporal (the source of truth) ...
        desc = await jobs.save_job(client, job(acct, "j"), account(acct), queues)
        assert desc.state.store_id is None
        # ... but a run needs an id from the store: a clear refusal, nothing queued.
        with pytest.raises(WorkflowUpdateFailedError) as info:
            await jobs.trigger(client, acct, "j", TriggerRequest())
        assert "the run store could not save the job" in str(info.value.cause)
        assert (await jobs.describe_job(client, acct, "j")).state.queue == []
        # The store comes back: the next trigger saves the job and runs.
        missing.mkdir()
        shutil.copyfile(new_store(tmp_path).engine.url.database or "", missing / "runslot.db")
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        assert (await wait_run(client, acct, res.run_id)).status == RunStatus.SUCCESS
    assert _status(store, acct, res.run_id) == RunStatus.SUCCESS
    store.close()


async def test_deleting_a_job_cancels_its_runs_marks_it_deleted_and_ends_its_workflow(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, acct = dev_env.client, unique("delete")
    async with running_stack(client, fake_dbt, store=run_store) as queues:
        await jobs.save_job(client, job(acct, "j", ["dbt run -s gate:g"]), account(acct), queues)
        running = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_for(lambda: fake_dbt.running == {running.run_id})
        queued = await jobs.trigger(client, acct, "j", TriggerRequest())
        desc = await jobs.delete_job(client, acct, "j")
        assert desc.state.deleted and desc.state.queue == []
        stored = run_store.get_job_by_key(acct, "j")
        assert stored is not None and stored.state == 2
        # The running run is cancelled (its step killed); then the job's workflow ends.
        assert (await wait_run(client, acct, running.run_id)).status == RunStatus.CANCELLED
        await jobs.job_handle(client, acct, "j").result()
        await wait_for(lambda: _status(run_store, acct, queued.run_id) == RunStatus.CANCELLED)
        assert running.run_id in fake_dbt.cancelled_steps
        # Saving the job again brings it back, active.
        await jobs.save_job(client, job(acct, "j"), account(acct), queues)
        stored = run_store.get_job_by_key(acct, "j")
        assert stored is not None and stored.state == 1
        again = await jobs.trigger(client, acct, "j", TriggerRequest())
        assert (await wait_run(client, acct, again.run_id)).status == RunStatus.SUCCESS
