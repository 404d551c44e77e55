"""Calling job workflows from a request: bounded in time, every failure an envelope.

An update needs a workflow worker to answer; with none polling, it would wait forever and
so would the client. Each call here is bounded (``WORKFLOW_TIMEOUT_SECONDS``) and its
failures become API errors that say what happened and what to do.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from temporalio.client import WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.envelope import ApiError
from workflows import constants as c

T = TypeVar("T")

WORKFLOW_TIMEOUT_SECONDS = 30.0
"""How long a request waits for a job workflow to answer an update."""


class WorkflowGoneError(Exception):
    """The job's workflow does not exist (never started, or ended after a delete)."""


def refusal(err: WorkflowUpdateFailedError) -> str:
    """The reason a workflow gave for refusing an update."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.message
    return str(cause or err)


async def call_workflow(what: str, call: Awaitable[T]) -> T:
    """Await a workflow call; refusals become 409 (503 when the run store is down),
    silence 503, and a missing workflow ``WorkflowGoneError`` for the route to handle.

    Args:
        what: What the call does, for the messages ("trigger job 3").
        call: The update (or update-with-start) to await.
    """
    try:
        return await asyncio.wait_for(call, WORKFLOW_TIMEOUT_SECONDS)
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
        # The SDK answers the cancellation of a waiting update with its own error.
        raise ApiError(
            503,
            f"Could not {what}: no workflow worker answered within "
            f"{WORKFLOW_TIMEOUT_SECONDS:.0f} s. Check that the Runslot workers "
            "(runslot worker --pool workflows) are running against this Temporal server.",
        ) from None
    except WorkflowUpdateFailedError as err:
        cause = err.cause
        code = 409
        if isinstance(cause, ApplicationError) and cause.type == c.STORE_UNAVAILABLE:
            code = 503
        raise ApiError(code, f"Could not {what}: {refusal(err)}") from None
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            raise WorkflowGoneError(str(err)) from None
        raise ApiError(503, f"Could not {what}: Temporal refused the call: {err}") from None
