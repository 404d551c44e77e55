"""The error hierarchy, written out in one place.

Activities raise ``ApplicationError`` with one of the ``type`` names below so that retry
policies and the run workflow can tell them apart without importing exception classes.
"""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

MEMORY_LIMIT_MESSAGE = "This run exceeded your account's run memory limits"


class ErrorType:
    """``ApplicationError.type`` values raised by Runslot activities."""

    STEP_FAILED = "StepFailed"
    """The dbt process exited non-zero: the step (and the run) is in Error."""
    STEP_START_FAILED = "StepStartFailed"
    """The process could not even start (bad binary, bad environment): fails this run only."""
    MEMORY_LIMIT = "MemoryLimitExceeded"
    PREP_FAILED = "PrepFailed"
    RUN_TIMEOUT = "RunTimeout"
    """The step was stopped at the run's deadline (the job's timeout)."""
    INVALID_PAYLOAD = "InvalidPayload"

    NON_RETRYABLE = (STEP_FAILED, STEP_START_FAILED, MEMORY_LIMIT, INVALID_PAYLOAD, RUN_TIMEOUT)


def step_failed(message: str, exit_code: int | None) -> ApplicationError:
    return ApplicationError(message, exit_code, type=ErrorType.STEP_FAILED, non_retryable=True)


def step_start_failed(message: str) -> ApplicationError:
    return ApplicationError(message, type=ErrorType.STEP_START_FAILED, non_retryable=True)


def memory_limit_exceeded() -> ApplicationError:
    return ApplicationError(MEMORY_LIMIT_MESSAGE, type=ErrorType.MEMORY_LIMIT, non_retryable=True)


def prep_failed(message: str, *, retryable: bool) -> ApplicationError:
    return ApplicationError(message, type=ErrorType.PREP_FAILED, non_retryable=not retryable)


def run_timed_out(message: str) -> ApplicationError:
    return ApplicationError(message, type=ErrorType.RUN_TIMEOUT, non_retryable=True)
