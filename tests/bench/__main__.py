"""``python -m tests.bench [--only NAME[,NAME]] [--scale F] [--json FILE]`` (``scripts/bench``).

Runs the scenarios one after the other, each on its own fresh dev server, prints each one's
figures and then the Runslot-vs-floor table, and writes everything as JSON with ``--json``.
Ctrl-C (or SIGTERM) stops the scenario under way and every process it started.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests.bench.harness import Context
from tests.bench.report import (
    ScenarioResult,
    code_version,
    machine_text,
    scenario_text,
    summary_text,
    write_json,
)
from tests.bench.scenarios import api, floor, memory, runs, slots, storm

Scenario = Callable[[Context], Awaitable[ScenarioResult | list[ScenarioResult]]]

SCENARIOS: dict[str, tuple[Scenario, str]] = {
    "floor": (floor.run, "bare Temporal workflow with one activity: the floor"),
    "runs": (runs.run, "Runslot runs on the no-op executor: cost per run"),
    "storm": (storm.run, "cron storm: Runslot jobs vs Temporal Schedules on one minute"),
    "slots": (slots.run, "slot contention: 10 slots, steps of 0.5 s"),
    "api": (api.run, "REST API trigger latency on an idle system"),
    "memory": (memory.run, "worker memory with idle job workflows"),
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Runslot against the floor Temporal sets on this machine.",
        epilog="scenarios: "
        + "; ".join(f"{name}: {text}" for name, (_, text) in SCENARIOS.items()),
    )
    parser.add_argument(
        "--only", help="comma-separated scenarios to run (default: all, in the order listed below)"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiplies every N (0.1 for a quick check)"
    )
    parser.add_argument("--json", type=Path, help="write every figure to this JSON file")
    parser.add_argument(
        "--keep", action="store_true", help="keep each scenario's directory (logs, databases)"
    )
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    names = list(SCENARIOS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            parser.error(
                f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
            )
        names = [n for n in SCENARIOS if n in names]
    args.names = names
    return args


async def main(args: argparse.Namespace) -> int:
    # SIGTERM stops the run like Ctrl-C: the scenario's stack is closed on the way out.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    ctx = Context(scale=args.scale, keep=args.keep)
    started = time.time()
    print(f"Runslot benchmark: code {code_version()}; {machine_text()}", flush=True)
    done: list[ScenarioResult] = []
    for name in args.names:
        scenario, text = SCENARIOS[name]
        print(f"\n# {name}: {text} (scale {args.scale:g})", flush=True)
        t0 = time.monotonic()
        outcome = await scenario(ctx)
        for result in outcome if isinstance(outcome, list) else [outcome]:
            result.details["elapsed_s"] = round(time.monotonic() - t0, 1)
            ctx.results[result.name] = result
            done.append(result)
            print(scenario_text(result), flush=True)
        if args.json:
            write_json(args.json, done, args.scale, started)
    print(summary_text(done))
    print(f"\ntotal {time.time() - started:.0f} s")
    if args.json:
        write_json(args.json, done, args.scale, started)
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        sys.exit(asyncio.run(main(parse())))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: every process this run started has been stopped", file=sys.stderr)
        sys.exit(130)
