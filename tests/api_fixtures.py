"""The API over real HTTP for tests: uvicorn in-process on a free port, a real Temporal dev
server, real workers and a real SQLite run store.

* ``api`` (per test): fake dbt that writes real logs and artifacts into the artifact store,
  an account with a unique digit id (workflow ids are per account, and the dev server is
  shared by the session), a token, one environment, and an ``httpx`` client.
* ``api_server`` (per session): what the real-client tests use (tests/test_api_clients.py),
  account ``"1"`` whose runs execute real dbt on ``sample/jaffle`` (DuckDB), served over
  HTTP and HTTPS.

tests/conftest.py registers this module as a plugin, so every test module can ask for
these fixtures by name.
"""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest_asyncio
import uvicorn
from fastapi import FastAPI
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.artifacts import LocalArtifactStore, StepKey
from activities.executor import Progress
from activities.local import LocalExecutor, LocalExecutorSettings
from activities.store import RunStore
from api.app import create_app
from api.context import ApiContext
from tests.conftest import new_store, running_stack
from tests.fakes import FakeDbtExecutor
from workflows.models import (
    AccountSettings,
    Environment,
    StepInput,
    StepOutcome,
    TaskQueues,
)

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "jaffle"
PROJECT_ID = 1
SERVER_ACCOUNT = "1"


def refused(response: httpx.Response, code: int, *needles: str) -> str:
    """The response is error ``code`` in dbt Cloud's envelope, and its message names what to
    fix (holds every needle); returns the message."""
    assert response.status_code == code, (response.status_code, response.text[:500])
    body = response.json()
    assert body["status"]["code"] == code and body["status"]["is_success"] is False, body
    assert body["data"] is None, body
    message: str = body["status"]["user_message"]
    for needle in needles:
        assert needle in message, (needle, message, response.request.content[:200])
    return message


JOB_CALLS: tuple[tuple[str, str, dict[str, Any] | None], ...] = (
    ("GET", "", None),
    ("POST", "", {"name": "mine now"}),
    ("DELETE", "", None),
    ("POST", "run/", {"cause": "x"}),
    ("POST", "rerun/", {}),
)
"""Every call on one job (method, path after ``jobs/{id}/``, body): what another account's
token must find refused as if the job did not exist."""


def unique_account() -> str:
    """A digit account id (dbt Cloud clients need digits) no other test uses."""
    return str(10**9 + uuid.uuid4().int % 10**9)


# --------------------------------------------------------------------------- uvicorn


@asynccontextmanager
async def serve(app: FastAPI, *, cert: tuple[Path, Path] | None = None) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 (a port the OS picks) until the block ends; yields its URL.

    Requests still open when the block ends get a second to finish, then are cancelled: a
    webhook receiver's hanging request must not hold up the test.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        log_config=None,
        lifespan="off",
        access_log=False,
        ws="none",
        timeout_graceful_shutdown=1,
        ssl_certfile=str(cert[0]) if cert else None,
        ssl_keyfile=str(cert[1]) if cert else None,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()  # raises why it could not start
            await asyncio.sleep(0.01)
        yield f"{'https' if cert else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


# --------------------------------------------------------------------------- fake dbt


class ArtifactWritingFake(FakeDbtExecutor):
    """The fake dbt of tests/fakes.py that also leaves what real dbt leaves: a step log and
    ``manifest.json`` / ``run_results.json`` (``catalog.json`` for docs) in the artifact store."""

    def __init__(self, artifacts: LocalArtifactStore, scratch: Path) -> None:
        super().__init__()
        self.artifacts = artifacts
        self.scratch = scratch

    async def run_step(self, request: StepInput, progress: Progress) -> StepOutcome:
        key = StepKey(request.account_id, request.run_id, request.index)
        log = await self.artifacts.open_log(key)
        await log.write(f"Running with dbt: {' '.join(request.argv)}\n".encode())
        try:
            await super().run_step(request, progress)
        except BaseException:
            await log.write(b"Encountered an error: step failed\n")
            await log.aclose()
            raise
        await log.write(b"Completed successfully\n")
        await log.aclose()
        names = ["manifest.json", "run_results.json"]
        if request.argv[1:3] == ["docs", "generate"]:
            names.append("catalog.json")
        for name in names:
            content = {"metadata": {"step": request.index, "argv": request.argv}, "name": name}
            path = self.scratch / f"{request.account_id}-{request.run_id}-{request.index}-{name}"
            path.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(path.write_text, json.dumps(content))
            await self.artifacts.put_file(key, name, path)
        return StepOutcome(exit_code=0, log_key=key.log_key, artifacts=names)


# --------------------------------------------------------------------------- per test


@dataclass
class ApiStack:
    """One test's API: its URL, account, token, environment, and what backs them."""

    base_url: str
    account_id: str
    token: str
    project_id: int
    environment_id: int
    store: RunStore
    artifacts: LocalArtifactStore
    client: Client
    queues: TaskQueues
    dbt: ArtifactWritingFake
    http: httpx.AsyncClient
    """Authenticated (``Authorization: Token …``), based at ``base_url``."""

    @property
    def v2(self) -> str:
        return f"/api/v2/accounts/{self.account_id}"

    @property
    def v3(self) -> str:
        return f"/api/v3/accounts/{self.account_id}"

    async def create_job(self, **fields: Any) -> dict[str, Any]:
        """Create a job through the API (a minimal valid body, overridden by ``fields``)."""
        body = {
            "environment_id": self.environment_id,
            "project_id": self.project_id,
            "name": f"job {uuid.uuid4().hex[:6]}",
            "execute_steps": ["dbt run -s ok"],
            **fields,
        }
        response = await self.http.post(f"{self.v2}/jobs/", json=body)
        assert response.status_code == 201, response.text
        job: dict[str, Any] = response.json()["data"]
        return job


@pytest_asyncio.fixture
async def api(dev_env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[ApiStack]:
    client, account = dev_env.client, unique_account()
    store = new_store(tmp_path)
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    dbt = ArtifactWritingFake(artifacts, tmp_path / "scratch")
    try:
        async with running_stack(client, dbt, store=store) as queues:
            settings = AccountSettings(
                account_id=account, run_slots=2, slot_reap_interval=timedelta(seconds=2)
            )
            store.upsert_account(settings)
            token = store.create_token(account, "tests")
            env_id = store.put_environment(
                account, "production", Environment(project_dir="/fake/project"), project_id=1
            )
            ctx = ApiContext(
                store=store, client=client, artifacts=artifacts, queues=queues, data_dir=tmp_path
            )
            async with (
                serve(create_app(ctx)) as url,
                httpx.AsyncClient(
                    base_url=url, headers={"Authorization": f"Token {token}"}, timeout=60
                ) as http,
            ):
                yield ApiStack(
                    base_url=url,
                    account_id=account,
                    token=token,
                    project_id=PROJECT_ID,
                    environment_id=env_id,
                    store=store,
                    artifacts=artifacts,
                    client=client,
                    queues=queues,
                    dbt=dbt,
                    http=http,
                )
    finally:
        store.close()


# --------------------------------------------------------------------------- per session


@dataclass(frozen=True)
class ApiServer:
    """What ``api_server`` yields (see tests.clients.harness.ApiServer)."""

    base_url: str
    https_url: str
    account_id: str
    token: str
    project_id: int
    environment_id: int
    cert_path: Path
    store: RunStore
    client: Client


def jaffle_environment(warehouse: Path) -> Environment:
    """sample/jaffle on a DuckDB file, as tests/test_local_executor.py runs it."""
    return Environment(project_dir=str(SAMPLE), profile={"type": "duckdb", "path": str(warehouse)})


@pytest_asyncio.fixture(scope="session")
async def api_server(dev_env: WorkflowEnvironment) -> AsyncIterator[ApiServer]:
    """The API for the real dbt Cloud clients: account ``"1"``, one run slot (runs share one
    DuckDB file), real dbt through the local executor, HTTP and HTTPS listeners."""
    from tests.clients.harness import make_cert  # noqa: PLC0415 - written alongside, lazily

    client = dev_env.client
    async with AsyncExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="runslot-api-")))
        store = new_store(root)
        stack.callback(store.close)
        artifacts = LocalArtifactStore(root / "artifacts")
        executor = LocalExecutor(
            LocalExecutorSettings(workspace_root=root / "workspaces"), artifacts=artifacts
        )
        cert, key = make_cert(root / "tls")
        queues = await stack.enter_async_context(running_stack(client, executor, store=store))
        store.upsert_account(
            AccountSettings(
                account_id=SERVER_ACCOUNT, run_slots=1, slot_reap_interval=timedelta(seconds=2)
            )
        )
        token = store.create_token(SERVER_ACCOUNT, "client tests")
        env_id = store.put_environment(
            SERVER_ACCOUNT,
            "production",
            jaffle_environment(root / "warehouse" / "jaffle.duckdb"),
            project_id=PROJECT_ID,
        )
        ctx = ApiContext(
            store=store, client=client, artifacts=artifacts, queues=queues, data_dir=root
        )
        app = create_app(ctx)
        http_url = await stack.enter_async_context(serve(app))
        https_url = await stack.enter_async_context(serve(app, cert=(cert, key)))
        yield ApiServer(
            base_url=http_url,
            https_url=https_url,
            account_id=SERVER_ACCOUNT,
            token=token,
            project_id=PROJECT_ID,
            environment_id=env_id,
            cert_path=cert,
            store=store,
            client=client,
        )
