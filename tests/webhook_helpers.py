"""Real HTTP for the webhook tests: an ASGI app served by uvicorn on a free port, a webhook
receiver scripted per path, and a worker stack that sends webhooks with short retries."""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from temporalio.client import Client

from activities.executor import Executor
from activities.store import RunStore
from activities.telemetry import LogSink
from activities.webhooks import WebhookConfig
from tests.conftest import fresh_queues, new_store
from worker.registry import Pools, build_workers
from workflows.models import TaskQueues, WebhookDeliveryPolicy

SIGNING_KEY = bytes(range(32))

FAST_POLICY = WebhookDeliveryPolicy(
    attempt_timeout=timedelta(seconds=3),
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=1),
    maximum_attempts=5,
    deadline=timedelta(minutes=1),
    idle_timeout=timedelta(seconds=2),
)
"""dbt Cloud's five attempts, in about two seconds instead of ten minutes."""

HANG = -1
"""A scripted answer: hold the request open until the receiver closes."""


@asynccontextmanager
async def serve(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app on 127.0.0.1 (a free port) for the block; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", ws="none", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                await task  # raises what stopped it
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


@dataclass
class Receiver:
    """A webhook endpoint: records every request; answers each path from its script (HTTP
    statuses, or ``HANG``), then 200."""

    scripts: dict[str, list[int]] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.received if r.path == path]

    def app(self) -> FastAPI:
        app = FastAPI()
        answered: dict[str, int] = defaultdict(int)

        @app.post("/{path:path}")
        async def hook(path: str, request: Request) -> Response:
            loop = asyncio.get_running_loop()
            body = await request.body()
            self.received.append(Received(path, dict(request.headers), body, loop.time()))
            script = self.scripts.get(path, [])
            status = script[answered[path]] if answered[path] < len(script) else 200
            answered[path] += 1
            if status == HANG:
                await self._release.wait()
                status = 200
            return Response(status_code=status)

        return app

    @asynccontextmanager
    async def running(self) -> AsyncIterator[str]:
        try:
            async with serve(self.app()) as url:
                yield url
        finally:
            self._release.set()


@asynccontextmanager
async def webhook_stack(
    client: Client,
    executor: Executor,
    store: RunStore | None = None,
    *,
    webhooks: WebhookConfig | None = None,
) -> AsyncIterator[TaskQueues]:
    """``tests.conftest.running_stack`` with outgoing webhooks configured (fast policy)."""
    queues = fresh_queues()
    config = webhooks or WebhookConfig(
        signing_key=SIGNING_KEY, http_timeout=timedelta(seconds=1), policy=FAST_POLICY
    )
    async with AsyncExitStack() as stack:
        if store is None:
            directory = stack.enter_context(tempfile.TemporaryDirectory(prefix="runslot-"))
            store = new_store(Path(directory))
            stack.callback(store.close)
        workers = build_workers(
            client,
            Pools(executor=executor, telemetry=LogSink(), store=store, webhooks=config),
            queues=queues,
            max_concurrent_steps=20,
            graceful_shutdown_seconds=0.5,
        )
        for worker in workers:
            await stack.enter_async_context(worker)
        yield queues
