"""Initial run store: accounts, jobs, runs, run steps, API tokens.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _json(*, nullable: bool = False) -> sa.types.TypeEngine[Any]:
    return sa.JSON(none_as_null=nullable).with_variant(
        postgresql.JSONB(none_as_null=nullable), "postgresql"
    )


def _ts(name: str, *, nullable: bool = False) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("run_slots", sa.Integer(), nullable=False),
        sa.Column("run_memory_limit_mb", sa.Integer(), nullable=True),
        sa.Column("max_queue_wait_seconds", sa.Integer(), nullable=False),
        sa.Column("settings", _json(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("job_type", sa.String(32), nullable=False),
        sa.Column("definition", _json(), nullable=False),
        sa.Column("extra", _json(), server_default=sa.text("'{}'"), nullable=False),
        sa.Column("deactivated", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("state", sa.SmallInteger(), server_default=sa.text("1"), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_jobs_account_id_accounts"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.UniqueConstraint("account_id", "key", name="uq_jobs_account_id_key"),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("request_key", sa.String(255), nullable=True),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        sa.Column("status_message", sa.Text(), server_default="", nullable=False),
        sa.Column("cause", sa.String(32), nullable=False),
        sa.Column("cause_text", sa.String(255), server_default="", nullable=False),
        sa.Column("trigger", _json(nullable=True), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("dequeued_at", nullable=True),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        sa.Column("git_sha", sa.String(64), nullable=True),
        sa.Column("git_branch", sa.String(255), nullable=True),
        sa.Column("schema_name", sa.String(128), nullable=True),
        sa.Column("dbt_version", sa.String(64), nullable=True),
        sa.Column("artifacts", _json(nullable=True), nullable=True),
        sa.Column("updated_seq", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_runs_account_id_accounts"
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_runs_job_id_jobs"),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        sa.UniqueConstraint("account_id", "key", name="uq_runs_account_id_key"),
        sa.UniqueConstraint("account_id", "request_key", name="uq_runs_account_id_request_key"),
    )
    op.create_index("ix_runs_account_id_job_id", "runs", ["account_id", "job_id"])
    op.create_index("ix_runs_account_id_status", "runs", ["account_id", "status"])
    op.create_table(
        "run_steps",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("argv", _json(), nullable=False),
        sa.Column("status", sa.SmallInteger(), nullable=False),
        _ts("started_at", nullable=True),
        _ts("finished_at", nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("message", sa.Text(), server_default="", nullable=False),
        sa.Column("log_key", sa.String(512), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_run_steps_run_id_runs", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "index", name="pk_run_steps"),
    )
    op.create_table(
        "tokens",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("last_used_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_tokens_account_id_accounts"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_tokens_token_hash"),
    )


def downgrade() -> None:
    op.drop_table("tokens")
    op.drop_table("run_steps")
    op.drop_index("ix_runs_account_id_status", table_name="runs")
    op.drop_index("ix_runs_account_id_job_id", table_name="runs")
    op.drop_table("runs")
    op.drop_table("jobs")
    op.drop_table("accounts")
