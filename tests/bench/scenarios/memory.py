"""Scenario 6, worker memory with N idle job workflows.

The worker's RSS once it polls (and 3 s of rest), then N jobs saved through
``starter.jobs`` with a yearly cron (each one a workflow cached by the worker, waiting on
its timer), and RSS again 5 s after the last save: KiB per idle job workflow, against the
136 KiB per bare idle workflow of reference/temporal-floor.md (sandboxed, cache 2000).
Saving them is timed and its CPU measured too.
"""

from __future__ import annotations

import asyncio

from tests.bench.events import EventLog
from tests.bench.harness import (
    ACCOUNT,
    FAR_CRON,
    Context,
    account,
    job,
    open_store,
    save_jobs,
    scenario_stack,
    spaced,
)
from tests.bench.history import WFT_COMPLETED, count, histories
from tests.bench.meter import Meter
from tests.bench.report import ScenarioResult
from workflows import constants as c

FLOOR_KIB_PER_WF = 136.0
"""reference/temporal-floor.md, scenario 6: +136 KiB per cached idle bare workflow."""
REST_BEFORE = 3.0
REST_AFTER = 5.0
HISTORY_SAMPLE = 20


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("memory", "worker memory with idle job workflows")
    n = ctx.n(1000, 10)
    settings = account(run_slots=1)
    keys = [f"m{i:05d}" for i in range(n)]
    async with scenario_stack(ctx, "memory") as stack:
        store = open_store(stack, settings)
        events = EventLog(stack.root / "events.jsonl")
        worker = await stack.start_runslot_worker(events.path)
        client = stack.client
        meter = Meter({"server": stack.children["server"].ps, "worker": worker.ps})
        await asyncio.sleep(REST_BEFORE)
        before = meter.snapshot()
        _, save_s = await save_jobs(client, [job(k, FAR_CRON) for k in keys], settings)
        saved = meter.snapshot()
        await asyncio.sleep(REST_AFTER)
        after = meter.snapshot()
        sample = spaced(keys, HISTORY_SAMPLE)
        counts = [
            count(h)
            for h in await histories(client, [c.job_workflow_id(ACCOUNT, k) for k in sample])
        ]
        store.close()
    window = meter.window(before, saved)
    grown = after.rss["worker"] - before.rss["worker"]
    result.add(
        "kib_per_job", "worker RSS per idle job workflow", grown / 1024 / n, "KiB", n,
        floor=FLOOR_KIB_PER_WF, floor_label="(doc: bare idle wf)", summary=True,
    )  # fmt: skip
    result.add("worker_rss_before", "worker RSS before", before.rss["worker"] / 2**20, "MiB", n)
    result.add(
        "worker_rss_after", "worker RSS with the jobs", after.rss["worker"] / 2**20, "MiB", n
    )
    result.add(
        "server_rss_after", "server RSS with the jobs", after.rss["server"] / 2**20, "MiB", n
    )
    result.add("saves_per_s", "jobs saved per second (20 at once)", n / save_s, "jobs/s", n)
    result.add("server_cpu_ms", "server CPU per job saved", window.ms_per("server", n), "ms", n)
    result.add("worker_cpu_ms", "worker CPU per job saved", window.ms_per("worker", n), "ms", n)
    result.add(
        "events", "history events per new job workflow",
        sum(x["total"] for x in counts) / len(counts), "events", len(counts),
    )  # fmt: skip
    result.add(
        "wft", "workflow tasks per new job workflow",
        sum(x[WFT_COMPLETED] for x in counts) / len(counts), "tasks", len(counts),
    )  # fmt: skip
    idle = meter.window(saved, after)
    result.load = window.as_dict()
    result.details = {
        "idle_after_save": idle.as_dict(),
        "max_cached_workflows": 1000,
    }
    return result
