"""The run store's Temporal activities. Names are pinned: they are in histories.

Each one is idempotent (an upsert, or an allocation keyed by its request key), so Temporal
may retry it freely. The store's own errors become ``ApplicationError``s whose ``type`` says
whether a retry can help; database errors stay retryable (a restarting database recovers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.store.errors import StoreError
from activities.store.store import RunStore
from workflows.models import (
    AllocateRunInput,
    AllocateRunResult,
    RecordRunInput,
    RecordRunResult,
    UpsertJobInput,
    UpsertJobResult,
)

T = TypeVar("T")


class StoreActivities:
    def __init__(self, store: RunStore) -> None:
        self._store = store

    @activity.defn(name="store_upsert_job")
    async def upsert_job(self, request: UpsertJobInput) -> UpsertJobResult:
        def work() -> UpsertJobResult:
            if request.account is not None:
                self._store.upsert_account(request.account)
            job_id = self._store.upsert_job(
                request.job, request.id, deactivated=request.deactivated
            )
            return UpsertJobResult(id=job_id, job_id=request.job.job_id)

        return await _in_thread(work)

    @activity.defn(name="store_allocate_run")
    async def allocate_run(self, request: AllocateRunInput) -> AllocateRunResult:
        def work() -> AllocateRunResult:
            run_id = self._store.allocate_run(
                request.account_id, request.job_id, request.request_key, trigger=request.trigger
            )
            return AllocateRunResult(id=run_id, run_id=str(run_id))

        return await _in_thread(work)

    @activity.defn(name="store_record_run")
    async def record_run(self, request: RecordRunInput) -> RecordRunResult:
        return await _in_thread(lambda: self._store.record_run(request))


async def _in_thread(work: Callable[[], T]) -> T:
    try:
        return await asyncio.to_thread(work)
    except StoreError as err:
        raise ApplicationError(
            str(err), type=err.error_type, non_retryable=not err.retryable
        ) from err
