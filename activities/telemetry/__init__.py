"""Post-run telemetry, handed off after the run's slot is released.

A run's final report (local activity ``report_run``) hands its telemetry to a bounded
in-process queue (``TelemetryQueue``) and returns: a sink that hangs or fails can never hold
a slot, a run or a workflow task, its calls have a timeout and at most
``TELEMETRY_RETRY.maximum_attempts`` attempts, and a queue that is full drops new events
with a warning instead of growing (the dbt Cloud incident of February 2026). This is how
OpenTelemetry SDKs export, and it costs a run no history events; the ``emit_run_telemetry``
activity on the telemetry task queue remains for a run whose report could not be made. The
sink is
a small Protocol: ``LogSink`` writes a log line, ``OpenTelemetrySink`` (``.otel``) records a
trace and metrics per finished run. ``build_sink`` picks one from the worker's settings; the
OpenTelemetry SDK is imported only when it is asked for.

A sink built by ``build_sink`` is an async context manager: the worker enters it before its
workers and leaves it after them, so the last runs' telemetry is flushed on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol

from temporalio import activity

from workflows.constants import TELEMETRY_RETRY, TELEMETRY_TIMEOUT
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


class TelemetryQueue:
    """Telemetry of finished runs, emitted in the background, bounded in every dimension.

    ``submit`` never waits and never fails. ``concurrency`` emits at most run at once (the
    telemetry task queue's 50 activity slots, as before), each with ``timeout``; a failed or
    timed-out emit is tried again once after ``retry_after`` (``TELEMETRY_RETRY``). At most
    ``capacity`` events wait; beyond that new ones are dropped and counted. The consumers
    start with the first event, in the caller's event loop.
    """

    def __init__(
        self,
        sink: TelemetrySink,
        *,
        capacity: int = 5000,
        concurrency: int = 50,
        timeout: float = TELEMETRY_TIMEOUT.total_seconds(),
        attempts: int = TELEMETRY_RETRY.maximum_attempts,
        retry_after: float = TELEMETRY_RETRY.initial_interval.total_seconds(),
    ) -> None:
        self._sink = sink
        self._capacity = capacity
        self._concurrency = concurrency
        self._timeout = timeout
        self._attempts = max(attempts, 1)
        self._retry_after = retry_after
        self._queue: asyncio.Queue[TelemetryEvent] | None = None
        self._consumers: list[asyncio.Task[None]] = []
        self.dropped = 0
        self.failed = 0

    def submit(self, event: TelemetryEvent) -> bool:
        """Queue ``event``; False (and counted) if the queue is full."""
        if self._queue is None:
            self._queue = asyncio.Queue(maxsize=self._capacity)
            self._consumers = [
                asyncio.create_task(self._consume(), name=f"telemetry-{i}")
                for i in range(self._concurrency)
            ]
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8...: never a log storm
                log.warning(
                    "telemetry queue full (%d): %d events dropped", self._capacity, self.dropped
                )
            return False
        return True

    async def aclose(self, within: float = 5.0) -> None:
        """Emit what is queued or being emitted, for at most ``within`` seconds; then stop."""
        if self._queue is not None:
            try:
                await asyncio.wait_for(self._queue.join(), within)
            except TimeoutError:
                log.warning("telemetry: %d events not emitted at shutdown", self._queue.qsize())
        for task in self._consumers:
            task.cancel()
        await asyncio.gather(*self._consumers, return_exceptions=True)
        self._consumers = []

    async def _consume(self) -> None:
        assert self._queue is not None
        while True:
            event = await self._queue.get()
            try:
                await self._emit(event)
            finally:
                self._queue.task_done()

    async def _emit(self, event: TelemetryEvent) -> None:
        for attempt in range(1, self._attempts + 1):
            try:
                await asyncio.wait_for(self._sink.emit(event), self._timeout)
            except Exception as err:  # noqa: BLE001 - telemetry never fails anything else
                if attempt == self._attempts:
                    self.failed += 1
                    log.warning("telemetry of run %s failed: %r", event.run.run_id, err)
                    return
                await asyncio.sleep(self._retry_after)
            else:
                return
