"""``runslot jobs ...``: apply a jobs file, list jobs, show one, all through the REST API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from starter.api_client import DEFAULT_API_URL, JsonObject
from starter.cli_common import (
    Account,
    ApiUrl,
    CliError,
    Output,
    OutputFormat,
    Token,
    connect_api,
    err,
    new_table,
    out,
    print_json,
    print_tables,
    text,
    user_errors,
    when,
)
from starter.cli_runs import RUN_COLUMNS, JobRef, job_label, resolve_job, run_cells
from starter.jobs_file import Action, JobsFile, JobsFileError, apply_jobs_file, load_jobs_file

jobs_app = typer.Typer(help="Jobs: apply a jobs file, list, show.", no_args_is_help=True)

ACTION_STYLE = {Action.CREATED: "green", Action.UPDATED: "yellow", Action.UNCHANGED: "dim"}
RECENT_RUNS = 10


@jobs_app.command("apply")
def jobs_apply(
    file: Annotated[
        Path,
        typer.Option(
            "--file", "-f", exists=True, dir_okay=False, help="YAML: account, environments, jobs."
        ),
    ],
    *,
    resolve_paths: Annotated[
        bool,
        typer.Option(
            help="Resolve relative project_dir and duckdb paths against the current directory."
        ),
    ] = True,
    api_url: ApiUrl = DEFAULT_API_URL,
    token: Token = None,
    account: Account = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """Create or update the file's environments and jobs (idempotent; others are kept)."""
    with user_errors():
        try:
            spec = load_jobs_file(file, Path.cwd() if resolve_paths else None)
        except JobsFileError as error:
            raise CliError(str(error)) from None
        account = _file_account(spec, account)
        with connect_api(api_url, token, account) as api:
            applied = apply_jobs_file(api, spec)
            stored = api.account()
    if output == OutputFormat.JSON:
        print_json([a.as_json() for a in applied])
        return
    table = new_table(f"account {account}", "kind", "key", "id", "action")
    for item in applied:
        style = ACTION_STYLE[item.action]
        table.add_row(item.kind, text(item.key), str(item.id), f"[{style}]{item.action}[/]")
    out.print(table)
    _warn_account_drift(spec, stored)


def _file_account(spec: JobsFile, account: str | None) -> str:
    in_file = spec.account.account_id if spec.account is not None else None
    if account and in_file and account != in_file:
        raise CliError(f"the file is for account {in_file}, not {account} (--account)")
    chosen = account or in_file
    if not chosen:
        raise CliError("no account: the file has no account.account_id; pass --account")
    return chosen


def _warn_account_drift(spec: JobsFile, stored: JsonObject) -> None:
    """The API does not change account limits (they are admin settings): say so when the
    file's differ from the account's, instead of silently ignoring them."""
    if spec.account is None:
        return
    wanted = spec.account.run_slots
    current = stored.get("run_slots")
    given = "run_slots" in spec.account.model_fields_set
    if given and current is not None and int(current) != wanted:
        err.print(
            f"[yellow]note:[/] account {spec.account.account_id} has {current} run slot(s), "
            f"the file says {wanted}; account limits are admin settings: "
            f"`runslot accounts create {spec.account.account_id} --run-slots {wanted}`"
        )


@jobs_app.command("list")
def jobs_list(
    *,
    api_url: ApiUrl = DEFAULT_API_URL,
    token: Token = None,
    account: Account = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """List the account's jobs."""
    with user_errors(), connect_api(api_url, token, account) as api:
        found = api.all_jobs()
    if output == OutputFormat.JSON:
        print_json(found)
        return
    table = new_table(
        f"jobs ({len(found)})", "id", "key", "name", "type", "env", "steps", "schedule", "state"
    )
    for job in found:
        table.add_row(
            str(job["id"]),
            text(job.get("runslot_key")),
            text(job.get("name")),
            text(job.get("job_type")),
            text(job.get("environment_id")),
            text("; ".join(job.get("execute_steps") or [])),
            text(_schedule(job)),
            _state(job),
        )
    print_tables(table)


@jobs_app.command("get")
def jobs_get(
    job: JobRef,
    *,
    api_url: ApiUrl = DEFAULT_API_URL,
    token: Token = None,
    account: Account = None,
    output: Output = OutputFormat.TEXT,
) -> None:
    """Show a job and its recent runs."""
    with user_errors(), connect_api(api_url, token, account) as api:
        found = resolve_job(api, job)
        if output == OutputFormat.JSON:
            print_json(found)
            return
        runs = api.list_runs(job_id=int(found["id"]), limit=RECENT_RUNS)
    out.print(
        f"Job [bold]{text(job_label(found))}[/]: {text(found.get('name'))}, "
        f"{text(found.get('job_type'))}, {_state(found)}"
    )
    out.print(f"  environment {found.get('environment_id')}, project {found.get('project_id')}")
    out.print(f"  steps: {text('; '.join(found.get('execute_steps') or []))}")
    schedule = _schedule(found)
    if schedule:
        out.print(f"  schedule: {text(schedule)}, next run {when(found.get('next_run'))}")
    condition = (found.get("job_completion_trigger_condition") or {}).get("condition")
    if condition:
        out.print(f"  runs after job {condition.get('job_id')} ends in {condition.get('statuses')}")
    table = new_table(f"recent runs ({len(runs.items)} of {runs.total_count})", "run", *RUN_COLUMNS)
    for run in runs.items:
        table.add_row(str(run["id"]), *run_cells(run))
    print_tables(table)


def _schedule(job: JsonObject) -> str:
    if not (job.get("triggers") or {}).get("schedule"):
        return ""
    schedule = job.get("schedule") or {}
    cron = schedule.get("cron") or ""
    zone = schedule.get("timezone")
    return f"{cron} ({zone})" if cron and zone else str(cron)


def _state(job: JsonObject) -> str:
    if job.get("state") == 2:
        return "[red]deleted[/]"
    if job.get("deactivated"):
        return "[red]deactivated[/]"
    return "[green]active[/]"
