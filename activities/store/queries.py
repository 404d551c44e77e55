"""Read queries shared by the listings: ordering, paging, counting, steps of runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVarTuple

import sqlalchemy as sa
from sqlalchemy.orm import Session

from activities.store.schema import JobRow, RunRow, RunStepRow

Ts = TypeVarTuple("Ts")

MAX_PAGE = 1000

RUN_ORDER: Mapping[str, sa.ColumnElement[Any]] = {
    "id": RunRow.id.expression,
    "created_at": RunRow.created_at.expression,
    "updated_at": RunRow.updated_at.expression,
    "started_at": RunRow.started_at.expression,
    "finished_at": RunRow.finished_at.expression,
    "status": RunRow.status.expression,
}
JOB_ORDER: Mapping[str, sa.ColumnElement[Any]] = {
    "id": JobRow.id.expression,
    "name": JobRow.name.expression,
    "created_at": JobRow.created_at.expression,
    "updated_at": JobRow.updated_at.expression,
}


def runs_with_job_key(account_id: str) -> sa.Select[RunRow, str]:
    return (
        sa.select(RunRow, JobRow.key)
        .join(JobRow, RunRow.job_id == JobRow.id)
        .where(RunRow.account_id == account_id)
    )


def count(session: Session, query: sa.Select[*Ts]) -> int:
    counted = sa.select(sa.func.count()).select_from(query.order_by(None).subquery())
    return session.scalar(counted) or 0


def page(
    query: sa.Select[*Ts],
    columns: Mapping[str, sa.ColumnElement[Any]],
    *,
    order_by: str,
    limit: int,
    offset: int,
) -> sa.Select[*Ts]:
    """Ordered by ``field`` or ``-field`` (NULLs last both ways, ties by id) and paged."""
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise ValueError(f"limit must be 1..{MAX_PAGE} and offset >= 0 (got {limit}, {offset})")
    descending = order_by.startswith("-")
    name = order_by.removeprefix("-")
    if name not in columns:
        raise ValueError(f"cannot order by {name!r}; use one of {', '.join(columns)}")
    column, tie = columns[name], columns["id"]
    ordered = column.desc() if descending else column.asc()
    # Without a unique tie-break, rows with equal keys could repeat or vanish across pages.
    return (
        query.order_by(ordered.nulls_last(), tie.desc() if descending else tie.asc())
        .limit(limit)
        .offset(offset)
    )


def steps_of(session: Session, run_ids: list[int]) -> dict[int, list[RunStepRow]]:
    by_run: dict[int, list[RunStepRow]] = {}
    if run_ids:
        query = sa.select(RunStepRow).where(RunStepRow.run_id.in_(run_ids))
        for step in session.scalars(query):
            by_run.setdefault(step.run_id, []).append(step)
    return by_run
