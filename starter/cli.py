"""``runslot``: the embedded stack, worker processes, jobs from YAML, runs, slots and queues.

The only module that prints. Job operations go through ``starter.jobs`` over Temporal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from starter import jobs
from starter.client import connect
from starter.demo import DEMO_ACCOUNT, seed_demo
from starter.devserver import DevServerError, DevSettings, DevStack
from worker import main as worker_main
from worker.logging import LogLevel, configure_logging
from worker.settings import STORE_FILE
from workflows.models import (
    AccountSettings,
    FinishedRun,
    JobDefinition,
    JobDescription,
    RunResult,
    RunStatus,
    SlotsState,
    TriggerCause,
    TriggerRequest,
)

T = TypeVar("T")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    name="runslot",
    help="Runslot: a self-hosted scheduler for dbt jobs, on Temporal.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
jobs_app = typer.Typer(help="Jobs from YAML.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
app.command("worker")(worker_main.command)

Address = Annotated[
    str,
    typer.Option(envvar="RUNSLOT_TEMPORAL_ADDRESS", help="host:port of the Temporal frontend."),
]
Namespace = Annotated[str, typer.Option(envvar="RUNSLOT_NAMESPACE", help="Temporal namespace.")]
DEFAULT_ADDRESS = "127.0.0.1:7233"
WAIT_POLL_SECONDS = 1.0
STATUS_STYLE = {
    RunStatus.QUEUED: "cyan",
    RunStatus.STARTING: "cyan",
    RunStatus.RUNNING: "blue",
    RunStatus.SUCCESS: "green",
    RunStatus.ERROR: "red",
    RunStatus.CANCELLED: "yellow",
}


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit code 1."""


def main() -> None:
    """Entry point of the ``runslot`` script."""
    worker_main.exit_without_finalizing(app)


# --------------------------------------------------------------------------- dev


@app.command()
def dev(
    *,
    data_dir: Annotated[
        Path, typer.Option(help="Where the SQLite file, workspaces and logs live.")
    ] = Path(".runslot"),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Temporal gRPC port.")] = 7233,
    ui_port: Annotated[int, typer.Option(min=1, max=65535, help="Temporal Web UI port.")] = 8233,
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
        typer.Option(help="On a new data dir, create the demo account and queue a first run."),
    ] = True,
) -> None:
    """Run the embedded stack: a Temporal dev server and one worker per pool, until Ctrl-C."""
    settings = DevSettings(
        data_dir=data_dir,
        port=port,
        ui_port=ui_port,
        headless=headless,
        max_concurrent_steps=max_concurrent_steps,
        step_activities_per_second=step_activities_per_second or None,
        worker_log_level=log_level,
        demo=demo,
    )
    configure_logging(settings.worker_log_level, tag="dev")
    raise typer.Exit(asyncio.run(_dev(settings)))


async def _seed_demo(settings: DevSettings, stack: DevStack) -> None:
    client = await connect(settings.address)
    first = await seed_demo(client, stack.data_dir)
    if first is not None:
        out.print(
            f"Demo: account [bold]{DEMO_ACCOUNT}[/] with jobs [bold]build[/] (every 5 minutes) "
            f"and [bold]docs[/] (after each build); run [bold]{first}[/] is running now. "
            f"Watch it: runslot job {DEMO_ACCOUNT} build --temporal-address {settings.address}"
        )


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
            f"(data in {escape(str(stack.data_dir))}) and the workers..."
        )
        start = asyncio.create_task(stack.start())
        await asyncio.wait({start, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
            return 0
        start.result()
        _print_stack(settings, stack)
        if settings.demo:
            await _seed_demo(settings, stack)
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


def _print_stack(settings: DevSettings, stack: DevStack) -> None:
    table = Table.grid(padding=(0, 2))
    if settings.ui_url:
        table.add_row("Temporal Web UI", f"[bold]{settings.ui_url}[/]")
    table.add_row("Temporal gRPC", f"{settings.address}  (namespace default)")
    table.add_row("Data", f"{escape(str(stack.data_dir))}  (server log: {stack.server_log.name})")
    table.add_row(
        "Run store", f"{escape(str(stack.data_dir / STORE_FILE))}  (runs, steps, timings)"
    )
    table.add_row("Logs and artifacts", escape(str(stack.data_dir / "artifacts")))
    table.add_row(
        "Workers", ", ".join(f"{pool.value} (pid {p.pid})" for pool, p in stack.workers.items())
    )
    if stack.registered_search_attributes:
        table.add_row("Added search attributes", ", ".join(stack.registered_search_attributes))
    out.print("[green bold]Runslot dev stack is up[/]")
    out.print(table)
    flag = "" if settings.address == DEFAULT_ADDRESS else f" --temporal-address {settings.address}"
    out.print(f"Try: runslot jobs apply -f examples/jobs.yml{flag}")
    out.print("Press Ctrl-C to stop.")


# --------------------------------------------------------------------------- jobs apply


class JobsFile(BaseModel):
    """``runslot jobs apply`` input: one account and its jobs (``account_id`` may be omitted
    on each job: it is the account's)."""

    model_config = ConfigDict(extra="forbid")

    account: AccountSettings
    jobs: list[JobDefinition] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _jobs_default_to_the_account(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        account, jobs_ = data.get("account"), data.get("jobs")
        if isinstance(account, dict) and isinstance(jobs_, list):
            owner = account.get("account_id")
            jobs_ = [{"account_id": owner, **j} if isinstance(j, dict) else j for j in jobs_]
            data = {**data, "jobs": jobs_}
        return data

    @model_validator(mode="after")
    def _one_account_unique_jobs(self) -> JobsFile:
        seen: set[str] = set()
        for job in self.jobs:
            if job.account_id != self.account.account_id:
                raise ValueError(
                    f"job {job.job_id} names account {job.account_id}; this file is account "
                    f"{self.account.account_id}"
                )
            if job.job_id in seen:
                raise ValueError(f"job {job.job_id} is defined twice")
            seen.add(job.job_id)
        return self


def load_jobs_file(path: Path, base: Path | None = None) -> JobsFile:
    """Parse and validate the whole file; with ``base``, resolve relative local paths."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise CliError(f"cannot read {path}: {error}") from None
    try:
        spec = JobsFile.model_validate(data)
    except ValidationError as error:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()]
        raise CliError(f"{path} is not a valid jobs file:\n" + "\n".join(lines)) from None
    if base is not None:
        spec.jobs = [_resolve_paths(job, base) for job in spec.jobs]
    return spec


def _resolve_paths(job: JobDefinition, base: Path) -> JobDefinition:
    # Workers run dbt inside a per-run workspace, so a relative project_dir or duckdb file
    # would mean something else there: pin them to where the user ran the command.
    env = job.environment
    update: dict[str, Any] = {}
    if env.project_dir and not Path(env.project_dir).is_absolute():
        update["project_dir"] = os.path.normpath(base / env.project_dir)
    db_path = env.profile.get("path")
    if (
        env.profile.get("type") == "duckdb"
        and isinstance(db_path, str)
        and db_path != ":memory:"
        and ":" not in db_path.split("/")[0]  # md:..., s3://...
        and not Path(db_path).is_absolute()
    ):
        update["profile"] = {**env.profile, "path": os.path.normpath(base / db_path)}
    if not update:
        return job
    return job.model_copy(update={"environment": env.model_copy(update=update)})


@jobs_app.command("apply")
def jobs_apply(
    file: Annotated[
        Path,
        typer.Option("--file", "-f", exists=True, dir_okay=False, help="YAML: account + jobs."),
    ],
    *,
    resolve_paths: Annotated[
        bool,
        typer.Option(
            help="Resolve relative project_dir and duckdb paths against the current directory."
        ),
    ] = True,
    temporal_address: Address = DEFAULT_ADDRESS,
    namespace: Namespace = "default",
) -> None:
    """Create or update the file's jobs (idempotent; jobs missing from the file are kept)."""
    try:
        spec = load_jobs_file(file, Path.cwd() if resolve_paths else None)
    except CliError as error:
        _fail(str(error))
    saved, resized = _run(lambda: _apply(spec, temporal_address, namespace))
    table = Table(title=f"account {spec.account.account_id}: {len(saved)} job(s) saved")
    for column in ("job", "name", "type", "steps", "schedule", "next cron fire", "state"):
        table.add_column(column)
    for desc in saved:
        job = desc.job
        schedule = job.triggers.schedule
        table.add_row(
            job.job_id,
            escape(job.name),
            job.job_type.value,
            escape("; ".join(" ".join(step) for step in job.execute_steps)),
            f"{schedule.cron} ({schedule.timezone})" if schedule else "-",
            _when(desc.next_cron_fire),
            "deactivated" if desc.state.deactivated else "active",
        )
    out.print(table)
    if resized is not None:
        out.print(f"Run slots of account {spec.account.account_id}: {resized[0]} -> {resized[1]}")


async def _apply(
    spec: JobsFile, address: str, namespace: str
) -> tuple[list[JobDescription], tuple[int, int] | None]:
    client = await _connect(address, namespace)
    saved = []
    for job in spec.jobs:
        try:
            saved.append(await jobs.save_job(client, job, spec.account))
        except WorkflowUpdateFailedError as error:
            raise CliError(f"job {job.job_id} was refused: {error.cause}") from None
    # The account's slots workflow starts with its first run; once it exists, run_slots
    # from the file is applied to it (resize takes effect at once).
    try:
        slots = await jobs.describe_slots(client, spec.account.account_id)
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            return saved, None
        raise
    if slots.capacity == spec.account.run_slots:
        return saved, None
    await jobs.resize_slots(client, spec.account.account_id, spec.account.run_slots)
    return saved, (slots.capacity, spec.account.run_slots)


# --------------------------------------------------------------------------- run


@app.command("run")
def run_job(
    account: Annotated[str, typer.Argument(help="Account id.")],
    job: Annotated[str, typer.Argument(help="Job id.")],
    *,
    wait: Annotated[bool, typer.Option(help="Wait for the run to finish.")] = False,
    rerun_of: Annotated[
        str | None,
        typer.Option(
            help="Rerun this failed run from failure: same commit, `dbt retry` in place of "
            "the failed step, then the steps after it."
        ),
    ] = None,
    temporal_address: Address = DEFAULT_ADDRESS,
    namespace: Namespace = "default",
) -> None:
    """Run a job now (cause: manual, like dbt Cloud's Run now), or rerun a failed run."""
    try:
        request = TriggerRequest(
            cause=TriggerCause.MANUAL,
            cause_text=f"Rerun of run {rerun_of} from the runslot CLI"
            if rerun_of
            else "Run now from the runslot CLI",
            rerun_of=rerun_of,
        )
    except ValidationError as err:
        raise typer.BadParameter(f"--rerun-of: {err.errors()[0]['msg']}") from None

    async def trigger_and_wait() -> RunStatus | None:
        client = await _connect(temporal_address, namespace)
        try:
            result = await jobs.trigger(client, account, job, request)
        except WorkflowUpdateFailedError as error:
            raise CliError(f"the run was refused: {error.cause}") from None
        except RPCError as error:
            raise _not_found(error, f"job {job} of account {account} not found") from None
        out.print(f"Queued run [bold]{result.run_id}[/] of job {job} (account {account})")
        if result.cancelled_run_ids:
            out.print(f"Cancelled older queued run(s): {', '.join(result.cancelled_run_ids)}")
        if not wait:
            return None
        final = await _wait_for_run(client, account, job, result.run_id)
        if isinstance(final, RunResult):
            _print_run(final)
        else:
            out.print(f"Run {final.run_id}: {_status(final.status)} {escape(final.message)}")
        return final.status

    status = _run(trigger_and_wait)
    raise typer.Exit(0 if status in (None, RunStatus.SUCCESS) else 1)


async def _wait_for_run(
    client: Client, account: str, job: str, run_id: str
) -> RunResult | FinishedRun:
    """Poll the job until the run has a workflow, then wait for that workflow's result.

    A run cancelled while queued never gets a workflow: its end is in the job's recent runs.
    """
    shown: str | None = None
    while True:
        desc = await jobs.describe_job(client, account, job)
        finished = next((r for r in desc.state.recent if r.run_id == run_id), None)
        running = any(r.run_id == run_id for r in desc.state.in_flight)
        if finished is not None or running:
            try:
                return await jobs.run_result(client, account, run_id)
            except RPCError as error:
                if error.status != RPCStatusCode.NOT_FOUND:
                    raise
                if finished is not None:
                    return finished
            except WorkflowFailureError as error:
                if finished is not None:
                    return finished
                raise CliError(f"run {run_id} failed: {error.cause or error}") from None
        state = "Running" if running else "Queued"
        if state != shown:
            out.print(f"  {state}...")
            shown = state
        await asyncio.sleep(WAIT_POLL_SECONDS)


def _print_run(run: RunResult) -> None:
    out.print(
        f"Run [bold]{run.run_id}[/] of job {run.job_id}: {_status(run.status)} "
        f"{escape(run.status_message)}"
    )
    out.print(
        f"  cause {run.cause.value}; wait {_duration(run.wait_time)}, "
        f"prep {_duration(run.prep_time)}"
    )
    if not run.steps:
        return
    table = Table()
    for column in ("#", "step", "status", "exit", "duration", "message"):
        table.add_column(column)
    for step in run.steps:
        took = None
        if step.started_at and step.finished_at:
            took = step.finished_at - step.started_at
        table.add_row(
            str(step.index),
            escape(step.name),
            _status(step.status),
            "-" if step.exit_code is None else str(step.exit_code),
            _duration(took),
            escape(step.message),
        )
    out.print(table)


# --------------------------------------------------------------------------- views


@app.command("job")
def describe_job(
    account: Annotated[str, typer.Argument(help="Account id.")],
    job: Annotated[str, typer.Argument(help="Job id.")],
    *,
    temporal_address: Address = DEFAULT_ADDRESS,
    namespace: Namespace = "default",
) -> None:
    """Describe a job: its queue, its runs in flight and its recent runs."""

    async def describe() -> JobDescription:
        client = await _connect(temporal_address, namespace)
        try:
            return await jobs.describe_job(client, account, job)
        except RPCError as error:
            raise _not_found(error, f"job {job} of account {account} not found") from None

    desc = _run(describe)
    definition, state = desc.job, desc.state
    active = "[red]deactivated[/]" if state.deactivated else "[green]active[/]"
    out.print(
        f"Job [bold]{definition.job_id}[/] ({escape(definition.name)}) of account "
        f"{definition.account_id}: {definition.job_type.value}, {active}"
    )
    out.print(f"  steps: {escape('; '.join(' '.join(s) for s in definition.execute_steps))}")
    schedule = definition.triggers.schedule
    if schedule is not None:
        out.print(
            f"  schedule: {schedule.cron} ({schedule.timezone}), "
            f"next fire {_when(desc.next_cron_fire)}"
        )
    out.print(f"  consecutive failures: {state.consecutive_failures}")

    queue = Table(title=f"queue ({len(state.queue)})")
    for column in ("run", "cause", "queued at"):
        queue.add_column(column)
    for queued in state.queue:
        queue.add_row(queued.run_id, queued.trigger.cause.value, _when(queued.queued_at))
    in_flight = Table(title=f"in flight ({len(state.in_flight)})")
    for column in ("run", "cause", "queued at", "started at", "workflow"):
        in_flight.add_column(column)
    for flight in state.in_flight:
        in_flight.add_row(
            flight.run_id, flight.cause.value, _when(flight.queued_at),
            _when(flight.started_at), flight.workflow_id,
        )  # fmt: skip
    recent = Table(title=f"recent runs ({len(state.recent)})")
    for column in ("run", "cause", "status", "finished at", "message"):
        recent.add_column(column)
    for finished in reversed(state.recent):
        recent.add_row(
            finished.run_id, finished.cause.value, _status(finished.status),
            _when(finished.finished_at), escape(finished.message),
        )  # fmt: skip
    _print_tables(queue, in_flight, recent)


@app.command("slots")
def describe_slots(
    account: Annotated[str, typer.Argument(help="Account id.")],
    *,
    temporal_address: Address = DEFAULT_ADDRESS,
    namespace: Namespace = "default",
) -> None:
    """Show an account's run slots: who holds them and who waits, in grant order."""

    async def describe() -> SlotsState:
        client = await _connect(temporal_address, namespace)
        try:
            return await jobs.describe_slots(client, account)
        except RPCError as error:
            raise _not_found(
                error,
                f"account {account} has no slots yet (they start with the account's first run)",
            ) from None

    slots = _run(describe)
    out.print(
        f"Account [bold]{slots.account_id}[/]: {len(slots.holders)} of {slots.capacity} "
        f"slot(s) in use, {len(slots.waiters)} waiting ({slots.grants_total} granted so far)"
    )
    holders = Table(title="holders")
    for column in ("run", "workflow", "granted at", "lease expires"):
        holders.add_column(column)
    for holder in slots.holders:
        holders.add_row(
            holder.request_id, holder.workflow_id, _when(holder.granted_at),
            _when(holder.lease_expires_at),
        )  # fmt: skip
    waiters = Table(title="waiters (FIFO)")
    for column in ("run", "workflow", "requested at"):
        waiters.add_column(column)
    for waiter in slots.waiters:
        waiters.add_row(waiter.request_id, waiter.workflow_id, _when(waiter.requested_at))
    _print_tables(holders, waiters)


# --------------------------------------------------------------------------- helpers


def _run(make: Callable[[], Awaitable[T]]) -> T:
    """Run one async operation; a ``CliError`` becomes a one-line message and exit code 1."""

    async def call() -> T:
        return await make()

    try:
        return asyncio.run(call())
    except CliError as error:
        _fail(str(error))


def _print_tables(*tables: Table) -> None:
    for table in tables:
        if table.row_count:
            out.print(table)
        else:
            out.print(f"[dim]{table.title}: none[/]")


def _fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(1)


async def _connect(address: str, namespace: str) -> Client:
    try:
        return await connect(address, namespace)
    except RuntimeError as error:
        raise CliError(
            f"cannot reach Temporal at {address}: is `runslot dev` running? ({error})"
        ) from None


def _not_found(error: RPCError, message: str) -> Exception:
    """A NOT_FOUND error becomes ``message``; any other error is returned unchanged."""
    if error.status == RPCStatusCode.NOT_FOUND:
        return CliError(message)
    return error


def _status(status: RunStatus) -> str:
    return f"[{STATUS_STYLE[status]}]{status.humanized}[/]"


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _duration(value: timedelta | None) -> str:
    if value is None:
        return "-"
    seconds = value.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
