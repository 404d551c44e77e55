"""Scenario 3, cron storm: N jobs due on the same minute, against N Temporal Schedules.

Runslot: N jobs saved through ``starter.jobs`` with a yearly cron (timed: that is the
creation cost), then saved again with a daily cron whose minute (UTC) is the first one at
least 40 s after that second save is expected to end (aimed again if it ends later); the
account's slots outnumber the jobs. Lateness of each run = its first step's start (executor
event log) minus the minute; only the first fire is measured.

Native: on a fresh server, N ``create_schedule`` with the same kind of cron, action = start
the floor's bare workflow, aimed the same way; lateness = its activity's start minus the
minute. Both storms run on their own fresh server, with nothing else happening.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from tests.bench.events import EventLog
from tests.bench.floor import FLOOR_QUEUE, FLOOR_WORKFLOW
from tests.bench.harness import (
    FAR_CRON,
    SAVE_CONCURRENCY,
    Context,
    account,
    daily_cron,
    job,
    next_boundary,
    open_store,
    save_jobs,
    scenario_stack,
    wait_closed,
)
from tests.bench.history import bounded
from tests.bench.meter import Meter, Window
from tests.bench.report import ScenarioResult, spread
from workflows import constants as c

QUIET_BEFORE = 40.0
"""Seconds between the last save and the minute the storm is due."""
AIM_ATTEMPTS = 3
STORM_TIMEOUT = 600.0


@dataclass
class Storm:
    """One storm: how long setting it up took, and each fire's lateness in seconds."""

    create_s: float
    retarget_s: float
    boundary: datetime
    lateness: dict[str, list[float]]
    """By event kind (``step``, ``prepare``; ``activity`` for Schedules)."""
    window: Window


class AimError(Exception):
    """The storm's minute could not be set far enough ahead."""


async def aim(
    retarget: Callable[[str], Awaitable[float]], estimate: float
) -> tuple[datetime, float]:
    """Point every job (or schedule) at one minute at least ``QUIET_BEFORE`` s after the
    retargeting ends; returns the minute and how long retargeting took."""
    for _ in range(AIM_ATTEMPTS):
        boundary = next_boundary(time.time() + 1.5 * estimate + QUIET_BEFORE)
        spent = await retarget(daily_cron(boundary))
        if boundary.timestamp() - time.time() >= QUIET_BEFORE:
            return boundary, spent
        estimate = spent
    raise AimError(f"retargeting took {estimate:.0f}s; could not aim {QUIET_BEFORE:.0f}s ahead")


async def runslot_storm(ctx: Context, n: int) -> Storm:
    settings = account(run_slots=min(1000, max(500, n)))
    keys = [f"c{i:04d}" for i in range(n)]
    async with scenario_stack(ctx, "storm") as stack:
        store = open_store(stack, settings)
        events = EventLog(stack.root / "events.jsonl")
        worker = await stack.start_runslot_worker(events.path)
        client = stack.client
        _, create_s = await save_jobs(client, [job(k, FAR_CRON) for k in keys], settings)

        async def retarget(cron: str) -> float:
            return (await save_jobs(client, [job(k, cron) for k in keys], settings))[1]

        boundary, retarget_s = await aim(retarget, create_s)
        meter = Meter({"server": stack.children["server"].ps, "worker": worker.ps})
        async with events.following():
            await asyncio.sleep(max(0.0, boundary.timestamp() - time.time() - 1.0))
            start = meter.snapshot()
            await events.wait_count("step", n, STORM_TIMEOUT)
            await wait_closed(client, c.RUN_WORKFLOW, n, STORM_TIMEOUT)
            end = await meter.settle(("server", "worker"))
        store.close()
    at = boundary.timestamp()
    return Storm(
        create_s,
        retarget_s,
        boundary,
        {kind: [t - at for t in events.first(kind).values()] for kind in ("step", "prepare")},
        meter.window(start, end),
    )


async def native_storm(ctx: Context, n: int) -> Storm:
    async with scenario_stack(ctx, "storm-native") as stack:
        events = EventLog(stack.root / "events.jsonl")
        worker = await stack.start_floor_worker(events.path, FLOOR_QUEUE)
        client = stack.client
        ids = [f"native-{i:04d}" for i in range(n)]
        started = time.monotonic()
        await bounded((_create_schedule(client, sid, FAR_CRON) for sid in ids), SAVE_CONCURRENCY)
        create_s = time.monotonic() - started

        async def retarget(cron: str) -> float:
            began = time.monotonic()
            await bounded((_retarget_schedule(client, sid, cron) for sid in ids), SAVE_CONCURRENCY)
            return time.monotonic() - began

        boundary, retarget_s = await aim(retarget, create_s)
        meter = Meter({"server": stack.children["server"].ps, "worker": worker.ps})
        async with events.following():
            await asyncio.sleep(max(0.0, boundary.timestamp() - time.time() - 1.0))
            start = meter.snapshot()
            await events.wait_count("activity", n, STORM_TIMEOUT)
            end = await meter.settle(("server", "worker"))
    at = boundary.timestamp()
    return Storm(
        create_s,
        retarget_s,
        boundary,
        {"activity": [t - at for t in events.first("activity").values()]},
        meter.window(start, end),
    )


async def _create_schedule(client: Client, schedule_id: str, cron: str) -> None:
    await client.create_schedule(
        schedule_id,
        Schedule(
            action=ScheduleActionStartWorkflow(
                FLOOR_WORKFLOW, id=schedule_id, task_queue=FLOOR_QUEUE
            ),
            spec=ScheduleSpec(cron_expressions=[cron]),
        ),
    )


async def _retarget_schedule(client: Client, schedule_id: str, cron: str) -> None:
    def update(current: ScheduleUpdateInput) -> ScheduleUpdate:
        schedule = current.description.schedule
        schedule.spec = ScheduleSpec(cron_expressions=[cron])
        return ScheduleUpdate(schedule=schedule)

    await client.get_schedule_handle(schedule_id).update(update)


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("storm", "cron storm: N jobs due on one minute, first fire only")
    n = ctx.n(500, 10)
    ours = await runslot_storm(ctx, n)
    native = await native_storm(ctx, n)
    step = spread(ours.lateness["step"], 1000)
    prep = spread(ours.lateness["prepare"], 1000)
    act = spread(native.lateness["activity"], 1000)
    for p in ("p50", "p99", "max"):
        result.add(
            f"lateness_{p}", f"storm lateness to first step {p}", step[p], "ms", n,
            floor=act[p], floor_label="(Schedules → activity)", summary=p != "max",
        )  # fmt: skip
    for p in ("p50", "p99", "max"):
        result.add(f"prepare_{p}", f"lateness to prep start {p}", prep[p], "ms", n)
    for p in ("p50", "p99", "max"):
        result.add(f"native_{p}", f"Schedules: lateness to activity {p}", act[p], "ms", n)
    result.add("create_s", f"saving {n} jobs (Runslot)", ours.create_s, "s", n)
    result.add("retarget_s", "saving them again (aiming at the minute)", ours.retarget_s, "s", n)
    result.add("native_create_s", f"creating {n} schedules", native.create_s, "s", n)
    result.add("native_retarget_s", "updating them (aiming)", native.retarget_s, "s", n)
    result.add(
        "server_cpu_ms", "server CPU per fired run (storm window)",
        ours.window.ms_per("server", n), "ms", n,
        floor=native.window.ms_per("server", n), floor_label="(Schedules)",
    )  # fmt: skip
    result.add(
        "worker_cpu_ms", "worker CPU per fired run (storm window)",
        ours.window.ms_per("worker", n), "ms", n,
        floor=native.window.ms_per("worker", n), floor_label="(Schedules)",
    )  # fmt: skip
    result.load = ours.window.as_dict()
    result.details = {
        "runslot_minute": ours.boundary.isoformat(),
        "native_minute": native.boundary.isoformat(),
        "native_load": native.window.as_dict(),
        "run_slots": min(1000, max(500, n)),
        "fired": {
            "runslot": len(ours.lateness["step"]),
            "native": len(native.lateness["activity"]),
        },
    }
    return result
