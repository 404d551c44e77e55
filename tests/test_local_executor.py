"""Rules 10 and 11 with the local executor and real dbt on sample/jaffle (DuckDB)."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
from temporalio.testing import WorkflowEnvironment

from activities.local import LocalExecutor, LocalExecutorSettings
from starter import jobs
from tests.builders import account, wait_for, wait_run
from tests.conftest import running_stack, unique
from workflows.errors import MEMORY_LIMIT_MESSAGE
from workflows.models import (
    Environment,
    JobDefinition,
    RunResult,
    RunStatus,
    TriggerRequest,
)

pytestmark = [pytest.mark.devserver, pytest.mark.slow]

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "jaffle"
OPS = "--vars '{ops_enabled: true, sleep_seconds: 120, megabytes: 900}'"


def _job(
    acct: str, steps: list[str], tmp_path: Path, warehouse: Path | None = None, **kw: object
) -> JobDefinition:
    return JobDefinition(
        account_id=acct,
        job_id="j",
        name="sample",
        environment=Environment(
            project_dir=str(SAMPLE),
            profile={"type": "duckdb", "path": str(warehouse or tmp_path / "warehouse.duckdb")},
            env_vars={"RUNSLOT_TEST": "1"},
        ),
        execute_steps=steps,
        **kw,
    )


def _dbt_processes(workspace_root: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if proc.info["cwd"] and proc.info["cwd"].startswith(str(workspace_root)):
                found.append(proc)
        except psutil.Error:
            continue
    return found


async def test_a_real_dbt_run_succeeds_with_logs_and_artifacts(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("dbt")
    executor = LocalExecutor(LocalExecutorSettings(workspace_root=tmp_path / "ws"))
    async with running_stack(client, executor) as queues:
        # The warehouse's directory does not exist yet: prep creates it, as DuckDB will not.
        warehouse = tmp_path / "not" / "yet" / "warehouse.duckdb"
        definition = _job(acct, ["dbt seed", "dbt run"], tmp_path, warehouse=warehouse)
        await jobs.save_job(client, definition, account(acct), queues)
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        run = await wait_run(client, acct, res.run_id, timeout=120)
    assert run.status == RunStatus.SUCCESS, run.status_message
    assert [s.status for s in run.steps] == [RunStatus.SUCCESS, RunStatus.SUCCESS]
    workspace = tmp_path / "ws" / acct / res.run_id
    assert "Completed successfully" in (workspace / "logs" / "step-2.log").read_text()
    results = json.loads((workspace / "artifacts" / "run_results.json").read_text())
    assert {r["unique_id"] for r in results["results"]} >= {"model.jaffle.customers"}
    assert (workspace / "artifacts" / "manifest.json").exists()
    assert not (workspace / "project").exists(), "the checkout is cleaned up after the run"
    assert run.prep_time is not None and run.wait_time is not None
    assert warehouse.exists()


async def test_a_run_over_the_account_memory_limit_ends_in_error_with_dbt_clouds_message(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("mem")
    root = tmp_path / "ws"
    executor = LocalExecutor(LocalExecutorSettings(workspace_root=root))
    async with running_stack(client, executor) as queues:
        await jobs.save_job(
            client, _job(acct, [f"dbt run -s memory_hog {OPS}"], tmp_path),
            account(acct, run_memory_limit_mb=400), queues,
        )  # fmt: skip
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        run = await wait_run(client, acct, res.run_id, timeout=120)
        slots = await jobs.describe_slots(client, acct)
    assert run.status == RunStatus.ERROR
    assert run.status_message == MEMORY_LIMIT_MESSAGE
    assert run.steps[0].message == MEMORY_LIMIT_MESSAGE
    assert _dbt_processes(root) == [], "the step's process group is killed"
    assert slots.holders == []


async def test_cancelling_a_running_run_kills_the_dbt_process_and_frees_the_slot(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("kill")
    root = tmp_path / "ws"
    executor = LocalExecutor(LocalExecutorSettings(workspace_root=root))
    async with running_stack(client, executor) as queues:
        await jobs.save_job(
            client, _job(acct, [f"dbt run -s sleepy {OPS}"], tmp_path), account(acct), queues
        )
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        log = root / acct / res.run_id / "logs" / "step-1.log"
        await wait_for(
            lambda: log.exists() and "sleeping 120" in log.read_text(), timeout=90,
            what="dbt is inside the sleepy model",
        )  # fmt: skip
        assert _dbt_processes(root), "dbt is running"
        await jobs.cancel_run(client, acct, "j", res.run_id)
        run: RunResult = await wait_run(client, acct, res.run_id, timeout=30)
        slots = await jobs.describe_slots(client, acct)
    assert run.status == RunStatus.CANCELLED
    assert run.steps[0].status == RunStatus.CANCELLED
    assert _dbt_processes(root) == []
    assert slots.holders == []
    assert run.finished_at is not None


async def test_a_step_that_cannot_start_fails_that_run_with_the_reason_and_frees_the_slot(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    # The dbt Cloud incident of August 2023: a step process that could not start left runs
    # queued forever. Here it fails that run, at once, saying why.
    client, acct = dev_env.client, unique("nostart")
    broken = LocalExecutor(
        LocalExecutorSettings(workspace_root=tmp_path / "ws", dbt_executable="/nonexistent/dbt")
    )
    async with running_stack(client, broken) as queues:
        await jobs.save_job(client, _job(acct, ["dbt run"], tmp_path), account(acct), queues)
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        run = await wait_run(client, acct, res.run_id, timeout=60)
        slots = await jobs.describe_slots(client, acct)
        second = await jobs.trigger(client, acct, "j", TriggerRequest())
        assert (await wait_run(client, acct, second.run_id, timeout=60)).status == RunStatus.ERROR
    assert run.status == RunStatus.ERROR
    assert "could not start dbt run" in run.status_message
    assert "/nonexistent/dbt" in run.status_message
    assert slots.holders == []
