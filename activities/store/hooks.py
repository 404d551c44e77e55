"""Environments and outgoing webhooks: rows the API and the webhook activity write.

Like the rest of the store, nothing here commits: ``RunStore`` opens the transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from activities.store.errors import UnknownAccountError
from activities.store.schema import AccountRow, EnvironmentRow, WebhookDeliveryRow, WebhookRow
from workflows.models import Environment


def _account_exists(session: Session, account_id: str) -> None:
    if session.get(AccountRow, account_id) is None:
        raise UnknownAccountError(f"account {account_id!r} is not in the run store")


def put_environment(
    session: Session,
    account_id: str,
    name: str,
    environment: Environment,
    *,
    project_id: int,
    now: datetime,
) -> int:
    """Create or replace the account's environment called ``name``; returns its id."""
    _account_exists(session, account_id)
    row = session.scalars(
        sa.select(EnvironmentRow).where(
            EnvironmentRow.account_id == account_id, EnvironmentRow.name == name
        )
    ).one_or_none()
    if row is None:
        row = EnvironmentRow(account_id=account_id, name=name, created_at=now, state=1)
        session.add(row)
    row.project_id = project_id
    row.definition = environment.model_dump(mode="json")
    row.updated_at = now
    session.flush()
    return row.id


def add_webhook(
    session: Session,
    account_id: str,
    *,
    name: str,
    url: str,
    event_types: Sequence[str],
    job_ids: Sequence[int],
    now: datetime,
) -> int:
    _account_exists(session, account_id)
    row = WebhookRow(
        account_id=account_id,
        name=name,
        url=url,
        event_types=sorted(set(event_types)),
        job_ids=sorted(set(job_ids)),
        active=True,
        created_at=now,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    return row.id


def record_attempt(
    session: Session,
    *,
    webhook_id: int,
    account_id: str,
    event_id: str,
    event_type: str,
    run_id: int | None,
    status_code: int | None,
    error: str,
    succeeded: bool,
    now: datetime,
) -> int:
    """Count one delivery attempt of an event; returns the attempts so far.

    Keyed by (webhook, event): a retried attempt updates the same row. Once an event has
    been delivered, a late failure of a duplicate attempt does not unmark it.
    """
    row = session.scalars(
        sa.select(WebhookDeliveryRow)
        .where(WebhookDeliveryRow.webhook_id == webhook_id, WebhookDeliveryRow.event_id == event_id)
        .with_for_update()
    ).one_or_none()
    if row is None:
        row = WebhookDeliveryRow(
            webhook_id=webhook_id,
            account_id=account_id,
            event_id=event_id,
            event_type=event_type,
            run_id=run_id,
            attempts=0,
            succeeded=False,
            created_at=now,
        )
        session.add(row)
    row.attempts += 1
    row.updated_at = now
    if not row.succeeded:
        row.status_code, row.error, row.succeeded = status_code, error, succeeded
    session.flush()
    return row.attempts
