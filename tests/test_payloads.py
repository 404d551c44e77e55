"""Payloads written by earlier releases still parse (expand/contract: new fields get defaults).

tests/payloads/v1 holds one JSON sample per payload as release v1 wrote it. Add a v2 folder
when a payload changes; never edit an old sample to make a test pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from workflows import models

SAMPLES = sorted((Path(__file__).parent / "payloads").glob("v*/*.json"))


@pytest.mark.parametrize("path", SAMPLES, ids=[f"{p.parent.name}-{p.stem}" for p in SAMPLES])
def test_a_payload_from_an_earlier_release_still_parses(path: Path) -> None:
    model: type[BaseModel] = getattr(models, path.stem)
    data = json.loads(path.read_text())
    parsed = model.model_validate(data)
    # Nothing the old release wrote is lost on the way through.
    assert json.loads(parsed.model_dump_json()).items() >= data.items()


def test_a_newer_releases_extra_fields_are_ignored_by_internal_payloads() -> None:
    data = json.loads((Path(__file__).parent / "payloads" / "v1" / "RunFinished.json").read_text())
    data["added_in_v9"] = {"anything": True}
    assert models.RunFinished.model_validate(data).run_id == "42-1"
