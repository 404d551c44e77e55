"""Real HTTP for the webhook tests: a webhook receiver scripted per path, served by uvicorn on
a free port, and the webhook settings (short retries) for ``running_stack(webhooks=...)``."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from fastapi import FastAPI, Request, Response

from activities.webhooks import WebhookConfig
from tests.api_fixtures import serve
from workflows.models import WebhookDeliveryPolicy

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

FAST_WEBHOOKS = WebhookConfig(
    signing_key=SIGNING_KEY, http_timeout=timedelta(seconds=1), policy=FAST_POLICY
)
"""``running_stack(webhooks=FAST_WEBHOOKS)``: signed with ``SIGNING_KEY``, on ``FAST_POLICY``."""

HANG = -1
"""A scripted answer: hold the request open until the receiver closes."""


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
