"""Scenario 4, slot contention: N runs (one per job) over 10 run slots, steps of 0.5 s.

All N are triggered at once. Two views of the same hand-over:

* from the histories: a run's slot request is its ``acquire`` update as the slots workflow
  accepted it (or the ``request`` signal as it received it, the fallback), its grant the
  answer to that update when a slot was free, else the ``slot_granted`` signal as the run
  received it. Grant latency
  = grant - request (mostly queueing: N runs wait for 10 slots). Grant overhead = grant -
  the later of the request and the release that freed the slot (the k-th grant after the
  first 10 takes the slot of the (k-10)-th ``release`` signal, FIFO).
* from the executor's event log: a slot is busy from a run's prep start to its step's end
  (the run then releases it); after the i-th step end, the slot
  stays idle until the (10+i)-th prep start. Counted only while some request was waiting
  (requests received minus grants made > 0 at the step's end). Its parts, per run: step end
  → its ``release`` received by the slots workflow; release → the next grant (above); a
  grant received → that run's prep start.
"""

from __future__ import annotations

import asyncio
import bisect
import time

from temporalio.client import WorkflowHistory

from tests.bench.events import EventLog
from tests.bench.harness import (
    ACCOUNT,
    Context,
    account,
    close_times,
    job,
    open_store,
    run_workflow_ids,
    save_jobs,
    scenario_stack,
    trigger,
    wait_closed,
)
from tests.bench.history import bounded, chain_histories, histories, signals, updates
from tests.bench.meter import Meter
from tests.bench.report import ScenarioResult, spread
from workflows import constants as c

CAPACITY = 10
STEP_SECONDS = 0.5
TRIGGERS_IN_FLIGHT = 50
LOAD_TIMEOUT = 900.0


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult(
        "slots", f"slot contention: {CAPACITY} slots, steps of {STEP_SECONDS} s"
    )
    n = ctx.n(200, 2 * CAPACITY)
    settings = account(run_slots=CAPACITY)
    keys = [f"s{i:04d}" for i in range(n)]
    async with scenario_stack(ctx, "slots") as stack:
        store = open_store(stack, settings)
        events = EventLog(stack.root / "events.jsonl")
        worker = await stack.start_runslot_worker(events.path, step_seconds=STEP_SECONDS)
        client = stack.client
        await save_jobs(client, [job(k) for k in keys], settings)
        meter = Meter({"server": stack.children["server"].ps, "worker": worker.ps})
        async with events.following():
            start = meter.snapshot()
            first_trigger = time.time()
            triggered = await asyncio.wait_for(
                bounded((trigger(client, k) for k in keys), TRIGGERS_IN_FLIGHT), LOAD_TIMEOUT
            )
            await wait_closed(client, c.RUN_WORKFLOW, n, timeout=LOAD_TIMEOUT)
            end = await meter.settle(("server", "worker"))
        window = meter.window(start, end)
        run_ids = [t.run_id for t in triggered]
        run_histories = await histories(client, run_workflow_ids(run_ids))
        slots_id = c.slots_workflow_id(ACCOUNT)
        slot_runs = list((await chain_histories(client, slots_id)).values())
        closed = await close_times(client, c.RUN_WORKFLOW)
        store.close()

    requests, released, grants = _hand_over(slot_runs, run_ids, run_histories)
    releases = sorted(released.values())
    latency = [grants[r] - requests[r] for r in grants if r in requests]
    overhead = _grant_overhead(grants, requests, releases)
    idle = _idle_gaps(events, requests, grants)
    step_ends = events.first("step_end")
    preps = events.first("prepare")
    to_release = [released[r] - step_ends[r] for r in released if r in step_ends]
    to_prep = [preps[r] - grants[r] for r in grants if r in preps]
    makespan = max(closed.values()) - first_trigger
    step_seconds = sum(
        ends[0] - events.times["step"][run][0]
        for run, ends in events.times["step_end"].items()
        if events.times["step"].get(run)
    )
    busy_span = max(events.all("step_end")) - min(events.all("prepare"))

    for name, values, label in (
        ("grant", latency, "slot request → grant"),
        ("idle", idle, "slot idle: step end → next prep start"),
        ("to_release", to_release, "  part: step end → release received"),
        ("overhead", overhead, "  part: release (or request) → grant"),
        ("to_prep", to_prep, "  part: grant → prep start"),
    ):
        figures = spread(values, 1000)
        for p in ("p50", "p99", "max"):
            result.add(
                f"{name}_{p}", f"{label} {p}", figures[p], "ms", len(values),
                summary=name in ("grant", "idle") and p != "max",
            )  # fmt: skip
    result.add("runs_per_s", "run completions/s", n / makespan, "runs/s", n)
    result.add(
        "ideal_runs_per_s", "ceiling: slots / step time", CAPACITY / STEP_SECONDS, "runs/s", n
    )
    result.add(
        "utilization", "slot time spent in steps", 100 * step_seconds / (CAPACITY * busy_span),
        "%", n,
    )  # fmt: skip
    result.add(
        "max_concurrent_steps", "most steps at once (≤ slots)", _max_overlap(events), "steps", n
    )
    result.load = window.as_dict()
    result.details = {
        "capacity": CAPACITY,
        "step_seconds": STEP_SECONDS,
        "grant_source": "histories: acquire update accepted (or request signal received) by "
        "slots:{account} → its answer if granted, else slot_granted signal received by the run",
        "slots_generations": len(slot_runs),
        "requests_seen": len(requests),
        "grants_seen": len(grants),
    }
    return result


def _hand_over(
    slot_runs: list[WorkflowHistory], run_ids: list[str], run_histories: list[WorkflowHistory]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Per run id: when its request reached the slots workflow, when it released, when it
    was granted (from the histories)."""
    requests: dict[str, float] = {}
    released: dict[str, float] = {}
    answered: dict[str, float] = {}  # granted in the answer to the acquire update
    for history in slot_runs:
        for upd in updates(history):
            if upd.name != c.UPDATE_SLOT_ACQUIRE or not isinstance(upd.payload, dict):
                continue
            request_id = str(upd.payload["request_id"])
            requests.setdefault(request_id, upd.at)
            if isinstance(upd.result, dict) and upd.result.get("granted_at"):
                answered.setdefault(request_id, upd.at)
        for sig in signals(history):
            if not isinstance(sig.payload, dict):
                continue
            if sig.name == c.SIGNAL_SLOT_REQUEST:
                requests.setdefault(str(sig.payload["request_id"]), sig.at)
            elif sig.name == c.SIGNAL_SLOT_RELEASE:
                released.setdefault(str(sig.payload["request_id"]), sig.at)
    grants: dict[str, float] = {}
    for run_id, history in zip(run_ids, run_histories, strict=True):
        granted = [s.at for s in signals(history) if s.name == c.SIGNAL_SLOT_GRANTED]
        if granted:
            grants[run_id] = granted[0]
        elif run_id in answered:
            grants[run_id] = answered[run_id]
    return requests, released, grants


def _grant_overhead(
    grants: dict[str, float], requests: dict[str, float], releases: list[float]
) -> list[float]:
    """Grant - max(request, the release whose slot it took), FIFO over grants in order."""
    out = []
    for k, (run_id, granted) in enumerate(sorted(grants.items(), key=lambda kv: kv[1])):
        ready = requests.get(run_id, granted)
        if k >= CAPACITY and k - CAPACITY < len(releases):
            ready = max(ready, releases[k - CAPACITY])
        out.append(granted - ready)
    return out


def _idle_gaps(
    events: EventLog, requests: dict[str, float], grants: dict[str, float]
) -> list[float]:
    """Step end i → prep start CAPACITY+i, while a request was waiting at the step end."""
    ends = events.all("step_end")
    preps = events.all("prepare")
    asked = sorted(requests.values())
    given = sorted(grants.values())
    gaps = []
    for i, ended in enumerate(ends):
        j = CAPACITY + i
        if j >= len(preps):
            break
        waiting = bisect.bisect_right(asked, ended) - bisect.bisect_right(given, ended)
        if waiting > 0:
            gaps.append(preps[j] - ended)
    return gaps


def _max_overlap(events: EventLog) -> int:
    marks = [(t, 1) for t in events.all("step")] + [(t, -1) for t in events.all("step_end")]
    best = now = 0
    for _, delta in sorted(marks):
        now += delta
        best = max(best, now)
    return best
