"""``python -m worker`` / ``runslot worker``: one worker pool against a Temporal server.

Runs until SIGINT or SIGTERM, then shuts down gracefully: pollers stop, running activities
get ``graceful_shutdown_seconds`` to finish before they are cancelled (a cancelled dbt step
kills its process group).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, NoReturn

import sqlalchemy as sa
import typer
from pydantic import ValidationError
from temporalio.client import Client

from activities.local import LocalExecutor, LocalExecutorSettings
from activities.secrets import SecretError, worker_secrets
from activities.signing import SigningKeyError, server_key
from activities.store import RunStore
from activities.telemetry import TelemetryQueue, build_sink
from activities.webhooks import WebhookConfig
from starter.client import connect_retrying
from worker.logging import LogLevel, configure_logging
from worker.registry import Pools, build_workers
from worker.settings import Pool, TelemetryExporter, WorkerSettings

log = logging.getLogger(__name__)

DATA_DIR = Path(".runslot")
CONNECT_RETRY_SECONDS = 0.5
PARENT_CHECK_SECONDS = 1.0


def command(  # keyword-only: typer maps each parameter to an option
    *,
    pool: Annotated[Pool, typer.Option(help="The worker pool to run.")] = Pool.ALL,
    temporal_address: Annotated[
        str,
        typer.Option(envvar="RUNSLOT_TEMPORAL_ADDRESS", help="host:port of the Temporal frontend."),
    ] = "127.0.0.1:7233",
    namespace: Annotated[
        str, typer.Option(envvar="RUNSLOT_NAMESPACE", help="Temporal namespace.")
    ] = "default",
    data_dir: Annotated[
        Path,
        typer.Option(
            help="Where workspaces, logs, artifacts, the SQLite store and the webhook signing "
            "key (signing.key, unless the secret RUNSLOT_SIGNING_KEY is set) live."
        ),
    ] = DATA_DIR,
    store_url: Annotated[
        str | None,
        typer.Option(
            envvar="RUNSLOT_STORE_URL",
            help="Run store database URL, e.g. postgresql+psycopg://user@host/runslot "
            "(default: sqlite file runslot.db in --data-dir).",
        ),
    ] = None,
    secrets_file: Annotated[
        Path | None,
        typer.Option(help="JSON/YAML file of secrets that profiles reference by name."),
    ] = None,
    max_concurrent_steps: Annotated[
        int, typer.Option(min=1, help="dbt steps this worker runs at once.")
    ] = 4,
    step_activities_per_second: Annotated[
        float,
        typer.Option(
            min=0, help="Task-queue-wide limit on prep/step starts per second (0: no limit)."
        ),
    ] = 20.0,
    graceful_shutdown_seconds: Annotated[
        float, typer.Option(min=0, help="Time running steps get to finish on shutdown.")
    ] = 30.0,
    log_level: Annotated[LogLevel, typer.Option(help="Log level.")] = LogLevel.INFO,
    telemetry_exporter: Annotated[
        TelemetryExporter,
        typer.Option(
            envvar="RUNSLOT_TELEMETRY_EXPORTER",
            help="Where the telemetry pool sends finished runs: log, console (OpenTelemetry "
            "on stdout) or otlp (OpenTelemetry over OTLP/HTTP).",
        ),
    ] = "log",
    otlp_endpoint: Annotated[
        str | None,
        typer.Option(
            help="Collector base URL for otlp, e.g. http://collector:4318 "
            "(default: OTEL_EXPORTER_OTLP_ENDPOINT, else http://localhost:4318)."
        ),
    ] = None,
    telemetry_export_interval: Annotated[
        float,
        typer.Option(min=1, help="Seconds between OpenTelemetry metric exports."),
    ] = 60.0,
    parent_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Run a worker pool until SIGINT/SIGTERM."""
    try:
        settings = WorkerSettings(
            pool=pool,
            temporal_address=temporal_address,
            namespace=namespace,
            data_dir=data_dir,
            store_url=store_url,
            secrets_file=secrets_file,
            max_concurrent_steps=max_concurrent_steps,
            step_activities_per_second=step_activities_per_second or None,
            graceful_shutdown_seconds=graceful_shutdown_seconds,
            log_level=log_level,
            parent_pid=parent_pid,
            telemetry_exporter=telemetry_exporter,
            otlp_endpoint=otlp_endpoint,
            telemetry_export_interval_seconds=telemetry_export_interval,
        )
    except ValidationError as err:  # a bad --otlp-endpoint: a usage error, not a traceback
        raise typer.BadParameter(_first_error(err)) from None
    configure_logging(settings.log_level, tag=settings.pool.value)
    raise typer.Exit(asyncio.run(serve(settings)))


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    msg = str(first["msg"]).removeprefix("Value error, ")
    return f"{where}: {msg}" if where else msg


def main() -> None:
    """Entry point of ``python -m worker``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    exit_without_finalizing(lambda: app(prog_name="python -m worker"))


def exit_without_finalizing(run: Callable[[], object]) -> NoReturn:
    """Run a command, flush output, then ``os._exit`` with its exit code.

    The Temporal client's Rust threads can outlive the event loop; when the interpreter
    finalizes under them, CPython 3.11 sometimes aborts with "PyGILState_Release: thread
    state ... must be current" (temporalio/sdk-python#300), turning a clean shutdown into
    exit code 134. Everything is already shut down here, so skipping finalization is safe.
    """
    code = 0
    try:
        run()
    except SystemExit as exit_:
        if isinstance(exit_.code, str):
            sys.stderr.write(f"{exit_.code}\n")  # what SystemExit would have printed
        code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def serve(settings: WorkerSettings) -> int:
    """Run the configured pool until a stop signal; return the process exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watchdog = None
    if settings.parent_pid is not None:
        watchdog = asyncio.create_task(stop_when_orphaned(settings.parent_pid, stop))
    try:
        client = await connect_retrying(
            settings.temporal_address,
            settings.namespace,
            timeout_seconds=settings.connect_timeout_seconds,
            stop=stop,
            retry_seconds=CONNECT_RETRY_SECONDS,
        )
        if client is None:
            return 0 if stop.is_set() else 1
        return await _run_workers(client, settings, stop)
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run_workers(client: Client, settings: WorkerSettings, stop: asyncio.Event) -> int:
    executor = LocalExecutor(
        LocalExecutorSettings(
            workspace_root=settings.workspace_root, secrets_file=settings.secrets_file
        )
    )
    # The workflow pool emits (each run's final report hands its telemetry to a queue), and
    # the telemetry pool for runs whose report failed; the steps pool keeps the unused log sink.
    emits = {Pool.WORKFLOWS.value, Pool.TELEMETRY.value} & set(settings.pool_names)
    telemetry = build_sink(
        settings.telemetry_exporter if emits else "log",
        client=client,
        otlp_endpoint=settings.otlp_endpoint,
        export_interval_seconds=settings.telemetry_export_interval_seconds,
    )
    store = webhooks = None
    # The workflow pool writes the store; the telemetry pool reads webhook subscriptions and
    # writes their delivery log.
    if {Pool.WORKFLOWS.value, Pool.TELEMETRY.value} & set(settings.pool_names):
        try:
            store = await _open_store(settings)
        except Exception as err:  # noqa: BLE001 - one clear line, not a traceback
            url = sa.make_url(settings.store_database_url).render_as_string(hide_password=True)
            log.error("cannot open the run store at %s: %s", url, err)
            return 1
    if Pool.TELEMETRY.value in settings.pool_names:
        try:
            key = server_key(settings.data_dir, worker_secrets(settings.secrets_file))
        except (SigningKeyError, SecretError, OSError) as err:
            log.error("cannot read the webhook signing key: %s", err)
            if store is not None:
                store.close()
            return 1
        webhooks = WebhookConfig(signing_key=key)
    queue = TelemetryQueue(telemetry)
    workers = build_workers(
        client,
        Pools(
            executor=executor,
            telemetry=telemetry,
            store=store,
            webhooks=webhooks,
            telemetry_queue=queue,
        ),
        which=settings.pool_names,
        max_concurrent_steps=settings.max_concurrent_steps,
        step_activities_per_second=settings.step_activities_per_second,
        max_cached_workflows=settings.max_cached_workflows,
        graceful_shutdown_seconds=settings.graceful_shutdown_seconds,
    )
    try:
        # Leaving the stack shuts every worker down; a worker that fails fatally cancels
        # the wait below and its error is raised here.
        async with AsyncExitStack() as stack:
            # Entered first, so left last: the sink flushes after the workers stopped.
            await stack.enter_async_context(telemetry)
            stack.push_async_callback(queue.aclose)  # after the workers, before the sink
            for worker in workers:
                await stack.enter_async_context(worker)
            log.info(
                "pool %s polling %s at %s (namespace %s)",
                settings.pool.value,
                ", ".join(w.task_queue for w in workers),
                settings.temporal_address,
                settings.namespace,
            )
            await stop.wait()
            log.info("pool %s stopping", settings.pool.value)
    except Exception:
        log.exception("worker pool %s failed", settings.pool.value)
        return 1
    finally:
        if store is not None:
            store.close()
    log.info("pool %s stopped", settings.pool.value)
    return 0


async def _open_store(settings: WorkerSettings) -> RunStore:
    """The run store, migrated to this release's schema (a no-op when it is there already;
    concurrent migrators are serialized by the store)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(settings.store_database_url)
    await asyncio.to_thread(store.migrate)
    return store


async def stop_when_orphaned(parent_pid: int, stop: asyncio.Event) -> None:
    # Reparenting (to init or a subreaper) is how a child learns its parent died, even
    # from SIGKILL: `runslot dev` must never leave workers polling behind it.
    while True:
        if os.getppid() != parent_pid:
            break
        await asyncio.sleep(PARENT_CHECK_SECONDS)
    log.warning("parent process %d is gone: stopping", parent_pid)
    stop.set()
