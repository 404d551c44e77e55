"""``report_run``: a run's progress reported in one local activity.

At its first step and at its end a run has several things to say: the slot is free, here is
its snapshot for the run store, the job may start its next run, the account's webhooks have
an event. Each is idempotent, so one local activity says them all, in that order, and a
failed attempt simply says them all again: one marker event in the run's history where they
used to be one each (``tests/test_history_budget.py``).

The release goes first, so a slow or unavailable run store never holds a slot; the jobs
that run on this job's completion, and then the job, are told after the snapshot is stored
(a triggered run, or the job's next one, may read it).
A final report then hands the run's telemetry to the worker's ``TelemetryQueue``: emitted
in the background, bounded, never waited for.

``request_slot`` is the run's first local activity: the slot request, and, when the slot is
granted in the answer, the run's Starting snapshot, one marker where they were two.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from temporalio import activity

from activities.control import acquire_slot, signal_workflow
from activities.store.activities import in_thread, notify_dependents
from activities.store.store import RunStore
from activities.telemetry import TelemetryQueue
from activities.webhooks import WebhookPublisher
from workflows.models import (
    ReportRunInput,
    ReportRunResult,
    SlotAnswer,
    SlotsStartRequest,
    TelemetryEvent,
)


class RunReporter:
    def __init__(
        self, store: RunStore, publisher: WebhookPublisher, telemetry: TelemetryQueue
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._telemetry = telemetry

    @activity.defn(name="request_slot")
    async def request_slot(self, request: SlotsStartRequest) -> SlotAnswer:
        """Ask for a slot (``acquire_slot``); granted at once, also store the run's Starting
        snapshot (``request.starting``) with ``dequeued_at`` the grant's time.

        A snapshot that cannot be written never costs the run its slot: the answer says it
        is not recorded, and the run writes it itself (and logs if that fails too).
        """
        answer = await acquire_slot(request)
        if answer.granted_at is None or request.starting is None:
            return answer
        run = request.starting.run.model_copy(update={"dequeued_at": answer.granted_at})
        starting = request.starting.model_copy(update={"run": run})
        try:
            await in_thread(lambda: self._store.record_run(starting))
        except Exception as err:  # noqa: BLE001 - the grant stands; the run writes it
            activity.logger.warning("Starting snapshot of %s not stored: %s", run.run_id, err)
            return answer
        return answer.model_copy(update={"recorded": True})

    @activity.defn(name="report_run")
    async def report_run(self, request: ReportRunInput) -> ReportRunResult:
        if request.release is not None and not await signal_workflow(request.release):
            activity.logger.info("release of %s: no slots workflow", request.record.run.run_id)
        record = await in_thread(lambda: self._store.record_run(request.record))
        finished = request.finished
        if request.notify is not None:
            try:
                await notify_dependents(self._store, request.notify)
            except Exception as err:  # noqa: BLE001 - the job's signal must not wait on it
                # The job sends the triggers itself (dependents deduplicate a repeat).
                activity.logger.warning("job-completion triggers not sent here: %s", err)
                if finished is not None:
                    payload = {**finished.payload, "dependents_notified": False}
                    finished = finished.model_copy(update={"payload": payload})
        if finished is not None and not await signal_workflow(finished):
            activity.logger.info("run %s: its job's workflow is gone", request.record.run.run_id)
        deliveries = 0
        if request.publish is not None:
            deliveries = (await self._publisher.publish_run_event(request.publish)).deliveries
        if request.telemetry:
            # Last, once everything else is said: a retried attempt never queues it twice.
            self._telemetry.submit(TelemetryEvent(run=request.record.run))
        return ReportRunResult(record=record, deliveries=deliveries)

    def all(self) -> list[Callable[..., Any]]:
        """The run's two reporting local activities, for the workflow worker."""
        return [self.request_slot, self.report_run]
