"""One scenario's processes: a fresh dev server, worker subprocesses, the API.

The server is started exactly as the embedded stack starts it (``starter.devserver``: the
same binary, pragmas, dynamic config and search attributes) on a fresh SQLite file in the
scenario's temporary directory and a free port. Each child runs in its own session (a
terminal's Ctrl-C reaches only the driver, which then stops them in order: API, workers,
server) and asks Linux to SIGTERM it if the driver dies without stopping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from io import BufferedWriter
from pathlib import Path

import httpx
import psutil
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from starter.client import connect
from starter.devserver import (
    NAMESPACE,
    DevSettings,
    api_argv,
    ensure_search_attributes,
    find_temporal,
    server_argv,
)
from tests.store_fixtures import free_port
from worker.logging import LogLevel
from workflows.models import TaskQueues

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
STOP_GRACE = 10.0
POLL = 0.1

# A python that asks Linux to SIGTERM it when the driver dies, then becomes the child (a
# preexec_fn would do the same, but is unsafe once the Temporal client's threads run).
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class StackError(Exception):
    """A process of the scenario could not start: the message says which and why."""


@dataclass
class Child:
    name: str
    proc: asyncio.subprocess.Process
    ps: psutil.Process
    log: Path


class Stack:
    """A scenario's server and children, in ``root``; ``close`` stops them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.settings = DevSettings(
            data_dir=root,
            port=free_port(),
            api_port=free_port(),
            headless=True,
            server_log_level="warn",
            worker_log_level=LogLevel.WARNING,
        )
        self.children: dict[str, Child] = {}
        self._files: list[BufferedWriter] = []
        self._client: Client | None = None

    @property
    def address(self) -> str:
        return self.settings.address

    @property
    def store_url(self) -> str:
        return f"sqlite:///{self.root / 'runslot.db'}"

    @property
    def client(self) -> Client:
        assert self._client is not None, "start the server first"
        return self._client

    def processes(self) -> dict[str, psutil.Process]:
        return {name: child.ps for name, child in self.children.items()}

    # ------------------------------------------------------------------ starting

    async def start_server(self) -> Client:
        argv = server_argv(find_temporal(), self.settings, self.root / "temporal.sqlite")
        server = await self.spawn("server", argv)
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                if server.proc.returncode is not None:
                    raise StackError(f"the dev server exited:\n{self.tail('server')}")
                try:
                    self._client = await connect(self.address, NAMESPACE)
                    break
                except RuntimeError:
                    await asyncio.sleep(POLL)
        await ensure_search_attributes(self._client)
        return self._client

    async def spawn(self, name: str, argv: list[str]) -> Child:
        out = (self.root / f"{name}.log").open("ab")
        self._files.append(out)
        wrapped = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]
        proc = await asyncio.create_subprocess_exec(
            *wrapped,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
        child = Child(name, proc, psutil.Process(proc.pid), self.root / f"{name}.log")
        self.children[name] = child
        return child

    async def start_runslot_worker(
        self,
        events: Path,
        *,
        step_seconds: float = 0.0,
        max_concurrent_steps: int = 200,
        step_rate: float = 0.0,
    ) -> Child:
        """The three pools of Runslot in one process (tests/bench/worker.py)."""
        child = await self.spawn(
            "worker",
            [
                sys.executable, "-m", "tests.bench.worker",
                "--address", self.address,
                "--store-url", self.store_url,
                "--events", str(events),
                "--step-seconds", str(step_seconds),
                "--max-concurrent-steps", str(max_concurrent_steps),
                "--step-rate", str(step_rate),
                "--parent-pid", str(os.getpid()),
            ],
        )  # fmt: skip
        queues = TaskQueues()
        await self._wait_polling(
            child,
            [
                (queues.workflows, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
                (queues.steps, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
                (queues.telemetry, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
            ],
        )
        return child

    async def start_floor_worker(self, events: Path, queue: str) -> Child:
        """The bare floor workflow's worker (tests/bench/floor.py)."""
        child = await self.spawn(
            "floor-worker",
            [
                sys.executable, "-m", "tests.bench.floor",
                "--address", self.address,
                "--task-queue", queue,
                "--events", str(events),
                "--parent-pid", str(os.getpid()),
            ],
        )  # fmt: skip
        await self._wait_polling(
            child,
            [
                (queue, TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW),
                (queue, TaskQueueType.TASK_QUEUE_TYPE_ACTIVITY),
            ],
        )
        return child

    async def start_api(self) -> Child:
        """``python -m api`` on the scenario's data dir (run store, artifacts)."""
        child = await self.spawn("api", api_argv(self.settings, self.root))
        async with (
            httpx.AsyncClient(base_url=self.settings.api_url, timeout=2.0) as http,
            asyncio.timeout(START_TIMEOUT),
        ):
            while True:
                if child.proc.returncode is not None:
                    raise StackError(f"the API exited:\n{self.tail('api')}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/")).is_success:
                        return child
                await asyncio.sleep(POLL)

    async def _wait_polling(
        self, child: Child, queues: list[tuple[str, TaskQueueType.ValueType]]
    ) -> None:
        """Wait until the child polls every queue (a poller's identity is ``pid@host``)."""
        waiting = list(queues)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while waiting:
                    if child.proc.returncode is not None:
                        raise StackError(f"{child.name} exited:\n{self.tail(child.name)}")
                    for queue, kind in list(waiting):
                        resp = await self.client.workflow_service.describe_task_queue(
                            DescribeTaskQueueRequest(
                                namespace=NAMESPACE,
                                task_queue=TaskQueue(name=queue),
                                task_queue_type=kind,
                            )
                        )
                        if any(p.identity.startswith(f"{child.proc.pid}@") for p in resp.pollers):
                            waiting.remove((queue, kind))
                    await asyncio.sleep(POLL)
        except TimeoutError:
            raise StackError(
                f"{child.name} did not poll {waiting} in {START_TIMEOUT:.0f}s:\n"
                f"{self.tail(child.name)}"
            ) from None

    # ------------------------------------------------------------------ stopping

    async def close(self) -> None:
        """Stop the API, then the workers, then the server; kill what does not stop."""
        order = sorted(self.children.values(), key=lambda c: (c.name == "server", c.name != "api"))
        for child in order:
            await _stop(child)
        self._client = None
        for out in self._files:
            out.close()

    def tail(self, name: str, lines: int = 30) -> str:
        path = self.root / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


async def _stop(child: Child) -> None:
    proc = child.proc
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            async with asyncio.timeout(STOP_GRACE):
                await proc.wait()
        except TimeoutError:
            log.warning(
                "%s (pid %d) did not stop in %.0fs: killed", child.name, proc.pid, STOP_GRACE
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def wall() -> float:
    """Wall-clock seconds, comparable across processes on this host (the executor's clock)."""
    return time.time()
