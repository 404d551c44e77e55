"""The JSONL event log the benchmark's workers write, and the driver's reader of it.

A worker appends one line per executor call (``prepare``, ``step``, ``step_end``,
``artifacts``, ``cleanup``) or floor activity (``activity``): ``{"r": key, "k": kind, "t":
time.time()}``, where ``key`` is the run id (Runslot) or the workflow id (floor). Latencies
are measured from it with no extra RPC during the load; the driver tails the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

POLL_SECONDS = 0.01


class EventWriter:
    """Appends events, one line each, flushed at once (the driver reads as they come)."""

    def __init__(self, path: Path) -> None:
        self._out: IO[str] = path.open("a", buffering=1)

    def write(self, key: str, kind: str, at: float) -> None:
        self._out.write(json.dumps({"r": key, "k": kind, "t": at}) + "\n")

    def close(self) -> None:
        self._out.close()


@dataclass
class EventLog:
    """What the driver has read of an event log; ``follow`` keeps it current."""

    path: Path
    times: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    """``times[kind][key]``: every time ``key`` logged ``kind``, in order."""
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _offset: int = 0
    _partial: bytes = b""
    _waiters: dict[tuple[str, str], list[asyncio.Future[float]]] = field(default_factory=dict)

    def read(self) -> None:
        """Take in the lines written since the last read."""
        if not self.path.exists():
            return
        with self.path.open("rb") as src:
            src.seek(self._offset)
            data = src.read()
        if not data:
            return
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for its end
        for line in lines:
            if not line:
                continue
            event = json.loads(line)
            kind, key, at = event["k"], event["r"], float(event["t"])
            self.times[kind][key].append(at)
            self.counts[kind] += 1
            for fut in self._waiters.pop((kind, key), []):
                if not fut.done():
                    fut.set_result(self.times[kind][key][0])

    def first(self, kind: str) -> dict[str, float]:
        """The first time each key logged ``kind``."""
        return {key: values[0] for key, values in self.times[kind].items() if values}

    def all(self, kind: str) -> list[float]:
        return sorted(t for values in self.times[kind].values() for t in values)

    async def wait(self, kind: str, key: str) -> float:
        """When ``key`` first logged ``kind`` (waits for it; ``follow`` must be running)."""
        seen = self.times[kind].get(key)
        if seen:
            return seen[0]
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault((kind, key), []).append(fut)
        return await fut

    async def wait_count(self, kind: str, count: int, timeout: float) -> None:
        """Wait until ``count`` events of ``kind`` were logged (``follow`` must be running)."""
        async with asyncio.timeout(timeout):
            while True:
                if self.counts[kind] >= count:
                    return
                await asyncio.sleep(0.05)

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[EventLog]:
        """Read the file every ``POLL_SECONDS`` while the block runs."""

        async def follow() -> None:
            while True:
                self.read()
                await asyncio.sleep(POLL_SECONDS)

        task = asyncio.create_task(follow())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.read()
