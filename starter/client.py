"""The one place a Temporal ``Client`` is built."""

from __future__ import annotations

import asyncio
import logging

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter


async def connect(address: str, namespace: str = "default") -> Client:
    return await Client.connect(
        address, namespace=namespace, data_converter=pydantic_data_converter
    )


async def connect_retrying(
    address: str,
    namespace: str,
    *,
    timeout_seconds: float,
    stop: asyncio.Event | None = None,
    retry_seconds: float = 0.5,
) -> Client | None:
    """Connect, retrying while the server starts (``runslot dev`` starts everything at
    once); None, with the reason logged, once ``timeout_seconds`` have passed or ``stop`` is
    set."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    stop = stop or asyncio.Event()
    while True:
        try:
            return await connect(address, namespace)
        except RuntimeError as err:
            if loop.time() >= deadline:
                logging.getLogger(__name__).error(
                    "cannot connect to Temporal at %s: %s", address, err
                )
                return None
        try:
            await asyncio.wait_for(stop.wait(), retry_seconds)
            return None
        except TimeoutError:
            continue
