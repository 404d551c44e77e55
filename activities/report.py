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
"""

from __future__ import annotations

from temporalio import activity

from activities.control import signal_workflow
from activities.store.activities import in_thread, notify_dependents
from activities.store.store import RunStore
from activities.telemetry import TelemetryQueue
from activities.webhooks import WebhookPublisher
from workflows.models import ReportRunInput, ReportRunResult, TelemetryEvent


class RunReporter:
    def __init__(
        self, store: RunStore, publisher: WebhookPublisher, telemetry: TelemetryQueue
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._telemetry = telemetry

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
