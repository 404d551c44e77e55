"""Activities that talk to Temporal itself: things a workflow cannot do on its own.

* signal-with-start of the account's slots workflow (workflows cannot signal-with-start);
* liveness of holders and runs (``describe``), so a *terminated* run never leaks a slot.

(Job-completion fan-out reads the run store: ``activities.store.activities``.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from temporalio import activity
from temporalio.client import WorkflowExecutionStatus
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode

from workflows.constants import (
    SA_ACCOUNT,
    SIGNAL_SLOT_REQUEST,
    SLOTS_WORKFLOW,
    slots_workflow_id,
)
from workflows.models import (
    ClosedWorkflows,
    HolderLiveness,
    SlotsStartRequest,
    SlotsState,
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


CONTROL_ACTIVITIES: list[Callable[..., Any]] = [request_slot, closed_workflows]
