"""``python -m api`` / ``runslot api``: serve the dbt Cloud-compatible API.

HTTPS when given a certificate and its key (three of the four dbt Cloud clients hard-code
https), plain HTTP otherwise. The API reads the same run store and artifact directory as the
workers (``--data-dir`` or ``--store-url``) and changes jobs through their workflows on
``--temporal-address``. Tokens: ``runslot tokens create ACCOUNT``.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field, ValidationError, model_validator

from activities.artifacts import LocalArtifactStore
from activities.store import RunStore
from api.app import create_app
from api.context import ApiContext
from starter.client import connect_retrying
from worker.logging import LogLevel, configure_logging
from worker.main import exit_without_finalizing, stop_when_orphaned
from worker.settings import STORE_FILE
from workflows.models import TaskQueues

log = logging.getLogger(__name__)

CONNECT_RETRY_SECONDS = 0.5


class ApiSettings(BaseModel):
    """Everything ``serve`` needs, built once from the command line."""

    temporal_address: str = "127.0.0.1:7233"
    namespace: str = "default"
    data_dir: Path = Path(".runslot")
    store_url: str | None = None
    artifacts_dir: Path | None = None
    """Where the workers keep logs and artifacts; default ``<data_dir>/artifacts``."""
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    parent_pid: int | None = None
    """Stop when this process is gone (set by ``runslot dev``, like its workers)."""
    queues: TaskQueues = Field(default_factory=TaskQueues)
    log_level: LogLevel = LogLevel.INFO
    connect_timeout_seconds: float = Field(default=30.0, ge=0)

    @model_validator(mode="after")
    def _tls_pair(self) -> ApiSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("HTTPS needs both --ssl-certfile and --ssl-keyfile")
        for path in (self.ssl_certfile, self.ssl_keyfile):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} is not a file")
        return self

    @property
    def store_database_url(self) -> str:
        return self.store_url or f"sqlite:///{(self.data_dir / STORE_FILE).resolve()}"

    @property
    def artifacts_root(self) -> Path:
        return self.artifacts_dir or self.data_dir / "artifacts"

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile is not None else "http"


def command(  # keyword-only: typer maps each parameter to an option
    *,
    temporal_address: Annotated[
        str,
        typer.Option(envvar="RUNSLOT_TEMPORAL_ADDRESS", help="host:port of the Temporal frontend."),
    ] = "127.0.0.1:7233",
    namespace: Annotated[
        str, typer.Option(envvar="RUNSLOT_NAMESPACE", help="Temporal namespace.")
    ] = "default",
    data_dir: Annotated[
        Path, typer.Option(help="The stack's data directory (run store, artifacts).")
    ] = Path(".runslot"),
    store_url: Annotated[
        str | None,
        typer.Option(
            envvar="RUNSLOT_STORE_URL",
            help="Run store database URL (default: sqlite file runslot.db in --data-dir).",
        ),
    ] = None,
    artifacts_dir: Annotated[
        Path | None,
        typer.Option(help="The workers' artifact store (default: --data-dir/artifacts)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="PEM certificate: serve HTTPS (with --ssl-keyfile).")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="PEM key of --ssl-certfile.")] = None,
    workflows_task_queue: Annotated[
        str, typer.Option(help="Task queue of the workflow workers (where jobs start).")
    ] = TaskQueues().workflows,
    steps_task_queue: Annotated[
        str, typer.Option(help="Task queue of the step workers.")
    ] = TaskQueues().steps,
    telemetry_task_queue: Annotated[
        str, typer.Option(help="Task queue of the telemetry workers.")
    ] = TaskQueues().telemetry,
    log_level: Annotated[LogLevel, typer.Option(help="Log level.")] = LogLevel.INFO,
    parent_pid: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Serve the dbt Cloud-compatible REST API until SIGINT/SIGTERM."""
    try:
        settings = ApiSettings(
            temporal_address=temporal_address,
            namespace=namespace,
            data_dir=data_dir,
            store_url=store_url,
            artifacts_dir=artifacts_dir,
            host=host,
            port=port,
            ssl_certfile=ssl_certfile,
            ssl_keyfile=ssl_keyfile,
            queues=TaskQueues(
                workflows=workflows_task_queue,
                steps=steps_task_queue,
                telemetry=telemetry_task_queue,
            ),
            log_level=log_level,
            parent_pid=parent_pid,
        )
    except ValidationError as err:
        first = err.errors()[0]
        raise typer.BadParameter(str(first["msg"]).removeprefix("Value error, ")) from None
    configure_logging(settings.log_level, tag="api")
    raise typer.Exit(asyncio.run(serve(settings)))


def uvicorn_config(app: FastAPI, settings: ApiSettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        log_level=settings.log_level.value,
        log_config=None,  # keep the logging configured above
        lifespan="off",
        proxy_headers=False,
    )


async def serve(settings: ApiSettings) -> int:
    """Serve until a stop signal; return the process exit code."""
    client = await connect_retrying(
        settings.temporal_address,
        settings.namespace,
        timeout_seconds=settings.connect_timeout_seconds,
        retry_seconds=CONNECT_RETRY_SECONDS,
    )
    if client is None:
        return 1
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(settings.store_database_url)
    try:
        # The same schema the workers migrate to (concurrent migrators wait for each other).
        await asyncio.to_thread(store.migrate)
        context = ApiContext(
            store=store,
            client=client,
            artifacts=LocalArtifactStore(settings.artifacts_root),
            queues=settings.queues,
            data_dir=settings.data_dir,
        )
        server = uvicorn.Server(uvicorn_config(create_app(context), settings))
        log.info(
            "dbt Cloud-compatible API on %s://%s:%d (Temporal %s, namespace %s)",
            settings.scheme,
            settings.host,
            settings.port,
            settings.temporal_address,
            settings.namespace,
        )
        watchdog = None
        if settings.parent_pid is not None:
            watchdog = asyncio.create_task(_exit_when_orphaned(server, settings.parent_pid))
        try:
            await server.serve()
        finally:
            if watchdog is not None:
                watchdog.cancel()
    finally:
        store.close()
    return 0


async def _exit_when_orphaned(server: uvicorn.Server, parent_pid: int) -> None:
    """Stop when ``runslot dev`` is gone, even killed outright: never a stray API behind it."""
    stop = asyncio.Event()
    await stop_when_orphaned(parent_pid, stop)
    server.should_exit = True


def main() -> None:
    """Entry point of ``python -m api``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(command)
    exit_without_finalizing(lambda: app(prog_name="python -m api"))
