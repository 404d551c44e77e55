"""``python -m tests.bench.worker``: Runslot's three pools in one process, on the no-op
executor, for the benchmark (the driver measures this process's CPU and memory).

Built by ``worker.registry.build_workers`` like the real worker; the run store is the
scenario's SQLite file, migrated by the driver. Stops on SIGTERM/SIGINT or when the driver
is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from contextlib import AsyncExitStack
from pathlib import Path

from activities.store import RunStore
from activities.telemetry import LogSink
from starter.client import connect
from tests.bench.events import EventWriter
from tests.bench.executor import NoopExecutor
from worker.logging import LogLevel, configure_logging
from worker.main import exit_without_finalizing, stop_when_orphaned
from worker.registry import Pools, build_workers


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.worker")
    parser.add_argument("--address", required=True)
    parser.add_argument("--store-url", required=True)
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--step-seconds", type=float, default=0.0)
    parser.add_argument("--max-concurrent-steps", type=int, default=200)
    parser.add_argument("--step-rate", type=float, default=0.0, help="0: no rate limit")
    parser.add_argument("--max-cached-workflows", type=int, default=1000)
    parser.add_argument("--parent-pid", type=int)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watchdog = None
    if args.parent_pid is not None:
        watchdog = asyncio.create_task(stop_when_orphaned(args.parent_pid, stop))
    client = await connect(args.address)
    events = EventWriter(args.events)
    store = RunStore(args.store_url)
    workers = build_workers(
        client,
        Pools(executor=NoopExecutor(events, args.step_seconds), telemetry=LogSink(), store=store),
        which=("workflows", "steps", "telemetry"),
        max_concurrent_steps=args.max_concurrent_steps,
        step_activities_per_second=args.step_rate or None,
        max_cached_workflows=args.max_cached_workflows,
        graceful_shutdown_seconds=1.0,
    )
    try:
        async with AsyncExitStack() as stack:
            for worker in workers:
                await stack.enter_async_context(worker)
            await stop.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        store.close()
        events.close()
    return 0


def main() -> None:
    args = parse()
    # Warnings only: a log line per run (the log telemetry sink) would be measured too.
    configure_logging(LogLevel.WARNING, tag="bench-worker")

    def run() -> None:
        raise SystemExit(asyncio.run(serve(args)))

    exit_without_finalizing(run)


if __name__ == "__main__":
    main()
