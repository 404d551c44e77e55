"""The run store's tables, as SQLAlchemy 2 typed mappings.

This module is the *current* schema. Migrations (``activities/migrations``) never import it:
each revision spells out its own columns, so an old revision keeps meaning what it meant.
``tests/test_store.py`` checks that the migrated database and these mappings agree.

Portability: datetimes are stored in UTC (SQLite keeps no offset, PostgreSQL uses
``timestamptz``) and always come back timezone-aware; JSON is ``JSON`` on SQLite and
``JSONB`` on PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
"""Deterministic constraint names, so a later migration can drop one on every backend."""


class UTCDateTime(sa.TypeDecorator[datetime]):
    """An aware datetime, stored in UTC and always returned aware (UTC).

    A naive datetime is refused: its meaning depends on the writer's clock settings.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} (the run store needs aware ones)")
        utc = value.astimezone(UTC)
        # SQLite has no offsets: store UTC wall time, re-attach UTC on the way out.
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


def json_type(*, nullable: bool = False) -> sa.types.TypeEngine[Any]:
    """JSON on SQLite, JSONB on PostgreSQL. A nullable column stores Python None as SQL NULL."""
    return sa.JSON(none_as_null=nullable).with_variant(
        postgresql.JSONB(none_as_null=nullable), "postgresql"
    )


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


class AccountRow(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    """``AccountSettings.account_id``."""
    name: Mapped[str] = mapped_column(sa.String(255))
    run_slots: Mapped[int] = mapped_column(sa.Integer)
    run_memory_limit_mb: Mapped[int | None] = mapped_column(sa.Integer)
    max_queue_wait_seconds: Mapped[int] = mapped_column(sa.Integer)
    settings: Mapped[Any] = mapped_column(json_type())
    """The full ``AccountSettings``, so limits without a column are not lost."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (sa.UniqueConstraint("account_id", "key"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    """dbt Cloud's ``job_definition_id``, allocated by the store."""
    account_id: Mapped[str] = mapped_column(sa.ForeignKey("accounts.id"))
    key: Mapped[str] = mapped_column(sa.String(64))
    """The string job id Temporal uses (``job:{account}:{key}``)."""
    name: Mapped[str] = mapped_column(sa.String(255))
    job_type: Mapped[str] = mapped_column(sa.String(32))
    definition: Mapped[Any] = mapped_column(json_type())
    """The full ``JobDefinition``."""
    extra: Mapped[Any] = mapped_column(json_type(), server_default=sa.text("'{}'"))
    """dbt Cloud job fields Runslot does not model (description, project_id, ...), echoed back
    by the API so tools that diff what they sent see no change."""
    deactivated: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    state: Mapped[int] = mapped_column(sa.SmallInteger, server_default=sa.text("1"))
    """dbt Cloud's job state: 1 active, 2 deleted (soft delete)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RunRow(Base):
    __tablename__ = "runs"
    __table_args__ = (
        sa.UniqueConstraint("account_id", "key"),
        sa.UniqueConstraint("account_id", "request_key"),
        sa.Index(None, "account_id", "job_id"),
        sa.Index(None, "account_id", "status"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(sa.ForeignKey("accounts.id"))
    job_id: Mapped[int] = mapped_column(sa.ForeignKey("jobs.id"))
    key: Mapped[str] = mapped_column(sa.String(128))
    """The Temporal-level run id (``run:{account}:{key}``)."""
    request_key: Mapped[str | None] = mapped_column(sa.String(255))
    """Idempotency key of the allocation: the same key returns the same run."""
    status: Mapped[int] = mapped_column(sa.SmallInteger)
    status_message: Mapped[str] = mapped_column(sa.Text, server_default="")
    cause: Mapped[str] = mapped_column(sa.String(32))
    cause_text: Mapped[str] = mapped_column(sa.String(255), server_default="")
    trigger: Mapped[Any] = mapped_column(json_type(nullable=True), nullable=True)
    """The ``TriggerRequest`` (cause and overrides), echoed as the API's ``run.trigger``."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    dequeued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    git_sha: Mapped[str | None] = mapped_column(sa.String(64))
    git_branch: Mapped[str | None] = mapped_column(sa.String(255))
    schema_name: Mapped[str | None] = mapped_column(sa.String(128))
    dbt_version: Mapped[str | None] = mapped_column(sa.String(64))
    artifacts: Mapped[Any] = mapped_column(json_type(nullable=True), nullable=True)
    """Artifact paths relative to ``target/`` (the API's artifact list)."""
    updated_seq: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    """The writer's snapshot counter: an older snapshot never overwrites a newer one."""


class RunStepRow(Base):
    __tablename__ = "run_steps"

    run_id: Mapped[int] = mapped_column(
        sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    index: Mapped[int] = mapped_column(sa.Integer, primary_key=True)
    """1-based, as in dbt Cloud's ``run_steps[].index``."""
    name: Mapped[str] = mapped_column(sa.Text)
    argv: Mapped[Any] = mapped_column(json_type())
    status: Mapped[int] = mapped_column(sa.SmallInteger)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    exit_code: Mapped[int | None] = mapped_column(sa.Integer)
    message: Mapped[str] = mapped_column(sa.Text, server_default="")
    log_key: Mapped[str | None] = mapped_column(sa.String(512))
    """Where the artifact store keeps this step's log."""


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(sa.ForeignKey("accounts.id"))
    name: Mapped[str] = mapped_column(sa.String(255))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    """sha256 hex of the token: the plaintext is shown once and never stored."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class EnvironmentRow(Base):
    """A dbt Cloud environment: what a job's ``environment_id`` names (project, target)."""

    __tablename__ = "environments"
    __table_args__ = (sa.UniqueConstraint("account_id", "name"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(sa.ForeignKey("accounts.id"))
    project_id: Mapped[int] = mapped_column(sa.Integer)
    name: Mapped[str] = mapped_column(sa.String(255))
    definition: Mapped[Any] = mapped_column(json_type())
    """``workflows.models.Environment``: secrets appear as references, never values."""
    state: Mapped[int] = mapped_column(sa.SmallInteger, server_default=sa.text("1"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WebhookRow(Base):
    """An outgoing webhook subscription. Its signing secret is derived from the server's
    key (never stored), so the store holds nothing secret."""

    __tablename__ = "webhooks"

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    account_id: Mapped[str] = mapped_column(sa.ForeignKey("accounts.id"))
    name: Mapped[str] = mapped_column(sa.String(255))
    url: Mapped[str] = mapped_column(sa.Text)
    event_types: Mapped[Any] = mapped_column(json_type())
    job_ids: Mapped[Any] = mapped_column(json_type())
    """Store ids of the jobs it is for; empty: every job of the account."""
    active: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.true())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WebhookDeliveryRow(Base):
    """The delivery log: one row per (webhook, event), updated by every attempt."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.UniqueConstraint("webhook_id", "event_id"),
        sa.Index(None, "account_id", "run_id"),
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    webhook_id: Mapped[int] = mapped_column(sa.ForeignKey("webhooks.id", ondelete="CASCADE"))
    account_id: Mapped[str] = mapped_column(sa.String(64))
    event_id: Mapped[str] = mapped_column(sa.String(128))
    event_type: Mapped[str] = mapped_column(sa.String(64))
    run_id: Mapped[int | None] = mapped_column(sa.Integer)
    attempts: Mapped[int] = mapped_column(sa.Integer, server_default=sa.text("0"))
    status_code: Mapped[int | None] = mapped_column(sa.Integer)
    error: Mapped[str] = mapped_column(sa.Text, server_default="")
    succeeded: Mapped[bool] = mapped_column(sa.Boolean, server_default=sa.false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
