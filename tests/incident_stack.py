"""The real stack, one process per part, for the incident replays (issue 5).

``IncidentStack`` runs what ``runslot dev`` runs, but each part on its own so a test can
break it: ``temporal server start-dev`` on a SQLite file in the data dir (the project's
pragmas and poll rates), one ``python -m worker --pool ...`` process per pool and the API
(``python -m api``), all sharing that data dir (run store, artifacts, workspaces). It
creates an account, a token and environments on ``sample/jaffle`` (one DuckDB file each),
and offers the faults: ``kill_pool`` / ``start_pool``, ``restart_server`` (SIGTERM or
SIGKILL, then the same SQLite file and port again).

Every process it starts, and every process those started (dbt steps), is remembered;
``close`` stops them all and ``leftovers`` says what survived, which a test asserts empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import timedelta
from io import BufferedWriter
from pathlib import Path
from typing import Any

import httpx
import psutil
import sqlalchemy as sa
from temporalio.api.enums.v1 import EventType, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from activities.store import RunStore, StoredRun
from activities.store.schema import RunRow, RunStepRow
from starter.client import connect
from starter.devserver import (
    NAMESPACE,
    DevSettings,
    api_argv,
    ensure_search_attributes,
    find_temporal,
    server_argv,
    worker_argv,
)
from tests.conftest import DEV_SERVER_ARGS
from tests.store_fixtures import free_port
from worker.settings import POOLS, Pool
from workflows.models import AccountSettings, Environment, TaskQueues

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "jaffle"
ACCOUNT = "1"
PROJECT_ID = 1
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
POLL = 0.2

# A python that asks Linux to SIGTERM it when the test process dies, then becomes the
# server: a test killed half way must not leave a dev server holding its port. (A
# ``preexec_fn`` would do the same, but is unsafe in a process with threads, as pytest is.)
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def jaffle(warehouse: Path) -> Environment:
    """sample/jaffle on its own DuckDB file (DuckDB takes one writing process per file)."""
    return Environment(project_dir=str(SAMPLE), profile={"type": "duckdb", "path": str(warehouse)})


def sleepy_step(seconds: float) -> str:
    """A real dbt step that sleeps inside the model (sample/jaffle/models/ops/sleepy.py)."""
    variables = json.dumps({"ops_enabled": True, "sleep_seconds": seconds})
    return f"dbt run --select sleepy --vars '{variables}'"


def report(title: str, figures: dict[str, Any]) -> None:
    """Print a test's figures (visible with ``pytest -s``) for docs/incidents.md."""
    width = max(len(name) for name in figures)
    lines = [f"  {name:<{width}}  {value}" for name, value in figures.items()]
    print(f"\n[incident] {title}\n" + "\n".join(lines), flush=True)


class IncidentStack:
    """The stack's processes, its account and the clients a test talks to it with."""

    def __init__(
        self,
        root: Path,
        *,
        run_slots: int,
        environments: Iterable[str] = ("main",),
        reap_interval: timedelta = timedelta(seconds=2),
        max_concurrent_steps: int = 4,
    ) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.settings = DevSettings(
            data_dir=self.data_dir,
            port=free_port(),
            api_port=free_port(),
            headless=True,
            max_concurrent_steps=max_concurrent_steps,
            graceful_shutdown_seconds=2.0,
            startup_timeout_seconds=START_TIMEOUT,
        )
        self.account = AccountSettings(
            account_id=ACCOUNT, run_slots=run_slots, slot_reap_interval=reap_interval
        )
        self.environment_names = list(environments)
        self.environment_ids: dict[str, int] = {}
        self.server: asyncio.subprocess.Process | None = None
        self.pools: dict[Pool, asyncio.subprocess.Process] = {}
        self.api: asyncio.subprocess.Process | None = None
        self.store = RunStore(f"sqlite:///{self.data_dir / 'runslot.db'}")
        self.token = ""
        self.http = httpx.AsyncClient(base_url=self.settings.api_url, timeout=60)
        self.leftovers: list[str] = []
        self._client: Client | None = None
        self._seen: dict[int, psutil.Process] = {}
        self._files: list[BufferedWriter] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Server, search attributes, store and account, then the workers and the API."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        await self.start_server()
        await ensure_search_attributes(await self.client())
        await asyncio.to_thread(self._create_account)
        await asyncio.gather(*(self.start_pool(pool) for pool in POOLS), self._start_api())
        self.http.headers["Authorization"] = f"Token {self.token}"

    def _create_account(self) -> None:
        # Migrated here first: the workflow pool and the API would race to do it.
        self.store.migrate()
        self.store.upsert_account(self.account, name="incidents")
        self.token = self.store.create_token(ACCOUNT, "incident replays")
        for name in self.environment_names:
            # Not "main.duckdb": DuckDB names the catalog after the file, and a catalog
            # "main" breaks dbt-duckdb's python models (schema "main.main" not found).
            warehouse = self.data_dir / "warehouse" / f"warehouse_{name}.duckdb"
            self.environment_ids[name] = self.store.put_environment(
                ACCOUNT, name, jaffle(warehouse), project_id=PROJECT_ID
            )

    async def close(self) -> None:
        """Stop the API, the workers and the server; kill whatever did not stop, dbt steps
        included, and record it in ``leftovers``."""
        await self.http.aclose()
        for proc in list(self._seen.values()):  # before they stop: orphans leave the tree
            with contextlib.suppress(psutil.Error):
                self.remember(proc.children(recursive=True))
        procs = [p for p in [self.api, *self.pools.values()] if p is not None]
        await _terminate(procs, self.settings.graceful_shutdown_seconds + 5)
        if self.server is not None:
            await _terminate([self.server], STOP_TIMEOUT)
        self.store.close()
        _, alive = psutil.wait_procs(list(self._seen.values()), timeout=5)
        alive = [p for p in alive if _alive(p)]  # a zombie has exited: only unreaped
        self.leftovers = [_describe(p) for p in alive]
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        for handle in self._files:
            handle.close()

    def remember(self, procs: Iterable[psutil.Process]) -> None:
        """Processes that must be gone when the stack closes (e.g. a killed worker's dbt)."""
        for proc in procs:
            self._seen.setdefault(proc.pid, proc)

    # ------------------------------------------------------------------ the server

    @property
    def db_file(self) -> Path:
        return self.data_dir / "temporal.sqlite"

    async def start_server(self) -> None:
        argv = server_argv(find_temporal(), self.settings, self.db_file)
        for flag, value in zip(DEV_SERVER_ARGS[::2], DEV_SERVER_ARGS[1::2], strict=True):
            if value not in argv:  # the tests' continue-as-new threshold
                argv += [flag, value]
        wrapped = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
        self.server = await self._spawn(wrapped, "temporal-server")
        self._client = await self._connect()

    async def restart_server(self, sig: signal.Signals = signal.SIGTERM) -> dict[str, float]:
        """Stop the server with ``sig`` and start it again on the same file and port.

        Returns seconds from the signal until the server exited, until it served again
        (``downtime``), and until every worker polled again (``workers_back``).
        """
        assert self.server is not None
        started = time.monotonic()
        self.server.send_signal(sig)
        async with asyncio.timeout(STOP_TIMEOUT):
            await self.server.wait()
        exited = time.monotonic() - started
        self._client = None  # its connection went with the server
        await self.start_server()
        downtime = time.monotonic() - started
        await self.wait_polling(list(self.pools))
        return {
            "exited": exited,
            "downtime": downtime,
            "workers_back": time.monotonic() - started,
        }

    async def client(self) -> Client:
        """A client of the current server (connected again after a restart)."""
        if self._client is None:
            self._client = await self._connect()
        return self._client

    async def _connect(self) -> Client:
        """Connect, retrying while the server starts (failing if it exits instead)."""
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                assert self.server is None or self.server.returncode is None, self.tail(
                    "temporal-server"
                )
                try:
                    return await connect(self.settings.address, NAMESPACE)
                except RuntimeError:
                    await asyncio.sleep(POLL)

    # ------------------------------------------------------------------ workers and API

    async def start_pool(self, pool: Pool) -> None:
        """Start the pool's worker process and wait until it polls its task queue."""
        assert pool not in self.pools or self.pools[pool].returncode is not None
        argv = worker_argv(self.settings, pool, self.data_dir)
        self.pools[pool] = await self._spawn(argv, f"worker-{pool.value}")
        await self.wait_polling([pool])

    async def kill_pool(
        self, pool: Pool, sig: signal.Signals = signal.SIGKILL
    ) -> list[psutil.Process]:
        """Signal the pool's worker, wait until it is gone; return the processes it had
        started (its dbt steps), which the stack then watches too."""
        proc = self.pools[pool]
        children = psutil.Process(proc.pid).children(recursive=True)
        self.remember(children)
        proc.send_signal(sig)
        async with asyncio.timeout(STOP_TIMEOUT):
            await proc.wait()
        return children

    async def wait_polling(self, pools: list[Pool]) -> None:
        """Wait until each pool's current process polls its queue (identity ``pid@host``)."""
        queues = TaskQueues()
        polled = {
            Pool.WORKFLOWS: (queues.workflows, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
            Pool.STEPS: (queues.steps, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
            Pool.TELEMETRY: (queues.telemetry, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
        }
        waiting = list(pools)
        async with asyncio.timeout(START_TIMEOUT):
            while waiting:
                client = await self.client()
                for pool in list(waiting):
                    proc = self.pools[pool]
                    assert proc.returncode is None, self.tail(f"worker-{pool.value}")
                    queue, kind = polled[pool]
                    resp = await client.workflow_service.describe_task_queue(
                        DescribeTaskQueueRequest(
                            namespace=NAMESPACE, task_queue=TaskQueue(name=queue),
                            task_queue_type=kind,
                        )
                    )  # fmt: skip
                    if any(p.identity.startswith(f"{proc.pid}@") for p in resp.pollers):
                        waiting.remove(pool)
                await asyncio.sleep(POLL)

    async def _start_api(self) -> None:
        self.api = await self._spawn(api_argv(self.settings, self.data_dir), "api")
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                assert self.api.returncode is None, self.tail("api")
                with contextlib.suppress(httpx.HTTPError):
                    if (await self.http.get("/")).is_success:
                        return
                await asyncio.sleep(POLL)

    async def _spawn(self, argv: list[str], name: str) -> asyncio.subprocess.Process:
        log = (self.logs / f"{name}.log").open("ab")
        self._files.append(log)
        log.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(argv[:6])}\n".encode())
        log.flush()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        with contextlib.suppress(psutil.Error):
            self.remember([psutil.Process(proc.pid)])
        return proc

    def tail(self, name: str, lines: int = 30) -> str:
        """The end of a process's log, for assertion messages."""
        path = self.logs / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return f"{name} log:\n" + "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------------ the API

    @property
    def v2(self) -> str:
        return f"/api/v2/accounts/{ACCOUNT}"

    async def create_job(self, key: str, steps: list[str], environment: str = "main") -> int:
        """Create a job through the API; returns its id."""
        body = {
            "runslot_key": key,
            "name": f"incident {key}",
            "project_id": PROJECT_ID,
            "environment_id": self.environment_ids[environment],
            "execute_steps": steps,
        }
        response = await self.http.post(f"{self.v2}/jobs/", json=body)
        assert response.status_code in (200, 201), response.text
        job_id: int = response.json()["data"]["id"]
        return job_id

    async def trigger(self, job_id: int, cause: str, **body: Any) -> int:
        """Queue a run through the API; returns its id."""
        response = await self.http.post(
            f"{self.v2}/jobs/{job_id}/run/", json={"cause": cause, **body}
        )
        assert response.status_code == 200, response.text
        run_id: int = response.json()["data"]["id"]
        return run_id

    # ------------------------------------------------------------------ the run store

    async def runs(self) -> list[StoredRun]:
        """Every run of the account in the store, with its steps."""
        page = await asyncio.to_thread(
            lambda: self.store.list_runs(ACCOUNT, limit=1000, include_steps=True)
        )
        assert not page.quarantined, page.quarantined
        return page.items

    async def wait_finished(self, run_ids: Iterable[int], timeout: float) -> dict[int, StoredRun]:
        """Wait until the store shows every run finished; returns them by id."""
        wanted = set(run_ids)
        async with asyncio.timeout(timeout):
            while True:
                runs = {r.id: r for r in await self.runs() if r.id in wanted}
                if len(runs) == len(wanted) and all(r.status.is_finished for r in runs.values()):
                    return runs
                await asyncio.sleep(0.5)

    async def duplicate_rows(self) -> int:
        """Run rows sharing (account, key) plus step rows sharing (run, index)."""

        def count() -> int:
            runs = sa.select(RunRow.account_id, RunRow.key).group_by(RunRow.account_id, RunRow.key)
            steps = sa.select(RunStepRow.run_id, RunStepRow.index).group_by(
                RunStepRow.run_id, RunStepRow.index
            )
            total = 0
            with self.store.engine.connect() as conn:
                for query in (runs, steps):
                    dupes = query.having(sa.func.count() > 1).subquery()
                    total += conn.execute(
                        sa.select(sa.func.count()).select_from(dupes)
                    ).scalar_one()
            return total

        return await asyncio.to_thread(count)

    def step_log(self, run_id: int, step: int) -> Path:
        return self.data_dir / "artifacts" / ACCOUNT / str(run_id) / f"step-{step}" / "log"


@asynccontextmanager
async def incident_stack(root: Path, **options: Any) -> AsyncIterator[IncidentStack]:
    """A started ``IncidentStack``, closed (every process stopped) when the block ends."""
    stack = IncidentStack(root, **options)
    try:
        await stack.start()
        yield stack
    finally:
        await stack.close()


async def scheduled_activities(client: Client, workflow_id: str, activity: str) -> int:
    """How many times a workflow scheduled ``activity`` (retries are attempts, not events)."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return sum(
        1
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and event.activity_task_scheduled_event_attributes.activity_type.name == activity
    )


async def wait_gone(procs: list[psutil.Process], timeout: float) -> float | None:
    """Seconds until every process has exited (zombies count as exited); None if some
    are still alive after ``timeout``."""
    started = time.monotonic()
    while True:
        alive = [p for p in procs if _alive(p)]
        if not alive:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        await asyncio.sleep(0.1)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline()[:5])}"
    except psutil.Error:
        return str(proc.pid)


async def _terminate(procs: list[asyncio.subprocess.Process], grace: float) -> None:
    """SIGTERM, wait up to ``grace``, then SIGKILL what is left."""
    running = [p for p in procs if p.returncode is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(grace):
            await asyncio.gather(*(p.wait() for p in running))
    for proc in running:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
