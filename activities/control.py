"""Activities that talk to Temporal itself: things a workflow cannot do on its own.

* a run's slot request (``acquire_slot``, in the run's ``request_slot`` activity):
  update-with-start of the account's slots workflow, answered at once (signal-with-start
  when the update cannot be used); workflows can do neither;
* liveness of holders and runs (``describe``), so a *terminated* run never leaks a slot;
* signals sent from a local activity: one marker event in the sender's history, where a
  workflow's own signal costs two events and a workflow task more.

(Job-completion fan-out reads the run store: ``activities.store.activities``.)
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.client import (
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from workflows.constants import (
    RUN_WORKFLOW,
    SA_ACCOUNT,
    SA_CAUSE,
    SA_JOB,
    SA_RUN,
    SA_STATUS,
    SIGNAL_SLOT_REQUEST,
    SLOTS_WORKFLOW,
    UPDATE_SLOT_ACQUIRE,
    slots_workflow_id,
)
from workflows.models import (
    ClosedWorkflow,
    ClosedWorkflows,
    HolderLiveness,
    RunInput,
    RunStatus,
    SignalWorkflowInput,
    SlotAnswer,
    SlotsStartRequest,
    SlotsState,
    StartRunInput,
)

ACQUIRE_TIMEOUT = timedelta(seconds=3)
"""Bounds the update's call (the client's retries included) well inside the local
activity's timeout, leaving time for the signal."""


async def acquire_slot(request: SlotsStartRequest) -> SlotAnswer:
    """Ask ``slots:{account}`` for a slot, starting it with the account's capacity. Called
    in an activity (the run's ``request_slot``, ``activities.report``).

    The ``acquire`` update (with start) answers at once: a free slot is granted in the
    answer, with no signal back and no wait in the run. If the update cannot be used (the
    server's limit of updates in flight per workflow, an older server, slots continuing as
    new), the request goes as the ``request`` signal and the grant comes by signal. Both
    are idempotent by request id, so a repeat (a retry, or a signal after an update that
    did go through) is answered, never counted twice.
    """
    client = activity.client()
    start: WithStartWorkflowOperation[Any, Any] = WithStartWorkflowOperation(
        SLOTS_WORKFLOW,
        _slots_state(request),
        id=slots_workflow_id(request.account_id),
        task_queue=request.workflow_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=_slots_attributes(request),
        static_summary=f"run slots of account {request.account_id}",
    )
    try:
        async with asyncio.timeout(ACQUIRE_TIMEOUT.total_seconds()):
            answer: SlotAnswer = await client.execute_update_with_start_workflow(
                UPDATE_SLOT_ACQUIRE,
                request.request,
                start_workflow_operation=start,
                id=f"acquire-{request.request.request_id}",
                result_type=SlotAnswer,
            )
        return answer
    except (
        TimeoutError,
        RPCError,
        WorkflowUpdateFailedError,
        WorkflowUpdateRPCTimeoutOrCancelledError,
    ) as err:
        with contextlib.suppress(BaseException):
            await start.workflow_handle()  # settled by now; read so asyncio does not warn
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from err  # the activity itself is cancelled
        activity.logger.info("acquire not answered (%s); requesting by signal", err)
    await client.start_workflow(
        SLOTS_WORKFLOW,
        _slots_state(request),
        id=slots_workflow_id(request.account_id),
        task_queue=request.workflow_task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        start_signal=SIGNAL_SLOT_REQUEST,
        start_signal_args=[request.request],
        search_attributes=_slots_attributes(request),
        static_summary=f"run slots of account {request.account_id}",
    )
    return SlotAnswer()


def _slots_state(request: SlotsStartRequest) -> SlotsState:
    return SlotsState(
        account_id=request.account_id,
        capacity=request.capacity,
        reap_interval=request.reap_interval,
    )


def _slots_attributes(request: SlotsStartRequest) -> TypedSearchAttributes:
    return TypedSearchAttributes([SearchAttributePair(SA_ACCOUNT, request.account_id)])


@activity.defn(name="start_run_workflow")
async def start_run_workflow(request: StartRunInput) -> None:
    """Start a run's workflow for its job (not as a child: the job hears of the run's end
    from the run's ``run_finished`` signal, and checks on runs that never report).

    A retried start of a run that went through is a no-op: the run id is never reused.
    """
    try:
        await activity.client().start_workflow(
            RUN_WORKFLOW,
            request.run,
            id=request.workflow_id,
            task_queue=request.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=initial_search_attributes(request.run),
            static_summary=request.summary,
        )
    except WorkflowAlreadyStartedError:
        return


def initial_search_attributes(inp: RunInput) -> TypedSearchAttributes:
    return TypedSearchAttributes(
        [
            SearchAttributePair(SA_ACCOUNT, inp.account.account_id),
            SearchAttributePair(SA_JOB, inp.job.job_id),
            SearchAttributePair(SA_RUN, inp.run_id),
            SearchAttributePair(SA_CAUSE, inp.trigger.cause.value),
            SearchAttributePair(SA_STATUS, RunStatus.QUEUED.humanized),
        ]
    )


@activity.defn(name="closed_workflows")
async def closed_workflows(request: HolderLiveness) -> ClosedWorkflows:
    """Which of these workflows are no longer running (closed, or never existed)."""
    client = activity.client()

    async def closed(workflow_id: str) -> ClosedWorkflow | None:
        handle = client.get_workflow_handle(workflow_id)
        try:
            desc = await handle.describe()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return ClosedWorkflow(close_status="NOT_FOUND")
            raise
        if desc.status is None or desc.status == WorkflowExecutionStatus.RUNNING:
            return None
        found = ClosedWorkflow(close_status=desc.status.name)
        if desc.status == WorkflowExecutionStatus.COMPLETED and desc.workflow_type == RUN_WORKFLOW:
            # A run that ended but whose report never arrived: its own result says how.
            result = await handle.result()
            if isinstance(result, dict):
                status = result.get("status")
                found.result_status = status if isinstance(status, int) else None
                found.result_message = str(result.get("status_message") or "")
        return found

    ends = await asyncio.gather(*(closed(wid) for wid in request.workflow_ids))
    details = {wid: end for wid, end in zip(request.workflow_ids, ends, strict=True) if end}
    return ClosedWorkflows(workflow_ids=list(details), details=details)


@activity.defn(name="signal_workflow")
async def signal_workflow(request: SignalWorkflowInput) -> bool:
    """Send one signal. False if the workflow is gone (closed, or never existed).

    At least once: a retried call, or a workflow task replayed after a crash, may send it
    again, so every receiver treats a repeat as a no-op (releases, grants, run ends).
    """
    try:
        await (
            activity.client()
            .get_workflow_handle(request.workflow_id)
            .signal(request.signal, request.payload)
        )
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


CONTROL_ACTIVITIES: list[Callable[..., Any]] = [
    start_run_workflow,
    closed_workflows,
    signal_workflow,
]
