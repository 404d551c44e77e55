"""The run store's Temporal activities. Names are pinned: they are in histories.

Each one is idempotent (an upsert, or an allocation keyed by its request key), so Temporal
may retry it freely. The store's own errors become ``ApplicationError``s whose ``type`` says
whether a retry can help; database errors stay retryable (a restarting database recovers).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.store.errors import StoreError
from activities.store.store import RunStore
from workflows.constants import SIGNAL_UPSTREAM_FINISHED, job_workflow_id
from workflows.models import (
    AllocateRunInput,
    AllocateRunResult,
    NotifyDependentsInput,
    RecordRunInput,
    RecordRunResult,
    RerunPlan,
    RerunPlanInput,
    UpsertJobInput,
    UpsertJobResult,
    UpstreamFinished,
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
                request.job,
                request.id,
                deactivated=request.deactivated,
                extra=request.extra,
                state=request.state,
            )
            return UpsertJobResult(id=job_id, job_id=request.job.job_id)

        return await in_thread(work)

    @activity.defn(name="store_allocate_run")
    async def allocate_run(self, request: AllocateRunInput) -> AllocateRunResult:
        def work() -> AllocateRunResult:
            run_id = self._store.allocate_run(
                request.account_id,
                request.job_id,
                request.request_key,
                trigger=request.trigger,
                abandoned=request.abandoned,
            )
            return AllocateRunResult(id=run_id, run_id=str(run_id))

        return await in_thread(work)

    @activity.defn(name="store_record_run")
    async def record_run(self, request: RecordRunInput) -> RecordRunResult:
        return await in_thread(lambda: self._store.record_run(request))

    @activity.defn(name="store_rerun_plan")
    async def rerun_plan(self, request: RerunPlanInput) -> RerunPlan:
        return await in_thread(
            lambda: self._store.rerun_plan(request.account_id, request.job_id, request.run_id)
        )

    @activity.defn(name="notify_dependents")
    async def notify_dependents(self, request: NotifyDependentsInput) -> int:
        """Signal every job of the account that runs on this job's completion (rule 7)."""
        return await notify_dependents(self._store, request)

    def all(self) -> list[Callable[..., Any]]:
        """Every store activity: the workflow worker runs them as local activities."""
        return [
            self.upsert_job,
            self.allocate_run,
            self.record_run,
            self.rerun_plan,
            self.notify_dependents,
        ]


async def notify_dependents(store: RunStore, request: NotifyDependentsInput) -> int:
    """Signal every job of the account that runs on this job's completion (rule 7): from
    the job (a run it ended itself) or from the run's own final report.

    Returns how many were signalled. A dependent whose workflow is gone (a deleted job) is
    skipped; any other failure fails the call, and a retry signals again, which the
    dependents deduplicate (``upstream:{job}:{run}``).
    """
    dependents = await in_thread(lambda: store.dependent_jobs(request.account_id, request.job_id))
    client = activity.client()
    payload = UpstreamFinished(job_id=request.job_id, run_id=request.run_id, status=request.status)
    sent = 0
    for key in dependents:
        workflow_id = job_workflow_id(request.account_id, key)
        if workflow_id == request.source_workflow_id:
            continue
        try:
            await client.get_workflow_handle(workflow_id).signal(SIGNAL_UPSTREAM_FINISHED, payload)
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            continue
        sent += 1
    return sent


async def in_thread(work: Callable[[], T]) -> T:
    try:
        return await asyncio.to_thread(work)
    except StoreError as err:
        raise ApplicationError(
            str(err), type=err.error_type, non_retryable=not err.retryable
        ) from err
