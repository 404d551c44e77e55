"""Scenario 2, Runslot's cost per run on the no-op executor.

N runs over J jobs (runs of one job are serial by rule 2; the account's slots outnumber
the jobs, so they are not the bottleneck), triggered through ``starter.jobs.trigger``
(100 updates in flight). Measured over the load window: completions/s, server and worker
CPU per run; then, from the histories, events and workflow tasks per run, summed over the
three kinds of workflow a run involves: its own ``run:{account}:{run}`` (whole history),
and what it added to its job's ``job:{account}:{job}`` and to ``slots:{account}`` (the
chains' counts after the load minus before, continued-as-new runs included).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

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
from tests.bench.history import WFT_COMPLETED, added, bounded, chains, count, histories
from tests.bench.meter import Meter
from tests.bench.report import ScenarioResult, fmt, table
from workflows import constants as c
from workflows.models import RunStatus

TRIGGERS_IN_FLIGHT = 100
LOAD_TIMEOUT = 900.0
KINDS = ("run", "job", "slots")
COLUMNS = (
    ("total", "events"),
    (WFT_COMPLETED, "workflow tasks"),
    ("MARKER_RECORDED", "local activities"),
    ("ACTIVITY_TASK_SCHEDULED", "activities"),
    ("WORKFLOW_EXECUTION_SIGNALED", "signals in"),
    ("SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED", "signals out"),
    ("WORKFLOW_EXECUTION_UPDATE_ACCEPTED", "updates"),
    ("TIMER_STARTED", "timers"),
    ("START_CHILD_WORKFLOW_EXECUTION_INITIATED", "children"),
)


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("runs", "Runslot per-run cost, no-op executor")
    n_jobs = ctx.n(100, 2)
    n_runs = max(ctx.n(300, 2), n_jobs)
    settings = account(run_slots=min(1000, max(100, n_jobs)))
    keys = [f"j{i:04d}" for i in range(n_jobs)]
    async with scenario_stack(ctx, "runs") as stack:
        store = open_store(stack, settings)
        events = EventLog(stack.root / "events.jsonl")
        worker = await stack.start_runslot_worker(events.path)
        client = stack.client
        _, save_seconds = await save_jobs(client, [job(k) for k in keys], settings)
        job_ids = [c.job_workflow_id(ACCOUNT, k) for k in keys]
        slots_id = c.slots_workflow_id(ACCOUNT)
        before = await chains(client, [*job_ids, slots_id])

        meter = Meter({"server": stack.children["server"].ps, "worker": worker.ps})
        plan = [keys[i % n_jobs] for i in range(n_runs)]
        async with events.following():
            start = meter.snapshot()
            first_trigger = time.time()
            triggered = await asyncio.wait_for(
                bounded((trigger(client, key) for key in plan), TRIGGERS_IN_FLIGHT), LOAD_TIMEOUT
            )
            await wait_closed(client, c.RUN_WORKFLOW, n_runs, timeout=LOAD_TIMEOUT)
            end = await meter.settle(("server", "worker"))
        window = meter.window(start, end)
        await asyncio.sleep(1.0)  # the jobs' last workflow tasks (run_finished) land
        after = await chains(client, [*job_ids, slots_id])
        run_ids = [t.run_id for t in triggered]
        run_counts = [count(h) for h in await histories(client, run_workflow_ids(run_ids))]
        closed = await close_times(client, c.RUN_WORKFLOW)
        statuses = Counter(r.status for r in store.list_runs(ACCOUNT, limit=n_runs + 10).items)
        store.close()

    per_kind: dict[str, Counter[str]] = {
        "run": sum(run_counts, Counter()),
        "job": sum((added(before[j], after[j]) for j in job_ids), Counter()),
        "slots": added(before[slots_id], after[slots_id]),
    }
    total = sum(per_kind.values(), Counter())
    rate = n_runs / (max(closed.values()) - first_trigger)
    floor = ctx.floor
    result.add(
        "completions_per_s", "run completions/s", rate, "runs/s", n_runs,
        floor=floor("completions_per_s"), summary=True,
    )  # fmt: skip
    result.add(
        "server_cpu_ms", "server CPU per run", window.ms_per("server", n_runs), "ms", n_runs,
        floor=floor("server_cpu_ms"), summary=True,
    )  # fmt: skip
    result.add(
        "worker_cpu_ms", "worker CPU per run", window.ms_per("worker", n_runs), "ms", n_runs,
        floor=floor("worker_cpu_ms"), summary=True,
    )  # fmt: skip
    result.add(
        "events", "history events per run (run+job+slots)", total["total"] / n_runs, "events",
        n_runs, floor=floor("events"), summary=True,
    )  # fmt: skip
    result.add(
        "wft", "workflow tasks per run (run+job+slots)", total[WFT_COMPLETED] / n_runs, "tasks",
        n_runs, floor=floor("wft"), summary=True,
    )  # fmt: skip
    for kind in KINDS:
        result.add(
            f"events_{kind}", f"events per run in {kind} workflows",
            per_kind[kind]["total"] / n_runs, "events", n_runs, floor=floor("events"),
        )  # fmt: skip
        result.add(
            f"wft_{kind}", f"workflow tasks per run in {kind} workflows",
            per_kind[kind][WFT_COMPLETED] / n_runs, "tasks", n_runs, floor=floor("wft"),
        )  # fmt: skip
    result.add("save_seconds", f"saving {n_jobs} jobs", save_seconds, "s", n_jobs)
    result.add(
        "succeeded", "runs ending Success (store)", statuses[RunStatus.SUCCESS], "runs", n_runs
    )
    result.load = window.as_dict()
    rows = [
        [name, *(fmt(counts[key] / n_runs) for key, _ in COLUMNS)]
        for name, counts in [*per_kind.items(), ("sum", total)]
    ]
    result.tables.append(
        f"Per run, by workflow kind ({n_runs} runs over {n_jobs} jobs):\n\n"
        + table(["workflow", *(label for _, label in COLUMNS)], rows)
    )
    result.details = {
        "jobs": n_jobs,
        "runs": n_runs,
        "run_slots": settings.run_slots,
        "statuses": {RunStatus(k).humanized: v for k, v in statuses.items()},
        "per_run_by_kind": {
            kind: {k: round(v / n_runs, 3) for k, v in per_kind[kind].most_common()}
            for kind in KINDS
        },
        "slots_generations": len(after[slots_id]),
        "job_generations_max": max(len(after[j]) for j in job_ids),
    }
    return result
