"""Writing runs: allocation (idempotent by request key) and monotonic snapshots.

Both run inside one write transaction that ``RunStore`` opens (and repeats once after a
unique violation: a concurrent writer inserted the same key first, and the second attempt
finds its row). Nothing here commits.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from activities.store.errors import InvalidRecordError, UnknownJobError, UnknownRunError
from activities.store.schema import JobRow, RunRow, RunStepRow
from workflows.models import (
    AbandonedRuns,
    RecordRunInput,
    RecordRunResult,
    RunResult,
    RunStatus,
    TriggerRequest,
)

_KNOWN_STATUSES = frozenset(int(status) for status in RunStatus)


def progression(status: int) -> int:
    """Queued 1 < Starting 2 < Running 3 < finished (Success, Error and Cancelled alike)."""
    return status if status < RunStatus.SUCCESS else 4


def should_apply(stored_status: int, stored_seq: int, status: int, seq: int) -> bool:
    """Whether a snapshot (``status``, ``seq``) may overwrite the stored run.

    Progress always wins (the job cancelling a run may write with its own, lower counter);
    a status never moves backwards; a finished status is final (a later, different finish
    is the losing side of a race); within one phase the newer ``seq`` wins, and a retried
    write (same ``seq``) is applied again, harmlessly.
    """
    if stored_status not in _KNOWN_STATUSES:
        return True  # an unreadable stored status: any valid snapshot repairs the row
    before, after = progression(stored_status), progression(status)
    if after != before:
        return after > before
    if stored_status >= RunStatus.SUCCESS and status != stored_status:
        return False
    return seq >= stored_seq


def job_id_for(session: Session, account_id: str, job_key: str) -> int:
    job_id = session.scalar(
        sa.select(JobRow.id).where(JobRow.account_id == account_id, JobRow.key == job_key)
    )
    if job_id is None:
        raise UnknownJobError(f"job {job_key!r} of account {account_id!r} is not in the run store")
    return job_id


def allocate(
    session: Session,
    *,
    account_id: str,
    job_key: str,
    request_key: str,
    trigger: TriggerRequest | None,
    now: datetime,
    abandoned: AbandonedRuns | None = None,
) -> int:
    """The run allocated for ``request_key``, inserting a Queued run the first time.

    With ``abandoned``, the writer's earlier Queued runs it no longer knows are cancelled
    first (see ``AbandonedRuns``).
    """
    if abandoned is not None:
        cancel_abandoned(session, account_id, job_key, abandoned, keep=request_key, now=now)
    existing = session.scalar(
        sa.select(RunRow.id).where(
            RunRow.account_id == account_id, RunRow.request_key == request_key
        )
    )
    if existing is not None:
        return existing
    trigger = trigger or TriggerRequest()
    row = RunRow(
        account_id=account_id,
        job_id=job_id_for(session, account_id, job_key),
        # The key is the id, known only after the insert: a unique placeholder until then.
        key=f"pending-{uuid.uuid4().hex}",
        request_key=request_key,
        status=int(RunStatus.QUEUED),
        status_message="",
        cause=trigger.cause.value,
        cause_text=trigger.cause_text,
        trigger=trigger.model_dump(mode="json"),
        created_at=now,
        updated_at=now,
        updated_seq=0,
    )
    session.add(row)
    session.flush()
    row.key = str(row.id)
    session.flush()
    return row.id


ABANDONED_MESSAGE = (
    "Cancelled: its trigger was never accepted (the request was abandoned, or refused when "
    "it was delivered again), so the job never queued this run."
)


def cancel_abandoned(
    session: Session,
    account_id: str,
    job_key: str,
    abandoned: AbandonedRuns,
    *,
    keep: str,
    now: datetime,
) -> int:
    """Cancel the job's Queued runs allocated under ``abandoned.key_prefix`` that the writer
    does not know (``abandoned.known``), except the one keyed ``keep``. Returns how many."""
    conditions = [
        RunRow.account_id == account_id,
        RunRow.job_id == job_id_for(session, account_id, job_key),
        RunRow.status == int(RunStatus.QUEUED),
        RunRow.request_key.startswith(abandoned.key_prefix, autoescape=True),
        RunRow.request_key != keep,
    ]
    if abandoned.known:
        conditions.append(RunRow.key.not_in(abandoned.known))
    result = session.execute(  # an UPDATE: a CursorResult, which has a rowcount
        sa.update(RunRow)
        .where(*conditions)
        .values(
            status=int(RunStatus.CANCELLED),
            status_message=ABANDONED_MESSAGE,
            finished_at=now,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def record(session: Session, snapshot: RecordRunInput, *, now: datetime) -> RecordRunResult:
    """Insert or update the run keyed by (account, run key), monotonically."""
    run = snapshot.run
    _check_aware(snapshot)
    found = session.execute(
        sa.select(RunRow, JobRow.key)
        .join(JobRow, RunRow.job_id == JobRow.id)
        .where(RunRow.account_id == run.account_id, RunRow.key == run.run_id)
        .with_for_update(of=RunRow)
    ).one_or_none()
    if found is None:
        if run.run_id.isdigit():
            raise UnknownRunError(
                f"run {run.run_id} of account {run.account_id!r} was never allocated "
                "(run ids made of digits only are allocated by the run store)"
            )
        row = RunRow(
            account_id=run.account_id,
            job_id=job_id_for(session, run.account_id, run.job_id),
            key=run.run_id,
            created_at=run.created_at,
            updated_seq=snapshot.seq,
            status=int(run.status),
        )
        _apply(row, snapshot, now)
        session.add(row)
        session.flush()
    else:
        row, job_key = found
        if job_key != run.job_id:
            raise InvalidRecordError(
                f"run {run.run_id!r} belongs to job {job_key!r}, not {run.job_id!r}"
            )
        if not should_apply(row.status, row.updated_seq, int(run.status), snapshot.seq):
            return RecordRunResult(id=row.id, applied=False, status=RunStatus(row.status))
        _apply(row, snapshot, now)
    _write_steps(session, row.id, snapshot)
    return RecordRunResult(id=row.id, applied=True, status=RunStatus(row.status))


def _apply(row: RunRow, snapshot: RecordRunInput, now: datetime) -> None:
    run = snapshot.run
    row.status = int(run.status)
    row.status_message = run.status_message
    row.cause = run.cause.value
    row.updated_at = now
    row.updated_seq = max(row.updated_seq, snapshot.seq)
    if snapshot.trigger is not None:
        row.trigger = snapshot.trigger.model_dump(mode="json")
        row.cause_text = snapshot.trigger.cause_text
    elif row.cause_text is None:
        row.cause_text = ""
    # What a snapshot does not know (None) never erases what an earlier one recorded: the
    # job cancelling a run knows its status, not its start time or commit.
    overrides = snapshot.trigger.overrides if snapshot.trigger is not None else None
    known: dict[str, Any] = {
        "dequeued_at": run.dequeued_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "schema_name": run.schema_name,
        "git_sha": snapshot.git_sha or run.git_sha or (overrides.git_sha if overrides else None),
        "git_branch": snapshot.git_branch or (overrides.git_branch if overrides else None),
        "dbt_version": snapshot.dbt_version or run.dbt_version,
        "artifacts": snapshot.artifacts or _artifact_names(run) or None,
    }
    for name, value in known.items():
        if value is not None:
            setattr(row, name, value)


def _write_steps(session: Session, run_id: int, snapshot: RecordRunInput) -> None:
    """Upsert the snapshot's steps by index; steps it does not mention are kept."""
    if not snapshot.run.steps:
        return
    stored = {
        step.index: step
        for step in session.scalars(sa.select(RunStepRow).where(RunStepRow.run_id == run_id))
    }
    for step in snapshot.run.steps:
        row = stored.get(step.index)
        if row is None:
            row = RunStepRow(run_id=run_id, index=step.index)
            session.add(row)
        row.name = step.name
        row.argv = list(step.argv)
        row.status = int(step.status)
        row.started_at = step.started_at or row.started_at
        row.finished_at = step.finished_at or row.finished_at
        row.exit_code = step.exit_code if step.exit_code is not None else row.exit_code
        row.message = step.message
        row.log_key = step.log_key or snapshot.log_keys.get(step.index, row.log_key)


def _artifact_names(run: RunResult) -> list[str]:
    """The run's artifact names, from its steps (the API lists one set per run)."""
    return sorted({name for step in run.steps for name in step.artifacts})


def _check_aware(snapshot: RecordRunInput) -> None:
    run = snapshot.run
    stamps: dict[str, datetime | None] = {
        "created_at": run.created_at,
        "dequeued_at": run.dequeued_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }
    for step in run.steps:
        stamps[f"steps[{step.index}].started_at"] = step.started_at
        stamps[f"steps[{step.index}].finished_at"] = step.finished_at
    naive = [
        name for name, value in stamps.items() if value is not None and value.utcoffset() is None
    ]
    if naive:
        raise InvalidRecordError(f"naive datetimes in run {run.run_id!r}: {', '.join(naive)}")
