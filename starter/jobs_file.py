"""Jobs files (``runslot jobs apply -f jobs.yml``): parse them and apply them through the API.

A file names one account, its environments by name and its jobs by key. Applying maps them
onto the REST API: each environment through Runslot's v3 environments extension (create or
replace by name), each job through the dbt Cloud job create/update calls with
``runslot_key`` (create keyed by the file's id, so applying twice updates the same job).
A job is sent only when what the API holds differs from the file, so a second apply reports
every job ``unchanged``. The demo account of ``runslot dev`` is applied the same way.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from starter.api_client import ApiError, JsonObject, RunslotApi
from workflows.models import AccountSettings, Environment, JobDefinition

DEFAULT_PROJECT_ID = 1
DEFAULT_DEACTIVATE_AFTER = JobDefinition.model_fields["deactivate_after_failures"].default


class JobsFileError(Exception):
    """The file cannot be read or is invalid; the message lists every problem."""


class Action(StrEnum):
    CREATED = "created"
    UPDATED = "updated"
    UNCHANGED = "unchanged"


class EnvironmentSpec(BaseModel):
    """An environment of the file: a project id and Runslot's ``Environment`` fields, flat."""

    model_config = ConfigDict(extra="forbid")

    project_id: int = Field(default=DEFAULT_PROJECT_ID, ge=1)
    environment: Environment

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        # In YAML the environment's fields sit beside project_id, as in the API's body.
        if isinstance(data, dict) and "environment" not in data:
            rest = {k: v for k, v in data.items() if k != "project_id"}
            return {"project_id": data.get("project_id", DEFAULT_PROJECT_ID), "environment": rest}
        return data


class PlannedJob(BaseModel):
    """A job of the file: its definition and the name of its environment."""

    definition: JobDefinition
    environment: str


class JobsFile(BaseModel):
    """``runslot jobs apply`` input: one account, its environments and its jobs.

    A job's ``environment`` is the name of one of ``environments``, or (the older shape) an
    inline mapping, which becomes an environment named after the job.
    """

    model_config = ConfigDict(extra="forbid")

    account: AccountSettings | None = None
    environments: dict[str, EnvironmentSpec] = Field(default_factory=dict)
    jobs: list[PlannedJob] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        account = data.get("account")
        if isinstance(account, dict) and isinstance(account.get("account_id"), int):
            # dbt Cloud account ids are numbers, and YAML reads `account_id: 1` as one.
            account = {**account, "account_id": str(account["account_id"])}
            data = {**data, "account": account}
        owner = account.get("account_id") if isinstance(account, dict) else None
        environments = dict(data.get("environments") or {})
        raw_jobs = data.get("jobs") or []
        if isinstance(raw_jobs, dict):  # jobs keyed by id
            raw_jobs = [
                {"job_id": k, **v} if isinstance(v, dict) else v for k, v in raw_jobs.items()
            ]
        planned: list[Any] = []
        for job in raw_jobs:
            if not isinstance(job, dict):
                planned.append(job)
                continue
            env = job.get("environment")
            name = env if isinstance(env, str) else str(job.get("job_id"))
            if isinstance(env, dict):
                if name in environments:
                    raise ValueError(
                        f"job {name} has an inline environment, and an environment of that "
                        "name exists: refer to it by name"
                    )
                environments[name] = env
            definition = {"account_id": owner or "default", **job}
            definition["environment"] = _inline_environment(environments, name)
            planned.append({"definition": definition, "environment": name})
        return {**data, "environments": environments, "jobs": planned}

    @model_validator(mode="after")
    def _consistent(self) -> JobsFile:
        seen: set[str] = set()
        for planned in self.jobs:
            job = planned.definition
            if self.account is not None and job.account_id != self.account.account_id:
                raise ValueError(
                    f"job {job.job_id} names account {job.account_id}; this file is account "
                    f"{self.account.account_id}"
                )
            if job.job_id in seen:
                raise ValueError(f"job {job.job_id} is defined twice")
            if job.job_id.isdigit():
                raise ValueError(
                    f"job id {job.job_id} is digits only: those are the ids the store "
                    "allocates; use a name (letters, digits, '_', '.', '-')"
                )
            if planned.environment not in self.environments:
                raise ValueError(
                    f"job {job.job_id} names environment {planned.environment!r}, which is "
                    "not in environments"
                )
            schedule = job.triggers.schedule
            if schedule is not None and schedule.timezone != "UTC":
                raise ValueError(
                    f"job {job.job_id}: the API schedules in UTC, as dbt Cloud does; write "
                    f"the cron in UTC instead of timezone {schedule.timezone}"
                )
            if job.deactivate_after_failures != DEFAULT_DEACTIVATE_AFTER:
                raise ValueError(
                    f"job {job.job_id}: deactivate_after_failures cannot be set through the "
                    f"API (it is {DEFAULT_DEACTIVATE_AFTER}, as in dbt Cloud)"
                )
            if len(job.triggers.on_job_completion) > 1:
                raise ValueError(
                    f"job {job.job_id}: the API takes one job completion trigger per job"
                )
            seen.add(job.job_id)
        return self


def _inline_environment(environments: dict[str, Any], name: str) -> Any:
    """The environment a job definition is validated with (the job keeps only its name)."""
    spec = environments.get(name)
    if isinstance(spec, EnvironmentSpec):
        return spec.environment
    if isinstance(spec, dict):
        return spec.get("environment", {k: v for k, v in spec.items() if k != "project_id"})
    # An unknown name: validated with a stand-in, and reported by _consistent.
    return {"project_dir": "."}


def load_jobs_file(path: Path, base: Path | None = None) -> JobsFile:
    """Parse and validate the whole file; with ``base``, resolve relative local paths."""
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise JobsFileError(f"cannot read {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise JobsFileError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    try:
        spec = JobsFile.model_validate(data)
    except ValidationError as error:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or 'file'}: {_message(e['msg'])}"
            for e in error.errors(include_url=False)
        ]
        raise JobsFileError(f"{path} is not a valid jobs file:\n" + "\n".join(lines)) from None
    if base is not None:
        for env in spec.environments.values():
            env.environment = resolve_paths(env.environment, base)
    return spec


def _message(msg: str) -> str:
    msg = msg.removeprefix("Value error, ")
    # The file's shapes, not this module's class names.
    for model, shape in (("PlannedJob", "a job"), ("JobsFile", "a jobs file")):
        msg = msg.replace(f"a valid dictionary or instance of {model}", f"{shape} (a mapping)")
    return msg


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


def resolve_paths(env: Environment, base: Path) -> Environment:
    """Pin a relative ``project_dir`` and duckdb ``path`` to ``base``.

    Workers run dbt inside a per-run workspace, so a relative path would mean something else
    there: it is resolved against where the user ran the command.
    """
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
    return env.model_copy(update=update) if update else env


# --------------------------------------------------------------------------- applying


@dataclass(frozen=True)
class Applied:
    """What applying did to one environment or job."""

    kind: str
    """``environment`` or ``job``."""
    key: str
    id: int
    action: Action

    def as_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "key": self.key, "id": self.id, "action": self.action.value}


def environment_body(env: Environment) -> dict[str, Any]:
    data: dict[str, Any] = env.model_dump(mode="json")
    return data


def job_body(
    job: JobDefinition, *, project_id: int, environment_id: int, upstream_id: int | None
) -> dict[str, Any]:
    """The dbt Cloud job body of a definition (the API maps it back onto Runslot's model)."""
    schedule = job.triggers.schedule
    body: dict[str, Any] = {
        "runslot_key": job.job_id,
        "name": job.name,
        "project_id": project_id,
        "environment_id": environment_id,
        "job_type": job.job_type.value,
        "execute_steps": [shlex.join(argv) for argv in job.execute_steps],
        "generate_docs": job.generate_docs,
        "settings": {"threads": job.settings.threads},
        "execution": {"timeout_seconds": job.timeout_seconds},
        "triggers": {
            "schedule": schedule is not None,
            "github_webhook": job.triggers.git_provider_webhook,
            "git_provider_webhook": job.triggers.git_provider_webhook,
            "on_merge": job.triggers.on_merge,
        },
        "job_completion_trigger_condition": None,
    }
    if job.settings.target_name is not None:
        body["settings"]["target_name"] = job.settings.target_name
    if schedule is not None:
        body["schedule"] = {"cron": schedule.cron}
    if job.triggers.on_job_completion:
        trigger = job.triggers.on_job_completion[0]
        body["job_completion_trigger_condition"] = {
            "condition": {
                "job_id": upstream_id,
                "project_id": project_id,
                "statuses": [int(s) for s in trigger.statuses],
            }
        }
    return body


def differs(current: Any, wanted: Any, key: str = "") -> bool:
    """Whether ``wanted`` (what the file says) differs from ``current`` (what the API holds).

    Only the keys ``wanted`` sends are compared: the API adds read-only and defaulted fields.
    """
    if isinstance(wanted, dict):
        if not isinstance(current, dict):
            return True
        return any(differs(current.get(k), v, k) for k, v in wanted.items())
    if key == "execute_steps" and isinstance(current, list) and isinstance(wanted, list):
        return [_argv(s) for s in current] != [_argv(s) for s in wanted]
    return bool(current != wanted)


def _argv(step: Any) -> Any:
    try:
        return shlex.split(step) if isinstance(step, str) else step
    except ValueError:
        return step


def apply_jobs_file(api: RunslotApi, spec: JobsFile) -> list[Applied]:
    """Save the file's environments, then its jobs (upstream jobs first); report each."""
    applied: list[Applied] = []
    env_ids: dict[str, int] = {}
    known = _known_environments(api, {spec.project_id for spec in spec.environments.values()})
    for name, env in spec.environments.items():
        body = environment_body(env.environment)
        current = known.get((env.project_id, name))
        if current is not None and not differs(current.get("runslot"), body):
            env_ids[name] = int(current["id"])
            applied.append(Applied("environment", name, env_ids[name], Action.UNCHANGED))
            continue
        # Replacing an environment makes the API save its jobs again, with the new settings.
        saved = api.put_environment(env.project_id, name, body)
        env_ids[name] = int(saved["id"])
        action = Action.CREATED if current is None else Action.UPDATED
        applied.append(Applied("environment", name, env_ids[name], action))

    existing = {_job_key(job): job for job in api.all_jobs()}
    ids = {key: int(job["id"]) for key, job in existing.items()}
    for planned in _upstream_first(spec.jobs):
        job = planned.definition
        env = spec.environments[planned.environment]
        upstream = job.triggers.on_job_completion
        upstream_id = None
        if upstream:
            upstream_id = ids.get(upstream[0].job_id)
            if upstream_id is None:
                raise ApiError(
                    f"job {job.job_id} runs after job {upstream[0].job_id}, which is neither "
                    "in the file nor in the account"
                )
        body = job_body(
            job,
            project_id=env.project_id,
            environment_id=env_ids[planned.environment],
            upstream_id=upstream_id,
        )
        current = existing.get(job.job_id)
        if current is None:
            saved = api.create_job(body)
            action = Action.CREATED
        elif (
            differs(current, body)
            or bool(current.get("deactivated"))
            or current.get("state", 1) != 1
        ):
            saved = api.update_job(int(current["id"]), body)
            action = Action.UPDATED
        else:
            saved, action = current, Action.UNCHANGED
        ids[job.job_id] = int(saved["id"])
        applied.append(Applied("job", job.job_id, ids[job.job_id], action))
    return applied


def _job_key(job: JsonObject) -> str:
    key = job.get("runslot_key")
    return str(key) if key else str(job["id"])


def _known_environments(api: RunslotApi, projects: set[int]) -> dict[tuple[int, str], JsonObject]:
    """The account's environments by (project, name); empty if the API cannot list them."""
    found: dict[tuple[int, str], JsonObject] = {}
    for project_id in sorted(projects):
        try:
            listed = api.list_environments(project_id)
        except ApiError as error:
            if error.status_code in (404, 405):
                continue  # not served: every environment is saved
            raise
        for env in listed:
            if isinstance(env, dict) and "name" in env and "id" in env:
                found[(project_id, str(env["name"]))] = env
    return found


def _upstream_first(jobs: list[PlannedJob]) -> list[PlannedJob]:
    """Jobs ordered so that a job's completion-trigger upstream (in the file) comes first."""
    by_key = {planned.definition.job_id: planned for planned in jobs}
    ordered: list[PlannedJob] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(planned: PlannedJob) -> None:
        key = planned.definition.job_id
        if state.get(key) == 2:
            return
        if state.get(key) == 1:
            raise JobsFileError(f"job completion triggers form a cycle through job {key}")
        state[key] = 1
        for trigger in planned.definition.triggers.on_job_completion:
            if trigger.job_id in by_key:
                visit(by_key[trigger.job_id])
        state[key] = 2
        ordered.append(planned)

    for planned in jobs:
        visit(planned)
    return ordered
