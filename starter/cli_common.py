"""What every ``runslot`` command shares: consoles, options, errors and formatting.

The CLI modules are the only ones that print. A user error is one red line on stderr and
exit code 1, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from starter.api_client import ApiError, RunslotApi
from workflows.models import RunStatus

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """A failure the user can act on: printed as one line, exit code 1."""


class OutputFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


ApiUrl = Annotated[
    str,
    typer.Option(
        envvar="RUNSLOT_API_URL", help="Base URL of Runslot's API.", rich_help_panel="API"
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        envvar="RUNSLOT_API_TOKEN",
        help="API token (runslot tokens create ACCOUNT).",
        show_default=False,
        rich_help_panel="API",
    ),
]
Account = Annotated[
    str | None,
    typer.Option(
        envvar="RUNSLOT_ACCOUNT", help="Account id.", show_default=False, rich_help_panel="API"
    ),
]
Output = Annotated[
    OutputFormat,
    typer.Option(
        "--output", "-o", help="text for people, json: exactly the API's data, for programs."
    ),
]
TemporalAddress = Annotated[
    str,
    typer.Option(
        envvar="RUNSLOT_TEMPORAL_ADDRESS",
        help="host:port of the Temporal frontend.",
        rich_help_panel="Temporal",
    ),
]
Namespace = Annotated[
    str,
    typer.Option(
        envvar="RUNSLOT_NAMESPACE", help="Temporal namespace.", rich_help_panel="Temporal"
    ),
]
DEFAULT_ADDRESS = "127.0.0.1:7233"

STATUS_STYLE = {
    RunStatus.QUEUED: "cyan",
    RunStatus.STARTING: "cyan",
    RunStatus.RUNNING: "blue",
    RunStatus.SUCCESS: "green",
    RunStatus.ERROR: "red",
    RunStatus.CANCELLED: "yellow",
}
STATUS_NAMES = {
    **{status.humanized.lower(): status for status in RunStatus},
    # dbt-cloud-cli's names for the same codes.
    "succeeded": RunStatus.SUCCESS,
    "failed": RunStatus.ERROR,
    "canceled": RunStatus.CANCELLED,
}


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(1)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can act on into one line and exit code 1."""
    try:
        yield
    except (CliError, ApiError) as error:
        fail(str(error))


def require_account(account: str | None) -> str:
    """The ``--account`` / ``RUNSLOT_ACCOUNT`` given; none is a usage error."""
    if not account:
        raise CliError("no account: pass --account or set RUNSLOT_ACCOUNT")
    return account


def connect_api(api_url: str, token: str | None, account: str | None) -> RunslotApi:
    """A client of the API for one account; a missing token or account is a usage error."""
    if not token:
        raise CliError(
            "no API token: pass --token or set RUNSLOT_API_TOKEN (`runslot dev` prints one; "
            "`runslot tokens create ACCOUNT` makes one)"
        )
    return RunslotApi(api_url, token, require_account(account))


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def new_table(title: str, *columns: str) -> Table:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    return table


def print_tables(*tables: Table, empty: str | None = None) -> None:
    """Each table, or a dim line for one without rows: ``empty``, else ``<title>: none``."""
    for table in tables:
        if table.row_count:
            out.print(table)
        else:
            message = empty or f"{table.title}: none"
            out.print(f"[dim]{message}[/]")


def parse_status(value: str) -> RunStatus:
    """A run status by dbt Cloud's code (10) or name (success, Succeeded, error, ...)."""
    try:
        return RunStatus(int(value)) if value.isdigit() else STATUS_NAMES[value.lower()]
    except (ValueError, KeyError):
        names = ", ".join(s.humanized for s in RunStatus)
        raise CliError(f"unknown run status {value!r}: use one of {names} or its code") from None


def status_text(code: Any, humanized: Any = None) -> str:
    """A run status, coloured: from the API's integer code (and its humanized name)."""
    try:
        status = RunStatus(int(code))
    except (TypeError, ValueError):
        return escape(str(humanized or code))
    return f"[{STATUS_STYLE[status]}]{status.humanized}[/]"


def item_status(item: Mapping[str, Any]) -> str:
    """The coloured status of a run or run step of the API."""
    return status_text(item.get("status"), item.get("status_humanized"))


def when(value: Any, *, short: bool = False) -> str:
    """A timestamp (ISO string from the API, or datetime) in local time, or ``-``.

    ``short`` (table cells): the time alone when it is today.
    """
    if not value:
        return "-"
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return escape(value)
    if not isinstance(value, datetime):
        return escape(str(value))
    local = value if value.tzinfo is None else value.astimezone()
    if short and local.date() == datetime.now(local.tzinfo).date():
        return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d %H:%M:%S")


def text(value: Any) -> str:
    """A value for a table cell: ``-`` when missing, markup escaped."""
    return "-" if value is None or value == "" else escape(str(value))
