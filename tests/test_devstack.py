"""``runslot dev`` end to end: the real command, the real dev server, real worker processes
and the real API process.

Each test runs the stack as a subprocess on free ports and its own data dir, talks to it
through a client, the ``temporal`` CLI, the REST API and the ``runslot`` CLI, then stops it
with SIGINT (Ctrl-C) and checks that no server, worker or API process is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any, Protocol

import httpx
import psutil
import pytest
import pytest_asyncio

from activities.store import RunStore
from starter import jobs
from starter.client import connect
from starter.devserver import DevSettings, api_argv, server_argv
from tests.conftest import find_binary
from tests.store_fixtures import free_port
from workflows.constants import SA_ACCOUNT, SEARCH_ATTRIBUTES
from workflows.models import AccountSettings, Environment, JobDefinition, RunStatus

READY_LINE = "Press Ctrl-C to stop."
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class DevProcess:
    """One ``runslot dev`` subprocess and the processes it started."""

    def __init__(
        self, data_dir: Path, log: Path, ports: tuple[int, int, int], *, demo: bool = False
    ) -> None:
        self.data_dir, self.log = data_dir, log
        self.port, self.ui_port, self.api_port = ports
        self.demo = demo
        self.proc: asyncio.subprocess.Process | None = None
        self.children: list[psutil.Process] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                find_binary("runslot"), "dev",
                "--data-dir", str(self.data_dir),
                "--port", str(self.port),
                "--ui-port", str(self.ui_port),
                "--api-port", str(self.api_port),
                "--demo" if self.demo else "--no-demo",
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        async with asyncio.timeout(START_TIMEOUT):
            while READY_LINE not in self.output():
                assert self.proc.returncode is None, f"runslot dev exited:\n{self.output()}"
                await asyncio.sleep(0.1)
        self.children = psutil.Process(self.proc.pid).children(recursive=True)

    async def stop(self) -> int:
        """Ctrl-C, then wait for a clean exit; return the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(STOP_TIMEOUT):
            return await self.proc.wait()

    async def cleanup(self) -> None:
        """Whatever a failed test left running: stop it, kill it if it does not stop."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for child in self.children:
            with contextlib.suppress(psutil.Error):
                child.kill()

    def leftovers(self) -> list[str]:
        _, alive = psutil.wait_procs(self.children, timeout=5)
        return [" ".join(p.cmdline()[:4]) for p in alive]


class Launch(Protocol):
    def __call__(self, data_dir: Path, *, demo: bool = False) -> Awaitable[DevProcess]: ...


@pytest_asyncio.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launch]:
    """Start ``runslot dev`` on a data dir (free ports each time); stop everything after."""
    started: list[DevProcess] = []

    async def start(data_dir: Path, *, demo: bool = False) -> DevProcess:
        log = tmp_path / f"dev-{len(started)}.log"
        dev = DevProcess(data_dir, log, (free_port(), free_port(), free_port()), demo=demo)
        started.append(dev)
        await dev.start()
        return dev

    yield start
    for dev in started:
        await dev.cleanup()


async def run(*argv: str, cwd: Path | None = None) -> str:
    """Run a CLI without blocking the event loop; return its stdout (it must succeed)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, f"{argv[:3]} exited {proc.returncode}:\n{(out + err).decode()}"
    return out.decode()


async def listed_workflows(address: str, account: str) -> list[str]:
    """Workflow ids of an account, through ``temporal workflow list`` and visibility."""
    out = await run(
        find_binary("temporal"), "workflow", "list", "--address", address,
        "--query", f"RunslotAccount='{account}'", "--output", "json",
    )  # fmt: skip
    return sorted(w["execution"]["workflowId"] for w in json.loads(out or "[]"))


async def wait_listed(address: str, account: str, workflow_id: str) -> None:
    async with asyncio.timeout(10):
        while True:
            if workflow_id in await listed_workflows(address, account):
                return
            await asyncio.sleep(0.2)


async def save_demo_job(dev: DevProcess, account: str, project: Path) -> None:
    client = await connect(dev.address)
    job = JobDefinition(
        account_id=account,
        job_id="j1",
        name="debug",
        environment=Environment(project_dir=str(project)),
        execute_steps=["dbt debug"],
    )
    async with asyncio.timeout(20):
        await jobs.save_job(client, job, AccountSettings(account_id=account))


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_server_argv_registers_every_search_attribute_with_its_cli_type(tmp_path: Path) -> None:
    argv = server_argv("temporal", DevSettings(port=7300, ui_port=8300), tmp_path / "t.sqlite")
    pairs = {argv[i + 1] for i, arg in enumerate(argv) if arg == "--search-attribute"}
    assert pairs == {
        "RunslotAccount=Keyword", "RunslotJob=Keyword", "RunslotRun=Keyword",
        "RunslotCause=Keyword", "RunslotStatus=Keyword", "RunslotUpstreamJobs=KeywordList",
    }  # fmt: skip
    assert len(pairs) == len(SEARCH_ATTRIBUTES)
    assert argv[argv.index("--db-filename") + 1] == str(tmp_path / "t.sqlite")
    assert argv[argv.index("--ui-port") + 1] == "8300"
    assert "journal_mode=wal" in argv
    assert "history.transferProcessorMaxPollRPS=1000" in argv


def test_api_argv_serves_the_stack_s_data_dir_on_the_api_port(tmp_path: Path) -> None:
    argv = api_argv(DevSettings(port=7300, api_port=8300), tmp_path)
    assert argv[1:3] == ["-m", "api"]
    options = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert options["--port"] == "8300" and options["--host"] == "127.0.0.1"
    assert options["--temporal-address"] == "127.0.0.1:7300"
    assert options["--data-dir"] == str(tmp_path)


@pytest.mark.devserver
@pytest.mark.slow
async def test_dev_runs_server_and_worker_pools_and_ctrl_c_stops_them_all(
    launch: Launch, tmp_path: Path
) -> None:
    dev = await launch(tmp_path / "data")
    names = [" ".join(p.cmdline()) for p in dev.children]
    assert sum("server start-dev" in n for n in names) == 1, names
    for pool in ("workflows", "steps", "telemetry"):
        assert sum(f"-m worker --pool {pool}" in n for n in names) == 1, names
    assert sum(" -m api " in n for n in names) == 1, names
    assert f"http://127.0.0.1:{dev.ui_port}" in dev.output()
    assert dev.api_url in dev.output()
    async with httpx.AsyncClient(base_url=dev.api_url) as http:
        assert (await http.get("/")).status_code == 200
        assert (await http.get("/api/v2/accounts/1/runs/")).status_code == 401

    await save_demo_job(dev, "acct1", tmp_path)
    await wait_listed(dev.address, "acct1", "job:acct1:j1")

    assert await dev.stop() == 0, dev.output()
    assert dev.leftovers() == []
    assert port_is_free(dev.port) and port_is_free(dev.api_port)
    assert (tmp_path / "data" / "temporal.sqlite").exists()


@pytest.mark.devserver
@pytest.mark.slow
async def test_two_stacks_run_side_by_side_on_their_own_ports_and_data_dirs(
    launch: Launch, tmp_path: Path
) -> None:
    a, b = await asyncio.gather(launch(tmp_path / "a"), launch(tmp_path / "b"))
    await asyncio.gather(save_demo_job(a, "alpha", tmp_path), save_demo_job(b, "beta", tmp_path))
    await asyncio.gather(
        wait_listed(a.address, "alpha", "job:alpha:j1"),
        wait_listed(b.address, "beta", "job:beta:j1"),
    )
    assert await listed_workflows(a.address, "beta") == []
    assert await listed_workflows(b.address, "alpha") == []

    assert list(await asyncio.gather(a.stop(), b.stop())) == [0, 0]
    assert a.leftovers() == b.leftovers() == []


@pytest.mark.devserver
@pytest.mark.slow
async def test_restart_on_the_same_data_dir_keeps_jobs_and_search_attributes(
    launch: Launch, tmp_path: Path
) -> None:
    (tmp_path / "jobs.yml").write_text(
        "account: {account_id: keep, run_slots: 2}\n"
        "jobs:\n"
        "  - job_id: nightly\n"
        "    name: Nightly\n"
        "    environment: {project_dir: project}\n"
        "    execute_steps: [dbt build]\n"
        "    triggers: {schedule: {cron: '0 3 * * *'}}\n"
    )
    runslot, data = find_binary("runslot"), tmp_path / "data"
    first = await launch(data)
    # Admin commands on the running stack's store, then the API with the token they made.
    await run(runslot, "accounts", "create", "keep", "--run-slots", "2", "--data-dir", str(data))
    token = (await run(runslot, "tokens", "create", "keep", "--data-dir", str(data))).strip()
    api = ["--api-url", first.api_url, "--token", token]
    apply = [runslot, "jobs", "apply", "-f", "jobs.yml", "--output", "json"]
    applied = await run(*apply, *api, cwd=tmp_path)
    # The file's inline environment becomes an environment named after its job.
    assert {(a["kind"], a["key"], a["action"]) for a in json.loads(applied)} == {
        ("environment", "nightly", "created"),
        ("job", "nightly", "created"),
    }
    assert await first.stop() == 0, first.output()
    assert first.leftovers() == []

    second = await launch(data)  # search attributes exist already
    await wait_listed(second.address, "keep", "job:keep:nightly")
    api = ["--api-url", second.api_url, "--token", token, "--account", "keep"]
    described = json.loads(await run(runslot, "jobs", "get", "nightly", *api, "-o", "json"))
    assert described["name"] == "Nightly" and described["schedule"]["cron"] == "0 3 * * *"
    again = await run(*apply, *api, cwd=tmp_path)
    assert {a["action"] for a in json.loads(again)} == {"unchanged"}
    assert await second.stop() == 0, second.output()
    assert second.leftovers() == []


@pytest.mark.devserver
@pytest.mark.slow
async def test_dev_registers_search_attributes_an_older_data_dir_lacks(
    launch: Launch, tmp_path: Path
) -> None:
    # start-dev registers --search-attribute only when it creates the SQLite file: a data
    # dir made by an older release (fewer attributes) must still get every one of them.
    data_dir, port = tmp_path / "data", free_port()
    data_dir.mkdir()
    old = await asyncio.create_subprocess_exec(
        find_binary("temporal"), "server", "start-dev", "--headless",
        "--ip", "127.0.0.1", "--port", str(port),
        "--db-filename", str(data_dir / "temporal.sqlite"),
        "--search-attribute", f"{SA_ACCOUNT.name}=Keyword",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                with contextlib.suppress(RuntimeError):
                    await connect(f"127.0.0.1:{port}")
                    break
                await asyncio.sleep(0.2)
    finally:
        old.send_signal(signal.SIGINT)
        async with asyncio.timeout(STOP_TIMEOUT):
            await old.wait()

    dev = await launch(data_dir)
    out = await run(
        find_binary("temporal"), "operator", "search-attribute", "list",
        "--address", dev.address, "--output", "json",
    )  # fmt: skip
    registered = json.loads(out)["customAttributes"]
    for key in SEARCH_ATTRIBUTES:
        assert registered.get(key.name) == f"INDEXED_VALUE_TYPE_{key.indexed_value_type.name}"
    assert await dev.stop() == 0, dev.output()


async def test_a_new_stack_shows_a_successful_demo_run_within_a_minute(
    launch: Launch, tmp_path: Path
) -> None:
    started = time.monotonic()
    data = tmp_path / "data"
    dev = await launch(data, demo=True)
    token_file = data / "demo-token"
    token = token_file.read_text().strip()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token in dev.output()
    # A dbt Cloud client with DBT_CLOUD_ACCOUNT_ID=1 and the printed token sees the demo.
    async with httpx.AsyncClient(
        base_url=f"{dev.api_url}/api/v2/accounts/1",
        headers={"Authorization": f"Token {token}"},
        timeout=10,
    ) as http:
        account = (await http.get("/")).json()["data"]
        assert (account["id"], account["name"], account["run_slots"]) == (1, "demo", 1)
        listed = {j.get("runslot_key"): j for j in (await http.get("/jobs/")).json()["data"]}
        build, docs = listed["build"]["id"], listed["docs"]["id"]
        first = await asyncio.wait_for(_first_run_of(http, build), 60)
        elapsed = time.monotonic() - started
        assert first["status"] == RunStatus.SUCCESS, first["status_message"]
        assert [s["command"] for s in first["run_steps"]] == ["dbt seed", "dbt build"]
        assert elapsed < 60, f"first demo run took {elapsed:.0f}s from `runslot dev`"
        runs = (await http.get("/runs/")).json()
        assert {"id": first["id"], "status": 10} in [
            {"id": r["id"], "status": r["status"]} for r in runs["data"]
        ]
        # Its completion triggers the docs job (rule 7) on the real stack.
        docs_run = await asyncio.wait_for(_first_run_of(http, docs), 60)
        assert docs_run["status"] == RunStatus.SUCCESS, docs_run["status_message"]
        assert docs_run["trigger"]["cause_category"] == "job_completion"
    runslot, temporal = find_binary("runslot"), ["--temporal-address", dev.address]
    slots = await run(runslot, "slots", "--account", "1", *temporal, "--output", "json")
    assert json.loads(slots)["capacity"] == 1
    # An admin resize reaches the running slots workflow at once.
    resized = await run(
        runslot, "accounts", "create", "1", "--run-slots", "2", "--data-dir", str(data), *temporal
    )
    assert "resized: 1 -> 2" in resized
    slots = await run(runslot, "slots", "--account", "1", *temporal, "--output", "json")
    assert json.loads(slots)["capacity"] == 2
    assert await dev.stop() == 0
    assert dev.leftovers() == []

    # What the run left behind: the store's row with its timings, logs and artifacts.
    store = RunStore(f"sqlite:///{data / 'runslot.db'}")
    try:
        stored = store.get_run("1", first["id"])
        assert stored is not None and stored.status == RunStatus.SUCCESS and stored.dbt_version
        assert stored.created_at <= stored.dequeued_at <= stored.started_at  # type: ignore[operator]
        assert stored.started_at is not None and stored.finished_at is not None
        assert stored.finished_at >= stored.started_at
        assert [(s.name, s.status) for s in stored.steps] == [
            ("dbt seed", RunStatus.SUCCESS),
            ("dbt build", RunStatus.SUCCESS),
        ]
        assert {"manifest.json", "run_results.json"} <= set(stored.artifacts)
        for step in stored.steps:
            assert step.log_key and (data / "artifacts" / step.log_key).stat().st_size > 0
        step_dir = data / "artifacts" / "1" / stored.key / "step-2" / "artifacts"
        assert (step_dir / "run_results.json").exists() and (step_dir / "manifest.json").exists()
    finally:
        store.close()

    # A later start keeps the demo as it is and prints the same token again.
    again = await launch(data, demo=True)
    assert token in again.output() and "is running now" not in again.output()
    assert await again.stop() == 0


async def _first_run_of(http: httpx.AsyncClient, job_id: int) -> dict[str, Any]:
    """The job's first run once it has finished, with its steps and trigger."""
    params: dict[str, str | int] = {
        "job_definition_id": job_id, "order_by": "id", "limit": 1,
        "include_related": '["run_steps", "trigger"]',
    }  # fmt: skip
    while True:
        found = (await http.get("/runs/", params=params)).json()["data"]
        if found and found[0]["is_complete"]:
            run: dict[str, Any] = found[0]
            return run
        await asyncio.sleep(0.5)
