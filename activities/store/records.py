"""What the store returns: read models, pages, and the quarantine of unreadable rows.

A row is turned into a model here and nowhere else. A row that does not parse (corrupt JSON,
an unknown status code, a definition the current models reject) is *quarantined*: left out
of the answer with a logged reason, never raised, so one bad row cannot break a listing
(the CircleCI incident of November 2021). Stored JSON is read with unknown fields ignored,
so rows written by a newer release stay readable after a rollback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from activities.store.engine import Unreadable
from activities.store.schema import (
    AccountRow,
    EnvironmentRow,
    JobRow,
    RunRow,
    RunStepRow,
    WebhookDeliveryRow,
    WebhookRow,
)
from workflows.models import (
    AccountSettings,
    Environment,
    JobDefinition,
    JobType,
    RunStatus,
    TriggerCause,
    TriggerRequest,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class StoredAccount(Record):
    id: str
    name: str
    run_slots: int
    run_memory_limit_mb: int | None
    max_queue_wait_seconds: int
    settings: AccountSettings
    created_at: datetime
    updated_at: datetime


class StoredJob(Record):
    id: int
    account_id: str
    key: str
    name: str
    job_type: JobType
    definition: JobDefinition
    extra: dict[str, Any] = Field(default_factory=dict)
    deactivated: bool
    state: int
    created_at: datetime
    updated_at: datetime


class StoredEnvironment(Record):
    id: int
    account_id: str
    project_id: int
    name: str
    definition: Environment
    state: int
    created_at: datetime
    updated_at: datetime


class StoredWebhook(Record):
    id: int
    account_id: str
    name: str
    url: str
    event_types: list[str]
    job_ids: list[int]
    active: bool
    created_at: datetime
    updated_at: datetime


class StoredDelivery(Record):
    id: int
    webhook_id: int
    account_id: str
    event_id: str
    event_type: str
    run_id: int | None
    attempts: int
    status_code: int | None
    error: str
    succeeded: bool
    created_at: datetime
    updated_at: datetime


class StoredStep(Record):
    index: int
    name: str
    argv: list[str]
    status: RunStatus
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    message: str
    log_key: str | None


class StoredRun(Record):
    id: int
    account_id: str
    job_id: int
    job_key: str
    key: str
    request_key: str | None
    status: RunStatus
    status_message: str
    cause: TriggerCause
    cause_text: str
    trigger: TriggerRequest | None
    created_at: datetime
    updated_at: datetime
    dequeued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    git_sha: str | None
    git_branch: str | None
    schema_name: str | None
    dbt_version: str | None
    artifacts: list[str] = Field(default_factory=list)
    updated_seq: int
    steps: list[StoredStep] = Field(default_factory=list)
    """Filled by ``get_run`` and by ``list_runs(include_steps=True)``."""


@dataclass(frozen=True)
class Quarantined:
    """A row left out of an answer because it cannot be read."""

    table: str
    id: int | str
    reason: str


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing.

    ``total_count`` counts every matching row, quarantined ones included, so offsets stay
    stable; a caller paginating should advance by ``len(items) + len(quarantined)``.
    """

    items: list[T]
    total_count: int
    quarantined: list[Quarantined] = field(default_factory=list)


class UnreadableRowError(ValueError):
    """A row that cannot be turned into its model; the message is the reason."""


def _columns(row: object) -> dict[str, Any]:
    data = {attr.key: getattr(row, attr.key) for attr in sa.inspect(type(row)).column_attrs}
    for name, value in data.items():
        if isinstance(value, Unreadable):
            raise UnreadableRowError(f"column {name} is not valid JSON: {value.error}")
    return data


def _validate(model: type[Record], data: Mapping[str, Any]) -> Any:
    try:
        return model.model_validate(data, extra="ignore")
    except ValidationError as err:
        problems = [
            f"{'.'.join(str(part) for part in e['loc']) or model.__name__}: {e['msg']}"
            for e in err.errors(include_url=False, include_input=False)[:3]
        ]
        raise UnreadableRowError("; ".join(problems)) from None


def account_record(row: AccountRow) -> StoredAccount:
    result: StoredAccount = _validate(StoredAccount, _columns(row))
    return result


def job_record(row: JobRow) -> StoredJob:
    data = _columns(row)
    data["extra"] = data["extra"] or {}
    result: StoredJob = _validate(StoredJob, data)
    return result


def environment_record(row: EnvironmentRow) -> StoredEnvironment:
    result: StoredEnvironment = _validate(StoredEnvironment, _columns(row))
    return result


def webhook_record(row: WebhookRow) -> StoredWebhook:
    result: StoredWebhook = _validate(StoredWebhook, _columns(row))
    return result


def delivery_record(row: WebhookDeliveryRow) -> StoredDelivery:
    result: StoredDelivery = _validate(StoredDelivery, _columns(row))
    return result


def step_record(row: RunStepRow) -> StoredStep:
    result: StoredStep = _validate(StoredStep, _columns(row))
    return result


def run_record(row: RunRow, job_key: str, steps: list[RunStepRow] | None = None) -> StoredRun:
    data = _columns(row)
    data["job_key"] = job_key
    data["artifacts"] = data["artifacts"] if data["artifacts"] is not None else []
    data["steps"] = [step_record(step) for step in sorted(steps or [], key=lambda s: s.index)]
    result: StoredRun = _validate(StoredRun, data)
    return result


def read_or_quarantine(
    table: str, row_id: int | str, read: Callable[[], T], quarantined: list[Quarantined]
) -> T | None:
    """``read()``, or None with the row noted in ``quarantined`` and a logged reason."""
    try:
        return read()
    except UnreadableRowError as err:
        log.warning("quarantined %s row %s (left out of the answer): %s", table, row_id, err)
        quarantined.append(Quarantined(table=table, id=row_id, reason=str(err)))
        return None
