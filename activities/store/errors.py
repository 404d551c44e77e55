"""The run store's errors, written out in one place.

Each carries the ``ApplicationError.type`` its activity raises (pinned: workflows and retry
policies match on it) and whether retrying the same call can succeed.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of the run store's own errors (database errors are SQLAlchemy's, retryable)."""

    error_type = "StoreError"
    retryable = False


class UnknownAccountError(StoreError, LookupError):
    error_type = "StoreUnknownAccount"


class UnknownJobError(StoreError, LookupError):
    """The job is not in the store (yet): its upsert may still be on its way, so retry."""

    error_type = "StoreUnknownJob"
    retryable = True


class UnknownRunError(StoreError, LookupError):
    error_type = "StoreUnknownRun"


class InvalidRecordError(StoreError, ValueError):
    """The call itself is wrong (a naive datetime, a reserved key, a key owned by another
    job): the same call fails the same way, so it is not retried."""

    error_type = "StoreInvalidRecord"


class RerunRefusedError(StoreError, ValueError):
    """A rerun from failure names a run that cannot be rerun (unknown, another job's, or not
    failed): the message says which, and the trigger is refused."""

    error_type = "StoreRerunRefused"
