"""The floor: a bare workflow running one no-op activity, and its worker process.

``python -m tests.bench.floor`` runs the worker: sandboxed like the project's workers (the
same runner, with this module passed through as the project passes ``workflows`` through),
``max_cached_workflows=1000``, SDK defaults otherwise. The activity logs its start to the
event log with ``time.time()``, keyed by the workflow id.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from datetime import timedelta
from pathlib import Path

from temporalio import activity, workflow
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

with workflow.unsafe.imports_passed_through():
    from starter.client import connect
    from tests.bench.events import EventWriter
    from worker.logging import LogLevel, configure_logging
    from worker.main import exit_without_finalizing, stop_when_orphaned
    from worker.registry import PASSTHROUGH_MODULES

FLOOR_WORKFLOW = "BenchBare"
FLOOR_ACTIVITY = "bench_noop"
FLOOR_QUEUE = "bench-floor"


@workflow.defn(name=FLOOR_WORKFLOW)
class BareWorkflow:
    @workflow.run
    async def run(self) -> None:
        await workflow.execute_activity(
            FLOOR_ACTIVITY,
            workflow.info().workflow_id,
            start_to_close_timeout=timedelta(seconds=30),
        )


class FloorActivities:
    def __init__(self, events: EventWriter) -> None:
        self.events = events

    @activity.defn(name=FLOOR_ACTIVITY)
    async def noop(self, workflow_id: str) -> None:
        self.events.write(workflow_id, "activity", time.time())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.floor")
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", default=FLOOR_QUEUE)
    parser.add_argument("--events", type=Path, required=True)
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
    runner = SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(
            *PASSTHROUGH_MODULES, __name__
        )
    )
    worker = Worker(
        client,
        task_queue=args.task_queue,
        workflows=[BareWorkflow],
        activities=[FloorActivities(events).noop],
        workflow_runner=runner,
        max_cached_workflows=1000,
        graceful_shutdown_timeout=timedelta(seconds=1),
    )
    try:
        async with worker:
            await stop.wait()
    finally:
        if watchdog is not None:
            watchdog.cancel()
        events.close()
    return 0


def main() -> None:
    args = parse()
    configure_logging(LogLevel.WARNING, tag="bench-floor")

    def run() -> None:
        raise SystemExit(asyncio.run(serve(args)))

    exit_without_finalizing(run)


if __name__ == "__main__":
    # Run from the imported module, not from ``__main__``: the sandbox imports a workflow's
    # module by name, and the class must be the one registered.
    from tests.bench.floor import main as imported_main

    imported_main()
