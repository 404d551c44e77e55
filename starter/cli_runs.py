"""``runslot run`` and ``runslot runs ...``: trigger, wait, list, show, tail and cancel runs.

Everything goes through the REST API, as any dbt Cloud client would: a run's steps and
their logs come from ``GET …/runs/{id}/?include_related=["run_steps"]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from rich.text import Text

from starter.api_client import DEFAULT_API_URL, JsonObject, RunslotApi
from starter.cli_common import (
    Account,
    ApiUrl,
    CliError,
    Output,
    OutputFormat,
    Token,
    connect_api,
    err,
    item_status,
    new_table,
    out,
    parse_status,
    print_json,
    print_tables,
    text,
    user_errors,
    when,
)
from workflows.models import RunStatus

WAIT_POLL_SECONDS = 1.0
CLI_CAUSE = "Run now from the runslot CLI"

runs_app = typer.Typer(help="Runs: list, show, logs, cancel.", no_args_is_help=True)

RunId = Annotated[int, typer.Argument(help="Run id.", min=1, show_default=False)]
JobRef = Annotated[str, typer.Argument(help="Job id or key.", show_default=False)]


# --------------------------------------------------------------------------- lookups


def resolve_job(api: RunslotApi, ref: str) -> JsonObject:
    """A job by store id (digits) or by key (``runslot_key``, the jobs file's id)."""
    if ref.isdigit():
        return api.get_job(int(ref))
    for job in api.all_jobs():
        if job.get("runslot_key") == ref:
            return job
    raise CliError(
        f"no job with key {ref!r} in account {api.account_id} (`runslot jobs list` shows them)"
    )


def job_label(job: JsonObject) -> str:
    key = job.get("runslot_key")
    return f"{key} (id {job['id']})" if key and str(key) != str(job["id"]) else f"{job['id']}"


def run_job_id(run: JsonObject) -> int:
    """The store id of a run's job (0 when the API did not say)."""
    return int(run.get("job_definition_id") or run.get("job_id") or 0)


# --------------------------------------------------------------------------- rendering

RUN_COLUMNS = ("status", "created", "finished", "took", "message")


def run_cells(run: JsonObject) -> tuple[str, ...]:
    """A run's ``RUN_COLUMNS`` cells in a table of runs."""
    return (
        item_status(run),
        when(run.get("created_at"), short=True),
        when(run.get("finished_at"), short=True),
        text(run.get("duration_humanized") if run.get("is_complete") else None),
        text(run.get("status_message")),
    )


def step_header(index: Any, name: Any) -> str:
    """The line above a step's log."""
    return f"[bold]── step {index}: {text(name)}[/]"


# --------------------------------------------------------------------------- run


def run_job(
    job: JobRef,
    *,
    wait: Annotated[
        bool, typer.Option(help="Show the run's status and step logs until it ends.")
    ] = False,
    rerun_of: Annotated[
        int | None,
        typer.Option(
            help="Rerun this failed run from failure: same commit, `dbt retry` in place of "
            "the failed step, then the steps after it.",
            min=1,
        ),
    ] = None,
    cause: Annotated[str, typer.Option(help="Why (the run's trigger cause).")] = CLI_CAUSE,
    api_url: ApiUrl = DEFAULT_API_URL,
    token: Token = None,
    account: Account = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """Run a job now, or rerun a failed run; with --wait, exit code 0 only on Success."""
    with user_errors(), connect_api(api_url, token, account) as api:
        found = resolve_job(api, job)
        run = _rerun(api, found, rerun_of) if rerun_of else api.trigger_run(found["id"], cause)
        if output == OutputFormat.TEXT:
            what = f" (rerun of run {rerun_of} from failure)" if rerun_of else ""
            out.print(f"Queued run [bold]{run['id']}[/]{what} of job {text(job_label(found))}")
        if not wait:
            if output == OutputFormat.JSON:
                print_json(run)
            return
        try:
            final = wait_for_run(api, int(run["id"]), tail=output == OutputFormat.TEXT)
        except KeyboardInterrupt:
            # Waiting is the CLI's business; the run is the scheduler's and goes on.
            err.print(
                f"Stopped waiting; run {run['id']} goes on (runslot runs cancel {run['id']} "
                "cancels it)"
            )
            raise typer.Exit(130) from None
        if output == OutputFormat.JSON:
            print_json(final)
        else:
            print_summary(final)
    raise typer.Exit(0 if final.get("status") == RunStatus.SUCCESS else 1)


def _rerun(api: RunslotApi, job: JsonObject, run_id: int) -> JsonObject:
    """Rerun ``run_id`` from failure through dbt Cloud's ``…/jobs/{j}/rerun/``.

    That call reruns the job's newest run (from failure if it failed, else as a new run), so
    the run is checked first: a rerun of anything else would silently start another run.
    """
    run = api.get_run(run_id, steps=False)
    if run_job_id(run) != int(job["id"]):
        raise CliError(f"run {run_id} is not a run of job {job_label(job)}")
    if run.get("status") != RunStatus.ERROR:
        raise CliError(
            f"run {run_id} ended {run.get('status_humanized')}: only a failed (Error) run can "
            "be rerun from failure; run the job instead"
        )
    newest = api.list_runs(job_id=int(job["id"]), limit=1).items
    if newest and int(newest[0]["id"]) != run_id:
        raise CliError(
            f"run {run_id} is not the newest run of job {job_label(job)} (run "
            f"{newest[0]['id']} is): the API reruns a job's newest failed run only"
        )
    return api.rerun(int(job["id"]), f"Rerun of run {run_id} from the runslot CLI")


# --------------------------------------------------------------------------- wait + tail


@dataclass
class LogTail:
    """What of each step's log was printed, so each poll prints only what is new.

    ``run_steps[].logs`` may be only the tail of a long log; ``log_size`` is the whole log's
    size in bytes, which places that tail, so offsets stay right as the log grows.
    """

    printed: dict[int, int] = field(default_factory=dict)
    """Bytes of each step's log printed so far."""
    headers: set[int] = field(default_factory=set)

    def feed(self, run: JsonObject, *, final: bool) -> None:
        for step in run.get("run_steps") or []:
            index = int(step.get("index") or 0)
            if index not in self.headers:
                self.headers.add(index)
                out.print(step_header(index, step.get("name")))
            data = str(step.get("logs") or "").encode()
            size = int(step.get("log_size") or len(data))
            start = size - len(data)  # where the tail begins in the whole log
            done = self.printed.get(index, 0)
            if done < start:
                out.print(f"[dim]... {start - done} bytes of log skipped ...[/]")
                done = start
            new = data[done - start :]
            if not (final or _finished(step)):
                # Whole lines only while the step runs: a half-written line comes next time.
                new = new[: new.rfind(b"\n") + 1]
            if new:
                out.print(Text.from_ansi(new.decode(errors="replace").rstrip("\n")))
                self.printed[index] = done + len(new)


def _finished(step: JsonObject) -> bool:
    try:
        return RunStatus(int(step.get("status") or 0)).is_finished
    except ValueError:
        return False


def wait_for_run(
    api: RunslotApi, run_id: int, *, tail: bool, poll: float = WAIT_POLL_SECONDS
) -> JsonObject:
    """Poll the run until it ends and return it (with its steps); with ``tail``, show its
    status and step logs meanwhile.

    On a terminal the status is a live line under the logs; elsewhere (a pipe, CI) each
    status change is printed once.
    """
    logs = LogTail()
    live = out.status("", spinner="dots") if tail and out.is_terminal else None
    shown: Any = None
    try:
        if live is not None:
            live.start()
        while True:
            run = api.get_run(run_id, steps=tail)
            complete = bool(run.get("is_complete"))
            if tail:
                logs.feed(run, final=complete)
                line = f"Run {run_id}: {item_status(run)}"
                if live is not None:
                    live.update(f"{line} [dim]{text(run.get('duration_humanized') or '')}[/]")
                elif run.get("status") != shown and not complete:
                    out.print(f"{line}...")
                shown = run.get("status")
            if complete:
                # The whole run, steps and logs included, as `runs get` shows it.
                return run if tail else api.get_run(run_id)
            time.sleep(poll)
    finally:
        if live is not None:
            live.stop()


def print_summary(run: JsonObject) -> None:
    took = run.get("duration_humanized") or run.get("duration")
    message = run.get("status_message")
    line = f"Run [bold]{run['id']}[/]: {item_status(run)}"
    if took:
        line += f" in {text(took)}"
    if message:
        line += f": {text(message)}"
    (out if run.get("status") == RunStatus.SUCCESS else err).print(line)


# --------------------------------------------------------------------------- runs ...


@runs_app.command("list")
def list_runs(
    *,
    job: Annotated[
        str | None, typer.Option(help="Only runs of this job (id or key).", show_default=False)
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(help="Only runs in this status (name or code).", show_default=False),
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many, newest first.")] = 20,
    api_url: ApiUrl = DEFAULT_API_URL,
    token: Token = None,
    account: Account = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """List recent runs, newest first."""
    with user_errors(), connect_api(api_url, token, account) as api:
        wanted = parse_status(status) if status else None
        job_id = int(resolve_job(api, job)["id"]) if job else None
        page = api.list_runs(job_id=job_id, status=wanted, limit=limit)
        if output == OutputFormat.JSON:
            print_json(page.items)
            return
        keys = {int(j["id"]): j.get("runslot_key") or "" for j in api.all_jobs()}
    table = new_table(f"runs ({len(page.items)} of {page.total_count})", "run", "job", *RUN_COLUMNS)
    for run in page.items:
        job_id_ = run_job_id(run)
        table.add_row(str(run["id"]), text(f"{keys.get(job_id_) or job_id_}"), *run_cells(run))
    print_tables(table, empty="no runs")


@runs_app.command("get")
def get_run(
    run_id: RunId,
    *,
    api_url: ApiUrl = DEFAULT_API_URL,
    token: Token = None,
    account: Account = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """Show a run and its steps."""
    with user_errors(), connect_api(api_url, token, account) as api:
        run = api.get_run(run_id, related=("trigger", "job"))
    if output == OutputFormat.JSON:
        print_json(run)
        return
    job = run.get("job") or {"id": run.get("job_definition_id")}
    out.print(f"Run [bold]{run['id']}[/] of job {text(job_label(job))}: {item_status(run)}")
    trigger = run.get("trigger") or {}
    for label, value in (
        ("message", run.get("status_message")),
        ("cause", trigger.get("cause")),
        ("created", when(run.get("created_at"))),
        ("started", when(run.get("started_at"))),
        ("finished", when(run.get("finished_at"))),
        ("queued for", run.get("queued_duration_humanized")),
        ("ran for", run.get("run_duration_humanized")),
        ("git sha", run.get("git_sha")),
        ("dbt", run.get("dbt_version")),
    ):
        if value and value != "-":
            out.print(f"  {label}: {text(value)}")
    table = new_table("steps", "#", "step", "status", "started", "took")
    for step in run.get("run_steps") or []:
        table.add_row(
            str(step.get("index")),
            text(step.get("name")),
            item_status(step),
            when(step.get("started_at")),
            text(step.get("duration_humanized")),
        )
    print_tables(table, empty="steps: none yet")


@runs_app.command("logs")
def run_logs(
    run_id: RunId,
    *,
    step: Annotated[
        int | None, typer.Option(min=1, help="Only this step (1-based).", show_default=False)
    ] = None,
    api_url: ApiUrl = DEFAULT_API_URL,
    token: Token = None,
    account: Account = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """Print a run's step logs (json: the run's run_steps, with their logs)."""
    with user_errors(), connect_api(api_url, token, account) as api:
        steps = api.get_run(run_id).get("run_steps") or []
        if step is not None:
            steps = [s for s in steps if s.get("index") == step]
            if not steps:
                raise CliError(f"run {run_id} has no step {step}")
    if output == OutputFormat.JSON:
        print_json(steps)
        return
    if not steps:
        err.print(f"[dim]run {run_id} has no steps yet[/]")
    for item in steps:
        if step is None:
            out.print(step_header(item.get("index"), item.get("name")))
        logs = str(item.get("logs") or "")
        hidden = int(item.get("log_size") or 0) - len(logs.encode())
        if hidden > 0:  # the API serves the last MiB of a step's log
            out.print(f"[dim]... the first {hidden} bytes of this log are not shown ...[/]")
        if logs:
            out.print(Text.from_ansi(logs.rstrip("\n")))


@runs_app.command("cancel")
def cancel_run(
    run_id: RunId,
    *,
    api_url: ApiUrl = DEFAULT_API_URL,
    token: Token = None,
    account: Account = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """Cancel a queued or running run (a finished run is left as it is)."""
    with user_errors(), connect_api(api_url, token, account) as api:
        run = api.cancel_run(run_id)
    if output == OutputFormat.JSON:
        print_json(run)
        return
    out.print(f"Run [bold]{run['id']}[/]: {item_status(run)}")
