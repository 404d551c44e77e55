"""Stored runs to dbt Cloud run objects (spec §2.4): status flags, durations, the trigger
echo and ``run_steps`` with their logs."""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from activities.store import StoredRun, StoredStep
from api.convert import (
    api_account_id,
    clock_duration,
    humanize_ago,
    humanize_duration,
    step_command,
    step_name,
    timestamp,
)
from workflows.models import RunStatus, TriggerCause, TriggerRequest

LOG_TAIL_BYTES = 1024 * 1024
"""``run_steps[].logs`` of one run holds the last 1 MiB of each step's log."""
LIST_LOG_TAIL_BYTES = 64 * 1024
"""In run listings (up to 100 runs), the last 64 KiB of each step's log."""
TRUNCATED_LINES = 1000
"""``truncated_debug_logs``: the last 1,000 lines, as dbt Cloud truncates debug logs."""
STEP_ID_FACTOR = 1000
"""Steps have no ids of their own in Runslot: a step's id is ``run_id * 1000 + index``."""

_CAUSE_CATEGORY = {
    TriggerCause.SCHEDULED: "scheduled",
    TriggerCause.API: "api",
    TriggerCause.MANUAL: "manual",
    TriggerCause.JOB_COMPLETION: "job_completion",
    TriggerCause.PULL_REQUEST: "github_pull_request",
    TriggerCause.MERGE: "merge",
}


@dataclass(frozen=True)
class StepLog:
    """The tail of one step's log, as read from the artifact store."""

    text: str
    size: int
    """The whole log's size in bytes (``text`` may be its tail only)."""


@dataclass(frozen=True)
class RunContext:
    """What a run object needs besides the stored run."""

    now: datetime
    base_url: str
    project_id: int
    environment_id: int


def status_flags(status: RunStatus) -> dict[str, Any]:
    return {
        "status": int(status),
        "status_humanized": status.humanized,
        "in_progress": not status.is_finished,
        "is_complete": status.is_finished,
        "is_success": status == RunStatus.SUCCESS,
        "is_error": status == RunStatus.ERROR,
        "is_cancelled": status == RunStatus.CANCELLED,
        "is_running": status == RunStatus.RUNNING,
    }


def trigger_object(run: StoredRun) -> dict[str, Any]:
    """``run.trigger``: the cause and every override the run was queued with."""
    trigger = run.trigger or TriggerRequest(cause=run.cause, cause_text=run.cause_text)
    o = trigger.overrides
    return {
        "id": run.id,
        "cause": trigger.cause_text or run.cause_text,
        "cause_category": _CAUSE_CATEGORY.get(trigger.cause, trigger.cause.value),
        "job_definition_id": run.job_id,
        "git_branch": o.git_branch,
        "git_sha": o.git_sha,
        "github_pull_request_id": trigger.pr_id,
        "gitlab_merge_request_id": None,
        "azure_pull_request_id": None,
        "non_native_pull_request_id": None,
        "schema_override": o.schema_override,
        "dbt_version_override": o.dbt_version_override,
        "threads_override": o.threads_override,
        "target_name_override": o.target_name_override,
        "generate_docs_override": o.generate_docs_override,
        "timeout_seconds_override": o.timeout_seconds_override,
        "steps_override": [step_command(argv) for argv in o.steps_override]
        if o.steps_override
        else None,
        "rerun_of": int(trigger.rerun_of)
        if trigger.rerun_of and trigger.rerun_of.isdigit()
        else None,
        "created_at": timestamp(run.created_at),
        "updated_at": timestamp(run.created_at),
    }


def _tail_lines(text: str, lines: int) -> str:
    parts = text.splitlines(keepends=True)
    return "".join(parts[-lines:])


def step_object(
    run: StoredRun, step: StoredStep, log: StepLog | None, *, debug: bool, now: datetime
) -> dict[str, Any]:
    text = log.text if log is not None else ""
    end = step.finished_at or (now if step.started_at is not None else None)
    duration = end - step.started_at if end is not None and step.started_at else None
    truncated = _tail_lines(text, TRUNCATED_LINES)
    return {
        "id": run.id * STEP_ID_FACTOR + step.index,
        "run_id": run.id,
        "account_id": api_account_id(run.account_id),
        "index": step.index,
        "name": step_name(step.argv),
        "command": step_command(step.argv),
        **{k: v for k, v in status_flags(step.status).items() if k != "is_running"},
        "status_message": step.message or None,
        "exit_code": step.exit_code,
        "logs": text,
        "debug_logs": text if debug else truncated,
        "truncated_debug_logs": truncated,
        "log_size": log.size if log is not None else 0,
        "started_at": timestamp(step.started_at),
        "finished_at": timestamp(step.finished_at),
        "duration": clock_duration(duration),
        "duration_humanized": humanize_duration(duration),
    }


def run_object(
    run: StoredRun,
    ctx: RunContext,
    *,
    include: AbstractSet[str],
    status: RunStatus | None = None,
    job: dict[str, Any] | None = None,
    environment: dict[str, Any] | None = None,
    logs: Mapping[int, StepLog] | None = None,
) -> dict[str, Any]:
    """A dbt Cloud run object; ``status`` overrides the stored one (a run being cancelled)."""
    shown = status or run.status
    now = ctx.now
    end = run.finished_at or now
    duration = end - run.created_at
    queued_until = run.dequeued_at or run.finished_at or now
    queued = queued_until - run.created_at
    ran = (end - run.started_at) if run.started_at is not None else timedelta(0)
    artifacts = set(run.artifacts)
    trigger = run.trigger
    href = f"{ctx.base_url}/api/v2/accounts/{run.account_id}/runs/{run.id}/"
    obj: dict[str, Any] = {
        "id": run.id,
        "trigger_id": run.id,
        "account_id": api_account_id(run.account_id),
        "project_id": ctx.project_id,
        "environment_id": ctx.environment_id,
        "job_definition_id": run.job_id,
        "job_id": run.job_id,
        **status_flags(shown),
        "status_message": run.status_message or None,
        "dbt_version": run.dbt_version,
        "git_branch": run.git_branch,
        "git_sha": run.git_sha,
        "schema_override": run.schema_name,
        "created_at": timestamp(run.created_at),
        "updated_at": timestamp(run.updated_at),
        "dequeued_at": timestamp(run.dequeued_at),
        "started_at": timestamp(run.started_at),
        "finished_at": timestamp(run.finished_at),
        "should_start_at": timestamp(trigger.scheduled_at if trigger else None),
        "last_checked_at": timestamp(run.updated_at),
        "last_heartbeat_at": timestamp(run.updated_at),
        "duration": clock_duration(duration),
        "duration_humanized": humanize_duration(duration),
        "queued_duration": clock_duration(queued),
        "queued_duration_humanized": humanize_duration(queued),
        "run_duration": clock_duration(ran),
        "run_duration_humanized": humanize_duration(ran),
        "created_at_humanized": humanize_ago(run.created_at, now),
        "finished_at_humanized": humanize_ago(run.finished_at, now),
        "artifacts_saved": bool(artifacts),
        "artifact_s3_path": f"{run.account_id}/{run.key}" if artifacts else None,
        "has_docs_generated": "catalog.json" in artifacts,
        "has_sources_generated": "sources.json" in artifacts,
        "notifications_sent": False,
        "deferring_run_id": None,
        "retrying_run_id": int(trigger.rerun_of)
        if trigger and trigger.rerun_of and trigger.rerun_of.isdigit()
        else None,
        "can_retry": run.status == RunStatus.ERROR,
        "blocked_by": [],
        "href": href,
        "trigger": trigger_object(run) if "trigger" in include else None,
        "job": job if "job" in include else None,
        "environment": environment if "environment" in include else None,
        "repository": None,
        "run_steps": [],
    }
    if "run_steps" in include:
        debug = "debug_logs" in include
        obj["run_steps"] = [
            step_object(run, step, (logs or {}).get(step.index), debug=debug, now=now)
            for step in run.steps
        ]
    return obj
