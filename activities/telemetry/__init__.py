"""Post-run telemetry, on its own task queue.

It runs after the run's slot is released, with short timeouts and bounded retries, and its
failure never changes a run's status (the dbt Cloud incident of February 2026). The sink is
a small Protocol: ``LogSink`` writes a log line, ``OpenTelemetrySink`` (``.otel``) records a
trace and metrics per finished run. ``build_sink`` picks one from the worker's settings; the
OpenTelemetry SDK is imported only when it is asked for.

A sink built by ``build_sink`` is an async context manager: the worker enters it before its
workers and leaves it after them, so the last runs' telemetry is flushed on shutdown.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol

from temporalio import activity

from workflows.models import TelemetryEvent

if TYPE_CHECKING:
    from temporalio.client import Client

    from activities.telemetry.otel import OpenTelemetrySink

log = logging.getLogger(__name__)

ExporterKind = Literal["log", "console", "otlp"]
"""``log``: one log line per run; ``console``: OpenTelemetry spans and metrics printed to
stdout; ``otlp``: OpenTelemetry over OTLP/HTTP to a collector."""


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

    async def __aenter__(self) -> LogSink:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


def build_sink(
    kind: ExporterKind,
    *,
    client: Client | None = None,
    otlp_endpoint: str | None = None,
    export_interval_seconds: float = 60.0,
) -> LogSink | OpenTelemetrySink:
    """The sink a telemetry worker uses. ``client`` feeds the live gauges (queue depth,
    slots in use); without it only the per-run trace and metrics are recorded."""
    if kind == "log":
        return LogSink()
    from activities.telemetry.otel import build_otel_sink  # noqa: PLC0415 - the SDK on demand

    return build_otel_sink(
        kind,
        client=client,
        otlp_endpoint=otlp_endpoint,
        export_interval_seconds=export_interval_seconds,
    )


class TelemetryActivities:
    def __init__(self, sink: TelemetrySink) -> None:
        self._sink = sink

    @activity.defn(name="emit_run_telemetry")
    async def emit_run_telemetry(self, event: TelemetryEvent) -> None:
        await self._sink.emit(event)
