from __future__ import annotations

from temporalio.testing import WorkflowEnvironment

from starter import jobs
from tests.builders import account, job, wait_run
from tests.conftest import running_stack, unique
from tests.fakes import FakeDbtExecutor
from workflows.models import RunStatus, TriggerRequest


async def test_api_run_goes_through_slot_prep_steps_and_succeeds(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client = dev_env.client
    acct = unique("acct")
    async with running_stack(client, fake_dbt) as queues:
        await jobs.save_job(client, job(acct, "j1"), account(acct), queues)
        res = await jobs.trigger(client, acct, "j1", TriggerRequest())
        run = await wait_run(client, acct, res.run_id)
    assert run.status == RunStatus.SUCCESS
    assert run.dequeued_at is not None and run.started_at is not None
    assert fake_dbt.steps_of(res.run_id) == [["dbt", "run", "-s", "ok"]]
