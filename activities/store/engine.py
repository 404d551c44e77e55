"""The store's SQLAlchemy engine: SQLite (the default, one file) or PostgreSQL (production).

SQLite is set up for several processes sharing one file (the API and the workers): WAL, a
busy timeout, foreign keys on, and ``BEGIN IMMEDIATE`` for write transactions, so a writer
waits for the lock up front instead of failing when it upgrades a read lock mid-transaction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.pool import ConnectionPoolEntry

WRITE = "runslot_write"
"""Execution option: this connection's next transaction writes (SQLite: BEGIN IMMEDIATE)."""

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Unreadable:
    """What a JSON column holds when its text is not JSON (SQLite only: JSONB refuses it).

    Reading the row then quarantines it instead of failing the whole query.
    """

    error: str


def _loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        return Unreadable(str(err))


def create_store_engine(url: str | sa.URL) -> sa.Engine:
    """An engine for the run store at ``url`` (``sqlite:///path`` or ``postgresql+psycopg://``)."""
    url = sa.make_url(url)
    if url.get_backend_name() == "sqlite":
        engine = sa.create_engine(
            url,
            json_deserializer=_loads,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
        )
        _configure_sqlite(engine, in_memory=url.database in (None, "", ":memory:"))
        return engine
    # pre-ping: a long-lived worker survives a database restart without a failed activity.
    return sa.create_engine(url, json_deserializer=_loads, pool_pre_ping=True)


def _configure_sqlite(engine: sa.Engine, *, in_memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Take transaction control away from the sqlite3 module (it would BEGIN lazily and
        # DEFERRED); the "begin" hook below emits the right BEGIN instead.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA foreign_keys=ON")
            if not in_memory:
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        write = bool(conn.get_execution_options().get(WRITE, False))
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
