"""``runslot``: the embedded stack, worker and API processes, and a client of the REST API.

Jobs, runs and logs go through the REST API (``--api-url``, ``--token``, ``--account``), as
any dbt Cloud client would; admin commands (accounts, tokens, environments, webhooks) write
the run store itself; ``slots`` reads the account's slots workflow in Temporal, which no
dbt Cloud endpoint shows. The commands live in ``cli_jobs``, ``cli_runs`` and ``cli_admin``;
this module assembles them and runs the stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from temporalio.service import RPCError, RPCStatusCode

from activities.store import StoreError
from starter import jobs
from starter.api_client import ApiError
from starter.cli_admin import (
    accounts_app,
    environments_app,
    github_secret,
    tokens_app,
    webhooks_app,
)
from starter.cli_common import (
    DEFAULT_ADDRESS,
    Account,
    CliError,
    Namespace,
    Output,
    OutputFormat,
    TemporalAddress,
    err,
    fail,
    new_table,
    out,
    print_json,
    print_tables,
    require_account,
    user_errors,
    when,
)
from starter.cli_jobs import jobs_app
from starter.cli_runs import run_job, runs_app
from starter.client import connect
from starter.demo import DEMO_ACCOUNT, DEMO_ACCOUNT_NAME, Demo, seed_demo
from starter.devserver import DevServerError, DevSettings, DevStack
from worker import main as worker_main
from worker.logging import LogLevel, configure_logging
from worker.settings import STORE_FILE
from workflows.models import SlotsState

app = typer.Typer(
    name="runslot",
    help="Runslot: a self-hosted scheduler for dbt jobs, on Temporal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
STACK, CLIENT, ADMIN = "Processes", "Jobs and runs", "Admin (writes the run store)"
app.command("worker", rich_help_panel=STACK)(worker_main.command)
app.add_typer(jobs_app, name="jobs", rich_help_panel=CLIENT)
app.command("run", rich_help_panel=CLIENT)(run_job)
app.add_typer(runs_app, name="runs", rich_help_panel=CLIENT)
app.add_typer(accounts_app, name="accounts", rich_help_panel=ADMIN)
app.add_typer(tokens_app, name="tokens", rich_help_panel=ADMIN)
app.add_typer(environments_app, name="environments", rich_help_panel=ADMIN)
app.add_typer(webhooks_app, name="webhooks", rich_help_panel=ADMIN)
app.command("github-secret", rich_help_panel=ADMIN)(github_secret)

DEFAULT_API_PORT = 8000


def main() -> None:
    """Entry point of the ``runslot`` script."""
    worker_main.exit_without_finalizing(app)


# --------------------------------------------------------------------------- api


@app.command(
    "api",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
    rich_help_panel=STACK,
)
def api_server(ctx: typer.Context) -> None:
    """Run the dbt Cloud-compatible REST API (`runslot api --help` lists its options)."""
    # Imported here, not at the top: the API's dependencies load only for this command, and
    # every other command works even if the API package cannot be imported.
    try:
        from api import main as api_main  # noqa: PLC0415
    except ImportError as error:
        fail(f"the API server cannot be loaded: {error}")
    server = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    server.command()(api_main.command)
    server(args=ctx.args, prog_name="runslot api")


# --------------------------------------------------------------------------- dev


@app.command(rich_help_panel=STACK)
def dev(
    *,
    data_dir: Annotated[
        Path, typer.Option(help="Where the SQLite file, workspaces and logs live.")
    ] = Path(".runslot"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Temporal gRPC port.")] = 7233,
    ui_port: Annotated[int, typer.Option(min=1, max=65535, help="Temporal Web UI port.")] = 8233,
    api_port: Annotated[
        int, typer.Option(min=1, max=65535, help="REST API port (plain HTTP).")
    ] = DEFAULT_API_PORT,
    headless: Annotated[bool, typer.Option(help="Do not serve the Web UI.")] = False,
    max_concurrent_steps: Annotated[
        int, typer.Option(min=1, help="dbt steps the steps worker runs at once.")
    ] = 4,
    step_activities_per_second: Annotated[
        float, typer.Option(min=0, help="Limit on prep/step starts per second (0: none).")
    ] = 20.0,
    log_level: Annotated[LogLevel, typer.Option(help="Log level of the workers.")] = (
        LogLevel.INFO
    ),
    demo: Annotated[
        bool,
        typer.Option(
            help="On a new data dir, create the demo account (id 1), its token and jobs, and "
            "queue a first run."
        ),
    ] = True,
) -> None:
    """Run the embedded stack (Temporal dev server, workers, REST API) until Ctrl-C."""
    settings = DevSettings(
        data_dir=data_dir,
        port=port,
        ui_port=ui_port,
        api_port=api_port,
        headless=headless,
        max_concurrent_steps=max_concurrent_steps,
        step_activities_per_second=step_activities_per_second or None,
        worker_log_level=log_level,
        demo=demo,
    )
    configure_logging(settings.worker_log_level, tag="dev")
    raise typer.Exit(asyncio.run(_dev(settings)))


async def _seed_demo(settings: DevSettings, stack: DevStack) -> Demo | None:
    """The demo account (made on first start); a failure is reported, the stack stays up."""
    store_url = f"sqlite:///{stack.data_dir / STORE_FILE}"
    try:
        return await asyncio.to_thread(seed_demo, stack.data_dir, store_url, settings.api_url)
    except (ApiError, StoreError, OSError) as error:
        err.print(f"[yellow]warning:[/] could not create the demo account: {escape(str(error))}")
        return None


async def _dev(settings: DevSettings) -> int:
    loop = asyncio.get_running_loop()
    stopping, force = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        # First Ctrl-C: stop gracefully. Second: kill whatever is still running.
        if stopping.is_set():
            force.set()
        else:
            stopping.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    stack = DevStack(settings)
    stop_requested = asyncio.create_task(stopping.wait())
    code = 0
    try:
        out.print(
            f"Starting the Temporal dev server on {settings.address} "
            f"(data in {escape(str(stack.data_dir))}), the workers and the API..."
        )
        start = asyncio.create_task(stack.start())
        await asyncio.wait({start, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            return 0
        start.result()
        demo = await _seed_demo(settings, stack) if settings.demo else None
        _print_stack(settings, stack, demo)
        exited = asyncio.create_task(stack.wait_for_exit())
        await asyncio.wait({exited, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            name, returncode = exited.result()
            err.print(f"[red]{name} exited with code {returncode}[/]: stopping the stack")
            code = 1
        else:
            exited.cancel()
    except DevServerError as error:
        err.print(f"[red]error:[/] {escape(str(error))}")
        code = 1
    finally:
        stop_requested.cancel()
        started = bool(stack.processes())
        if started:
            out.print("Stopping the stack...")
        await stack.stop(force)
        if started:
            out.print("Stopped.")
    return code


def _print_stack(settings: DevSettings, stack: DevStack, demo: Demo | None) -> None:
    table = Table.grid(padding=(0, 2))
    if settings.ui_url:
        table.add_row("Temporal Web UI", f"[bold]{settings.ui_url}[/]")
    table.add_row("Temporal gRPC", f"{settings.address}  (namespace default)")
    table.add_row("REST API", f"[bold]{settings.api_url}[/]  (dbt Cloud API v2, plain HTTP)")
    if demo is not None:
        table.add_row("Demo account", f'{DEMO_ACCOUNT} ("{DEMO_ACCOUNT_NAME}")')
        table.add_row("API token", f"[bold]{escape(demo.token)}[/]")
    table.add_row("Data", f"{escape(str(stack.data_dir))}  (server log: {stack.server_log.name})")
    table.add_row(
        "Run store", f"{escape(str(stack.data_dir / STORE_FILE))}  (runs, steps, timings)"
    )
    table.add_row("Logs and artifacts", escape(str(stack.data_dir / "artifacts")))
    processes = [f"{pool.value} (pid {p.pid})" for pool, p in stack.workers.items()]
    table.add_row("Workers", ", ".join(processes))
    if stack.api is not None:
        table.add_row("API process", f"pid {stack.api.pid}")
    if stack.registered_search_attributes:
        table.add_row("Added search attributes", ", ".join(stack.registered_search_attributes))
    out.print("[green bold]Runslot dev stack is up[/]")
    out.print(table)
    if demo is not None:
        if demo.first_run_id is not None:
            out.print(
                "Demo: job [bold]build[/] (every 5 minutes) and job [bold]docs[/] (after each "
                f"successful build); run [bold]{demo.first_run_id}[/] is running now."
            )
        exports = f"RUNSLOT_API_TOKEN=$(cat {escape(str(demo.token_file))}) RUNSLOT_ACCOUNT=1"
        if settings.api_port != DEFAULT_API_PORT:
            exports += f" RUNSLOT_API_URL={settings.api_url}"
        out.print(f"Try: export {exports}")
        out.print("     runslot runs list; runslot jobs apply -f examples/jobs.yml")
    out.print("Press Ctrl-C to stop.")


# --------------------------------------------------------------------------- slots


@app.command("slots", rich_help_panel=CLIENT)
def describe_slots(
    account: Account = None,
    *,
    temporal_address: TemporalAddress = DEFAULT_ADDRESS,
    namespace: Namespace = "default",
    output: Output = OutputFormat.TEXT,
) -> None:
    """Show an account's run slots: who holds them and who waits, in grant order.

    Read from the account's slots workflow in Temporal: no dbt Cloud endpoint shows them.
    """
    with user_errors():
        account = require_account(account)
        slots = asyncio.run(_describe_slots(account, temporal_address, namespace))
    if output == OutputFormat.JSON:
        print_json(slots.model_dump(mode="json"))
        return
    out.print(
        f"Account [bold]{slots.account_id}[/]: {len(slots.holders)} of {slots.capacity} "
        f"slot(s) in use, {len(slots.waiters)} waiting ({slots.grants_total} granted so far)"
    )
    holders = new_table("holders", "run", "workflow", "granted at", "lease expires")
    for holder in slots.holders:
        holders.add_row(
            holder.request_id, holder.workflow_id, when(holder.granted_at),
            when(holder.lease_expires_at),
        )  # fmt: skip
    waiters = new_table("waiters (FIFO)", "run", "workflow", "requested at")
    for waiter in slots.waiters:
        waiters.add_row(waiter.request_id, waiter.workflow_id, when(waiter.requested_at))
    print_tables(holders, waiters)


async def _describe_slots(account: str, address: str, namespace: str) -> SlotsState:
    try:
        client = await connect(address, namespace)
    except RuntimeError as error:
        raise CliError(
            f"cannot reach Temporal at {address}: is `runslot dev` running? ({error})"
        ) from None
    try:
        return await jobs.describe_slots(client, account)
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise CliError(
                f"account {account} has no slots yet (they start with the account's first run)"
            ) from None
        raise
