"""dbt Cloud job bodies to Runslot's ``JobDefinition``, and stored jobs back to job objects.

A job body carries more than Runslot models (``description``, ``project_id``, lint flags …).
The API stores the body it accepted (minus read-only fields) as the job's ``extra`` and
echoes it back, so a tool that diffs what it sent against what it reads (dbt-jobs-as-code)
sees no change. The echo is trusted only while it still describes the saved definition: a
job changed outside the API (the CLI, a ``configure`` update) shows what it now does.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.envelope import ApiError, bad_request, validation_message
from workflows import policy
from workflows.models import (
    CompletionTrigger,
    CronSchedule,
    Environment,
    JobDefinition,
    JobTriggers,
    JobType,
    RunStatus,
)

DEFAULT_CRON = "0 0 1 1 *"
"""The cron shown for a job without a schedule (``cron`` must always be there)."""

READ_ONLY = frozenset(
    {
        "id", "account_id", "state", "created_at", "updated_at", "deactivation_reason",
        "run_failure_count", "is_deferrable", "generate_sources", "cron_humanized", "next_run",
        "next_run_humanized", "is_system", "raw_dbt_version", "account", "project",
        "environment", "most_recent_run", "most_recent_completed_run", "runslot_key",
        "custom_environment_variables", "job_definition_id", "href",
    }
)  # fmt: skip
"""Fields a client may send back from a GET that are the server's to set, never stored."""

TRIGGER_FLAGS = (
    "github_webhook", "git_provider_webhook", "schedule", "on_merge", "custom_branch_only",
)  # fmt: skip

MERGED_OBJECTS = ("settings", "execution", "triggers")
"""Sub-objects a partial update merges key by key (others are replaced whole)."""

_VERSION = re.compile(r"^v?(\d+(?:\.\d+){0,2})$")
_LATEST = re.compile(r"^v?(\d+\.\d+)(?:\.\d+)?-latest$")


class _In(BaseModel):
    model_config = ConfigDict(extra="allow")


class SettingsIn(_In):
    threads: int | None = None
    target_name: str | None = None


class ExecutionIn(_In):
    timeout_seconds: int | None = None


class TriggersIn(_In):
    github_webhook: bool | None = None
    git_provider_webhook: bool | None = None
    schedule: bool | None = None
    on_merge: bool | None = None
    custom_branch_only: bool | None = None


class ScheduleIn(_In):
    cron: str | None = None
    timezone: str | None = None
    """Runslot extension: the IANA zone the cron is read in (dbt Cloud's crons are UTC)."""


class ConditionIn(_In):
    job_id: int
    project_id: int | None = None
    statuses: list[int] = Field(default_factory=lambda: [int(RunStatus.SUCCESS)])


class CompletionIn(_In):
    condition: ConditionIn


class JobIn(_In):
    """A dbt Cloud job body (create or update); unknown fields are kept and echoed."""

    environment_id: int
    name: str = Field(min_length=1, max_length=255)
    execute_steps: list[str] = Field(min_length=1, max_length=20)
    project_id: int | None = None
    description: str | None = None
    dbt_version: str | None = None
    settings: SettingsIn | None = None
    execution: ExecutionIn | None = None
    triggers: TriggersIn | None = None
    schedule: ScheduleIn | None = None
    job_type: str | None = None
    generate_docs: bool | None = None
    deactivated: bool | None = None
    job_completion_trigger_condition: CompletionIn | None = None


def stored_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """What of a body is the client's to set (read-only fields dropped)."""
    return {name: value for name, value in body.items() if name not in READ_ONLY}


def merge_fields(current: Mapping[str, Any], body: Mapping[str, Any]) -> dict[str, Any]:
    """A partial update: the body's fields over the current ones, sub-objects key by key."""
    merged = dict(current)
    for name, value in stored_fields(body).items():
        before = merged.get(name)
        if name in MERGED_OBJECTS and isinstance(value, dict) and isinstance(before, dict):
            merged[name] = {**before, **value}
        else:
            merged[name] = value
    return merged


def parse_job(fields: Mapping[str, Any]) -> JobIn:
    try:
        return JobIn.model_validate(dict(fields))
    except ValidationError as err:
        raise bad_request(validation_message(err)) from None


def resolved_job_type(job: JobIn) -> JobType:
    """``job_type`` as sent, or (null) what the triggers say: ci, merge, scheduled, other."""
    if job.job_type is not None:
        try:
            return JobType(job.job_type)
        except ValueError:
            raise bad_request(
                f"job_type {job.job_type!r} is not supported; use one of "
                f"{', '.join(t.value for t in JobType)} (or null to derive it from triggers)"
            ) from None
    triggers = job.triggers or TriggersIn()
    if triggers.github_webhook or triggers.git_provider_webhook:
        return JobType.CI
    if triggers.on_merge:
        return JobType.MERGE
    if triggers.schedule:
        return JobType.SCHEDULED
    return JobType.OTHER


def cron_problem(expr: str) -> str | None:
    """Why ``expr`` cannot schedule a job (croniter's reason), or None."""
    fields = expr.split()
    if len(fields) != 5:
        return f"expected 5 fields (minute hour day month weekday), got {len(fields)}"
    try:
        croniter(expr)
        policy.next_cron_fire(" ".join(fields), "UTC", datetime.now(UTC))
    except Exception as err:  # noqa: BLE001 - croniter's errors have no common public base
        return str(err) or type(err).__name__
    return None


def pinned_dbt_version(value: str | None) -> str | None:
    """The dbt version a job's ``dbt_version`` pins for the worker: ``1.10.2`` as is,
    ``1.10.0-latest`` as ``1.10``; ``versionless``/``latest`` pin nothing."""
    if value is None:
        return None
    if match := _VERSION.match(value.strip()):
        return match.group(1)
    if match := _LATEST.match(value.strip()):
        return match.group(1)
    return None


UpstreamKey = Callable[[int], str | None]
"""A store job id to its key (None: no such job in the account)."""


def build_definition(
    job: JobIn,
    *,
    account_id: str,
    key: str,
    environment: Environment,
    upstream_key: UpstreamKey,
) -> JobDefinition:
    """The ``JobDefinition`` a job body describes (400 naming the field when it cannot)."""
    job_type = resolved_job_type(job)
    triggers_in = job.triggers or TriggersIn()
    schedule: CronSchedule | None = None
    cron = job.schedule.cron if job.schedule is not None else None
    if cron is not None and (problem := cron_problem(cron)):
        raise bad_request(f"schedule.cron {cron!r} is not a valid cron expression: {problem}")
    if triggers_in.schedule:
        if not cron:
            raise bad_request("triggers.schedule is true: set schedule.cron (5 fields, UTC)")
        assert job.schedule is not None
        try:
            schedule = CronSchedule(cron=cron, timezone=job.schedule.timezone or "UTC")
        except ValidationError as err:
            raise bad_request(validation_message(err, prefix="schedule")) from None
    completion: list[CompletionTrigger] = []
    if job.job_completion_trigger_condition is not None:
        condition = job.job_completion_trigger_condition.condition
        upstream = upstream_key(condition.job_id)
        if upstream is None:
            raise bad_request(
                f"job_completion_trigger_condition.condition.job_id: job {condition.job_id} "
                "does not exist in this account"
            )
        try:
            statuses = [RunStatus(s) for s in condition.statuses]
            completion = [CompletionTrigger(job_id=upstream, statuses=statuses)]
        except (ValueError, ValidationError) as err:
            raise bad_request(
                "job_completion_trigger_condition.condition.statuses: "
                f"{_reason(err)} (use finished statuses: 10, 20 or 30)"
            ) from None
    triggers = JobTriggers(
        schedule=schedule,
        git_provider_webhook=bool(triggers_in.github_webhook or triggers_in.git_provider_webhook),
        on_merge=bool(triggers_in.on_merge),
        on_job_completion=completion,
    )
    if job.deactivated:
        # A deactivated job keeps its triggers in the echo, but none of them starts a run.
        triggers = JobTriggers()
    if (version := pinned_dbt_version(job.dbt_version)) is not None:
        environment = environment.model_copy(update={"dbt_version": version})
    settings = job.settings or SettingsIn()
    data: dict[str, Any] = {
        "account_id": account_id,
        "job_id": key,
        "name": job.name,
        "job_type": job_type,
        "environment": environment,
        "execute_steps": job.execute_steps,
        "generate_docs": bool(job.generate_docs),
        "settings": {
            name: value
            for name, value in (
                ("threads", settings.threads),
                ("target_name", settings.target_name),
            )
            if value is not None
        },
        "triggers": triggers,
        "timeout_seconds": (job.execution.timeout_seconds if job.execution else None) or 0,
    }
    try:
        return JobDefinition.model_validate(data)
    except ValidationError as err:
        raise bad_request(_definition_errors(err)) from None


_FIELD_NAMES = {
    "timeout_seconds": "execution.timeout_seconds",
    "triggers.schedule": "triggers.schedule",
    "settings": "settings",
}


def _definition_errors(err: ValidationError) -> str:
    """The model's errors with dbt Cloud's field names (``execution.timeout_seconds``)."""
    parts = []
    for item in err.errors()[:5]:
        loc = [str(p) for p in item.get("loc", ())]
        where = ".".join(loc)
        where = _FIELD_NAMES.get(where, where)
        msg = str(item.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def _reason(err: Exception) -> str:
    if isinstance(err, ValidationError):
        return validation_message(err)
    return str(err)


# --------------------------------------------------------------------------- job objects


def derived_fields(
    definition: JobDefinition, upstream_id: Callable[[str], int | None]
) -> dict[str, Any]:
    """The dbt Cloud fields a definition implies, for a job whose echo is missing or stale."""
    schedule = definition.triggers.schedule
    webhook = definition.triggers.git_provider_webhook
    cron = schedule.cron if schedule is not None else DEFAULT_CRON
    completion = None
    if definition.triggers.on_job_completion:
        first = definition.triggers.on_job_completion[0]
        upstream = upstream_id(first.job_id)
        if upstream is not None:
            completion = {
                "condition": {
                    "job_id": upstream,
                    "statuses": [int(s) for s in first.statuses],
                }
            }
    return {
        "name": definition.name,
        "execute_steps": [shlex.join(argv) for argv in definition.execute_steps],
        "settings": {
            "threads": definition.settings.threads,
            "target_name": definition.settings.target_name or definition.environment.target_name,
        },
        "execution": {"timeout_seconds": definition.timeout_seconds},
        "triggers": {
            "github_webhook": webhook,
            "git_provider_webhook": webhook,
            "schedule": schedule is not None,
            "on_merge": definition.triggers.on_merge,
        },
        "schedule": {"cron": cron}
        if schedule is None or schedule.timezone == "UTC"
        else {"cron": cron, "timezone": schedule.timezone},
        "job_type": definition.job_type.value,
        "generate_docs": definition.generate_docs,
        "job_completion_trigger_condition": completion,
        "dbt_version": definition.environment.dbt_version,
    }


def echo_is_current(
    fields: Mapping[str, Any], definition: JobDefinition, upstream_key: UpstreamKey
) -> bool:
    """Whether the stored echo still describes ``definition`` (nobody saved the job since,
    other than through the API): the definition the echo builds is the saved one."""
    if not fields:
        return False
    try:
        rebuilt = build_definition(
            parse_job(fields),
            account_id=definition.account_id,
            key=definition.job_id,
            environment=definition.environment,
            upstream_key=upstream_key,
        )
    except ApiError:
        return False
    # The environment is re-read from its row on every save; only the job's own fields count.
    return rebuilt.model_dump(exclude={"environment"}) == definition.model_dump(
        exclude={"environment"}
    )


def _filled(value: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A sub-object with each missing or null key set to its default."""
    out = dict(value) if isinstance(value, dict) else {}
    for name, default in defaults.items():
        if out.get(name) is None:
            out[name] = default
    return out


def with_defaults(fields: Mapping[str, Any], definition: JobDefinition) -> dict[str, Any]:
    """Every field dbt-jobs-as-code parses strictly, never null: the sent value or a default."""
    out = dict(fields)
    target = definition.settings.target_name or definition.environment.target_name
    out["settings"] = _filled(
        out.get("settings"), {"threads": definition.settings.threads, "target_name": target}
    )
    out["execution"] = _filled(
        out.get("execution"), {"timeout_seconds": definition.timeout_seconds}
    )
    out["triggers"] = _filled(
        out.get("triggers"),
        dict.fromkeys(
            (
                "github_webhook",
                "git_provider_webhook",
                "schedule",
                "on_merge",
                "custom_branch_only",
            ),
            False,
        ),
    )
    schedule = _filled(out.get("schedule"), {})
    schedule["cron"] = schedule.get("cron") or DEFAULT_CRON
    out["schedule"] = _filled(
        schedule,
        {
            "date": {"type": "custom_cron", "cron": schedule["cron"]},
            "time": {"type": "every_hour", "interval": 1},
        },
    )
    defaults: dict[str, Any] = {
        "name": definition.name,
        "description": "",
        "execute_steps": [shlex.join(argv) for argv in definition.execute_steps],
        "job_type": definition.job_type.value,
        "generate_docs": definition.generate_docs,
        "run_generate_sources": False,
        "run_lint": False,
        "errors_on_lint_failure": True,
        "run_compare_changes": False,
        "compare_changes_flags": "--select state:modified",
        "cost_optimization_features": [],
        "triggers_on_draft_pr": False,
        "lifecycle_webhooks": False,
    }
    out = _filled(out, defaults)
    for name in (
        "dbt_version",
        "deferring_job_definition_id",
        "deferring_environment_id",
        "lifecycle_webhooks_url",
        "job_completion_trigger_condition",
    ):
        out.setdefault(name, None)
    return out
