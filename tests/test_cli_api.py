"""The ``runslot`` CLI against the real API: a real Temporal dev server, real workers, real dbt.

Commands run in-process through typer's ``CliRunner`` (in a thread: the API under test may
serve from the test's own event loop), with the API's address, token and account in the
environment as a user would set them; one test runs the installed ``runslot`` script to see
what a user sees on a bad token. Assertions read the ``--output json`` form, which is the
API's own ``data``.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from starter.cli import app
from tests.clients.harness import ApiServer
from tests.conftest import find_binary

pytestmark = [pytest.mark.devserver, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample" / "jaffle"
SLEEPY = "dbt run --select sleepy --vars '{ops_enabled: true, sleep_seconds: 300}'"
"""A step that runs for minutes (sample/jaffle's ops model): its run is still running when
the test cancels the run queued behind it."""
SUCCESS, ERROR, CANCELLED, QUEUED = 10, 20, 30, 1
CLI_TIMEOUT = 120.0
STATE_TIMEOUT = 30.0


class Cli:
    """``runslot`` in-process, configured like a user's shell: RUNSLOT_* variables."""

    def __init__(self, server: ApiServer, cwd: Path) -> None:
        self.server = server
        self.cwd = cwd
        self.env = {
            "RUNSLOT_API_URL": server.base_url,
            "RUNSLOT_API_TOKEN": server.token,
            "RUNSLOT_ACCOUNT": server.account_id,
        }

    async def __call__(self, *args: str, env: Mapping[str, str] | None = None) -> Result:
        runner = CliRunner()

        def invoke() -> Result:
            return runner.invoke(app, list(args), env={**self.env, **(env or {})})

        async with asyncio.timeout(CLI_TIMEOUT):
            return await asyncio.to_thread(invoke)

    async def ok(self, *args: str) -> Result:
        result = await self(*args)
        assert result.exit_code == 0, _shown(args, result)
        return result

    async def json(self, *args: str) -> Any:
        return json.loads((await self.ok(*args, "--output", "json")).stdout)


def _shown(args: tuple[str, ...], result: Result) -> str:
    return (
        f"runslot {' '.join(args)} exited {result.exit_code}\nstdout:\n{result.stdout}\n"
        f"stderr:\n{result.stderr}\nexception: {result.exception!r}"
    )


@pytest.fixture
def cli(api_server: ApiServer, tmp_path: Path) -> Cli:
    return Cli(api_server, tmp_path)


def jobs_file(
    tmp_path: Path, server: ApiServer, uid: str, *, seed_name: str = "Seed the warehouse"
) -> Path:
    """A jobs file: one environment on sample/jaffle, a seed job, a job after it, a slow job
    and a failing one."""
    env = f"env-{uid}"
    path = tmp_path / "jobs.yml"
    path.write_text(
        f"""
account: {{account_id: "{server.account_id}"}}
environments:
  {env}:
    project_id: {server.project_id}
    project_dir: {SAMPLE}
    profile: {{type: duckdb, path: {tmp_path / "warehouse.duckdb"}}}
jobs:
  - job_id: seed-{uid}
    name: {seed_name}
    environment: {env}
    execute_steps: [dbt seed]
    triggers: {{schedule: {{cron: "0 3 1 1 *"}}}}
  - job_id: after-{uid}
    name: After a cancelled seed
    environment: {env}
    execute_steps: ["dbt run --select stg_customers"]
    triggers: {{on_job_completion: [{{job_id: seed-{uid}, statuses: [30]}}]}}
  - job_id: sleepy-{uid}
    name: Sleepy
    environment: {env}
    execute_steps: ["{SLEEPY}"]
  - job_id: broken-{uid}
    name: Broken
    environment: {env}
    execute_steps: [dbt run-operation no_such_macro]
"""
    )
    return path


async def eventually(cli: Cli, run_id: str, status: int) -> Any:
    """The run (``runs get``) once it has ``status``."""
    async with asyncio.timeout(STATE_TIMEOUT):
        while True:
            run = await cli.json("runs", "get", run_id)
            if run["status"] == status:
                return run
            await asyncio.sleep(0.5)


def actions(applied: list[dict[str, Any]]) -> dict[str, str]:
    return {f"{item['kind']}:{item['key']}": item["action"] for item in applied}


async def test_jobs_apply_creates_then_reports_unchanged_then_updates_what_changed(
    cli: Cli, api_server: ApiServer, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:8]
    path = jobs_file(tmp_path, api_server, uid)
    first = await cli.json("jobs", "apply", "-f", str(path))
    assert actions(first) == {
        f"environment:env-{uid}": "created",
        f"job:seed-{uid}": "created",
        f"job:after-{uid}": "created",
        f"job:sleepy-{uid}": "created",
        f"job:broken-{uid}": "created",
    }
    second = await cli.json("jobs", "apply", "-f", str(path))
    assert set(actions(second).values()) == {"unchanged"}, second
    assert [item["id"] for item in second] == [item["id"] for item in first]

    jobs_file(tmp_path, api_server, uid, seed_name="Seed, renamed")
    third = actions(await cli.json("jobs", "apply", "-f", str(path)))
    assert third[f"job:seed-{uid}"] == "updated"
    assert third[f"job:after-{uid}"] == third[f"job:sleepy-{uid}"] == "unchanged"

    listed = {job.get("runslot_key"): job for job in await cli.json("jobs", "list")}
    seed, after = listed[f"seed-{uid}"], listed[f"after-{uid}"]
    assert seed["name"] == "Seed, renamed"
    assert seed["schedule"]["cron"] == "0 3 1 1 *" and seed["triggers"]["schedule"] is True
    condition = after["job_completion_trigger_condition"]["condition"]
    assert condition["job_id"] == seed["id"] and condition["statuses"] == [CANCELLED]
    shown = await cli.json("jobs", "get", f"seed-{uid}")
    assert shown["id"] == seed["id"]


async def test_run_wait_tails_the_step_logs_and_exits_0_on_success(
    cli: Cli, api_server: ApiServer, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:8]
    await cli.json("jobs", "apply", "-f", str(jobs_file(tmp_path, api_server, uid)))

    waited = await cli.ok("run", f"seed-{uid}", "--wait")
    assert "Success" in waited.stdout, waited.stdout
    assert "── step 1:" in waited.stdout
    assert "Running with dbt" in waited.stdout  # dbt's own log, tailed while it ran
    assert "Completed successfully" in waited.stdout

    runs = await cli.json("runs", "list", "--job", f"seed-{uid}", "--status", "success")
    assert len(runs) == 1 and runs[0]["status"] == SUCCESS
    run_id = str(runs[0]["id"])
    got = await cli.json("runs", "get", run_id)
    assert got["is_success"] and got["run_steps"], got
    logs = await cli.ok("runs", "logs", run_id, "--step", "1")
    assert "Running with dbt" in logs.stdout and "Completed successfully" in logs.stdout
    steps = await cli.json("runs", "logs", run_id)
    assert [step["index"] for step in steps] == [1]


async def test_run_wait_exits_1_on_error_and_rerun_of_reruns_that_run(
    cli: Cli, api_server: ApiServer, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:8]
    await cli.json("jobs", "apply", "-f", str(jobs_file(tmp_path, api_server, uid)))
    waited = await cli("run", f"broken-{uid}", "--wait", "--output", "json")
    assert waited.exit_code == 1, _shown(("run",), waited)
    failed = json.loads(waited.stdout)
    assert failed["status"] == ERROR and failed["run_steps"][0]["status"] == ERROR

    elsewhere = await cli("run", f"seed-{uid}", "--rerun-of", str(failed["id"]))
    assert elsewhere.exit_code == 1 and "is not a run of job" in elsewhere.stderr
    rerun = await cli.json("run", f"broken-{uid}", "--rerun-of", str(failed["id"]))
    try:
        assert rerun["trigger"]["rerun_of"] == failed["id"]
        assert rerun["id"] != failed["id"]
    finally:
        await cli.ok("runs", "cancel", str(rerun["id"]))


async def test_cancel_a_queued_run_leaves_it_cancelled(
    cli: Cli, api_server: ApiServer, tmp_path: Path
) -> None:
    uid = uuid.uuid4().hex[:8]
    await cli.json("jobs", "apply", "-f", str(jobs_file(tmp_path, api_server, uid)))
    running = await cli.json("run", f"sleepy-{uid}")
    queued = await cli.json("run", f"sleepy-{uid}")  # runs of one job never overlap
    try:
        assert queued["status"] == QUEUED
        cancelled = await cli.json("runs", "cancel", str(queued["id"]))
        assert cancelled["status"] == CANCELLED and cancelled["is_cancelled"], cancelled
        # The API answers Cancelled at once; the run store shows it within seconds.
        shown = await eventually(cli, str(queued["id"]), CANCELLED)
        assert shown["run_steps"] == []
        text = await cli.ok("runs", "list", "--job", f"sleepy-{uid}", "--status", "cancelled")
        assert str(queued["id"]) in text.stdout
    finally:
        await cli.ok("runs", "cancel", str(running["id"]))


async def test_a_bad_token_is_one_clear_line_and_exit_code_1(
    cli: Cli, api_server: ApiServer
) -> None:
    # The installed script, as a user runs it: no traceback, one line, exit code 1.
    proc = await asyncio.create_subprocess_exec(
        find_binary("runslot"), "jobs", "list",
        env={**os.environ, **cli.env, "RUNSLOT_API_TOKEN": "rst_not-a-token"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(CLI_TIMEOUT):
        out, err = await proc.communicate()
    assert proc.returncode == 1
    assert out == b""
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: the API refused the token (401"), lines

    other = await cli("runs", "list", "--account", "999999")
    assert other.exit_code == 1 and "999999" in other.stderr, _shown(("runs", "list"), other)
    assert other.exception is None or isinstance(other.exception, SystemExit)
    missing = await cli("runs", "get", "987654321")
    assert missing.exit_code == 1 and "(HTTP 404)" in missing.stderr, missing.stderr
