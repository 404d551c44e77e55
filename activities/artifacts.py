"""The artifact store: step logs and dbt artifacts, keyed by account/run/step.

Logs are appended while a step runs (a reader sees them grow), artifacts are whole files
put once per step. Callers see only ``ArtifactStore``: the local directory below is the
embedded default, and object storage can implement the same protocol (a log writer that
buffers and uploads parts) without a change to any caller. The key layout is part of the
interface, so every implementation names things the same way:

    {account}/{run}/step-{index}/log
    {account}/{run}/step-{index}/artifacts/{name}
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_STEP_DIR = re.compile(r"^step-(\d+)$")
LOG_NAME = "log"
ARTIFACTS_DIR = "artifacts"
READ_CHUNK = 64 * 1024
MAX_PENDING = 256 * 1024
"""A line longer than this is written in pieces (dbt can print a whole compiled query)."""


class ArtifactNotFoundError(LookupError):
    """No such log or artifact in the store."""


def _check_segment(what: str, value: str) -> str:
    # Keys become paths (or object names): nothing may climb out of its run's prefix.
    if not _SEGMENT.match(value) or ".." in value:
        raise ValueError(f"{what} {value!r} cannot be used in an artifact key")
    return value


@dataclass(frozen=True)
class StepKey:
    """One step of one run: everything the store holds is under such a key."""

    account_id: str
    run_id: str
    step: int

    def __post_init__(self) -> None:
        _check_segment("account id", self.account_id)
        _check_segment("run id", self.run_id)
        if self.step < 0:
            raise ValueError(f"step index must be >= 0, got {self.step}")

    @property
    def prefix(self) -> str:
        return f"{self.account_id}/{self.run_id}/step-{self.step}"

    @property
    def log_key(self) -> str:
        return f"{self.prefix}/{LOG_NAME}"

    def artifact_key(self, name: str) -> str:
        return f"{self.prefix}/{ARTIFACTS_DIR}/{_check_segment('artifact name', name)}"


@dataclass(frozen=True)
class StoredArtifact:
    step: int
    name: str
    size: int

    @property
    def path(self) -> str:
        """Relative to the run: ``step-{index}/{name}``."""
        return f"step-{self.step}/{self.name}"


@dataclass(frozen=True)
class LogRange:
    """Bytes ``[offset, next_offset)`` of a log that was ``size`` bytes long when read."""

    data: bytes
    offset: int
    next_offset: int
    size: int


class LogWriter(Protocol):
    """Appends to one step's log; ``aclose`` makes everything written durable."""

    async def write(self, data: bytes) -> None: ...

    async def aclose(self) -> None: ...


class ArtifactStore(Protocol):
    """Logs and artifacts of runs, keyed by account/run/step."""

    async def open_log(self, key: StepKey) -> LogWriter:
        """A writer appending to the step's log (a retried step appends after the first)."""
        ...

    async def read_log(self, key: StepKey, offset: int = 0, limit: int | None = None) -> LogRange:
        """Up to ``limit`` bytes of the log from ``offset``; raises ``ArtifactNotFoundError``."""
        ...

    async def put_file(self, key: StepKey, name: str, source: Path) -> None:
        """Store a copy of ``source`` as the step's artifact ``name`` (replacing it)."""
        ...

    async def get_file(self, key: StepKey, name: str) -> bytes:
        """The artifact's content; raises ``ArtifactNotFoundError``."""
        ...

    async def list_run(self, account_id: str, run_id: str) -> list[StoredArtifact]:
        """Every artifact of the run, ordered by step then name (logs are not listed)."""
        ...


class LocalArtifactStore:
    """The store as a directory tree under ``root``, one file per key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, key: str) -> Path:
        return self.root / key

    async def open_log(self, key: StepKey) -> LogWriter:
        path = self.path_of(key.log_key)

        def open_() -> BinaryIO:
            path.parent.mkdir(parents=True, exist_ok=True)
            return path.open("ab")

        return _LocalLogWriter(await asyncio.to_thread(open_))

    async def read_log(self, key: StepKey, offset: int = 0, limit: int | None = None) -> LogRange:
        if offset < 0 or (limit is not None and limit < 0):
            raise ValueError("offset and limit must be >= 0")
        path = self.path_of(key.log_key)

        def read() -> LogRange:
            try:
                with path.open("rb") as handle:
                    size = os.fstat(handle.fileno()).st_size
                    handle.seek(min(offset, size))
                    data = handle.read(-1 if limit is None else limit)
            except FileNotFoundError:
                raise ArtifactNotFoundError(key.log_key) from None
            start = min(offset, size)
            return LogRange(data=data, offset=start, next_offset=start + len(data), size=size)

        return await asyncio.to_thread(read)

    async def put_file(self, key: StepKey, name: str, source: Path) -> None:
        dest = self.path_of(key.artifact_key(name))

        def put() -> None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Copy then rename: a reader never sees half a manifest.
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{name}.")
            try:
                with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                    shutil.copyfileobj(src, out)
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise

        await asyncio.to_thread(put)

    async def get_file(self, key: StepKey, name: str) -> bytes:
        path = self.path_of(key.artifact_key(name))

        def get() -> bytes:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                raise ArtifactNotFoundError(key.artifact_key(name)) from None

        return await asyncio.to_thread(get)

    async def list_run(self, account_id: str, run_id: str) -> list[StoredArtifact]:
        run_dir = self.root / _check_segment("account id", account_id)
        run_dir = run_dir / _check_segment("run id", run_id)

        def list_() -> list[StoredArtifact]:
            found: list[StoredArtifact] = []
            if not run_dir.is_dir():
                return found
            for step_dir in run_dir.iterdir():
                match = _STEP_DIR.match(step_dir.name)
                if not match or not (step_dir / ARTIFACTS_DIR).is_dir():
                    continue
                for item in (step_dir / ARTIFACTS_DIR).iterdir():
                    if item.is_file() and not item.name.startswith("."):
                        size = item.stat().st_size
                        found.append(StoredArtifact(int(match.group(1)), item.name, size))
            return sorted(found, key=lambda a: (a.step, a.name))

        return await asyncio.to_thread(list_)


class _LocalLogWriter:
    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    async def write(self, data: bytes) -> None:
        # A local append of one chunk of output: cheap enough to do on the event loop, and
        # flushing at once is what lets a reader follow a running step.
        self._handle.write(data)
        self._handle.flush()

    async def aclose(self) -> None:
        if not self._handle.closed:
            await asyncio.to_thread(self._handle.close)


class Scrubber(Protocol):
    """Removes what must never be stored (secret values) from output bytes."""

    @property
    def overlap(self) -> int:
        """How many trailing bytes of a chunk may hold the start of something to remove."""
        ...

    def redact(self, data: bytes) -> bytes: ...


async def stream_log(
    source: asyncio.StreamReader,
    log: LogWriter,
    scrubber: Scrubber,
    on_line: Callable[[str], None],
) -> None:
    """Copy a process's output into a step log as it comes, scrubbed line by line."""
    pending = b""
    while chunk := await source.read(READ_CHUNK):
        pending += chunk
        cut = pending.rfind(b"\n") + 1
        if cut:
            ready, pending = scrubber.redact(pending[:cut]), pending[cut:]
        elif len(pending) > MAX_PENDING:
            # No newline in sight: write all but the tail where a secret may be starting.
            scrubbed = scrubber.redact(pending)
            keep = min(scrubber.overlap, len(scrubbed))
            ready, pending = scrubbed[: len(scrubbed) - keep], scrubbed[len(scrubbed) - keep :]
        else:
            continue
        await log.write(ready)
        for line in ready.splitlines():
            on_line(line.decode(errors="replace"))
    if pending:
        tail = scrubber.redact(pending)
        await log.write(tail)
        on_line(tail.decode(errors="replace"))
