"""Every payload that crosses Temporal: accounts, jobs, triggers, runs, slots.

Validation happens here, at the edge: a model that parses is a model the scheduler can run.
Env values are strings (the int-in-an-env-dict incident), steps are dbt argv lists, cron
expressions and time zones are checked. Every field added later gets a default, so a
payload written by the previous release still parses (tests/payloads keeps samples).
"""

from __future__ import annotations

import re
import shlex
from datetime import UTC, datetime, timedelta
from enum import IntEnum, StrEnum
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictStr,
    field_validator,
    model_serializer,
    model_validator,
)


class RunStatus(IntEnum):
    """dbt Cloud's run status codes, kept on purpose."""

    QUEUED = 1
    STARTING = 2
    RUNNING = 3
    SUCCESS = 10
    ERROR = 20
    CANCELLED = 30

    @property
    def humanized(self) -> str:
        """The name dbt Cloud shows: Queued, Starting, Running, Success, Error, Cancelled."""
        return self.name.capitalize()

    @property
    def is_finished(self) -> bool:
        return self >= RunStatus.SUCCESS


class JobType(StrEnum):
    SCHEDULED = "scheduled"
    CI = "ci"
    MERGE = "merge"
    OTHER = "other"


class TriggerCause(StrEnum):
    """Why a run exists. API runs are never collapsed by the over-scheduled rule."""

    SCHEDULED = "scheduled"
    API = "api"
    MANUAL = "manual"  # "Run now"
    JOB_COMPLETION = "job_completion"
    PULL_REQUEST = "pull_request"
    MERGE = "merge"


class StrictModel(BaseModel):
    """Edge models: unknown fields are an error, so a typo never silently drops a setting."""

    model_config = ConfigDict(extra="forbid", frozen=False)


class WireModel(BaseModel):
    """Internal payloads: unknown fields are ignored so a newer release's payload still parses."""

    model_config = ConfigDict(extra="ignore")


_IDENT = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Ident = Annotated[str, Field(pattern=_IDENT, description="letters, digits, '_', '.', '-'")]

DBT_SUBCOMMANDS = frozenset(
    {
        "build", "clone", "compile", "debug", "deps", "docs", "list", "ls", "parse",
        "retry", "run", "run-operation", "seed", "show", "snapshot", "source", "test",
    }
)  # fmt: skip


def _parse_dbt_command(value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as err:
            raise ValueError(f"cannot split the command into arguments: {err}") from None
    if not isinstance(value, list) or not all(isinstance(part, str) for part in value):
        raise ValueError("a step is a dbt command: a string or a list of strings")
    return value


def _check_dbt_command(argv: list[str]) -> list[str]:
    if not argv or argv[0] != "dbt":
        raise ValueError(f"a step must be a dbt command starting with 'dbt', got {argv[:1]!r}")
    if len(argv) < 2 or argv[1] not in DBT_SUBCOMMANDS:
        got = argv[1] if len(argv) > 1 else "nothing"
        raise ValueError(
            f"unknown dbt subcommand {got!r}; expected one of {', '.join(sorted(DBT_SUBCOMMANDS))}"
        )
    if any("\x00" in part for part in argv):
        raise ValueError("a step argument contains a NUL byte")
    return argv


DbtCommand = Annotated[
    list[str], BeforeValidator(_parse_dbt_command), AfterValidator(_check_dbt_command)
]
"""A dbt command kept as argv: ``"dbt run -s x"`` becomes ``["dbt", "run", "-s", "x"]``."""

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"env var name {name!r} must match [A-Za-z_][A-Za-z0-9_]*")
        if "\x00" in value:
            raise ValueError(f"env var {name} contains a NUL byte")
    return env


EnvVars = Annotated[dict[str, StrictStr], AfterValidator(_check_env)]
"""Strictly str -> str: an int value is a validation error naming the variable, never a crash
inside subprocess.Popen (the dbt Cloud incident of August 2023)."""


def _check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}; use an IANA name like 'Europe/Paris'"
        ) from None
    return name


TimeZoneName = Annotated[str, AfterValidator(_check_timezone)]


def _check_cron(expr: str) -> str:
    expr = " ".join(expr.split())
    if len(expr.split(" ")) != 5 or not croniter.is_valid(expr):
        raise ValueError(
            f"invalid cron expression {expr!r}; expected 5 fields: minute hour day month weekday"
        )
    try:
        # Valid syntax that never fires (February 31st) would leave the job with no next tick.
        croniter(expr, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterError as err:
        raise ValueError(f"cron expression {expr!r} never fires: {err}") from None
    return expr


CronExpr = Annotated[str, AfterValidator(_check_cron)]


# --------------------------------------------------------------------------- routing


class TaskQueues(WireModel):
    """Where each kind of work goes. Defaults are the embedded stack's queues; tests and
    dedicated worker pools (one account on its own step workers) use other names."""

    workflows: str = "runslot-workflows"
    steps: str = "runslot-steps"
    telemetry: str = "runslot-telemetry"


# --------------------------------------------------------------------------- accounts


class AccountSettings(StrictModel):
    """A tenant's limits."""

    account_id: Ident
    run_slots: int = Field(default=1, ge=0, le=1000)
    run_memory_limit_mb: int | None = Field(default=None, ge=16)
    max_queue_wait: timedelta = Field(default=timedelta(hours=1))
    max_run_duration: timedelta = Field(default=timedelta(hours=24))
    """Hard cap on a run (also the slot lease): a run with no job timeout still ends."""
    slot_reap_interval: timedelta = Field(default=timedelta(seconds=30))
    """How often the slots workflow checks that holders are still running."""

    @field_validator("max_queue_wait", "max_run_duration", "slot_reap_interval")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be a positive duration")
        return value


# --------------------------------------------------------------------------- jobs


class Environment(StrictModel):
    """Where the dbt project lives and how it runs. Secrets are references, never values.

    The project is either a plain local directory (``project_dir``) or a git repository
    (``git_url``), never both; ``subdirectory`` is where dbt_project.yml sits inside it.
    """

    project_dir: str = Field(default="", description="local directory of the dbt project")
    subdirectory: str = ""
    dbt_version: str | None = None
    target_name: str = "default"
    profile: dict[str, StrictStr | int | bool] = Field(default_factory=dict)
    """Target fields for profiles.yml (type, path, schema, ...). A secret is written as a
    reference, ``"{{ secret('NAME') }}"``, resolved by the worker that prepares the run."""
    env_vars: EnvVars = Field(default_factory=dict)
    """Step environment; values may hold ``"{{ secret('NAME') }}"`` references too."""
    git_url: str | None = Field(
        default=None, min_length=1, max_length=2048,
        description="git repository of the dbt project: a URL or a local path",
    )  # fmt: skip

    @field_validator("subdirectory")
    @classmethod
    def _relative(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/"):
            raise ValueError("subdirectory must be a relative path inside the project")
        return value

    @field_validator("git_url")
    @classmethod
    def _not_an_option(cls, value: str | None) -> str | None:
        if value is not None and (value.startswith("-") or "\x00" in value):
            raise ValueError("git_url must be a repository URL or path")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> Environment:
        if self.project_dir and self.git_url:
            raise ValueError(
                "set project_dir (a local directory) or git_url (a git repository), not both"
            )
        if not self.project_dir and not self.git_url:
            raise ValueError(
                "the project needs a source: set project_dir (a local directory) or git_url "
                "(a git repository URL or path)"
            )
        return self

    @model_serializer(mode="wrap")
    def _omit_no_git(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The previous release forbids unknown Environment fields: a plain-directory
        # environment must serialize exactly as it did, so "git_url": null is left out.
        data: dict[str, Any] = handler(self)
        if self.git_url is None:
            data.pop("git_url", None)
        return data


class JobSettings(StrictModel):
    threads: int = Field(default=4, ge=1, le=64)
    target_name: str | None = None


class CronSchedule(StrictModel):
    cron: CronExpr
    timezone: TimeZoneName = "UTC"


class CompletionTrigger(StrictModel):
    """Run this job when ``job_id``'s run ends in one of ``statuses``."""

    job_id: Ident
    statuses: list[RunStatus] = Field(default_factory=lambda: [RunStatus.SUCCESS], min_length=1)

    @field_validator("statuses")
    @classmethod
    def _finished_only(cls, value: list[RunStatus]) -> list[RunStatus]:
        bad = [s for s in value if not s.is_finished]
        if bad:
            raise ValueError("statuses must be finished statuses: 10, 20 or 30")
        return value


class JobTriggers(StrictModel):
    schedule: CronSchedule | None = None
    git_provider_webhook: bool = False
    """CI: run on pull request events."""
    on_merge: bool = False
    on_job_completion: list[CompletionTrigger] = Field(default_factory=list, max_length=20)


class JobDefinition(StrictModel):
    """A job as saved. Saving it again reactivates a deactivated job."""

    account_id: Ident
    job_id: Ident
    name: str = Field(min_length=1, max_length=255)
    job_type: JobType = JobType.SCHEDULED
    environment: Environment
    execute_steps: list[DbtCommand] = Field(min_length=1, max_length=20)
    generate_docs: bool = False
    settings: JobSettings = Field(default_factory=JobSettings)
    triggers: JobTriggers = Field(default_factory=JobTriggers)
    timeout_seconds: int = Field(default=0, ge=0, le=7 * 24 * 3600)
    """0 means no job timeout (the account's max run duration still applies)."""
    deactivate_after_failures: int = Field(default=100, ge=1, le=10_000)

    @model_validator(mode="after")
    def _consistent(self) -> JobDefinition:
        if self.job_type == JobType.CI and self.triggers.schedule is not None:
            raise ValueError("a CI job is triggered by pull requests; remove triggers.schedule")
        return self


# --------------------------------------------------------------------------- triggers


class TriggerOverrides(StrictModel):
    steps_override: list[DbtCommand] | None = Field(default=None, min_length=1, max_length=20)
    threads_override: int | None = Field(default=None, ge=1, le=64)
    target_name_override: str | None = None
    schema_override: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    timeout_seconds_override: int | None = Field(default=None, ge=0, le=7 * 24 * 3600)
    git_sha: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{7,40}$")
    git_branch: str | None = Field(default=None, max_length=255)
    env_vars: EnvVars = Field(default_factory=dict)
    generate_docs_override: bool | None = None
    """Run ``dbt docs generate`` after the steps (True) or not (False), whatever the job says."""
    dbt_version_override: str | None = Field(default=None, pattern=r"^[0-9A-Za-z.+_-]{1,32}$")
    """The dbt version this run needs (prep refuses it clearly if the worker lacks it)."""


class TriggerRequest(StrictModel):
    """One request to run a job: from the API, the CLI, cron, a webhook or another job."""

    cause: TriggerCause = TriggerCause.API
    cause_text: str = Field(default="", max_length=255)
    run_id: Ident | None = None
    """Set when the caller already holds the run's id; otherwise the job has the run store
    allocate one. An id made of digits only must have been allocated by the store."""
    rerun_of: Ident | None = None
    """Rerun from failure: the id of a failed run of this job. The new run builds the same
    commit, starts with ``dbt retry`` in place of the step that failed (dbt rebuilds only
    what errored or was skipped) and goes on with the steps after it."""
    dedupe_key: str | None = Field(default=None, max_length=200)
    """A repeated key returns the first run's id instead of queueing a second run."""
    pr_id: int | None = Field(default=None, ge=1)
    overrides: TriggerOverrides = Field(default_factory=TriggerOverrides)
    scheduled_at: datetime | None = None

    @model_validator(mode="after")
    def _pr_for_ci(self) -> TriggerRequest:
        if self.cause == TriggerCause.PULL_REQUEST and self.pr_id is None:
            raise ValueError("a pull_request trigger needs pr_id")
        return self


class TriggerResult(WireModel):
    run_id: str
    status: RunStatus = RunStatus.QUEUED
    deduplicated: bool = False
    cancelled_run_ids: list[str] = Field(default_factory=list)


class CancelRequest(StrictModel):
    run_id: Ident
    reason: str = Field(default="Cancelled by request", max_length=500)


class PullRequestClosed(StrictModel):
    pr_id: int = Field(ge=1)


class UpstreamFinished(WireModel):
    """Sent by job A's workflow to every job that lists A in on_job_completion."""

    job_id: str
    run_id: str
    status: RunStatus


# --------------------------------------------------------------------------- runs


class StepResult(WireModel):
    index: int
    name: str
    argv: list[str]
    status: RunStatus
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    message: str = ""
    log_key: str = ""
    """Where the step's log lives in the artifact store."""
    artifacts: list[str] = Field(default_factory=list)
    """Artifact paths of this step in the store (``step-N/run_results.json``, ...)."""


class RunFinished(WireModel):
    """What a run tells its job when it ends (signal ``run_finished``)."""

    run_id: str
    status: RunStatus
    message: str = ""
    finished_at: datetime | None = None
    dependents_notified: bool = False
    """The run's report already signalled the jobs that run on this job's completion."""


class RunInput(WireModel):
    account: AccountSettings
    job: JobDefinition
    run_id: str
    trigger: TriggerRequest
    queued_at: datetime
    job_workflow_id: str
    queues: TaskQueues = Field(default_factory=TaskQueues)


class RunResult(WireModel):
    run_id: str
    account_id: str
    job_id: str
    status: RunStatus
    status_message: str = ""
    cause: TriggerCause
    created_at: datetime
    dequeued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    steps: list[StepResult] = Field(default_factory=list)
    schema_name: str | None = None
    git_sha: str | None = None
    """The commit the run built (resolved by prep for git projects)."""
    dbt_version: str | None = None

    @property
    def wait_time(self) -> timedelta | None:
        """Queued until the slot was granted."""
        return None if self.dequeued_at is None else self.dequeued_at - self.created_at

    @property
    def prep_time(self) -> timedelta | None:
        """Slot granted until the first step started."""
        if self.dequeued_at is None or self.started_at is None:
            return None
        return self.started_at - self.dequeued_at


# --------------------------------------------------------------------------- job state


class QueuedRun(WireModel):
    run_id: str
    trigger: TriggerRequest
    queued_at: datetime


class InFlightRun(WireModel):
    run_id: str
    workflow_id: str
    cause: TriggerCause
    pr_id: int | None = None
    queued_at: datetime
    started_at: datetime
    generation: int = 0
    """Unused since runs stopped being child workflows; kept so earlier payloads parse."""


class FinishedRun(WireModel):
    run_id: str
    cause: TriggerCause
    status: RunStatus
    message: str = ""
    finished_at: datetime


class Rejected(WireModel):
    """A message the job could not use: kept (bounded) so it is visible, never raised."""

    at: datetime
    handler: str
    reason: str


class JobState(WireModel):
    """Everything a job carries across continue-as-new."""

    schema_version: int = 1
    queue: list[QueuedRun] = Field(default_factory=list)
    in_flight: list[InFlightRun] = Field(default_factory=list)
    last_cron_fire: datetime | None = None
    next_seq: int = 1
    """Unused since the run store allocates run ids; kept so that the previous release can
    still read this state (expand/contract)."""
    store_id: int | None = None
    """The job's id in the run store (dbt Cloud's ``job_definition_id``), once saved there."""
    consecutive_failures: int = 0
    deactivated: bool = False
    recent: list[FinishedRun] = Field(default_factory=list)
    dedupe: dict[str, str] = Field(default_factory=dict)
    rejected: list[Rejected] = Field(default_factory=list)
    pending_notifications: list[UpstreamFinished] = Field(default_factory=list)
    pending_schema_drops: list[str] = Field(default_factory=list)
    deleted: bool = False
    """Deleted (dbt Cloud's soft delete): no new runs; the workflow ends once its runs have."""
    pending_records: list[FinishedRun] = Field(default_factory=list)
    """Runs the job ended itself (cancelled while queued, failed to start, terminated), not
    yet written to the run store: written by the main loop, kept until the store takes them."""
    generation: int = 0


class JobWorkflowInput(WireModel):
    job: JobDefinition
    account: AccountSettings
    state: JobState | None = None
    queues: TaskQueues = Field(default_factory=TaskQueues)


class JobUpdate(StrictModel):
    """Save a job (update ``configure``): new definition and/or account limits."""

    job: JobDefinition
    account: AccountSettings | None = None
    api_fields: dict[str, Any] | None = None
    """dbt Cloud job fields Runslot does not model (``description``, ``project_id``, ...),
    kept in the run store for the API to echo; None keeps the stored ones."""


class JobDelete(StrictModel):
    """Delete a job (update ``delete``): dbt Cloud's soft delete."""

    reason: str = Field(default="Cancelled because the job was deleted.", max_length=500)


class JobDescription(WireModel):
    job: JobDefinition
    account: AccountSettings
    state: JobState
    next_cron_fire: datetime | None = None


# --------------------------------------------------------------------------- slots


class SlotRequest(WireModel):
    request_id: str
    """The run id: one request per run, so a repeated request is a no-op."""
    workflow_id: str
    lease: timedelta = Field(default=timedelta(hours=25))
    requested_at: datetime | None = None


class SlotRelease(WireModel):
    request_id: str


class SlotGrant(WireModel):
    request_id: str
    granted_at: datetime


class SlotAnswer(WireModel):
    """The slots workflow's answer to an ``acquire`` update: granted now, or queued (the
    grant then comes by the ``slot_granted`` signal)."""

    granted_at: datetime | None = None
    recorded: bool = False
    """The request's ``starting`` snapshot is in the run store (written by the same local
    activity, after the grant)."""


class SlotHolder(WireModel):
    request_id: str
    workflow_id: str
    granted_at: datetime
    lease_expires_at: datetime


class SlotWaiter(WireModel):
    request_id: str
    workflow_id: str
    requested_at: datetime
    lease: timedelta


class SlotsState(WireModel):
    account_id: str
    capacity: int = Field(ge=0)
    holders: list[SlotHolder] = Field(default_factory=list)
    waiters: list[SlotWaiter] = Field(default_factory=list)
    reap_interval: timedelta = Field(default=timedelta(seconds=30))
    generation: int = 0
    grants_total: int = 0
    reaped_total: int = 0
    expired_total: int = 0
    rejected: list[Rejected] = Field(default_factory=list)


class SlotsStartRequest(WireModel):
    """What a run sends to request a slot: signal-with-start of ``slots:{account}``."""

    account_id: str
    capacity: int
    reap_interval: timedelta
    request: SlotRequest
    workflow_task_queue: str = "runslot-workflows"
    starting: RecordRunInput | None = None
    """The run's Starting snapshot: written to the run store by the same local activity
    when the slot is granted in the answer, with ``dequeued_at`` the grant's time (one
    marker in the run's history where the grant and the snapshot were two)."""


class Resize(StrictModel):
    capacity: int = Field(ge=0, le=1000)


class HolderLiveness(WireModel):
    workflow_ids: list[str]


class ClosedWorkflow(WireModel):
    """How a workflow closed (``closed_workflows``)."""

    close_status: str
    """Temporal's close status (``COMPLETED``, ``TERMINATED``, ...), or ``NOT_FOUND``."""
    result_status: int | None = None
    """A completed run workflow's own ``RunResult.status``."""
    result_message: str = ""


class ClosedWorkflows(WireModel):
    workflow_ids: list[str] = Field(default_factory=list)
    details: dict[str, ClosedWorkflow] = Field(default_factory=dict)
    """By workflow id, for the closed ones."""


# --------------------------------------------------------------------------- executor


class PrepareInput(WireModel):
    account_id: str
    job_id: str
    run_id: str
    environment: Environment
    target_name: str
    threads: int
    schema_override: str | None = None
    env_vars: dict[str, str] = Field(default_factory=dict)
    git_sha: str | None = None
    git_branch: str | None = None
    retry_of_run_id: str | None = None
    """Rerun from failure: the failed run whose last run_results.json is put in target/
    before the steps start, so a ``dbt retry`` step builds only what failed or was skipped."""


class PreparedRun(WireModel):
    """Where a prepared run lives. Never carries resolved secrets (they stay on the worker)."""

    workspace: str
    dbt_version: str = ""
    git_sha: str | None = None
    """The commit the run's project was checked out at (None for a plain directory)."""


class StepInput(WireModel):
    account_id: str
    run_id: str
    workspace: str
    index: int
    argv: list[str]
    memory_limit_mb: int | None = None
    timeout_seconds: float | None = None
    """The executor's own bound on the step (the run's timeout plus a grace period)."""
    deadline: datetime | None = None
    """The run's timeout as a moment: the step is stopped then and fails with ``RunTimeout``
    (enforced around every executor, so the run needs no timer of its own)."""
    cleanup_after: bool = False
    """The run's last step: remove the workspace once it succeeds (saves the run a cleanup
    activity). A failed step leaves it to the run's ``cleanup_run``."""


class StepOutcome(WireModel):
    exit_code: int
    log_path: str = ""
    """Unused since logs live in the artifact store (``log_key``); kept for old payloads."""
    message: str = ""
    log_key: str = ""
    """The step's log in the artifact store: ``{account}/{run}/step-{index}/log``."""
    artifacts: list[str] = Field(default_factory=list)
    """Names of the dbt artifacts this step wrote (manifest.json, run_results.json, ...)."""
    cleaned_up: bool = False
    """The workspace is gone (``StepInput.cleanup_after``): the run need not clean it up."""


class ArtifactsInput(WireModel):
    account_id: str
    run_id: str
    workspace: str


class ArtifactsResult(WireModel):
    files: list[str] = Field(default_factory=list)
    """What the artifact store holds for the run, as ``step-{index}/{name}``."""


class CleanupInput(WireModel):
    account_id: str
    run_id: str
    workspace: str


class DropSchemaInput(WireModel):
    account_id: str
    job_id: str
    environment: Environment
    schema_name: str


class TelemetryEvent(WireModel):
    """Post-run telemetry: handed off after the slot is released (``TelemetryQueue``)."""

    run: RunResult


class NotifyDependentsInput(WireModel):
    account_id: str
    job_id: str
    run_id: str
    status: RunStatus
    source_workflow_id: str


# --------------------------------------------------------------------------- run store
# --- run store: inputs and results of the store_* activities (activities/store).
# Store ids are the integers the dbt Cloud API shows (job_definition_id, run id); the
# string ``job_id`` / ``run_id`` fields are the keys Temporal uses, as everywhere above.


class UpsertJobInput(WireModel):
    """Save a job in the run store (activity ``store_upsert_job``)."""

    job: JobDefinition
    account: AccountSettings | None = None
    """Saved too when given; otherwise the account row is created with defaults if missing."""
    id: int | None = None
    """The job's store id when the caller knows it (an API update); None: look up by key."""
    deactivated: bool = False
    """Saving a job reactivates it; the job workflow saves True when it deactivates the job."""
    extra: dict[str, Any] | None = None
    """dbt Cloud job fields Runslot does not model, echoed by the API; None keeps the stored."""
    state: int | None = Field(default=None, ge=1, le=2)
    """1 active, 2 deleted; None keeps the stored state."""


class UpsertJobResult(WireModel):
    id: int
    job_id: str


class StartRunInput(WireModel):
    """Start a run's workflow (local activity ``start_run_workflow``)."""

    run: RunInput
    workflow_id: str
    task_queue: str
    summary: str = ""


class SignalWorkflowInput(WireModel):
    """One signal sent by the local activity ``signal_workflow``."""

    workflow_id: str
    signal: str
    payload: dict[str, Any]
    """The signal's argument as JSON (a model's ``model_dump(mode="json")``)."""


class AbandonedRuns(WireModel):
    """Which Queued runs an allocation may cancel as abandoned.

    A trigger's run is allocated before the job queues it. If the workflow task that
    allocated it never completes (the update is aborted by a continue-as-new, say) and the
    trigger is refused when it is delivered again, the run stays allocated but unknown to
    the job. The job's next allocation names every run it knows, and the store cancels the
    rest of its Queued runs, with a reason.
    """

    key_prefix: str = Field(min_length=1, max_length=200)
    """Request keys the job allocates under (``{job workflow id}:``)."""
    known: list[str] = Field(default_factory=list)
    """Run ids the job has queued, in flight, or waiting to be written."""


class AllocateRunInput(WireModel):
    """Allocate a run id before triggering (activity ``store_allocate_run``)."""

    account_id: str
    job_id: str
    request_key: str = Field(min_length=1, max_length=255)
    """Idempotency key: the same key always returns the same run."""
    trigger: TriggerRequest | None = None
    abandoned: AbandonedRuns | None = None


class AllocateRunResult(WireModel):
    id: int
    run_id: str
    """The Temporal-level run id: ``str(id)``."""


class RecordRunInput(WireModel):
    """A snapshot of a run for the read model (activity ``store_record_run``).

    Writes are monotonic: a snapshot that would move the status backwards, replace one
    finished status with another, or carry an older ``seq`` than the stored one is ignored.
    """

    run: RunResult
    seq: int = Field(default=0, ge=0)
    """The writer's counter, increased with every snapshot of this run."""
    trigger: TriggerRequest | None = None
    git_sha: str | None = None
    git_branch: str | None = None
    dbt_version: str | None = None
    artifacts: list[str] | None = None
    log_keys: dict[int, str] = Field(default_factory=dict)
    """Artifact-store key of each step's log, by step index."""


class RecordRunResult(WireModel):
    id: int
    applied: bool
    """False when the snapshot was stale and the stored run was left as it was."""
    status: RunStatus
    """The stored status after the call."""


class RerunPlanInput(WireModel):
    """Look up a failed run to rerun from failure (activity ``store_rerun_plan``)."""

    account_id: str
    job_id: str
    run_id: str


class RerunPlan(WireModel):
    """What the failed run did: the job turns it into the rerun's steps."""

    run_id: str
    failed_step: int | None
    """Index (from 1) of the step that failed; None: the run failed before its steps."""
    failed_argv: list[str] | None = None
    steps_override: list[list[str]] | None = None
    """The failed run's own steps override, if it had one (else the job's steps apply)."""
    git_sha: str | None = None
    """The commit the failed run built: the rerun builds the same one."""


# --------------------------------------------------------------------------- webhooks
# --- webhooks: dbt Cloud's outgoing job.run.* events (workflows/webhooks.py and
# activities/webhooks.py). A subscription's URL never crosses Temporal (a URL often holds a
# token): deliveries name the subscription by id and the delivery activity reads it from
# the run store. Ids in ``RunEventData`` are the run store's (dbt Cloud's) ids.


class RunEventInput(WireModel):
    """What a run publishes when it starts or ends (local activity ``publish_run_event``)."""

    account_id: str
    job_id: str
    run_id: str
    event_types: list[str] = Field(min_length=1)
    occurred_at: datetime
    status: RunStatus
    status_message: str = ""
    cause: TriggerCause
    cause_text: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    dbt_version: str | None = None
    queues: TaskQueues = Field(default_factory=TaskQueues)


class PublishResult(WireModel):
    deliveries: int = 0
    """Deliveries handed to the account's webhooks workflow (0: no subscription wanted it)."""


class ReportRunInput(WireModel):
    """A run's report, in the order the parts are carried out (local activity ``report_run``):
    ``release`` (the slot), ``record`` (the snapshot), ``notify`` (job-completion triggers),
    ``finished`` (the job's signal),
    ``publish`` (webhook events). One marker in the run's history where the parts alone are
    one each. Every part is idempotent, so a failed attempt repeats them all."""

    record: RecordRunInput
    release: SignalWorkflowInput | None = None
    notify: NotifyDependentsInput | None = None
    """The jobs that run on this job's completion (rule 7), after the snapshot is stored."""
    finished: SignalWorkflowInput | None = None
    publish: RunEventInput | None = None
    telemetry: bool = False
    """Hand the run (``record.run``) to the worker's telemetry queue, after everything else."""


class ReportRunResult(WireModel):
    record: RecordRunResult
    deliveries: int = 0


class RunEventData(WireModel):
    """The run an event is about, as a webhook's ``data`` shows it."""

    job_id: int
    """The job's run store id (dbt Cloud's ``jobId``)."""
    job_name: str
    run_id: str
    environment_id: str = ""
    environment_name: str = ""
    project_id: str = ""
    project_name: str = ""
    dbt_version: str = ""
    status: RunStatus
    status_message: str = ""
    reason: str = ""
    started_at: datetime | None = None
    finished_at: datetime | None = None


class WebhookEvent(WireModel):
    event_id: str
    """Stable for a run's event: a republished event keeps it, receivers can dedupe on it."""
    event_type: str
    account_id: str
    occurred_at: datetime
    data: RunEventData


class WebhookDelivery(WireModel):
    """One event for one subscription: the unit that is retried and logged."""

    webhook_id: int
    event: WebhookEvent

    @property
    def key(self) -> str:
        return f"{self.webhook_id}:{self.event.event_id}"


class WebhookDeliveries(WireModel):
    """Signal ``deliveries`` to ``webhooks:{account}`` (sent with signal-with-start)."""

    deliveries: list[WebhookDelivery] = Field(default_factory=list)


class WebhookDeliveryPolicy(WireModel):
    """Replaces the delivery timeouts and retries of ``constants`` (tests use short ones)."""

    attempt_timeout: timedelta
    initial_interval: timedelta
    backoff_coefficient: float = Field(ge=1.0)
    maximum_interval: timedelta
    maximum_attempts: int = Field(ge=1)
    deadline: timedelta
    idle_timeout: timedelta


class WebhooksState(WireModel):
    """Everything ``webhooks:{account}`` carries across continue-as-new."""

    account_id: str
    queues: TaskQueues = Field(default_factory=TaskQueues)
    policy: WebhookDeliveryPolicy | None = None
    """None: the constants' timeouts and retries."""
    pending: list[WebhookDelivery] = Field(default_factory=list)
    """Deliveries not started yet, oldest first."""
    seen: list[str] = Field(default_factory=list)
    """Recent ``WebhookDelivery.key``s: an event published twice is delivered once."""
    generation: int = 0
    delivered_total: int = 0
    failed_total: int = 0
    skipped_total: int = 0
    dropped_total: int = 0
    rejected: list[Rejected] = Field(default_factory=list)


class WebhookDeliveryResult(WireModel):
    status_code: int | None = None
    attempts: int = 0
    """Attempts logged for this delivery so far, this one included."""
    skipped: bool = False
    """The subscription was deleted or paused meanwhile: nothing was sent."""
