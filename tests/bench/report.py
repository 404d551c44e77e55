"""Figures, percentiles, the tables the benchmark prints and the JSON it writes."""

from __future__ import annotations

import json
import math
import platform
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import temporalio


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def spread(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """p50, p99 and max of ``values`` times ``scale`` (1000: seconds to ms)."""
    return {
        "p50": percentile(values, 50) * scale,
        "p99": percentile(values, 99) * scale,
        "max": (max(values) if values else math.nan) * scale,
    }


@dataclass
class Figure:
    """One measured figure, the N behind it and, when there is one, its floor."""

    key: str
    label: str
    value: float
    unit: str
    n: int
    floor: float | None = None
    floor_label: str = ""
    """Where the floor comes from: a scenario of this run, or temporal-floor.md."""
    summary: bool = False
    """Shown in the final Runslot-vs-floor table."""

    @property
    def ratio(self) -> float | None:
        if self.floor is None or not self.floor or math.isnan(self.value):
            return None
        return self.value / self.floor


@dataclass
class ScenarioResult:
    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    load: dict[str, float] = field(default_factory=dict)
    """The load window: seconds, CPU seconds per process, foreign (other processes') cores."""
    details: dict[str, Any] = field(default_factory=dict)
    tables: list[str] = field(default_factory=list)
    """Extra tables (markdown) printed after the figures."""

    def add(self, key: str, label: str, value: float, unit: str, n: int, **kw: Any) -> Figure:
        figure = Figure(key, label, value, unit, n, **kw)
        self.figures.append(figure)
        return figure

    def get(self, key: str) -> Figure | None:
        return next((f for f in self.figures if f.key == key), None)


def fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, columns padded so it also reads as plain text."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _floor_cell(figure: Figure) -> str:
    if figure.floor is None:
        return "-"
    return f"{fmt(figure.floor)} {figure.floor_label}".strip()


def scenario_text(result: ScenarioResult) -> str:
    rows = [
        [f.label, fmt(f.value), f.unit, str(f.n), _floor_cell(f), fmt(f.ratio)]
        for f in result.figures
    ]
    load = result.load
    out = [
        f"\n## {result.name}: {result.title}\n",
        table(["figure", "value", "unit", "N", "floor", "ratio"], rows),
    ]
    if load:
        others = ", ".join(
            f"{name} {load[key]:.2f}"
            for key, name in (("cores_server", "server"), ("cores_worker", "worker"))
            if key in load
        )
        out.append(
            f"\nload window {load.get('seconds', 0):.1f} s: cores busy {others}; "
            f"**other processes {load.get('foreign_cores', 0):.2f} cores**"
        )
    for extra in result.tables:
        out.append("\n" + extra)
    return "\n".join(out)


def summary_text(results: Sequence[ScenarioResult]) -> str:
    rows = []
    for result in results:
        for f in result.figures:
            if f.summary:
                rows.append(
                    [
                        f"{f.label} ({f.unit}, N={f.n})",
                        fmt(f.value),
                        _floor_cell(f),
                        fmt(f.ratio),
                    ]
                )
    foreign = [
        [r.name, f"{r.load['foreign_cores']:.2f}"] for r in results if "foreign_cores" in r.load
    ]
    parts = []
    if rows:
        parts += [
            "\n## Runslot against the floor\n",
            table(["figure", "Runslot", "floor", "ratio"], rows),
        ]
    parts += [
        "\nBusy cores in other processes during each load window:\n",
        table(["scenario", "foreign cores"], foreign),
    ]
    return "\n".join(parts)


def code_version() -> str:
    """The commit measured, and whether the code had uncommitted changes."""
    git = shutil.which("git")
    if git is None:
        return "unknown (no git)"
    root = Path(__file__).resolve().parents[2]
    head = subprocess.run(
        [git, "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=False
    ).stdout.strip()
    changed = subprocess.run(
        [git, "status", "--porcelain", "--untracked-files=no", "--", "workflows", "activities",
         "worker", "starter", "api"],
        cwd=root, capture_output=True, text=True, check=False,
    ).stdout.splitlines()  # fmt: skip
    return f"{head or 'unknown'}" + (
        f" + uncommitted changes in {len(changed)} files" if changed else ""
    )


def machine_text() -> str:
    m = machine()
    return (
        f"{m['cpus']} CPUs, {m['memory_gib']} GiB, Python {m['python']}, "
        f"temporalio {m['temporalio']}, {m['platform']}"
    )


def machine() -> dict[str, Any]:
    return {
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "temporalio": temporalio.__version__,
        "platform": platform.platform(),
    }


def write_json(path: Path, results: Sequence[ScenarioResult], scale: float, started: float) -> None:
    doc = {
        "date": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "scale": scale,
        "code": code_version(),
        "machine": machine(),
        "scenarios": {r.name: _clean(asdict(r)) for r in results},
    }
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def _clean(value: Any) -> Any:
    """NaN is not JSON: null instead."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value
