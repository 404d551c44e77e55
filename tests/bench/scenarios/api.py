"""Scenario 5, trigger latency on an idle system, through the REST API.

The real API process (``python -m api`` on the scenario's data dir) beside the worker. N
jobs, saved through ``starter.jobs``; one POST of dbt Cloud's trigger endpoint
(``/api/v2/accounts/{account}/jobs/{job}/run/``) per job, one at a time: each run finishes
(the run store shows it finished) and the system rests 0.3 s before the next POST. Three
warm-up triggers on another job go first and are not counted. Latency from the moment the
POST is sent to: the response, the run Starting (prep start in the event log), its first
step starting.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from activities.store import RunStore
from tests.bench.events import EventLog
from tests.bench.harness import (
    ACCOUNT,
    Context,
    account,
    job,
    open_store,
    save_jobs,
    scenario_stack,
)
from tests.bench.meter import Meter
from tests.bench.report import ScenarioResult, spread

WARMUP = 3
REST = 0.3
RUN_TIMEOUT = 60.0


async def run(ctx: Context) -> ScenarioResult:
    result = ScenarioResult("api", "REST API trigger → run, idle system, one at a time")
    n = ctx.n(100, 5)
    settings = account(run_slots=4)
    async with scenario_stack(ctx, "api") as stack:
        store = open_store(stack, settings)
        token = store.create_token(ACCOUNT, "bench")
        events = EventLog(stack.root / "events.jsonl")
        worker = await stack.start_runslot_worker(events.path)
        api = await stack.start_api()
        keys = [f"a{i:04d}" for i in range(n)]
        saved, _ = await save_jobs(stack.client, [job(k) for k in ["warmup", *keys]], settings)
        job_ids = [d.state.store_id for d in saved]
        assert all(i is not None for i in job_ids), "a job has no run store id"
        meter = Meter({"server": stack.children["server"].ps, "worker": worker.ps, "api": api.ps})
        response_s: list[float] = []
        starting_s: list[float] = []
        step_s: list[float] = []
        async with (
            httpx.AsyncClient(
                base_url=stack.settings.api_url,
                headers={"Authorization": f"Token {token}"},
                timeout=30,
            ) as http,
            events.following(),
        ):
            for _ in range(WARMUP):
                _, _, run_id = await _trigger(http, job_ids[0])
                await _finished(store, run_id)
                await asyncio.sleep(REST)
            start = meter.snapshot()
            for job_id in job_ids[1:]:
                sent, answered, run_id = await _trigger(http, job_id)
                prep = await asyncio.wait_for(events.wait("prepare", run_id), RUN_TIMEOUT)
                step = await asyncio.wait_for(events.wait("step", run_id), RUN_TIMEOUT)
                await _finished(store, run_id)
                response_s.append(answered - sent)
                starting_s.append(prep - sent)
                step_s.append(step - sent)
                await asyncio.sleep(REST)
            end = meter.snapshot()
        window = meter.window(start, end)
        store.close()

    floor = ctx.floor
    for name, values, label, floor_key in (
        ("starting", starting_s, "API trigger → run Starting (prep)", "paced"),
        ("step", step_s, "API trigger → first step", "paced"),
        ("response", response_s, "API trigger → HTTP response", None),
    ):
        figures = spread(values, 1000)
        for p in ("p50", "p99"):
            result.add(
                f"{name}_{p}", f"{label} {p}", figures[p], "ms", n,
                floor=floor(f"{floor_key}_{p}") if floor_key else None,
                floor_label="(idle start → activity)" if floor_key else "",
                summary=name == "starting",
            )  # fmt: skip
    result.add("api_cpu_ms", "API CPU per trigger", window.ms_per("api", n), "ms", n)
    result.add(
        "server_cpu_ms", "server CPU per run (idle, paced)", window.ms_per("server", n), "ms", n
    )
    result.add(
        "worker_cpu_ms", "worker CPU per run (idle, paced)", window.ms_per("worker", n), "ms", n
    )
    result.load = window.as_dict()
    result.details = {
        "warmup_triggers": WARMUP,
        "rest_between_s": REST,
        "max_ms": {
            "starting": max(starting_s) * 1000,
            "response": max(response_s) * 1000,
        },
    }
    return result


async def _trigger(http: httpx.AsyncClient, job_id: int | None) -> tuple[float, float, str]:
    """POST the trigger; returns when it was sent, when answered, and the run id."""
    sent = time.time()
    response = await http.post(
        f"/api/v2/accounts/{ACCOUNT}/jobs/{job_id}/run/", json={"cause": "bench"}
    )
    answered = time.time()
    if response.status_code != 200:
        raise RuntimeError(f"trigger of job {job_id}: {response.status_code} {response.text[:300]}")
    return sent, answered, str(response.json()["data"]["id"])


async def _finished(store: RunStore, run_id: str) -> None:
    """Wait until the run store shows the run finished (its final snapshot is written)."""
    async with asyncio.timeout(RUN_TIMEOUT):
        while True:
            run = store.get_run(ACCOUNT, int(run_id))
            if run is not None and run.status.is_finished:
                return
            await asyncio.sleep(0.01)
