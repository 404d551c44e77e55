"""Job operations over Temporal: save a job, trigger a run, cancel, describe.

These are the calls the CLI and (next) the REST API make. A job's workflow is started on
first save (``USE_EXISTING``: saving is idempotent) and reconfigured by update afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio.client import Client, WithStartWorkflowOperation, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError

from workflows import constants as c
from workflows.job import JobWorkflow, job_search_attributes
from workflows.models import (
    AccountSettings,
    CancelRequest,
    JobDefinition,
    JobDelete,
    JobDescription,
    JobUpdate,
    JobWorkflowInput,
    Resize,
    RunResult,
    RunStatus,
    SlotsState,
    TaskQueues,
    TriggerRequest,
    TriggerResult,
)
from workflows.run import RunWorkflow
from workflows.slots import SlotsWorkflow

T = TypeVar("T")


async def save_job(
    client: Client,
    job: JobDefinition,
    account: AccountSettings,
    queues: TaskQueues | None = None,
    api_fields: dict[str, Any] | None = None,
) -> JobDescription:
    """Create the job's workflow, or reconfigure it (which also reactivates it).

    ``api_fields``: the dbt Cloud job fields Runslot does not model, saved in the run store
    for the API to echo (None keeps the stored ones).
    """
    queues = queues or TaskQueues()
    inp = JobWorkflowInput(job=job, account=account, queues=queues)
    start = WithStartWorkflowOperation(
        JobWorkflow.run,
        inp,
        id=c.job_workflow_id(job.account_id, job.job_id),
        task_queue=queues.workflows,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=job_search_attributes(inp),
        static_summary=f"job {job.job_id}: {job.name}"[:200],
    )
    # By name: the handlers are async, which the SDK's method-reference typing mistakes
    # for a coroutine result.
    description: JobDescription = await client.execute_update_with_start_workflow(
        c.UPDATE_CONFIGURE,
        JobUpdate(job=job, account=account, api_fields=api_fields),
        start_workflow_operation=start,
        result_type=JobDescription,
    )
    return description


def job_handle(client: Client, account_id: str, job_id: str) -> WorkflowHandle[JobWorkflow, None]:
    return client.get_workflow_handle_for(JobWorkflow.run, c.job_workflow_id(account_id, job_id))


NOT_READY_RETRIES = 20
NOT_ACCEPTED = ("not ready", "unexpected workflow task failure")
"""How the server says it dropped an update it had not accepted (lower case)."""


async def _update(call: Callable[[], Awaitable[T]]) -> T:
    """Run an update, retrying while the server says the workflow is not ready.

    Temporal refuses an update for a moment while a workflow switches runs (continue-as-new)
    with "Workflow is not ready to handle the request". An update that arrives while the
    worker completes the workflow task that continues-as-new fails that task
    (UNHANDLED_COMMAND, so the update is not lost with the old run), and the server then
    drops the update with "Unable to perform workflow execution update due to unexpected
    workflow task failure". Both happen before the update is accepted, so a retry cannot
    apply it twice.
    """
    for attempt in range(NOT_READY_RETRIES):
        try:
            return await call()
        except RPCError as err:
            retry = any(text in str(err).lower() for text in NOT_ACCEPTED)
            if not retry or attempt == NOT_READY_RETRIES - 1:
                raise
            await asyncio.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


async def delete_job(
    client: Client, account_id: str, job_id: str, reason: str | None = None
) -> JobDescription:
    """dbt Cloud's soft delete: no new runs, its runs cancelled, ``state`` 2 in the store."""
    handle = job_handle(client, account_id, job_id)
    request = JobDelete() if reason is None else JobDelete(reason=reason)
    description: JobDescription = await _update(
        lambda: handle.execute_update(c.UPDATE_DELETE, request, result_type=JobDescription)
    )
    return description


async def trigger(
    client: Client, account_id: str, job_id: str, request: TriggerRequest
) -> TriggerResult:
    """Queue a run and return its id (raises ``WorkflowUpdateFailedError`` if refused).

    One update id for every retry: the server may still deliver an attempt the client saw
    fail (it carries unaccepted updates across continue-as-new), and the same id makes the
    retry that same update, not a second run. The job keys the run's store row by it too.
    """
    handle = job_handle(client, account_id, job_id)
    update_id = str(uuid.uuid4())
    return await _update(
        lambda: handle.execute_update(
            c.UPDATE_TRIGGER, request, id=update_id, result_type=TriggerResult
        )
    )


async def cancel_run(
    client: Client, account_id: str, job_id: str, run_id: str, reason: str = "Cancelled by user"
) -> RunStatus:
    handle = job_handle(client, account_id, job_id)
    request = CancelRequest(run_id=run_id, reason=reason)
    return await _update(lambda: handle.execute_update(JobWorkflow.cancel_run, request))


async def describe_job(client: Client, account_id: str, job_id: str) -> JobDescription:
    return await job_handle(client, account_id, job_id).query(JobWorkflow.describe)


async def run_result(client: Client, account_id: str, run_id: str) -> RunResult:
    handle = client.get_workflow_handle_for(RunWorkflow.run, c.run_workflow_id(account_id, run_id))
    return await handle.result()


async def describe_slots(client: Client, account_id: str) -> SlotsState:
    return await client.get_workflow_handle_for(
        SlotsWorkflow.run, c.slots_workflow_id(account_id)
    ).query(SlotsWorkflow.describe)


async def resize_slots(client: Client, account_id: str, capacity: int) -> SlotsState:
    return await client.get_workflow_handle_for(
        SlotsWorkflow.run, c.slots_workflow_id(account_id)
    ).execute_update(SlotsWorkflow.resize, Resize(capacity=capacity))
