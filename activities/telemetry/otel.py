"""OpenTelemetry for finished runs: one trace per run, run metrics, live queue and slot gauges.

Everything is derived from the ``TelemetryEvent`` the run workflow already sends (its
``RunResult``), after the run ended: spans are created after the fact with explicit start
and end timestamps.

Trace of a run (``run {run_id}``, created_at → finished_at), children where the run got
that far:

- ``wait``: created_at → dequeued_at (slot granted; for CI runs, which take no slot, the
  moment the run started). A run that never left the queue (cancelled, queue timeout) waits
  until it finished.
- ``prep``: dequeued_at → started_at (first step). A run that ended during prep (prep
  failed, cancelled) preps until it finished; the span carries the error if prep failed.
- ``step N: dbt …``: each step's own started_at → finished_at, exit code and status.

Metrics: ``runslot.run.wait_time`` and ``runslot.run.prep_time`` (histograms, seconds),
``runslot.runs.finished`` and ``runslot.runs.failed_to_start`` (counters; a run fails to
start when it ends in Error or Cancelled before its first step), and, with a Temporal
client, the live gauges of ``live.py`` (``runslot.queue.depth``, ``runslot.slots.in_use``,
``runslot.slots.capacity``).

``emit`` is bounded: it only records into the SDK's in-memory structures. Spans are
exported by the batch span processor's thread and metrics by the periodic reader's thread,
never inline, so a dead or slow collector cannot slow or fail the telemetry activity (its
export errors are logged by the SDK). ``emit`` never raises: a retry could not do better.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Literal

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Status, StatusCode
from opentelemetry.util.types import Attributes
from temporalio.client import Client

from activities.telemetry import names as n
from activities.telemetry.live import LiveState
from workflows.models import RunResult, RunStatus, StepResult, TelemetryEvent

log = logging.getLogger(__name__)

DURATION_BUCKETS = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    7200.0, 14400.0,
)  # fmt: skip
"""Seconds: from an idle stack's sub-second wait to hours in a backlog."""
MAX_ATTRIBUTE_CHARS = 1000
REMEMBERED_RUNS = 10_000
"""Runs already emitted by this process: a retried telemetry activity records nothing twice."""
SHUTDOWN_TIMEOUT_SECONDS = 10.0

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class OpenTelemetrySink:
    """A ``TelemetrySink`` that records a trace and metrics per finished run.

    It owns its tracer and meter providers (the global ones are left alone). Use it as an
    async context manager, or call ``aclose``: that stops the live gauges' refresh and
    flushes and shuts the providers down within ``shutdown_timeout`` seconds.
    """

    def __init__(
        self,
        *,
        span_exporter: SpanExporter,
        metric_readers: Sequence[MetricReader],
        live: LiveState | None = None,
        resource: Resource | None = None,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT_SECONDS,
    ) -> None:
        resource = resource or default_resource()
        self.tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        self.meter_provider = MeterProvider(
            metric_readers=list(metric_readers), resource=resource, shutdown_on_exit=False
        )
        self.live = live
        self._shutdown_timeout = shutdown_timeout
        self._closed = False
        self._emitted: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._tracer = self.tracer_provider.get_tracer(n.INSTRUMENTATION_SCOPE)
        meter = self.meter_provider.get_meter(n.INSTRUMENTATION_SCOPE)
        self._wait_time = meter.create_histogram(
            n.WAIT_TIME, unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            description="Queued until a run slot was granted (CI runs: until they started).",
        )  # fmt: skip
        self._prep_time = meter.create_histogram(
            n.PREP_TIME, unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            description="Slot granted until the first step started.",
        )  # fmt: skip
        self._finished = meter.create_counter(
            n.RUNS_FINISHED, unit="{run}", description="Runs finished, by final status."
        )
        self._failed_to_start = meter.create_counter(
            n.RUNS_FAILED_TO_START, unit="{run}",
            description="Runs that ended in Error or Cancelled before their first step.",
        )  # fmt: skip
        if live is not None:
            meter.create_observable_gauge(
                n.QUEUE_DEPTH, callbacks=[live.observe_queue_depth], unit="{run}",
                description="Runs queued now: in a job's own queue (runslot.queue=job) or "
                "waiting for one of the account's slots (runslot.queue=slots).",
            )  # fmt: skip
            meter.create_observable_gauge(
                n.SLOTS_IN_USE, callbacks=[live.observe_slots_in_use], unit="{slot}",
                description="Run slots held now, per account.",
            )  # fmt: skip
            meter.create_observable_gauge(
                n.SLOTS_CAPACITY, callbacks=[live.observe_slots_capacity], unit="{slot}",
                description="Run slots an account has.",
            )  # fmt: skip

    # ------------------------------------------------------------------ TelemetrySink

    async def emit(self, event: TelemetryEvent) -> None:
        run = event.run
        key = (run.account_id, run.run_id)
        if key in self._emitted:
            log.info("telemetry of run %s/%s already recorded", *key)
            return
        try:
            self._record_metrics(run)
            self._record_trace(run)
        except Exception:  # telemetry never fails; a retry would fail the same way
            log.exception("telemetry of run %s/%s not recorded", *key)
        self._emitted[key] = None
        if len(self._emitted) > REMEMBERED_RUNS:
            self._emitted.popitem(last=False)
        if self.live is not None:
            self.live.track(run.account_id, run.job_id)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> OpenTelemetrySink:
        if self.live is not None:
            self.live.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the live refresh, then flush and shut down both providers (bounded)."""
        if self._closed:
            return
        self._closed = True
        if self.live is not None:
            await self.live.stop()
        timeout_ms = int(self._shutdown_timeout * 1000)
        # Each provider in its own daemon thread: a collector that never answers cannot
        # keep the worker from exiting, and slow traces do not eat the metrics' budget.
        done = [
            _in_daemon_thread(self.tracer_provider.shutdown, "traces"),
            _in_daemon_thread(lambda: self.meter_provider.shutdown(timeout_ms), "metrics"),
        ]
        finished, pending = await asyncio.wait(
            [asyncio.wrap_future(f) for f in done], timeout=self._shutdown_timeout
        )
        for future in finished:
            if future.exception() is not None:
                log.warning("telemetry shutdown failed: %s", future.exception())
        if pending:
            for future in pending:
                future.cancel()  # the thread goes on (daemon); nobody waits for it any more
            log.warning(
                "telemetry not flushed within %.0f s: the rest is dropped", self._shutdown_timeout
            )

    def force_flush(self, timeout_seconds: float = 5.0) -> bool:
        """Export what is buffered now (blocking: for tests and tools, not for ``emit``)."""
        timeout_ms = int(timeout_seconds * 1000)
        traces = self.tracer_provider.force_flush(timeout_ms)
        return self.meter_provider.force_flush(timeout_ms) and traces

    # ------------------------------------------------------------------ recording

    def _record_metrics(self, run: RunResult) -> None:
        attrs = {n.ACCOUNT: run.account_id, n.JOB: run.job_id, n.CAUSE: run.cause.value}
        if run.wait_time is not None:
            self._wait_time.record(max(run.wait_time.total_seconds(), 0.0), attrs)
        if run.prep_time is not None:
            self._prep_time.record(max(run.prep_time.total_seconds(), 0.0), attrs)
        status = {**attrs, n.STATUS: run.status.humanized}
        self._finished.add(1, status)
        if run.status in (RunStatus.ERROR, RunStatus.CANCELLED) and run.started_at is None:
            phase = "queue" if run.dequeued_at is None else "prep"
            self._failed_to_start.add(1, {**status, n.PHASE: phase})

    def _record_trace(self, run: RunResult) -> None:
        end = run.finished_at or _last_known_time(run)
        ids: dict[str, str] = {n.ACCOUNT: run.account_id, n.JOB: run.job_id, n.RUN: run.run_id}
        # An empty context: a new trace, whatever span may be current in this activity.
        root = self._tracer.start_span(
            f"run {run.run_id}", context=Context(), start_time=_ns(run.created_at),
            attributes=_run_attributes(run),
        )  # fmt: skip
        if run.status == RunStatus.ERROR:
            root.set_status(Status(StatusCode.ERROR, run.status_message or "Error"))
        parent = trace.set_span_in_context(root)
        self._child("wait", parent, run.created_at, run.dequeued_at or end, ids)
        if run.dequeued_at is not None:
            # A run that errored before its first step failed in prep.
            prep_failed = run.started_at is None and run.status == RunStatus.ERROR
            self._child(
                "prep", parent, run.dequeued_at, run.started_at or end, ids,
                error=(run.status_message or "Error") if prep_failed else None,
            )  # fmt: skip
        for step in run.steps:
            if step.started_at is None:
                continue
            self._child(
                f"step {step.index}: {step.name}", parent, step.started_at,
                step.finished_at or end, {**ids, **_step_attributes(step)},
                error=(step.message or "Error") if step.status == RunStatus.ERROR else None,
            )  # fmt: skip
        root.end(end_time=max(_ns(end), _ns(run.created_at)))

    def _child(
        self,
        name: str,
        parent: Context,
        start: datetime,
        end: datetime,
        attributes: Attributes,
        *,
        error: str | None = None,
    ) -> None:
        start_ns = _ns(start)
        span = self._tracer.start_span(
            name, context=parent, start_time=start_ns, attributes=attributes
        )
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=max(_ns(end), start_ns))


def default_resource() -> Resource:
    """``service.name=runslot`` unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES name one."""
    from_env = "OTEL_SERVICE_NAME" in os.environ or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    return Resource.create({} if from_env else {"service.name": n.SERVICE_NAME})


def build_otel_sink(
    kind: Literal["console", "otlp"],
    *,
    client: Client | None = None,
    otlp_endpoint: str | None = None,
    export_interval_seconds: float = 60.0,
    otlp_timeout_seconds: float | None = None,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_SECONDS,
) -> OpenTelemetrySink:
    """A sink exporting to stdout (``console``) or to a collector over OTLP/HTTP (``otlp``).

    ``otlp_endpoint`` is the collector's base URL (``http://collector:4318``); the signal
    paths ``/v1/traces`` and ``/v1/metrics`` are appended. Without it the exporters follow
    the standard variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
    ..., default ``http://localhost:4318``), as do their timeout and headers.
    """
    span_exporter: SpanExporter
    metric_exporter: MetricExporter
    if kind == "console":
        span_exporter, metric_exporter = ConsoleSpanExporter(), ConsoleMetricExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import (  # noqa: PLC0415
            OTLPMetricExporter,
        )
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        base = otlp_endpoint.rstrip("/") if otlp_endpoint else None
        span_exporter = OTLPSpanExporter(
            endpoint=f"{base}/v1/traces" if base else None, timeout=otlp_timeout_seconds
        )
        metric_exporter = OTLPMetricExporter(
            endpoint=f"{base}/v1/metrics" if base else None, timeout=otlp_timeout_seconds
        )
    reader = PeriodicExportingMetricReader(
        metric_exporter, export_interval_millis=export_interval_seconds * 1000
    )
    live = LiveState(client, interval=export_interval_seconds) if client is not None else None
    return OpenTelemetrySink(
        span_exporter=span_exporter,
        metric_readers=[reader],
        live=live,
        shutdown_timeout=shutdown_timeout,
    )


# ---------------------------------------------------------------------- helpers


def _ns(at: datetime) -> int:
    """Nanoseconds since the epoch, exactly (a float timestamp would lose microseconds)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1_000


def _last_known_time(run: RunResult) -> datetime:
    times = [run.created_at, run.dequeued_at, run.started_at]
    times += [t for step in run.steps for t in (step.started_at, step.finished_at)]
    return max(t for t in times if t is not None)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_ATTRIBUTE_CHARS else text[: MAX_ATTRIBUTE_CHARS - 1] + "…"


def _run_attributes(run: RunResult) -> dict[str, str | int]:
    attrs: dict[str, str | int] = {
        n.ACCOUNT: run.account_id,
        n.JOB: run.job_id,
        n.RUN: run.run_id,
        n.CAUSE: run.cause.value,
        n.STATUS: run.status.humanized,
        n.STATUS_CODE: int(run.status),
        n.STEP_COUNT: len(run.steps),
    }
    optional = {
        n.STATUS_MESSAGE: run.status_message,
        n.GIT_SHA: run.git_sha,
        n.DBT_VERSION: run.dbt_version,
        n.SCHEMA: run.schema_name,
    }
    attrs.update({k: _clip(v) for k, v in optional.items() if v})
    return attrs


def _step_attributes(step: StepResult) -> dict[str, str | int]:
    attrs: dict[str, str | int] = {
        n.STEP_INDEX: step.index,
        n.STEP_COMMAND: _clip(" ".join(step.argv)),
        n.STEP_STATUS: step.status.humanized,
        n.STEP_STATUS_CODE: int(step.status),
    }
    if step.exit_code is not None:
        attrs[n.STEP_EXIT_CODE] = step.exit_code
    if step.message:
        attrs[n.STEP_MESSAGE] = _clip(step.message)
    return attrs


def _in_daemon_thread(target: Callable[[], object], what: str) -> concurrent.futures.Future[None]:
    future: concurrent.futures.Future[None] = concurrent.futures.Future()

    def run() -> None:
        future.set_running_or_notify_cancel()  # running: a caller giving up cannot cancel it
        try:
            target()
        except Exception as err:  # noqa: BLE001 - reported through the future
            future.set_exception(err)
        else:
            future.set_result(None)

    threading.Thread(target=run, name=f"runslot-telemetry-shutdown-{what}", daemon=True).start()
    return future
