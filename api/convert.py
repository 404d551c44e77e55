"""Small conversions every API object shares: ids, timestamps, durations, step names."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta


def api_account_id(account_id: str) -> int | str:
    """dbt Cloud account ids are integers; Runslot's are strings (``"1"`` shows as 1)."""
    return int(account_id) if account_id.isdigit() else account_id


def timestamp(value: datetime | None) -> str | None:
    """dbt Cloud's timestamp format, ``2021-11-26 16:48:41.431645+00:00`` (in UTC)."""
    return None if value is None else str(value.astimezone(UTC))


def clock_duration(value: timedelta | None) -> str | None:
    """``HH:MM:SS``, as dbt Cloud's ``duration`` fields."""
    if value is None:
        return None
    total = max(0, int(value.total_seconds()))
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}"


def humanize_duration(value: timedelta | None) -> str | None:
    """``1 minute, 12 seconds``, as dbt Cloud's ``*_humanized`` durations."""
    if value is None:
        return None
    total = max(0, int(value.total_seconds()))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [
        f"{amount} {unit}{'' if amount == 1 else 's'}"
        for amount, unit in ((days, "day"), (hours, "hour"), (minutes, "minute"))
        if amount
    ]
    if seconds or not parts:
        parts.append(f"{seconds} second{'' if seconds == 1 else 's'}")
    return ", ".join(parts)


def humanize_ago(value: datetime | None, now: datetime) -> str | None:
    if value is None:
        return None
    if value > now:
        return f"in {humanize_duration(value - now)}"
    return f"{humanize_duration(now - value)} ago"


def step_command(argv: Sequence[str]) -> str:
    """A step's argv as the command string dbt Cloud shows (``dbt run -s "a b"``)."""
    return shlex.join(argv)


def step_name(argv: Sequence[str]) -> str:
    """dbt Cloud's step name; one client's OpenLineage helper parses exactly this form."""
    return f"Invoke dbt with `{step_command(argv)}`"
