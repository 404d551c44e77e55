"""Scenario 1, the floor: a bare workflow with one no-op activity on the same dev server.

Paced first (one workflow at a time on the idle server: start → activity latency), then the
load: N workflows started with at most ~100 open at once (a workflow counts as open until
its activity has logged; it completes right after), measuring completions/s, server and
worker CPU per workflow, and events and workflow tasks per workflow from the histories of a
sample.
"""

from __future__ import annotations

import asyncio
import time

from tests.bench.events import EventLog
from tests.bench.floor import FLOOR_QUEUE, FLOOR_WORKFLOW
from tests.bench.harness import Context, close_times, scenario_stack, spaced, wait_closed
from tests.bench.history import WFT_COMPLETED, count, histories, per_item
from tests.bench.meter import Meter
from tests.bench.report import ScenarioResult, percentile, spread

IN_FLIGHT = 100
HISTORY_SAMPLE = 20
PACED_GAP = 0.2
TIMEOUT = 30.0
LOAD_TIMEOUT = 600.0


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("floor", "bare workflow, one no-op activity (Temporal alone)")
    n = ctx.n(500, 10)
    paced_n = ctx.n(50, 10)
    in_flight = min(IN_FLIGHT, n)
    async with scenario_stack(ctx, "floor") as stack:
        events = EventLog(stack.root / "events.jsonl")
        worker = await stack.start_floor_worker(events.path, FLOOR_QUEUE)
        client = stack.client
        async with events.following():
            # ---------------------------------------------------------------- paced
            paced: list[float] = []
            for i in range(paced_n):
                wid = f"paced-{i}"
                sent = time.time()
                handle = await client.start_workflow(FLOOR_WORKFLOW, id=wid, task_queue=FLOOR_QUEUE)
                paced.append(await asyncio.wait_for(events.wait("activity", wid), TIMEOUT) - sent)
                await asyncio.wait_for(handle.result(), TIMEOUT)
                await asyncio.sleep(PACED_GAP)
            # ---------------------------------------------------------------- load
            meter = Meter({"server": stack.children["server"].ps, "worker": worker.ps})
            gate = asyncio.Semaphore(in_flight)

            async def one(i: int) -> None:
                wid = f"load-{i}"
                async with gate:
                    await client.start_workflow(FLOOR_WORKFLOW, id=wid, task_queue=FLOOR_QUEUE)
                    await events.wait("activity", wid)

            before = meter.snapshot()
            first_start = time.time()
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), LOAD_TIMEOUT)
            await wait_closed(client, FLOOR_WORKFLOW, paced_n + n, timeout=LOAD_TIMEOUT)
            after = await meter.settle(("server", "worker"))
        window = meter.window(before, after)
        closed = await close_times(client, FLOOR_WORKFLOW)
        closes = [closed[f"load-{i}"] for i in range(n)]
        sample = spaced([f"load-{i}" for i in range(n)], HISTORY_SAMPLE)
        counts = [count(h) for h in await histories(client, sample)]

    rate = n / (max(closes) - first_start)
    events_per_wf = sum(c["total"] for c in counts) / len(counts)
    wft_per_wf = sum(c[WFT_COMPLETED] for c in counts) / len(counts)
    result.add("completions_per_s", "completions/s", rate, "wf/s", n)
    result.add("server_cpu_ms", "server CPU per workflow", window.ms_per("server", n), "ms", n)
    result.add("worker_cpu_ms", "worker CPU per workflow", window.ms_per("worker", n), "ms", n)
    result.add("events", "history events per workflow", events_per_wf, "events", len(counts))
    result.add("wft", "workflow tasks per workflow", wft_per_wf, "tasks", len(counts))
    idle = spread(paced, 1000)
    result.add("paced_p50", "idle start → activity p50", idle["p50"], "ms", paced_n)
    result.add("paced_p99", "idle start → activity p99", idle["p99"], "ms", paced_n)
    result.load = window.as_dict()
    result.details = {
        "paced_ms": idle,
        "in_flight": in_flight,
        "history_sample": len(counts),
        "event_types_per_wf": per_item(counts),
        "close_spread_s": percentile([t - first_start for t in closes], 50),
    }
    return result
