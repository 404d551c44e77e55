"""One account as the API shows it: job, run, environment and project objects.

``AccountView`` reads the run store synchronously (callers run it in a thread) and caches
what one request looks up more than once: jobs by id and key, the account's environments.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any

from fastapi import Request

from activities.store import RunStore, StoredEnvironment, StoredJob, StoredRun
from api.context import ApiContext
from api.convert import api_account_id, humanize_ago, timestamp
from api.convert_jobs import derived_fields, echo_is_current, stored_fields, with_defaults
from api.convert_runs import RunContext, StepLog, run_object
from workflows import policy
from workflows.models import RunStatus

SECRET_REFERENCE = re.compile(r"^\{\{\s*secret\(\s*['\"][A-Za-z0-9_]+['\"]\s*\)\s*\}\}$")
_SECRET_NAMES = re.compile(r"pass|secret|token|private|key", re.IGNORECASE)
MASK = "********"


def masked(values: Mapping[str, Any]) -> dict[str, Any]:
    """Profile or env values for display: secret references as written, and any value under
    a secret-looking name that is not a reference hidden."""
    return {
        name: value
        if not _SECRET_NAMES.search(name)
        or (isinstance(value, str) and SECRET_REFERENCE.match(value))
        else MASK
        for name, value in values.items()
    }


def project_name(env: StoredEnvironment) -> str:
    """A project's name, from its environment's source: ``jaffle`` for ``…/sample/jaffle``."""
    d = env.definition
    source = d.git_url or d.project_dir
    name = (
        PurePosixPath(source.rstrip("/")).name.removesuffix(".git") or f"project-{env.project_id}"
    )
    return f"{name}/{d.subdirectory}" if d.subdirectory else name


class AccountView:
    def __init__(self, store: RunStore, account_id: str, *, now: datetime, base_url: str) -> None:
        self.store = store
        self.account_id = account_id
        self.now = now
        self.base_url = base_url.rstrip("/")
        self._jobs: dict[int, StoredJob | None] = {}
        self._ids: dict[str, int | None] = {}
        self._environments: list[StoredEnvironment] | None = None

    # ------------------------------------------------------------------ lookups

    def job(self, job_id: int) -> StoredJob | None:
        if job_id not in self._jobs:
            self._jobs[job_id] = self.store.get_job(self.account_id, job_id)
        return self._jobs[job_id]

    def key_of(self, job_id: int) -> str | None:
        job = self.job(job_id)
        return job.key if job is not None and job.state == 1 else None

    def id_of(self, key: str) -> int | None:
        if key not in self._ids:
            job = self.store.get_job_by_key(self.account_id, key)
            self._ids[key] = job.id if job is not None else None
        return self._ids[key]

    def environments(self) -> list[StoredEnvironment]:
        if self._environments is None:
            self._environments = self.store.list_environments(self.account_id)
        return self._environments

    def environment(self, environment_id: int) -> StoredEnvironment | None:
        return next((e for e in self.environments() if e.id == environment_id), None)

    def project_ids(self) -> list[int]:
        return sorted({e.project_id for e in self.environments()})

    # ------------------------------------------------------------------ jobs

    def fields(self, job: StoredJob) -> dict[str, Any]:
        """The job's dbt Cloud fields: the stored echo while it is current, else derived
        from the definition (with the echo's fields Runslot does not model)."""
        extra = stored_fields(job.extra)
        if echo_is_current(extra, job.definition, self.key_of):
            fields = dict(extra)
        else:
            fields = {**extra, **derived_fields(job.definition, self.id_of)}
        fields = with_defaults(fields, job.definition)
        environment_id = fields.get("environment_id")
        env = self.environment(environment_id) if isinstance(environment_id, int) else None
        if env is None and not isinstance(environment_id, int):
            # A job saved outside the API: the environment with the same definition, if any.
            env = next(
                (e for e in self.environments() if e.definition == job.definition.environment),
                None,
            )
            environment_id = env.id if env is not None else 0
        project_id = fields.get("project_id")
        if not isinstance(project_id, int):
            project_id = env.project_id if env is not None else 0
        fields["environment_id"], fields["project_id"] = environment_id, project_id
        completion = fields.get("job_completion_trigger_condition")
        if isinstance(completion, dict) and isinstance(completion.get("condition"), dict):
            completion["condition"] = {"project_id": project_id, **completion["condition"]}
        return fields

    def job_object(self, job: StoredJob, include: AbstractSet[str] = frozenset()) -> dict[str, Any]:
        fields = self.fields(job)
        definition = job.definition
        schedule = definition.triggers.schedule
        next_run = None
        if schedule is not None and job.state == 1 and not job.deactivated:
            next_run = policy.next_cron_fire(schedule.cron, schedule.timezone, self.now)
        deactivated = bool(fields.get("deactivated")) or job.deactivated
        obj: dict[str, Any] = {
            "id": job.id,
            "account_id": api_account_id(job.account_id),
            **{k: v for k, v in fields.items() if k not in ("id", "account_id")},
            "state": job.state,
            "deactivated": deactivated,
            "deactivation_reason": "Deactivated after consecutive failed runs"
            if job.deactivated
            else None,
            "raw_dbt_version": fields.get("dbt_version"),
            "is_deferrable": False,
            "generate_sources": bool(fields.get("run_generate_sources")),
            "created_at": timestamp(job.created_at),
            "updated_at": timestamp(job.updated_at),
            "next_run": timestamp(next_run),
            "next_run_humanized": humanize_ago(next_run, self.now),
            "cron_humanized": f"{schedule.cron} ({schedule.timezone})"
            if schedule is not None
            else "Not scheduled",
            "run_failure_count": 0,
            "is_system": False,
            "custom_environment_variables": [],
            "account": None,
            "project": None,
            "environment": None,
            "most_recent_run": None,
            "most_recent_completed_run": None,
        }
        if job.key != str(job.id):
            obj["runslot_key"] = job.key
        if "environment" in include:
            env = self.environment(obj["environment_id"])
            obj["environment"] = self.environment_object(env) if env is not None else None
        if "most_recent_run" in include:
            page = self.store.list_runs(self.account_id, job_id=job.id, order_by="-id", limit=1)
            obj["most_recent_run"] = self.run_object(page.items[0]) if page.items else None
        if "most_recent_completed_run" in include:
            finished = [RunStatus.SUCCESS, RunStatus.ERROR, RunStatus.CANCELLED]
            page = self.store.list_runs(
                self.account_id, job_id=job.id, status=finished, order_by="-id", limit=1
            )
            obj["most_recent_completed_run"] = (
                self.run_object(page.items[0]) if page.items else None
            )
        return obj

    # ------------------------------------------------------------------ runs

    def run_object(
        self,
        run: StoredRun,
        include: AbstractSet[str] = frozenset(),
        *,
        status: RunStatus | None = None,
        logs: Mapping[int, StepLog] | None = None,
    ) -> dict[str, Any]:
        job = self.job(run.job_id)
        fields = self.fields(job) if job is not None else {}
        environment_id = int(fields.get("environment_id") or 0)
        ctx = RunContext(
            now=self.now,
            base_url=self.base_url,
            project_id=int(fields.get("project_id") or 0),
            environment_id=environment_id,
        )
        job_obj = self.job_object(job) if job is not None and "job" in include else None
        env = self.environment(environment_id) if "environment" in include else None
        return run_object(
            run,
            ctx,
            include=include,
            status=status,
            job=job_obj,
            environment=self.environment_object(env) if env is not None else None,
            logs=logs,
        )

    # ------------------------------------------------------------------ environments

    def environment_object(self, env: StoredEnvironment) -> dict[str, Any]:
        d = env.definition
        profile = masked(d.profile)
        return {
            "id": env.id,
            "account_id": api_account_id(env.account_id),
            "project_id": env.project_id,
            "name": env.name,
            "state": env.state,
            "type": "deployment",
            "deployment_type": None,
            "dbt_version": d.dbt_version,
            "use_custom_branch": False,
            "custom_branch": None,
            "credentials": {
                "type": profile.get("type"),
                "target_name": d.target_name,
                "schema": profile.get("schema"),
            },
            "created_at": timestamp(env.created_at),
            "updated_at": timestamp(env.updated_at),
            "runslot": {
                **d.model_dump(mode="json"),
                "profile": profile,
                "env_vars": masked(d.env_vars),
            },
        }

    def project_object(self, project_id: int) -> dict[str, Any] | None:
        envs = [e for e in self.environments() if e.project_id == project_id]
        if not envs:
            return None
        first = envs[0]
        profile = masked(first.definition.profile)
        kind = profile.get("type")
        return {
            "id": project_id,
            "account_id": api_account_id(self.account_id),
            "name": project_name(first),
            "description": "",
            "state": 1,
            "dbt_project_subdirectory": first.definition.subdirectory or None,
            "connection": {
                "id": project_id,
                "account_id": api_account_id(self.account_id),
                "type": kind,
                "adapter_version": f"{kind}_v0" if kind else None,
                "name": kind,
                "details": {k: v for k, v in profile.items() if k != "type"},
            },
            "repository": {"remote_url": first.definition.git_url}
            if first.definition.git_url
            else None,
            "environment_ids": [e.id for e in envs],
            "created_at": timestamp(min(e.created_at for e in envs)),
            "updated_at": timestamp(max(e.updated_at for e in envs)),
        }


def account_view(request: Request, ctx: ApiContext, account: str) -> AccountView:
    """The view of one request: its clock and the base URL its links use."""
    return AccountView(ctx.store, account, now=datetime.now(UTC), base_url=str(request.base_url))
