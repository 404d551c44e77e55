"""How a job records a run that ended without telling it (``closed_workflows`` details)."""

from __future__ import annotations

import pytest

from workflows.job import _finished_unreported
from workflows.models import ClosedWorkflow, RunStatus


@pytest.mark.parametrize(
    ("end", "status", "message", "to_store"),
    [
        # A run that completed wrote its own end to the store: the job only learns it.
        (
            ClosedWorkflow(close_status="COMPLETED", result_status=20, result_message="boom"),
            RunStatus.ERROR,
            "boom",
            False,
        ),
        (ClosedWorkflow(close_status="TERMINATED"), RunStatus.CANCELLED, "terminated", True),
        (ClosedWorkflow(close_status="CANCELED"), RunStatus.CANCELLED, "Cancelled", True),
        (ClosedWorkflow(close_status="FAILED"), RunStatus.ERROR, "ended with failed", True),
        (ClosedWorkflow(close_status="TIMED_OUT"), RunStatus.ERROR, "ended with timed out", True),
        (ClosedWorkflow(close_status="NOT_FOUND"), RunStatus.CANCELLED, "without reporting", True),
        # Completed, but its result could not be read: never counted as a success.
        (ClosedWorkflow(close_status="COMPLETED"), RunStatus.CANCELLED, "without reporting", True),
        (
            ClosedWorkflow(close_status="COMPLETED", result_status=99),
            RunStatus.CANCELLED,
            "without reporting",
            True,
        ),
        (
            ClosedWorkflow(close_status="COMPLETED", result_status=3),  # Running: not an end
            RunStatus.CANCELLED,
            "without reporting",
            True,
        ),
    ],
)
def test_a_silent_run_is_recorded_from_how_its_workflow_closed(
    end: ClosedWorkflow, status: RunStatus, message: str, to_store: bool
) -> None:
    finished, store = _finished_unreported("7", end)
    assert (finished.run_id, finished.status, store) == ("7", status, to_store)
    assert message in finished.message
