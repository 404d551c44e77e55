"""Small builders for jobs and accounts in tests."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from starter import jobs
from workflows.models import (
    AccountSettings,
    Environment,
    JobDefinition,
    JobDescription,
    JobTriggers,
    JobType,
    RunResult,
    RunStatus,
)


def account(account_id: str, **kw: Any) -> AccountSettings:
    kw.setdefault("run_slots", 1)
    kw.setdefault("slot_reap_interval", timedelta(seconds=2))
    return AccountSettings(account_id=account_id, **kw)


def job(
    account_id: str,
    job_id: str,
    steps: list[str] | None = None,
    *,
    job_type: JobType = JobType.SCHEDULED,
    triggers: JobTriggers | None = None,
    project_dir: str = "/fake/project",
    **kw: Any,
) -> JobDefinition:
    return JobDefinition(
        account_id=account_id,
        job_id=job_id,
        name=f"job {job_id}",
        job_type=job_type,
        environment=Environment(project_dir=project_dir),
        execute_steps=steps or ["dbt run -s ok"],
        triggers=triggers or JobTriggers(),
        **kw,
    )


async def wait_for(
    probe: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll an async or sync probe until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = probe()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or probe}")
        await asyncio.sleep(interval)


async def finished_runs(client: Client, account_id: str, job_id: str) -> JobDescription:
    return await jobs.describe_job(client, account_id, job_id)


async def wait_run(client: Client, account_id: str, run_id: str, timeout: float = 60) -> RunResult:
    """The run's final result; a queued run's workflow may not exist yet, so wait for it."""

    async def result() -> RunResult:
        while True:
            try:
                return await jobs.run_result(client, account_id, run_id)
            except RPCError as err:
                if err.status != RPCStatusCode.NOT_FOUND:
                    raise
                await asyncio.sleep(0.1)

    return await asyncio.wait_for(result(), timeout)


def statuses(desc: JobDescription) -> dict[str, RunStatus]:
    return {r.run_id: r.status for r in desc.state.recent}


async def skip_time(env: WorkflowEnvironment, duration: timedelta) -> None:
    """Advance the time-skipping server's clock in 5-minute steps.

    One long ``env.sleep`` is a single RPC that the Java test server sometimes drops (a
    timeout or an HTTP/2 error) when many timers fire inside it; short steps do not.
    """
    step = timedelta(minutes=5)
    while duration > timedelta(0):
        await env.sleep(min(step, duration))
        duration -= step


def decoded_history(history_json: str) -> str:
    """A history's JSON plus every payload in it decoded (payload data is base64): the text
    a secret would have to be absent from."""
    parts = [history_json]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("data"), str) and "metadata" in node:
                parts.append(base64.b64decode(node["data"]).decode(errors="replace"))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(history_json))
    return "\n".join(parts)
