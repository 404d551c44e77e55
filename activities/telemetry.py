"""Post-run telemetry, on its own task queue.

It runs after the run's slot is released, with short timeouts and bounded retries, and its
failure never changes a run's status (the dbt Cloud incident of February 2026). The sink is
a small Protocol so the OpenTelemetry exporter (next issue) plugs in without touching callers.
"""

from __future__ import annotations

import logging
from typing import Protocol

from temporalio import activity

from workflows.models import TelemetryEvent

log = logging.getLogger(__name__)


class TelemetrySink(Protocol):
    async def emit(self, event: TelemetryEvent) -> None: ...


class LogSink:
    """Writes one structured log line per finished run."""

    async def emit(self, event: TelemetryEvent) -> None:
        run = event.run
        log.info(
            "run finished account=%s job=%s run=%s status=%s wait=%s prep=%s",
            run.account_id, run.job_id, run.run_id, run.status.humanized,
            run.wait_time, run.prep_time,
        )  # fmt: skip


class TelemetryActivities:
    def __init__(self, sink: TelemetrySink) -> None:
        self._sink = sink

    @activity.defn(name="emit_run_telemetry")
    async def emit_run_telemetry(self, event: TelemetryEvent) -> None:
        await self._sink.emit(event)
