"""What every scenario shares: its context, its stack, and Runslot's account and jobs.

Jobs are saved through ``starter.jobs`` from the driver, as the CLI and the API save them;
the run store is the scenario's SQLite file, migrated here before the worker starts.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from temporalio.client import Client

from activities.store import RunStore
from starter import jobs
from tests.bench.history import bounded
from tests.bench.procs import Stack
from tests.bench.report import ScenarioResult
from workflows import constants as c
from workflows.models import (
    AccountSettings,
    CronSchedule,
    Environment,
    JobDefinition,
    JobDescription,
    JobTriggers,
    TriggerCause,
    TriggerRequest,
    TriggerResult,
)

ACCOUNT = "1"
SAVE_CONCURRENCY = 20
FAR_CRON = "0 0 1 1 *"
"""Yearly: a job saved with it stays idle for the whole benchmark."""


@dataclass
class Context:
    scale: float
    keep: bool = False
    results: dict[str, ScenarioResult] = field(default_factory=dict)
    """Scenarios already run (the floor's figures are the others' denominators)."""

    def n(self, base: int, minimum: int = 1) -> int:
        return max(minimum, round(base * self.scale))

    def floor(self, key: str) -> float | None:
        """The floor scenario's figure, if it ran in this invocation."""
        result = self.results.get("floor")
        figure = result.get(key) if result else None
        return figure.value if figure else None


@asynccontextmanager
async def scenario_stack(ctx: Context, name: str) -> AsyncIterator[Stack]:
    """A fresh server in a fresh temporary directory; everything stopped and removed after."""
    root = Path(tempfile.mkdtemp(prefix=f"runslot-bench-{name}-"))
    stack = Stack(root)
    try:
        await stack.start_server()
        yield stack
    finally:
        await stack.close()
        if ctx.keep:
            print(f"  (kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


def open_store(stack: Stack, settings: AccountSettings) -> RunStore:
    """The scenario's run store, migrated, with the account in it."""
    store = RunStore(stack.store_url)
    store.migrate()
    store.upsert_account(settings, name="bench")
    return store


def account(run_slots: int) -> AccountSettings:
    return AccountSettings(account_id=ACCOUNT, run_slots=run_slots)


def job(
    key: str, cron: str | None = None, steps: Sequence[str] = ("dbt run -s ok",)
) -> JobDefinition:
    schedule = CronSchedule(cron=cron) if cron else None
    return JobDefinition(
        account_id=ACCOUNT,
        job_id=key,
        name=f"bench {key}",
        environment=Environment(project_dir="/bench/project"),
        execute_steps=list(steps),
        triggers=JobTriggers(schedule=schedule),
    )


async def save_jobs(
    client: Client, definitions: Sequence[JobDefinition], settings: AccountSettings
) -> tuple[list[JobDescription], float]:
    """Save jobs, ``SAVE_CONCURRENCY`` at once; return their descriptions and the seconds
    it took."""
    started = time.monotonic()
    saved = await bounded(
        (jobs.save_job(client, d, settings) for d in definitions), SAVE_CONCURRENCY
    )
    return saved, time.monotonic() - started


async def trigger(client: Client, key: str) -> TriggerResult:
    return await jobs.trigger(client, ACCOUNT, key, TriggerRequest(cause=TriggerCause.API))


async def wait_closed(client: Client, workflow_type: str, count: int, timeout: float) -> None:
    """Poll visibility (every 0.25 s) until ``count`` workflows of the type completed."""
    query = f"WorkflowType = '{workflow_type}' AND ExecutionStatus = 'Completed'"
    async with asyncio.timeout(timeout):
        while True:
            if (await client.count_workflows(query)).count >= count:
                return
            await asyncio.sleep(0.25)


async def close_times(client: Client, workflow_type: str) -> dict[str, float]:
    """Close time (unix seconds) of every completed workflow of the type, by workflow id."""
    query = f"WorkflowType = '{workflow_type}' AND ExecutionStatus = 'Completed'"
    return {
        wf.id: wf.close_time.timestamp()
        async for wf in client.list_workflows(query)
        if wf.close_time is not None
    }


def spaced(items: Sequence[str], count: int) -> list[str]:
    """``count`` items spread evenly over ``items`` (a sample that is the same every run)."""
    step = max(1, len(items) // max(count, 1))
    return list(items[::step][:count])


def run_workflow_ids(run_ids: Sequence[str]) -> list[str]:
    return [c.run_workflow_id(ACCOUNT, run_id) for run_id in run_ids]


def next_boundary(after: float) -> datetime:
    """The first whole minute at or after ``after`` (unix seconds), in UTC."""
    at = datetime.fromtimestamp(after, UTC)
    floor = at.replace(second=0, microsecond=0)
    return floor if floor.timestamp() >= after else floor + timedelta(minutes=1)


def daily_cron(at: datetime) -> str:
    """A cron that fires at ``at``'s minute each day (so once in a benchmark), in UTC."""
    return f"{at.minute} {at.hour} * * *"
