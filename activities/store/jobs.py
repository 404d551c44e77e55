"""Writing accounts and jobs, inside a write transaction ``RunStore`` opens."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from activities.store.errors import InvalidRecordError, UnknownJobError
from activities.store.schema import AccountRow, JobRow
from workflows.models import AccountSettings, JobDefinition


def put_account(
    session: Session,
    settings: AccountSettings,
    *,
    overwrite: bool,
    now: datetime,
    name: str | None = None,
) -> None:
    """Insert the account, or (``overwrite``) update its limits; ``name`` when given."""
    row = session.get(AccountRow, settings.account_id)
    if row is None:
        row = AccountRow(id=settings.account_id, name=settings.account_id, created_at=now)
        session.add(row)
    elif not overwrite:
        return
    if name is not None:
        row.name = name
    row.run_slots = settings.run_slots
    row.run_memory_limit_mb = settings.run_memory_limit_mb
    row.max_queue_wait_seconds = int(settings.max_queue_wait.total_seconds())
    row.settings = settings.model_dump(mode="json")
    row.updated_at = now
    session.flush()


def put_job(
    session: Session,
    definition: JobDefinition,
    *,
    job_id: int | None,
    deactivated: bool,
    extra: Mapping[str, Any] | None,
    now: datetime,
    state: int | None = None,
) -> int:
    """Upsert by store id (when given) or by (account, key); returns the store id.

    ``state``: 1 active, 2 deleted (dbt Cloud's soft delete); None keeps the stored one."""
    account_id, key = definition.account_id, definition.job_id
    # A job saved before its account gets the default limits; saving the account later
    # replaces them.
    put_account(session, AccountSettings(account_id=account_id), overwrite=False, now=now)
    if job_id is not None:
        row = session.get(JobRow, job_id)
        if row is None or row.account_id != account_id:
            raise UnknownJobError(f"job {job_id} of account {account_id!r} does not exist")
        if row.key != key:
            raise InvalidRecordError(f"job {job_id} has key {row.key!r}, not {key!r}")
    else:
        row = session.scalars(
            sa.select(JobRow).where(JobRow.account_id == account_id, JobRow.key == key)
        ).one_or_none()
        if row is None:
            if key.isdigit():
                # str(id) is the key of jobs the store creates: a digit key from outside
                # could collide with a later allocation.
                raise InvalidRecordError(
                    f"job key {key!r}: keys made of digits only are allocated by the store"
                )
            row = JobRow(account_id=account_id, key=key, created_at=now)
            session.add(row)
    _fill(row, definition, deactivated=deactivated, extra=extra, now=now)
    if state is not None:
        row.state = state
    session.flush()
    return row.id


def create_job(
    session: Session, definition: JobDefinition, *, extra: Mapping[str, Any] | None, now: datetime
) -> int:
    """Insert a job keyed by its new id (``key = str(id)``, also written into the definition)."""
    put_account(
        session, AccountSettings(account_id=definition.account_id), overwrite=False, now=now
    )
    # The key is the id, known only after the insert: a unique placeholder until then.
    row = JobRow(
        account_id=definition.account_id, key=f"pending-{secrets.token_hex(16)}", created_at=now
    )
    _fill(row, definition, deactivated=False, extra=extra or {}, now=now)
    session.add(row)
    session.flush()
    row.key = str(row.id)
    row.definition = definition.model_copy(update={"job_id": row.key}).model_dump(mode="json")
    session.flush()
    return row.id


def _fill(
    row: JobRow,
    definition: JobDefinition,
    *,
    deactivated: bool,
    extra: Mapping[str, Any] | None,
    now: datetime,
) -> None:
    row.name = definition.name
    row.job_type = definition.job_type.value
    row.definition = definition.model_dump(mode="json")
    row.deactivated = deactivated
    if extra is not None:
        row.extra = dict(extra)
    elif row.extra is None:
        row.extra = {}
    row.state = row.state or 1
    row.updated_at = now
