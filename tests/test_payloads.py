"""Payloads written by earlier releases still parse (expand/contract: new fields get defaults).

tests/payloads/v1 holds one JSON sample per payload as release v1 wrote it. Add a v2 folder
when a payload changes; never edit an old sample to make a test pass.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from workflows import models

SAMPLES = sorted((Path(__file__).parent / "payloads").glob("v*/*.json"))


@pytest.mark.parametrize("path", SAMPLES, ids=[f"{p.parent.name}-{p.stem}" for p in SAMPLES])
def test_a_payload_from_an_earlier_release_still_parses(path: Path) -> None:
    model: type[BaseModel] = getattr(models, path.stem)
    data = json.loads(path.read_text())
    parsed = model.model_validate(data)
    # Nothing the old release wrote is lost on the way through (new fields may be added).
    assert _keeps(json.loads(parsed.model_dump_json()), data)


def _keeps(new: Any, old: Any) -> bool:
    """True if every value in ``old`` is still in ``new``, recursively."""
    if isinstance(old, dict):
        return isinstance(new, dict) and all(k in new and _keeps(new[k], v) for k, v in old.items())
    if isinstance(old, list):
        return (
            isinstance(new, list)
            and len(new) == len(old)
            and all(_keeps(n, o) for n, o in zip(new, old, strict=True))
        )
    return bool(new == old)


def test_keeps_detects_a_lost_nested_value() -> None:
    assert _keeps({"a": [{"x": 1, "y": 2}]}, {"a": [{"x": 1}]})
    assert not _keeps({"a": [{"y": 2}]}, {"a": [{"x": 1}]})
    assert not _keeps({"a": [{"x": 2}]}, {"a": [{"x": 1}]})


def test_a_newer_releases_extra_fields_are_ignored_by_internal_payloads() -> None:
    data = json.loads((Path(__file__).parent / "payloads" / "v1" / "RunFinished.json").read_text())
    data["added_in_v9"] = {"anything": True}
    assert models.RunFinished.model_validate(data).run_id == "42-1"
