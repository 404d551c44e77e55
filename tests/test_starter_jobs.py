"""Client-side job operations: the not-ready retry of updates."""

from __future__ import annotations

import pytest
from temporalio.service import RPCError, RPCStatusCode

from starter.jobs import _update


def _not_ready() -> RPCError:
    return RPCError(
        "Workflow is not ready to handle the request.", RPCStatusCode.FAILED_PRECONDITION, b""
    )


async def test_an_update_refused_as_not_ready_is_retried_until_it_goes_through() -> None:
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise _not_ready()
        return "run-7"

    assert await _update(call) == "run-7"
    assert calls == 3


async def test_other_update_errors_are_not_retried() -> None:
    calls = 0

    async def call() -> str:
        nonlocal calls
        calls += 1
        raise RPCError("workflow not found", RPCStatusCode.NOT_FOUND, b"")

    with pytest.raises(RPCError, match="not found"):
        await _update(call)
    assert calls == 1
