"""Activities that talk to Temporal itself: things a workflow cannot do on its own.

* signal-with-start of the account's slots workflow (workflows cannot signal-with-start);
* liveness of holders and runs (``describe``), so a *terminated* run never leaks a slot;
* job-completion fan-out: find the jobs that list a job in ``on_job_completion`` through
  visibility (search attribute ``RunslotUpstreamJobs``) and signal them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from temporalio import activity
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from workflows.constants import (
    SA_ACCOUNT,
    SIGNAL_SLOT_REQUEST,
    SIGNAL_UPSTREAM_FINISHED,
    SLOTS_WORKFLOW,
    slots_workflow_id,
)
from workflows.models import (
    ClosedWorkflows,
    HolderLiveness,
    NotifyDependentsInput,
    SlotsStartRequest,
    SlotsState,
    UpstreamFinished,
)


@activity.defn(name="request_slot")
async def request_slot(request: SlotsStartRequest) -> None:
    """Signal ``request`` to ``slots:{account}``, starting it with the account's capacity."""
    client = activity.client()
    await client.start_workflow(
        SLOTS_WORKFLOW,
        SlotsState(
            account_id=request.account_id,
            capacity=request.capacity,
            reap_interval=request.reap_interval,
        ),
        id=slots_workflow_id(request.account_id),
        task_queue=request.workflow_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        start_signal=SIGNAL_SLOT_REQUEST,
        start_signal_args=[request.request],
        search_attributes=TypedSearchAttributes(
            [SearchAttributePair(SA_ACCOUNT, request.account_id)]
        ),
        static_summary=f"run slots of account {request.account_id}",
    )


@activity.defn(name="closed_workflows")
async def closed_workflows(request: HolderLiveness) -> ClosedWorkflows:
    """Which of these workflows are no longer running (closed, or never existed)."""
    client = activity.client()

    async def is_closed(workflow_id: str) -> bool:
        try:
            desc = await client.get_workflow_handle(workflow_id).describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return True
            raise
        return desc.status != WorkflowExecutionStatus.RUNNING

    flags = await asyncio.gather(*(is_closed(wid) for wid in request.workflow_ids))
    return ClosedWorkflows(
        workflow_ids=[
            wid for wid, closed in zip(request.workflow_ids, flags, strict=True) if closed
        ]
    )


@activity.defn(name="notify_dependents")
async def notify_dependents(request: NotifyDependentsInput) -> int:
    """Signal every running job of the account that is triggered by this job's completion."""
    client = activity.client()
    query = (
        f"RunslotAccount = '{request.account_id}' AND RunslotUpstreamJobs = '{request.job_id}' "
        "AND ExecutionStatus = 'Running'"
    )
    payload = UpstreamFinished(job_id=request.job_id, run_id=request.run_id, status=request.status)
    sent = 0
    try:
        async for execution in client.list_workflows(query):
            if execution.id == request.source_workflow_id:
                continue
            await client.get_workflow_handle(execution.id).signal(SIGNAL_UPSTREAM_FINISHED, payload)
            sent += 1
    except RPCError as err:
        if err.status == RPCStatusCode.UNIMPLEMENTED:
            # Temporal's time-skipping test server has no visibility store: retrying is futile.
            raise ApplicationError(
                "this Temporal server has no visibility API, so job completion triggers "
                "cannot find dependent jobs",
                type="VisibilityUnavailable",
                non_retryable=True,
            ) from err
        raise
    return sent


CONTROL_ACTIVITIES: list[Callable[..., Any]] = [request_slot, closed_workflows, notify_dependents]
