"""The local artifact store and log streaming into it (no Temporal, no dbt)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from activities import artifacts
from activities.artifacts import (
    ArtifactNotFoundError,
    ArtifactStore,
    LocalArtifactStore,
    StepKey,
    stream_log,
)
from activities.secrets import Redactor

KEY = StepKey("acme", "42-1", 1)


@pytest.fixture
def store(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


async def test_a_step_log_is_readable_while_it_is_written_and_by_range(
    store: LocalArtifactStore,
) -> None:
    writer = await store.open_log(KEY)
    await writer.write(b"line one\n")
    assert (await store.read_log(KEY)).data == b"line one\n", "visible before the step ends"
    await writer.write(b"line two\n")
    await writer.aclose()
    part = await store.read_log(KEY, offset=5, limit=8)
    assert (part.data, part.offset, part.next_offset, part.size) == (b"one\nline", 5, 13, 18)
    rest = await store.read_log(KEY, offset=part.next_offset)
    assert rest.data == b" two\n" and rest.next_offset == rest.size
    assert (await store.read_log(KEY, offset=100)).data == b""


async def test_reopening_a_step_log_appends_to_it(store: LocalArtifactStore) -> None:
    for text in (b"first attempt\n", b"second attempt\n"):
        writer = await store.open_log(KEY)
        await writer.write(text)
        await writer.aclose()
    assert (await store.read_log(KEY)).data == b"first attempt\nsecond attempt\n"


async def test_each_steps_artifacts_are_kept_apart_and_listed_by_step(
    store: LocalArtifactStore, tmp_path: Path
) -> None:
    source = tmp_path / "run_results.json"
    for step, content in ((2, "second"), (1, "first")):
        source.write_text(content)
        await store.put_file(StepKey("acme", "42-1", step), "run_results.json", source)
    source.write_text("{}")
    await store.put_file(KEY, "manifest.json", source)
    await store.put_file(StepKey("acme", "other-run", 1), "manifest.json", source)
    listed = await store.list_run("acme", "42-1")
    assert [a.path for a in listed] == [
        "step-1/manifest.json",
        "step-1/run_results.json",
        "step-2/run_results.json",
    ]
    assert await store.get_file(KEY, "run_results.json") == b"first"
    second = StepKey("acme", "42-1", 2)
    assert await store.get_file(second, "run_results.json") == b"second"
    assert await store.list_run("acme", "no-such-run") == []


async def test_a_missing_log_or_artifact_is_artifact_not_found(store: LocalArtifactStore) -> None:
    with pytest.raises(ArtifactNotFoundError):
        await store.read_log(KEY)
    with pytest.raises(ArtifactNotFoundError):
        await store.get_file(KEY, "manifest.json")


@pytest.mark.parametrize(
    ("account", "run", "step"),
    [("..", "1", 1), ("acme", "../other", 1), ("acme", "a/b", 1), ("", "1", 1), ("a", "1", -1)],
    ids=["dotdot-account", "dotdot-run", "slash", "empty", "negative-step"],
)
def test_a_key_cannot_climb_out_of_its_run(account: str, run: str, step: int) -> None:
    with pytest.raises(ValueError, match=r"cannot be used|must be >= 0"):
        StepKey(account, run, step)


async def test_an_artifact_name_cannot_be_a_path(store: LocalArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="artifact name"):
        await store.put_file(KEY, "../../escape.json", tmp_path / "f")


def test_the_local_store_is_an_artifact_store(tmp_path: Path) -> None:
    store: ArtifactStore = LocalArtifactStore(tmp_path)  # mypy checks the protocol here
    assert KEY.log_key == "acme/42-1/step-1/log"
    assert store is not None


class _Collect:
    """A log writer that keeps what it is given."""

    def __init__(self) -> None:
        self.data = b""

    async def write(self, data: bytes) -> None:
        self.data += data

    async def aclose(self) -> None:
        return None


async def _stream(chunks: list[bytes], secrets: list[str]) -> tuple[bytes, list[str]]:
    reader = asyncio.StreamReader()
    for chunk in chunks:
        reader.feed_data(chunk)
    reader.feed_eof()
    out, lines = _Collect(), list[str]()
    await stream_log(reader, out, Redactor(secrets), lines.append)
    return out.data, lines


async def test_streamed_output_is_masked_even_when_a_secret_spans_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(artifacts, "READ_CHUNK", 3)  # every secret is cut by a read
    output = b"connecting with hunter2-pw\nok\nno newline hunter2-pw"
    data, lines = await _stream([output], ["hunter2-pw"])
    assert data == b"connecting with *****\nok\nno newline *****"
    assert lines == ["connecting with *****", "ok", "no newline *****"]


async def test_a_huge_line_is_written_in_pieces_without_leaking_a_secret_at_a_cut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(artifacts, "READ_CHUNK", 7)
    monkeypatch.setattr(artifacts, "MAX_PENDING", 10)
    line = b"x" * 25 + b"s3cr3t-value" + b"y" * 25 + b"\n"
    data, _ = await _stream([line], ["s3cr3t-value"])
    assert data == b"x" * 25 + b"*****" + b"y" * 25 + b"\n"
