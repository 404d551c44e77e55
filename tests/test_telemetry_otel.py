"""OpenTelemetry for finished runs: a trace per run, run metrics, live queue and slot gauges.

Unit tests feed hand-built ``TelemetryEvent``s to an ``OpenTelemetrySink`` backed by
in-memory exporters; OTLP is checked against a tiny local collector and a dead port; the
end-to-end tests go through the real dev server, workers and workflows.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
import pytest_asyncio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    NumberDataPoint,
)
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from pydantic import ValidationError
from temporalio.testing import WorkflowEnvironment

from activities.telemetry import LogSink, build_sink
from activities.telemetry import names as n
from activities.telemetry.live import LiveState
from activities.telemetry.otel import DURATION_BUCKETS, OpenTelemetrySink, build_otel_sink
from starter import jobs
from tests.builders import account, job, wait_for, wait_run
from tests.conftest import running_stack, unique
from tests.fakes import FakeDbtExecutor
from worker.settings import WorkerSettings
from workflows.models import (
    RunResult,
    RunStatus,
    StepResult,
    TelemetryEvent,
    TriggerCause,
    TriggerOverrides,
    TriggerRequest,
)

T0 = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def ns(when: datetime) -> int:
    return int((when - datetime(1970, 1, 1, tzinfo=UTC)) / timedelta(microseconds=1)) * 1000


def step(index: int, command: str, start: float, end: float, **kw: Any) -> StepResult:
    argv = command.split()
    kw.setdefault("status", RunStatus.SUCCESS)
    kw.setdefault("exit_code", 0)
    return StepResult(
        index=index, name=" ".join(argv[:3]), argv=argv,
        started_at=at(start), finished_at=at(end), **kw,
    )  # fmt: skip


def run(**kw: Any) -> TelemetryEvent:
    kw.setdefault("run_id", "101")
    kw.setdefault("account_id", "acme")
    kw.setdefault("job_id", "nightly")
    kw.setdefault("cause", TriggerCause.SCHEDULED)
    kw.setdefault("created_at", at(0))
    return TelemetryEvent(run=RunResult(**kw))


def success_with_two_steps() -> TelemetryEvent:
    return run(
        status=RunStatus.SUCCESS, dequeued_at=at(3), started_at=at(5), finished_at=at(20),
        steps=[step(1, "dbt deps", 5, 8.123456), step(2, "dbt run -s orders", 8.123456, 19.5)],
        git_sha="abc1234", dbt_version="1.10.2",
    )  # fmt: skip


# ---------------------------------------------------------------------- in-memory harness


@dataclass
class Otel:
    sink: OpenTelemetrySink
    exporter: InMemorySpanExporter
    reader: InMemoryMetricReader

    def spans(self) -> dict[str, ReadableSpan]:
        assert self.sink.force_flush()
        spans = self.exporter.get_finished_spans()
        by_name = {s.name: s for s in spans}
        assert len(by_name) == len(spans), f"span names repeat: {[s.name for s in spans]}"
        return by_name

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        if data is None:  # nothing recorded or observed at all
            return []
        return [
            point
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == metric
            for point in m.data.data_points
        ]

    def histogram(self, metric: str) -> list[HistogramDataPoint]:
        points = self.points(metric)
        assert all(isinstance(p, HistogramDataPoint) for p in points)
        return points

    def numbers(self, metric: str) -> dict[frozenset[tuple[str, Any]], float]:
        """Points by their attributes (as a frozenset of items)."""
        points = self.points(metric)
        assert all(isinstance(p, NumberDataPoint) for p in points)
        return {frozenset((p.attributes or {}).items()): p.value for p in points}


def in_memory_sink(live: LiveState | None = None, **kw: Any) -> Otel:
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    sink = OpenTelemetrySink(span_exporter=exporter, metric_readers=[reader], live=live, **kw)
    return Otel(sink, exporter, reader)


@pytest_asyncio.fixture
async def otel() -> AsyncIterator[Otel]:
    harness = in_memory_sink()
    async with harness.sink:
        yield harness


def attrs(**kw: str) -> frozenset[tuple[str, str]]:
    names = {"account": n.ACCOUNT, "job": n.JOB, "cause": n.CAUSE, "status": n.STATUS,
             "phase": n.PHASE, "queue": n.QUEUE}  # fmt: skip
    return frozenset((names[k], v) for k, v in kw.items())


def labels(point: HistogramDataPoint) -> frozenset[tuple[str, Any]]:
    return frozenset((point.attributes or {}).items())


def assert_children_of(root: ReadableSpan, spans: Sequence[ReadableSpan]) -> None:
    assert root.parent is None
    for span in spans:
        assert span.context is not None and root.context is not None
        assert span.context.trace_id == root.context.trace_id, span.name
        assert span.parent is not None and span.parent.span_id == root.context.span_id, span.name


# ---------------------------------------------------------------------- unit: traces + metrics


async def test_a_successful_run_is_one_trace_with_wait_prep_and_a_span_per_step(otel: Otel) -> None:
    await otel.sink.emit(success_with_two_steps())

    spans = otel.spans()
    assert set(spans) == {"run 101", "wait", "prep", "step 1: dbt deps", "step 2: dbt run -s"}
    root = spans.pop("run 101")
    assert_children_of(root, list(spans.values()))
    times = {name: (s.start_time, s.end_time) for name, s in spans.items()}
    assert (root.start_time, root.end_time) == (ns(at(0)), ns(at(20)))
    assert times == {
        "wait": (ns(at(0)), ns(at(3))),
        "prep": (ns(at(3)), ns(at(5))),
        "step 1: dbt deps": (ns(at(5)), ns(at(8.123456))),
        "step 2: dbt run -s": (ns(at(8.123456)), ns(at(19.5))),
    }
    assert ns(at(8.123456)) % 1_000_000_000 == 123_456_000, "exact to the microsecond"
    assert dict(root.attributes or {}) == {
        n.ACCOUNT: "acme", n.JOB: "nightly", n.RUN: "101", n.CAUSE: "scheduled",
        n.STATUS: "Success", n.STATUS_CODE: 10, n.STEP_COUNT: 2,
        n.GIT_SHA: "abc1234", n.DBT_VERSION: "1.10.2",
    }  # fmt: skip
    assert root.status.status_code == StatusCode.UNSET
    second = spans["step 2: dbt run -s"].attributes or {}
    assert second[n.STEP_COMMAND] == "dbt run -s orders"
    assert (second[n.STEP_INDEX], second[n.STEP_EXIT_CODE]) == (2, 0)
    assert (second[n.STEP_STATUS], second[n.STEP_STATUS_CODE]) == ("Success", 10)
    assert (second[n.RUN], second[n.ACCOUNT], second[n.JOB]) == ("101", "acme", "nightly")
    assert root.resource.attributes["service.name"] == "runslot"

    key = attrs(account="acme", job="nightly", cause="scheduled")
    [wait] = otel.histogram(n.WAIT_TIME)
    [prep] = otel.histogram(n.PREP_TIME)
    assert (wait.count, wait.sum, labels(wait)) == (1, 3.0, key)
    assert (prep.count, prep.sum, labels(prep)) == (1, 2.0, key)
    assert tuple(wait.explicit_bounds) == DURATION_BUCKETS, "seconds, not the SDK's ms buckets"
    assert otel.numbers(n.RUNS_FINISHED) == {key | attrs(status="Success"): 1}
    assert otel.numbers(n.RUNS_FAILED_TO_START) == {}


async def test_a_failed_step_marks_the_step_and_the_run_as_errors(otel: Otel) -> None:
    message = "Step 2 (dbt run -s) failed: exit code 1"
    await otel.sink.emit(
        run(
            status=RunStatus.ERROR, status_message=message, cause=TriggerCause.API,
            dequeued_at=at(1), started_at=at(2), finished_at=at(9),
            steps=[
                step(1, "dbt deps", 2, 4),
                step(2, "dbt run -s broken", 4, 8, status=RunStatus.ERROR, exit_code=1,
                     message="exit code 1"),
            ],
        )
    )  # fmt: skip

    spans = otel.spans()
    root = spans["run 101"]
    assert root.status.status_code == StatusCode.ERROR
    assert root.status.description == message
    assert (root.attributes or {})[n.STATUS] == "Error"
    assert (root.attributes or {})[n.STATUS_CODE] == 20
    assert (root.attributes or {})[n.STATUS_MESSAGE] == message
    failed = spans["step 2: dbt run -s"]
    assert failed.status.status_code == StatusCode.ERROR
    assert (failed.attributes or {})[n.STEP_EXIT_CODE] == 1
    assert (failed.attributes or {})[n.STEP_STATUS] == "Error"
    assert spans["step 1: dbt deps"].status.status_code == StatusCode.UNSET
    assert spans["prep"].status.status_code == StatusCode.UNSET
    key = attrs(account="acme", job="nightly", cause="api")
    assert otel.numbers(n.RUNS_FINISHED) == {key | attrs(status="Error"): 1}
    assert otel.numbers(n.RUNS_FAILED_TO_START) == {}, "its steps started"


async def test_a_run_cancelled_while_queued_has_only_the_root_and_wait(otel: Otel) -> None:
    await otel.sink.emit(
        run(status=RunStatus.CANCELLED, status_message="Cancelled by request", finished_at=at(30))
    )

    spans = otel.spans()
    assert set(spans) == {"run 101", "wait"}
    assert_children_of(spans["run 101"], [spans["wait"]])
    assert (spans["wait"].start_time, spans["wait"].end_time) == (ns(at(0)), ns(at(30)))
    assert spans["run 101"].status.status_code == StatusCode.UNSET
    key = attrs(account="acme", job="nightly", cause="scheduled", status="Cancelled")
    assert otel.histogram(n.WAIT_TIME) == [], "it never got a slot: no wait time to report"
    assert otel.histogram(n.PREP_TIME) == []
    assert otel.numbers(n.RUNS_FINISHED) == {key: 1}
    assert otel.numbers(n.RUNS_FAILED_TO_START) == {key | attrs(phase="queue"): 1}


async def test_a_run_that_failed_in_prep_failed_to_start(otel: Otel) -> None:
    message = "cannot check out the project: repository not found"
    await otel.sink.emit(
        run(status=RunStatus.ERROR, status_message=message, dequeued_at=at(2), finished_at=at(4))
    )

    spans = otel.spans()
    assert set(spans) == {"run 101", "wait", "prep"}
    assert (spans["prep"].start_time, spans["prep"].end_time) == (ns(at(2)), ns(at(4)))
    assert spans["prep"].status.status_code == StatusCode.ERROR
    assert spans["prep"].status.description == message
    key = attrs(account="acme", job="nightly", cause="scheduled", status="Error")
    assert otel.numbers(n.RUNS_FAILED_TO_START) == {key | attrs(phase="prep"): 1}
    assert [p.sum for p in otel.histogram(n.WAIT_TIME)] == [2.0]
    assert otel.histogram(n.PREP_TIME) == [], "no first step: no prep time"


async def test_a_ci_run_without_a_slot(otel: Otel) -> None:
    schema = "dbt_cloud_pr_ci_7"
    await otel.sink.emit(
        run(
            run_id="7", job_id="ci", cause=TriggerCause.PULL_REQUEST, status=RunStatus.SUCCESS,
            schema_name=schema, dequeued_at=at(0.01), started_at=at(0.5), finished_at=at(4),
            steps=[step(1, "dbt build --select state:modified+", 0.5, 3.9)],
        )
    )  # fmt: skip

    spans = otel.spans()
    assert set(spans) == {"run 7", "wait", "prep", "step 1: dbt build --select"}
    assert_children_of(spans["run 7"], [s for name, s in spans.items() if name != "run 7"])
    assert (spans["run 7"].attributes or {})[n.SCHEMA] == schema
    assert (spans["run 7"].attributes or {})[n.CAUSE] == "pull_request"
    key = attrs(account="acme", job="ci", cause="pull_request")
    [wait] = otel.histogram(n.WAIT_TIME)
    assert labels(wait) == key
    assert wait.sum == pytest.approx(0.01)
    assert otel.numbers(n.RUNS_FINISHED) == {key | attrs(status="Success"): 1}


async def test_each_run_is_its_own_trace_and_a_retried_event_is_recorded_once(otel: Otel) -> None:
    first, second = success_with_two_steps(), success_with_two_steps()
    second.run.run_id = "102"
    await otel.sink.emit(first)
    await otel.sink.emit(second)
    await otel.sink.emit(first)  # the telemetry activity's second attempt

    otel.sink.force_flush()
    spans = otel.exporter.get_finished_spans()
    roots = [s for s in spans if s.name.startswith("run ")]
    assert sorted(s.name for s in roots) == ["run 101", "run 102"]
    assert len({s.context.trace_id for s in roots if s.context is not None}) == 2
    assert len(spans) == 2 * 5
    key = attrs(account="acme", job="nightly", cause="scheduled", status="Success")
    assert otel.numbers(n.RUNS_FINISHED) == {key: 2}


class StuckExporter(SpanExporter):
    """A collector that takes forever to answer, then fails."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.calls += 1
        self.release.wait(2)
        return SpanExportResult.FAILURE


async def test_emit_is_bounded_and_shutdown_too_when_the_exporter_hangs() -> None:
    exporter = StuckExporter()
    sink = OpenTelemetrySink(
        span_exporter=exporter, metric_readers=[InMemoryMetricReader()], shutdown_timeout=0.5
    )
    loop = asyncio.get_running_loop()
    try:
        for index in range(120):  # 600 spans, more than a batch: the processor exports
            event = success_with_two_steps()
            event.run.run_id = str(index)
            started = loop.time()
            await sink.emit(event)
            assert loop.time() - started < 0.5, "emit never waits for the exporter"
        await wait_for(lambda: exporter.calls > 0, timeout=5, what="an export in progress")
        started = loop.time()
        await sink.aclose()
        assert loop.time() - started < 1.5, "shutdown gives up after shutdown_timeout"
    finally:
        exporter.release.set()


# ---------------------------------------------------------------------- sinks from settings


def test_worker_settings_choose_the_exporter() -> None:
    assert WorkerSettings().telemetry_exporter == "log"
    otlp = WorkerSettings(telemetry_exporter="otlp", otlp_endpoint="http://collector:4318")
    assert otlp.otlp_endpoint == "http://collector:4318"
    with pytest.raises(ValidationError, match="also set telemetry_exporter"):
        WorkerSettings(otlp_endpoint="http://collector:4318")
    with pytest.raises(ValidationError, match="http:// or https://"):
        WorkerSettings(telemetry_exporter="otlp", otlp_endpoint="collector:4318")
    with pytest.raises(ValidationError):
        WorkerSettings(telemetry_exporter="prometheus")


async def test_build_sink_log_and_console() -> None:
    assert isinstance(build_sink("log"), LogSink)
    console = build_sink("console", export_interval_seconds=3600)
    assert isinstance(console, OpenTelemetrySink)
    async with console:
        await console.emit(success_with_two_steps())


class Collector(BaseHTTPRequestHandler):
    """Just enough of an OTLP/HTTP collector: records each request's path and body."""

    received: list[tuple[str, bytes]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    received: list[tuple[str, bytes]] = []
    handler = type("Handler", (Collector,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def exported_span_names(received: list[tuple[str, bytes]]) -> list[str]:
    names = []
    for path, body in received:
        if path == "/v1/traces":
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            names += [
                span.name
                for rs in request.resource_spans
                for ss in rs.scope_spans
                for span in ss.spans
            ]
    return sorted(names)


@pytest.mark.parametrize("configured_by", ["flag", "env"])
async def test_otlp_exports_traces_and_metrics_to_the_collector(
    collector: tuple[str, list[tuple[str, bytes]]],
    configured_by: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, received = collector
    endpoint = url if configured_by == "flag" else None
    if configured_by == "env":
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    sink = build_sink("otlp", otlp_endpoint=endpoint, export_interval_seconds=3600)
    assert isinstance(sink, OpenTelemetrySink)
    async with sink:
        await sink.emit(success_with_two_steps())
    # Leaving the sink flushed both signals.
    assert {path for path, _ in received} == {"/v1/traces", "/v1/metrics"}
    assert exported_span_names(received) == sorted(
        ["run 101", "wait", "prep", "step 1: dbt deps", "step 2: dbt run -s"]
    )


# ---------------------------------------------------------------------- end to end


@pytest.mark.devserver
async def test_a_real_run_becomes_one_trace_with_its_ids(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("otel")
    otel = in_memory_sink()
    async with otel.sink, running_stack(client, fake_dbt, telemetry=otel.sink) as queues:
        await jobs.save_job(
            client, job(acct, "j", ["dbt deps", "dbt run -s ok"]), account(acct), queues
        )
        trigger = await jobs.trigger(client, acct, "j", TriggerRequest())
        # The run workflow returns after its telemetry activity: the sink has the event.
        result = await wait_run(client, acct, trigger.run_id, timeout=30)
        assert result.status == RunStatus.SUCCESS
        spans = otel.spans()

    run_id = trigger.run_id
    expected = {f"run {run_id}", "wait", "prep", "step 1: dbt deps", "step 2: dbt run -s ok"}
    assert set(spans) == expected
    root = spans.pop(f"run {run_id}")
    assert_children_of(root, list(spans.values()))
    for span in [root, *spans.values()]:
        ids = {k: (span.attributes or {})[k] for k in (n.ACCOUNT, n.JOB, n.RUN)}
        assert ids == {n.ACCOUNT: acct, n.JOB: "j", n.RUN: run_id}, span.name
    assert result.finished_at is not None and result.dequeued_at is not None
    assert (root.start_time, root.end_time) == (ns(result.created_at), ns(result.finished_at))
    assert spans["wait"].end_time == ns(result.dequeued_at)
    key = attrs(account=acct, job="j", cause="api", status="Success")
    assert otel.numbers(n.RUNS_FINISHED) == {key: 1}


@pytest.mark.devserver
async def test_live_gauges_show_queued_runs_and_slots_in_use(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("otelgauge")
    live = LiveState(client, interval=3600)  # refreshed by hand below
    otel = in_memory_sink(live)

    def gauges() -> dict[str, dict[frozenset[tuple[str, Any]], float]]:
        data = {m: otel.numbers(m) for m in (n.QUEUE_DEPTH, n.SLOTS_IN_USE, n.SLOTS_CAPACITY)}
        return {m: {k: v for k, v in points.items() if (n.ACCOUNT, acct) in k}
                for m, points in data.items()}  # fmt: skip

    gated = TriggerRequest(
        overrides=TriggerOverrides(steps_override=[["dbt", "run", "-s", "gate:g"]])
    )
    async with otel.sink, running_stack(client, fake_dbt, telemetry=otel.sink) as queues:
        for name in ("a", "b"):
            await jobs.save_job(client, job(acct, name), account(acct, run_slots=1), queues)
        await live.refresh()
        assert gauges() == {n.QUEUE_DEPTH: {}, n.SLOTS_IN_USE: {}, n.SLOTS_CAPACITY: {}}, (
            "nothing finished yet: nothing tracked, nothing reported"
        )
        for name in ("a", "b"):  # one finished run each: the sink has seen both jobs
            first = await jobs.trigger(client, acct, name, TriggerRequest())
            await wait_run(client, acct, first.run_id, timeout=30)

        a1 = await jobs.trigger(client, acct, "a", gated)
        await wait_for(lambda: a1.run_id in fake_dbt.started_runs(), timeout=15, what="a1 runs")
        b1 = await jobs.trigger(client, acct, "b", gated)  # waits for the only slot
        a2 = await jobs.trigger(client, acct, "a", gated)  # waits in job a's queue behind a1

        async def queued() -> bool:
            slots = await jobs.describe_slots(client, acct)
            desc = await jobs.describe_job(client, acct, "a")
            return len(slots.waiters) == 1 and len(desc.state.queue) == 1

        await wait_for(queued, timeout=15, what="b1 waits for a slot and a2 in a's queue")
        await live.refresh()
        assert gauges() == {
            n.QUEUE_DEPTH: {
                attrs(account=acct, job="a", queue="job"): 1,
                attrs(account=acct, job="b", queue="job"): 0,
                attrs(account=acct, queue="slots"): 1,
            },
            n.SLOTS_IN_USE: {attrs(account=acct): 1},
            n.SLOTS_CAPACITY: {attrs(account=acct): 1},
        }

        fake_dbt.open("g")
        for pending in (a1, b1, a2):
            assert (await wait_run(client, acct, pending.run_id, timeout=30)).status == (
                RunStatus.SUCCESS
            )
        await live.refresh()
        assert gauges()[n.SLOTS_IN_USE] == {attrs(account=acct): 0}
        assert set(gauges()[n.QUEUE_DEPTH].values()) == {0}

        # A value not refreshed for three intervals is dropped, never reported stale.
        live.interval = 0.01
        await asyncio.sleep(0.05)
        assert gauges() == {n.QUEUE_DEPTH: {}, n.SLOTS_IN_USE: {}, n.SLOTS_CAPACITY: {}}


@pytest.mark.devserver
async def test_live_state_forgets_workflows_that_do_not_exist(dev_env: WorkflowEnvironment) -> None:
    live = LiveState(dev_env.client, interval=3600)
    acct = unique("nosuch")
    live.track(acct, "nojob")
    assert live.tracked() == ([acct], [(acct, "nojob")])
    await live.refresh()
    assert live.tracked() == ([], [])


@pytest.fixture(params=["closed port", "silent collector"])
def dead_endpoint(request: pytest.FixtureRequest) -> Iterator[tuple[str, socket.socket | None]]:
    """A closed port (connection refused at once), or a port that accepts connections and
    never answers (every export waits for its whole timeout)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    if request.param == "closed port":
        sock.close()
        yield f"http://127.0.0.1:{port}", None
        return
    sock.listen(64)  # the kernel completes connections; nobody ever reads or answers
    sock.setblocking(False)
    try:
        yield f"http://127.0.0.1:{port}", sock
    finally:
        sock.close()


OTLP_TIMEOUT = 6.0


@pytest.mark.devserver
async def test_a_dead_or_silent_collector_neither_delays_nor_fails_runs(
    dev_env: WorkflowEnvironment,
    fake_dbt: FakeDbtExecutor,
    dead_endpoint: tuple[str, socket.socket | None],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, acct = dev_env.client, unique("oteldead")
    url, listening = dead_endpoint
    # Spans leave every 50 ms and metrics every second: exports run while the runs do.
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    sink = build_otel_sink(
        "otlp", client=client, otlp_endpoint=url, export_interval_seconds=1,
        otlp_timeout_seconds=OTLP_TIMEOUT, shutdown_timeout=1,
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    caplog.set_level(logging.WARNING, logger="opentelemetry")
    async with sink, running_stack(client, fake_dbt, telemetry=sink) as queues:
        await jobs.save_job(client, job(acct, "j"), account(acct, run_slots=3), queues)
        for _ in range(3):
            started = loop.time()
            trigger = await jobs.trigger(client, acct, "j", TriggerRequest())
            # The result comes after the telemetry activity: an export inside emit would
            # add up to OTLP_TIMEOUT here, a hung emit its 10 s start-to-close timeout.
            result = await wait_run(client, acct, trigger.run_id, timeout=30)
            assert result.status == RunStatus.SUCCESS
            assert loop.time() - started < OTLP_TIMEOUT - 2, "telemetry delayed the run"
        if listening is None:
            await wait_for(
                lambda: any(r.name.startswith("opentelemetry.exporter") for r in caplog.records),
                timeout=5, what="the exporters report the refused connection",
            )  # fmt: skip
        else:
            connection, _ = listening.accept()  # the exporters did connect, and got nothing
            connection.close()
        closing = loop.time()
    assert loop.time() - closing < 1 + 1.5, "shutdown is bounded by shutdown_timeout"
