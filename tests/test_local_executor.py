"""The local executor with real dbt on sample/jaffle (DuckDB), mostly through a real
Temporal dev server: rules 10 and 11, logs and artifacts in the artifact store, secrets,
rerun from failure with ``dbt retry``, the dbt version check."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psutil
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment

from activities.artifacts import LocalArtifactStore, StepKey
from activities.local import LocalExecutor, LocalExecutorSettings, installed_dbt_version
from starter import jobs
from tests.builders import account, decoded_history, wait_for, wait_run
from tests.conftest import new_store, running_stack, unique
from workflows import constants as c
from workflows.errors import MEMORY_LIMIT_MESSAGE
from workflows.models import (
    Environment,
    JobDefinition,
    PrepareInput,
    RunResult,
    RunStatus,
    TriggerOverrides,
    TriggerRequest,
)

pytestmark = [pytest.mark.devserver, pytest.mark.slow]

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "jaffle"
OPS = "--vars '{ops_enabled: true, sleep_seconds: 120, megabytes: 900}'"


def _job(
    acct: str,
    steps: list[str],
    tmp_path: Path,
    warehouse: Path | None = None,
    environment: Environment | None = None,
) -> JobDefinition:
    return JobDefinition(
        account_id=acct,
        job_id="j",
        name="sample",
        environment=environment or _environment(tmp_path, warehouse),
        execute_steps=steps,
    )


def _environment(tmp_path: Path, warehouse: Path | None = None, **kw: Any) -> Environment:
    profile = {"type": "duckdb", "path": str(warehouse or tmp_path / "warehouse.duckdb")}
    return Environment.model_validate(
        {"project_dir": str(SAMPLE), "env_vars": {"RUNSLOT_TEST": "1"}, "profile": profile, **kw}
    )


def _executor(tmp_path: Path, **settings: Any) -> tuple[LocalExecutor, LocalArtifactStore]:
    store = LocalArtifactStore(tmp_path / "artifacts")
    executor = LocalExecutor(
        LocalExecutorSettings(workspace_root=tmp_path / "ws", **settings), artifacts=store
    )
    return executor, store


def _dbt_processes(workspace_root: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if proc.info["cwd"] and proc.info["cwd"].startswith(str(workspace_root)):
                found.append(proc)
        except psutil.Error:
            continue
    return found


async def test_a_real_dbt_run_streams_logs_and_keeps_each_steps_artifacts_in_the_store(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("dbt")
    executor, store = _executor(tmp_path)
    async with running_stack(client, executor) as queues:
        # The warehouse's directory does not exist yet: prep creates it, as DuckDB will not.
        warehouse = tmp_path / "not" / "yet" / "warehouse.duckdb"
        steps = ["dbt build", "dbt source freshness"]
        await jobs.save_job(client, _job(acct, steps, tmp_path, warehouse), account(acct), queues)
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        run = await wait_run(client, acct, res.run_id, timeout=120)
    assert run.status == RunStatus.SUCCESS, run.status_message
    assert [s.status for s in run.steps] == [RunStatus.SUCCESS, RunStatus.SUCCESS]
    build, freshness = StepKey(acct, res.run_id, 1), StepKey(acct, res.run_id, 2)
    assert b"Completed successfully" in (await store.read_log(build)).data
    assert b"PASS freshness of raw.raw_orders" in (await store.read_log(freshness)).data
    stored = {a.path for a in await store.list_run(acct, res.run_id)}
    # Each step's own artifacts: the freshness step wrote no run_results.json, so the build's
    # is neither overwritten nor taken for the freshness step's.
    assert stored == {
        "step-1/manifest.json", "step-1/run_results.json",
        "step-2/manifest.json", "step-2/sources.json",
    }  # fmt: skip
    results = json.loads(await store.get_file(build, "run_results.json"))
    assert {r["unique_id"] for r in results["results"]} >= {"model.jaffle.customers"}
    sources = json.loads(await store.get_file(freshness, "sources.json"))
    assert [r["unique_id"] for r in sources["results"]] == ["source.jaffle.raw.raw_orders"]
    assert not (tmp_path / "ws" / acct / res.run_id).exists(), "the workspace is cleaned up"
    assert run.prep_time is not None and run.wait_time is not None
    assert warehouse.exists()
    # The run result says where each step's log and artifacts are, and what built it.
    assert [s.log_key for s in run.steps] == [build.log_key, freshness.log_key]
    assert sorted(run.steps[0].artifacts) == ["manifest.json", "run_results.json"]
    assert sorted(run.steps[1].artifacts) == ["manifest.json", "sources.json"]
    assert run.dbt_version == installed_dbt_version()


async def test_a_run_over_the_account_memory_limit_ends_in_error_with_dbt_clouds_message(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("mem")
    root = tmp_path / "ws"
    executor, _ = _executor(tmp_path)
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
    executor, store = _executor(tmp_path)
    async with running_stack(client, executor) as queues:
        await jobs.save_job(
            client, _job(acct, [f"dbt run -s sleepy {OPS}"], tmp_path), account(acct), queues
        )
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        # The log is in the store while the step runs, not copied there at the end.
        log = store.path_of(StepKey(acct, res.run_id, 1).log_key)
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
    broken, store = _executor(tmp_path, dbt_executable="/nonexistent/dbt")
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
    log = await store.read_log(StepKey(acct, res.run_id, 1))
    assert b"runslot: could not start dbt run" in log.data, "the reason is in the step log too"


PASSWORD = "pw-51e0-never-in-clear"
TOKEN = "tok-0f3a-never-in-clear"


async def test_a_secret_in_the_profile_never_reaches_history_logs_or_leftover_files(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("secret")
    secrets = tmp_path / "worker-secrets.json"
    secrets.write_text(json.dumps({"WAREHOUSE_PASSWORD": PASSWORD, "ECHO_TOKEN": TOKEN}))
    os.chmod(secrets, 0o600)
    executor, store = _executor(tmp_path, secrets_file=secrets)
    environment = _environment(tmp_path)
    environment.profile["password"] = "{{ secret('WAREHOUSE_PASSWORD') }}"
    # dbt echoes this one (it is no DBT_ENV_SECRET_ variable, so dbt does not scrub it).
    environment.env_vars["JAFFLE_ECHO"] = "{{ secret('ECHO_TOKEN') }}"
    step = "dbt run-operation echo_env_var --args '{name: JAFFLE_ECHO}'"
    run_store = new_store(tmp_path)
    async with running_stack(client, executor, store=run_store) as queues:
        job = _job(acct, [step], tmp_path, environment=environment)
        await jobs.save_job(client, job, account(acct), queues)
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        run = await wait_run(client, acct, res.run_id, timeout=120)
        histories = [
            await client.get_workflow_handle(workflow_id).fetch_history()
            for workflow_id in (c.run_workflow_id(acct, res.run_id), c.job_workflow_id(acct, "j"))
        ]
    # The run store got the job (its profile, with the reference) and the finished run.
    stored_job = run_store.get_job_by_key(acct, "j")
    assert stored_job is not None
    reference = "{{ secret('WAREHOUSE_PASSWORD') }}"
    assert stored_job.definition.environment.profile["password"] == reference
    stored_run = run_store.get_run_by_key(acct, res.run_id)
    assert stored_run is not None and stored_run.status == RunStatus.SUCCESS
    run_store.close()  # checkpoints the WAL: every row is in the database file now
    database = (tmp_path / "runslot.db").read_bytes()
    assert b"secret('WAREHOUSE_PASSWORD')" in database, "the scan reads the stored rows"
    assert PASSWORD.encode() not in database and TOKEN.encode() not in database
    # dbt read the password through env_var() in profiles.yml: had it been missing, dbt
    # would have failed to load the profile.
    assert run.status == RunStatus.SUCCESS, run.status_message
    for history in histories:
        text = decoded_history(history.to_json())
        assert "{{ secret('WAREHOUSE_PASSWORD') }}" in text, "references travel verbatim"
        assert PASSWORD not in text and TOKEN not in text
    log = (await store.read_log(StepKey(acct, res.run_id, 1))).data
    assert b"JAFFLE_ECHO is *****" in log
    assert PASSWORD.encode() not in log and TOKEN.encode() not in log
    assert not (tmp_path / "ws" / acct / res.run_id).exists()
    for root in (tmp_path / "ws", tmp_path / "artifacts"):
        for path in (p for p in root.rglob("*") if p.is_file()):
            content = path.read_bytes()
            assert PASSWORD.encode() not in content and TOKEN.encode() not in content, path


async def test_dbt_retry_in_a_rerun_builds_only_what_failed_or_was_skipped(
    dev_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("retry")
    executor, store = _executor(tmp_path)
    async with running_stack(client, executor) as queues:
        await jobs.save_job(client, _job(acct, ["dbt build"], tmp_path), account(acct), queues)
        fail = TriggerOverrides(env_vars={"JAFFLE_FAIL_ORDER_TOTALS": "1"})
        res = await jobs.trigger(client, acct, "j", TriggerRequest(overrides=fail))
        failed = await wait_run(client, acct, res.run_id, timeout=120)
        assert failed.status == RunStatus.ERROR
        first = json.loads(await store.get_file(StepKey(acct, res.run_id, 1), "run_results.json"))
        statuses = {r["unique_id"]: r["status"] for r in first["results"]}
        assert statuses["model.jaffle.order_totals"] == "error"
        assert statuses["model.jaffle.customers"] == "success"
        # Rerun from failure through the job: `dbt retry` in a fresh workspace that has the
        # failed run's run_results.json in target/ (the failure switch is not set this time).
        again = await jobs.trigger(client, acct, "j", TriggerRequest(rerun_of=res.run_id))
        rerun = await wait_run(client, acct, again.run_id, timeout=120)
    assert rerun.status == RunStatus.SUCCESS, rerun.status_message
    assert [s.argv for s in rerun.steps] == [["dbt", "retry"]]
    retried = json.loads(await store.get_file(StepKey(acct, again.run_id, 1), "run_results.json"))
    # Test ids end in a hash that depends on the dbt version: compare without it.
    assert {_without_hash(r["unique_id"]): r["status"] for r in retried["results"]} == {
        "model.jaffle.order_totals": "success",
        "test.jaffle.not_null_order_totals_status": "pass",
    }


def _without_hash(unique_id: str) -> str:
    return unique_id.rsplit(".", 1)[0] if unique_id.startswith("test.") else unique_id


async def test_a_rerun_of_a_run_without_run_results_is_a_clear_prep_error(
    tmp_path: Path,
) -> None:
    executor, _ = _executor(tmp_path)
    with pytest.raises(ApplicationError, match=r"run 9-9 has no run_results\.json") as info:
        await executor.prepare(
            PrepareInput(
                account_id="acme", job_id="j", run_id="10-1", environment=_environment(tmp_path),
                target_name="default", threads=1, retry_of_run_id="9-9",
            )
        )  # fmt: skip
    assert info.value.non_retryable
    assert not (tmp_path / "ws" / "acme" / "10-1").exists(), "a failed prep leaves nothing"


@pytest.mark.parametrize("wanted", ["0.21", "1.99.0"])
async def test_a_dbt_version_the_worker_lacks_is_a_non_retryable_prep_error(
    tmp_path: Path, wanted: str
) -> None:
    executor, _ = _executor(tmp_path)
    request = PrepareInput(
        account_id="acme", job_id="j", run_id="1", target_name="default", threads=1,
        environment=_environment(tmp_path, dbt_version=wanted),
    )  # fmt: skip
    with pytest.raises(ApplicationError) as info:
        await executor.prepare(request)
    assert info.value.non_retryable
    installed = installed_dbt_version()
    assert f"dbt {wanted} is not available on this worker; installed: {installed}" in (
        info.value.message
    )


async def test_the_installed_dbt_version_is_accepted_with_or_without_a_patch_number(
    tmp_path: Path,
) -> None:
    executor, _ = _executor(tmp_path)
    installed = installed_dbt_version()
    minor = ".".join(installed.split(".")[:2])
    for index, wanted in enumerate((installed, minor)):
        prepared = await executor.prepare(
            PrepareInput(
                account_id="acme", job_id="j", run_id=f"v{index}", target_name="default",
                threads=1, environment=_environment(tmp_path, dbt_version=wanted),
            )
        )  # fmt: skip
        assert prepared.dbt_version == installed
