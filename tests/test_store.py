"""The run store on real databases: a SQLite file and a PostgreSQL server.

PostgreSQL comes from ``RUNSLOT_TEST_POSTGRES_URL`` or from a throwaway cluster built with
Debian's binaries (package ``postgresql``; ``.ci/run`` installs it). Without either, the
PostgreSQL cases fail under CI (``CI=true``) and are skipped elsewhere, saying why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.store import (
    InvalidRecordError,
    RerunRefusedError,
    RunStore,
    StoreActivities,
    UnknownJobError,
    UnknownRunError,
)
from activities.store import migrate as migrations
from activities.store.runs import should_apply
from activities.store.schema import Base
from tests.store_fixtures import (
    POSTGRES_URL_ENV,
    REVISION_COLUMNS,
    T0,
    find_initdb,
    job_definition,
    snapshot,
    throwaway_cluster,
)
from workflows.models import (
    AbandonedRuns,
    AccountSettings,
    AllocateRunInput,
    CompletionTrigger,
    Environment,
    JobTriggers,
    RecordRunInput,
    RunStatus,
    TriggerCause,
    TriggerOverrides,
    TriggerRequest,
    UpsertJobInput,
)

TABLES = {
    "accounts", "jobs", "runs", "run_steps", "tokens", "environments", "webhooks",
    "webhook_deliveries",
}  # fmt: skip
Q, S, R = RunStatus.QUEUED, RunStatus.STARTING, RunStatus.RUNNING
OK, ERR, CANCEL = RunStatus.SUCCESS, RunStatus.ERROR, RunStatus.CANCELLED


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str | None]:
    """A PostgreSQL URL for the session, or None when no server can be had here."""
    if url := os.environ.get(POSTGRES_URL_ENV):
        yield url
        return
    initdb = find_initdb()
    if initdb is None:
        yield None
        return
    with throwaway_cluster(initdb) as url:
        yield url


def _postgres_or_skip(server: str | None) -> str:
    if server is None:
        reason = (
            f"PostgreSQL is not available: set {POSTGRES_URL_ENV} or install Debian's "
            "postgresql package (initdb under /usr/lib/postgresql/*/bin)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must test the run store on PostgreSQL")
        pytest.skip(reason)
    return server


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh schema on the session's server, as the search path of the returned URL."""
    server = _postgres_or_skip(request.getfixturevalue("postgres_server"))
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
        url = sa.make_url(server).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    finally:
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runslot.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def bare_store(db_url: str) -> Iterator[RunStore]:
    """A store on an empty database (not migrated)."""
    store = RunStore(db_url)
    yield store
    store.close()


@pytest.fixture
def store(bare_store: RunStore) -> RunStore:
    """A migrated store with account ``acme`` and its job ``daily``."""
    bare_store.migrate()
    bare_store.upsert_account(AccountSettings(account_id="acme", run_slots=2))
    bare_store.upsert_job(job_definition())
    return bare_store


def _tables(store: RunStore) -> set[str]:
    return set(sa.inspect(store.engine).get_table_names()) - {"alembic_version"}


def _count(store: RunStore, sql: str, **params: Any) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.text(sql), params).scalar_one())


def _execute(store: RunStore, sql: str, **params: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text(sql), params)


# --------------------------------------------------------------------------- migrations


def test_migrations_go_up_down_and_up_again(bare_store: RunStore) -> None:
    assert migrations.current(bare_store.engine) is None
    bare_store.migrate()
    bare_store.migrate()  # already at head: a no-op
    assert migrations.current(bare_store.engine) == migrations.head()
    assert _tables(bare_store) == TABLES

    bare_store.downgrade("base")
    assert migrations.current(bare_store.engine) is None
    assert _tables(bare_store) == set()

    bare_store.migrate()
    assert _tables(bare_store) == TABLES
    bare_store.upsert_account(AccountSettings(account_id="acme"))
    assert bare_store.upsert_job(job_definition()) == 1


def test_concurrent_migrations_do_not_collide(bare_store: RunStore) -> None:
    # An API process and a worker starting together both migrate the same database.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: bare_store.migrate(), range(4)))
    assert migrations.current(bare_store.engine) == migrations.head()


def test_migrated_schema_matches_the_models(bare_store: RunStore) -> None:
    bare_store.migrate()
    with bare_store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_every_revision_has_a_frozen_column_snapshot() -> None:
    assert list(REVISION_COLUMNS) == migrations.revisions(), (
        "freeze the columns of each new revision in tests/store_fixtures.py REVISION_COLUMNS"
    )


def test_the_head_snapshot_is_what_the_models_read() -> None:
    models = {t.name: tuple(c.name for c in t.columns) for t in Base.metadata.sorted_tables}
    assert REVISION_COLUMNS[migrations.head()] == models


@pytest.mark.parametrize("revision", list(REVISION_COLUMNS))
def test_an_earlier_release_can_read_and_insert_into_the_migrated_schema(
    store: RunStore, revision: str
) -> None:
    """Expand/contract: the schema at head still serves the queries of every release."""
    run_id = store.allocate_run("acme", "daily", "req-1")
    store.record_run(snapshot(str(run_id), R, seq=1, steps=1))
    store.create_token("acme", "ci")
    store.put_environment("acme", "prod", Environment(project_dir="sample/jaffle"))
    hook = store.create_webhook("acme", name="ops", url="https://x", event_types=["a"])
    store.record_delivery_attempt(
        webhook_id=hook, account_id="acme", event_id="e", event_type="a", run_id=run_id,
        status_code=500, succeeded=False,
    )  # fmt: skip
    columns = REVISION_COLUMNS[revision]
    with store.engine.connect() as conn:
        for table, names in columns.items():
            query: sa.Select[Any] = sa.select(sa.table(table, *(sa.column(n) for n in names)))
            assert len(conn.execute(query).all()) > 0, (
                f"release {revision} reads nothing from {table}"
            )
    # Columns added after that release must be optional: its inserts leave them out.
    inspector = sa.inspect(store.engine)
    for table, names in columns.items():
        for column in inspector.get_columns(table):
            if column["name"] not in names:
                assert column["nullable"] or column.get("default") is not None, (
                    f"{table}.{column['name']} is required, so release {revision} cannot insert"
                )


# --------------------------------------------------------------------------- jobs and accounts


def test_upsert_job_allocates_one_id_per_key(store: RunStore) -> None:
    first = store.upsert_job(job_definition("hourly", name="Hourly"))
    assert store.upsert_job(job_definition("hourly", name="Hourly, renamed")) == first
    assert store.upsert_job(job_definition("hourly"), first) == first
    job = store.get_job_by_key("acme", "hourly")
    assert job is not None and job.id == first and job.name == "Daily"
    assert _count(store, "SELECT count(*) FROM jobs WHERE key = 'hourly'") == 1


def test_upsert_job_is_safe_under_concurrent_saves(store: RunStore) -> None:
    barrier = threading.Barrier(10)

    def save(_: int) -> int:
        barrier.wait()
        return store.upsert_job(job_definition("nightly", account_id="newco"))

    with ThreadPoolExecutor(10) as pool:
        ids = set(pool.map(save, range(10)))
    assert len(ids) == 1
    assert _count(store, "SELECT count(*) FROM jobs WHERE account_id = 'newco'") == 1


def test_a_job_saved_before_its_account_gets_default_limits_until_the_account_is_saved(
    store: RunStore,
) -> None:
    store.upsert_job(job_definition("x", account_id="later"))
    account = store.get_account("later")
    assert account is not None and account.run_slots == 1
    store.upsert_account(AccountSettings(account_id="later", run_slots=5))
    store.upsert_job(job_definition("x", account_id="later"))  # must not reset the limits
    account = store.get_account("later")
    assert account is not None and account.run_slots == 5
    assert account.max_queue_wait_seconds == 3600


def test_saving_a_job_reactivates_it_and_keeps_its_api_fields(store: RunStore) -> None:
    job_id = store.upsert_job(job_definition(), deactivated=True, extra={"description": "d"})
    job = store.get_job("acme", job_id)
    assert job is not None and job.deactivated and job.extra == {"description": "d"}
    store.upsert_job(job_definition())
    job = store.get_job("acme", job_id)
    assert job is not None and not job.deactivated and job.extra == {"description": "d"}


def test_create_job_keys_the_job_by_its_new_id(store: RunStore) -> None:
    job_id = store.create_job(job_definition("ignored"))
    job = store.get_job("acme", job_id)
    assert job is not None
    assert job.key == str(job_id) == job.definition.job_id


def test_numeric_job_keys_are_reserved_for_the_store(store: RunStore) -> None:
    with pytest.raises(InvalidRecordError, match="digits only"):
        store.upsert_job(job_definition("42"))


def test_list_jobs_hides_deleted_jobs_and_filters_by_name(store: RunStore) -> None:
    for key in ("a", "b", "c"):
        store.upsert_job(job_definition(key, name=f"Nightly {key.upper()}"))
    b = store.get_job_by_key("acme", "b")
    assert b is not None and store.set_job_state("acme", b.id, 2)
    assert [j.key for j in store.list_jobs("acme").items] == ["daily", "a", "c"]
    assert store.list_jobs("acme", state=None).total_count == 4
    page = store.list_jobs("acme", name_contains="nightly", order_by="-name")
    assert [j.name for j in page.items] == ["Nightly C", "Nightly A"]
    assert store.list_jobs("acme", name_contains="50%_").total_count == 0


# --------------------------------------------------------------------------- allocation


def test_allocate_run_is_idempotent_under_retries(store: RunStore) -> None:
    trigger = TriggerRequest(cause=TriggerCause.API, cause_text="from the API")
    ids = {store.allocate_run("acme", "daily", "req-1", trigger=trigger) for _ in range(3)}
    assert len(ids) == 1
    run_id = ids.pop()
    run = store.get_run("acme", run_id)
    assert run is not None
    assert (run.key, run.status, run.cause_text) == (str(run_id), Q, "from the API")
    assert store.allocate_run("acme", "daily", "req-2") != run_id
    assert _count(store, "SELECT count(*) FROM runs") == 2


def test_allocate_run_under_20_concurrent_same_key_calls_returns_one_id(store: RunStore) -> None:
    barrier = threading.Barrier(20)

    def allocate(_: int) -> int:
        barrier.wait()
        return store.allocate_run("acme", "daily", "same-key")

    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(allocate, range(20)))
    assert len(set(ids)) == 1
    assert _count(store, "SELECT count(*) FROM runs WHERE request_key = 'same-key'") == 1


def test_allocate_run_cancels_the_callers_abandoned_queued_runs(store: RunStore) -> None:
    # wf:1 was allocated and queued; wf:2 was allocated by a workflow task that never
    # completed (the job does not know it); wf:3 got a slot; other:1 is another writer's.
    ids = {key: store.allocate_run("acme", "daily", key) for key in ("wf:1", "wf:2", "wf:3")}
    other = store.allocate_run("acme", "daily", "other:1")
    assert store.record_run(snapshot(str(ids["wf:3"]), S, seq=1)).applied
    known = AbandonedRuns(key_prefix="wf:", known=[str(ids["wf:1"]), str(ids["wf:3"])])

    new = store.allocate_run("acme", "daily", "wf:4", abandoned=known)

    statuses = {
        key: store.get_run("acme", run_id) for key, run_id in {**ids, "other:1": other}.items()
    }
    assert {key: run.status for key, run in statuses.items() if run} == {
        "wf:1": Q,
        "wf:2": CANCEL,
        "wf:3": S,
        "other:1": Q,
    }
    abandoned = statuses["wf:2"]
    assert abandoned is not None and "never accepted" in abandoned.status_message
    assert abandoned.finished_at is not None
    # The new run is kept, and a retried allocation returns it again.
    assert store.allocate_run("acme", "daily", "wf:4", abandoned=known) == new
    run = store.get_run("acme", new)
    assert run is not None and run.status == Q


def test_allocate_run_recovers_from_a_lost_insert_race(postgres_url: str) -> None:
    """PostgreSQL only: SQLite writers are serialized (BEGIN IMMEDIATE), so no race there."""
    first, rival = RunStore(postgres_url), RunStore(postgres_url)
    try:
        first.migrate()
        first.upsert_job(job_definition())
        raced: list[int] = []

        @sa.event.listens_for(first.engine, "before_cursor_execute")
        def _rival_inserts_first(*args: Any) -> None:
            # After `first` looked the key up and found nothing, before its INSERT: the
            # rival allocates the same key and commits.
            if str(args[2]).startswith("INSERT INTO runs") and not raced:
                raced.append(rival.allocate_run("acme", "daily", "contested"))

        run_id = first.allocate_run("acme", "daily", "contested")
        assert raced == [run_id]
        assert _count(first, "SELECT count(*) FROM runs") == 1
    finally:
        first.close()
        rival.close()


def test_allocate_run_for_an_unknown_job_fails_clearly(store: RunStore) -> None:
    with pytest.raises(UnknownJobError, match="'nope'"):
        store.allocate_run("acme", "nope", "req-1")


# --------------------------------------------------------------------------- run snapshots


@pytest.mark.parametrize(
    ("stored", "stored_seq", "incoming", "seq", "applies"),
    [
        (Q, 0, R, 0, True),
        (R, 3, OK, 1, True),  # progress wins over another writer's lower counter
        (OK, 5, R, 9, False),  # never backwards
        (OK, 5, CANCEL, 9, False),  # the first finish is final
        (OK, 5, OK, 6, True),  # more detail about the same finish
        (R, 5, R, 4, False),  # an older snapshot of the same phase
        (R, 5, R, 5, True),  # a retry of the same snapshot
        (99, 5, R, 0, True),  # an unreadable stored status is repaired
    ],
    ids=[
        "queued-to-running", "progress-with-lower-seq", "running-after-success",
        "cancel-after-success", "same-finish-newer-seq", "older-seq", "retry", "repair",
    ],
)  # fmt: skip
def test_should_apply(stored: int, stored_seq: int, incoming: int, seq: int, applies: bool) -> None:
    assert should_apply(stored, stored_seq, incoming, seq) is applies


def test_record_run_is_monotonic(store: RunStore) -> None:
    run_id = store.allocate_run("acme", "daily", "req-1")
    key = str(run_id)
    assert store.record_run(snapshot(key, S, seq=1)).applied
    assert store.record_run(snapshot(key, R, seq=2, steps=1)).applied
    assert store.record_run(snapshot(key, R, seq=3, steps=2)).applied
    done = store.record_run(snapshot(key, OK, seq=4, steps=2, message="done"))
    assert (done.id, done.applied, done.status) == (run_id, True, OK)

    stale = [
        snapshot(key, R, seq=3, steps=2),  # a delayed retry of an earlier write
        snapshot(key, R, seq=9, steps=2),  # a later seq cannot move the status backwards
        snapshot(key, CANCEL, seq=9, message="too late"),  # nor change the finish
    ]
    for write in stale:
        result = store.record_run(write)
        assert (result.applied, result.status) == (False, OK)
    run = store.get_run("acme", run_id)
    assert run is not None
    assert (run.status, run.status_message, run.updated_seq) == (OK, "done", 4)
    assert [s.status for s in run.steps] == [OK, OK]
    assert _count(store, "SELECT count(*) FROM runs") == 1


def test_record_run_inserts_a_run_the_store_did_not_allocate(store: RunStore) -> None:
    first = store.record_run(snapshot("daily-1", R, seq=1, steps=1))
    again = store.record_run(snapshot("daily-1", R, seq=1, steps=1))
    assert first.id == again.id and again.applied
    run = store.get_run_by_key("acme", "daily-1")
    assert run is not None and run.request_key is None and run.job_key == "daily"
    assert _count(store, "SELECT count(*) FROM run_steps") == 1


def test_record_run_keeps_what_a_snapshot_does_not_know(store: RunStore) -> None:
    running = snapshot("daily-1", R, seq=2, steps=2)
    running.git_sha = "abc1234"
    running.log_keys = {1: "acme/daily-1/1.log"}
    store.record_run(running)
    # The job cancelling the run knows its status, not its steps, commit or start time.
    cancel = RecordRunInput.model_validate(
        {"run": {**snapshot("daily-1", CANCEL).run.model_dump(), "started_at": None}}
    )
    assert store.record_run(cancel).applied
    run = store.get_run_by_key("acme", "daily-1")
    assert run is not None
    assert run.status == CANCEL and run.git_sha == "abc1234"
    assert run.started_at == T0 + timedelta(seconds=5)
    assert [(s.index, s.log_key) for s in run.steps] == [(1, "acme/daily-1/1.log"), (2, None)]
    assert run.updated_seq == 2


def test_record_run_refuses_an_unallocated_numeric_run_id(store: RunStore) -> None:
    with pytest.raises(UnknownRunError, match="never allocated"):
        store.record_run(snapshot("999", R))


def test_record_run_refuses_a_run_key_of_another_job(store: RunStore) -> None:
    store.upsert_job(job_definition("other"))
    store.record_run(snapshot("daily-1", R))
    with pytest.raises(InvalidRecordError, match="belongs to job 'daily'"):
        store.record_run(snapshot("daily-1", OK, job_key="other"))


def test_datetimes_are_stored_in_utc_and_come_back_aware(store: RunStore) -> None:
    paris = timezone(timedelta(hours=2))
    store.record_run(snapshot("daily-1", OK, steps=1, created_at=T0.astimezone(paris)))
    run = store.get_run_by_key("acme", "daily-1")
    assert run is not None
    for value in (run.created_at, run.finished_at, run.updated_at, run.steps[0].started_at):
        assert value is not None and value.utcoffset() == timedelta(0)
    assert run.created_at == T0


def test_naive_datetimes_are_refused(store: RunStore) -> None:
    naive = snapshot("daily-1", R, created_at=datetime(2026, 3, 1, 12, 0))
    with pytest.raises(InvalidRecordError, match="naive datetimes"):
        store.record_run(naive)


def test_git_fields_default_to_the_trigger_overrides(store: RunStore) -> None:
    write = snapshot("daily-1", Q)
    write.trigger = TriggerRequest(
        cause_text="PR", overrides=TriggerOverrides(git_sha="abcdef1", git_branch="feature")
    )
    store.record_run(write)
    run = store.get_run_by_key("acme", "daily-1")
    assert run is not None
    assert (run.git_sha, run.git_branch, run.cause_text) == ("abcdef1", "feature", "PR")
    assert run.trigger is not None and run.trigger.overrides.git_branch == "feature"


def test_rerun_plan_names_the_failed_step_and_the_commit(store: RunStore) -> None:
    run_id = str(store.allocate_run("acme", "daily", "req-1"))
    failed = snapshot(run_id, ERR, steps=2)
    failed.run.steps[1].status = ERR
    failed.run.git_sha = "abcdef1"
    store.record_run(failed)
    plan = store.rerun_plan("acme", "daily", run_id)
    assert (plan.failed_step, plan.failed_argv) == (2, ["dbt", "run", "-s", "step2"])
    assert plan.git_sha == "abcdef1" and plan.steps_override is None


def test_rerun_plan_refuses_runs_that_did_not_fail_or_are_not_the_jobs(store: RunStore) -> None:
    run_id = str(store.allocate_run("acme", "daily", "req-1"))
    store.record_run(snapshot(run_id, OK, steps=1))
    with pytest.raises(RerunRefusedError, match="ended Success: only a failed"):
        store.rerun_plan("acme", "daily", run_id)
    store.upsert_job(job_definition("hourly"))
    with pytest.raises(RerunRefusedError, match="is not a run of job hourly"):
        store.rerun_plan("acme", "hourly", run_id)
    with pytest.raises(RerunRefusedError, match="run 404 is not a run"):
        store.rerun_plan("acme", "daily", "404")


def test_dependent_jobs_are_found_from_the_saved_definitions(store: RunStore) -> None:
    after = job_definition("after").model_copy(
        update={"triggers": JobTriggers(on_job_completion=[CompletionTrigger(job_id="daily")])}
    )
    store.upsert_job(after)
    store.upsert_job(job_definition("other"))
    other_account = after.model_copy(update={"account_id": "globex"})
    store.upsert_job(other_account)
    assert store.dependent_jobs("acme", "daily") == ["after"]
    assert store.dependent_jobs("acme", "after") == []
    deleted = store.get_job_by_key("acme", "after")
    assert deleted is not None and store.set_job_state("acme", deleted.id, 2)
    assert store.dependent_jobs("acme", "daily") == [], "deleted jobs are not triggered"


def test_dependent_jobs_see_saves_made_through_another_store(store: RunStore) -> None:
    # The graph is cached per account; a save by another process (the API, another worker)
    # must still be seen by the next call.
    other = RunStore(store.engine.url)
    try:
        assert store.dependent_jobs("acme", "daily") == []
        chained = job_definition("after").model_copy(
            update={"triggers": JobTriggers(on_job_completion=[CompletionTrigger(job_id="daily")])}
        )
        other.upsert_job(chained)
        assert store.dependent_jobs("acme", "daily") == ["after"]
        other.upsert_job(job_definition("after"))  # the dependency is removed
        assert store.dependent_jobs("acme", "daily") == []
    finally:
        other.close()


def test_environments_keep_their_id_when_replaced_and_stay_in_their_account(
    store: RunStore,
) -> None:
    first = store.put_environment("acme", "prod", Environment(project_dir="a"), project_id=3)
    again = store.put_environment("acme", "prod", Environment(project_dir="b"), project_id=3)
    assert first == again
    env = store.get_environment("acme", first)
    assert env is not None and env.definition.project_dir == "b" and env.project_id == 3
    store.upsert_account(AccountSettings(account_id="globex"))
    assert store.get_environment("globex", first) is None
    assert [e.name for e in store.list_environments("acme", project_id=3)] == ["prod"]
    assert store.list_environments("acme", project_id=4) == []


def test_webhooks_match_events_and_jobs_and_log_each_delivery_once(store: RunStore) -> None:
    assert not store.has_active_webhooks("acme")
    every = store.create_webhook(
        "acme", name="all", url="https://a", event_types=["job.run.completed"]
    )
    assert store.has_active_webhooks("acme") and not store.has_active_webhooks("globex")
    one = store.create_webhook(
        "acme", name="one", url="https://b", event_types=["job.run.errored"], job_ids=[7]
    )
    assert [h.id for h in store.webhooks_for("acme", "job.run.completed", 1)] == [every]
    assert [h.id for h in store.webhooks_for("acme", "job.run.errored", 7)] == [one]
    assert store.webhooks_for("acme", "job.run.errored", 8) == []
    assert store.set_webhook_active("acme", every, False)
    assert store.webhooks_for("acme", "job.run.completed", 1) == []
    assert store.has_active_webhooks("acme"), "one is still active"
    assert store.set_webhook_active("acme", one, False)
    assert not store.has_active_webhooks("acme")
    assert store.set_webhook_active("acme", one, True)

    def attempt(status_code: int | None, succeeded: bool, error: str = "") -> int:
        return store.record_delivery_attempt(
            webhook_id=one, account_id="acme", event_id="errored:5",
            event_type="job.run.errored", run_id=5, status_code=status_code, error=error,
            succeeded=succeeded,
        )  # fmt: skip

    attempt(503, False, "busy")
    assert attempt(200, True) == 2
    # A late failure of a duplicate attempt does not unmark a delivered event.
    attempt(None, False, "timeout")
    [logged] = store.list_deliveries("acme")
    assert (logged.attempts, logged.status_code, logged.succeeded) == (3, 200, True)


# --------------------------------------------------------------------------- listing


def test_list_runs_pages_filters_and_counts(store: RunStore) -> None:
    store.upsert_job(job_definition("hourly"))
    statuses = [OK, ERR, CANCEL, R, Q]
    for i in range(25):
        job = "daily" if i % 2 == 0 else "hourly"
        store.record_run(
            snapshot(f"run-{i:02d}", statuses[i % 5], job_key=job, created_at=T0 + timedelta(i))
        )
    pages = [store.list_runs("acme", limit=10, offset=offset) for offset in (0, 10, 20, 30)]
    assert [len(p.items) for p in pages] == [10, 10, 5, 0]
    assert {p.total_count for p in pages} == {25}
    assert [r.key for p in pages for r in p.items] == [f"run-{i:02d}" for i in range(25)]

    daily = store.get_job_by_key("acme", "daily")
    assert daily is not None
    assert store.list_runs("acme", job_id=daily.id).total_count == 13
    assert store.list_runs("acme", job_key="hourly").total_count == 12
    assert store.list_runs("acme", status=OK).total_count == 5
    assert store.list_runs("acme", status=[Q, S, R]).total_count == 10
    finished = store.list_runs("acme", job_key="daily", status={OK, ERR}, order_by="-id")
    assert [r.key for r in finished.items] == ["run-20", "run-16", "run-10", "run-06", "run-00"]
    assert store.list_runs("other-account").total_count == 0


def test_list_runs_orders_unfinished_runs_last(store: RunStore) -> None:
    store.record_run(snapshot("a", OK, created_at=T0 + timedelta(hours=1)))
    store.record_run(snapshot("b", R))
    store.record_run(snapshot("c", ERR, created_at=T0))
    for order, expected in (("finished_at", "cab"), ("-finished_at", "acb")):
        assert "".join(r.key for r in store.list_runs("acme", order_by=order).items) == expected


def test_list_runs_includes_steps_on_request(store: RunStore) -> None:
    store.record_run(snapshot("a", R, steps=2))
    assert store.list_runs("acme").items[0].steps == []
    steps = store.list_runs("acme", include_steps=True).items[0].steps
    assert [s.index for s in steps] == [1, 2]


def test_list_runs_refuses_bad_paging(store: RunStore) -> None:
    with pytest.raises(ValueError, match="cannot order by"):
        store.list_runs("acme", order_by="-secret")
    with pytest.raises(ValueError, match="limit"):
        store.list_runs("acme", limit=0)


# --------------------------------------------------------------------------- tokens


def test_tokens_are_stored_as_sha256_only(store: RunStore, db_url: str) -> None:
    token = store.create_token("acme", "ci")
    assert store.account_for_token(token) == "acme"
    assert store.account_for_token(token + "x") is None
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert _count(store, "SELECT count(*) FROM tokens WHERE token_hash = :h", h=digest) == 1
    with store.engine.connect() as conn:
        for row in conn.execute(sa.text("SELECT * FROM tokens")):
            assert token not in " ".join(str(value) for value in row)
    if db_url.startswith("sqlite"):
        path = Path(sa.make_url(db_url).database or "")
        store.close()
        files = list(path.parent.glob(path.name + "*"))  # the database, its WAL and shm
        assert files
        assert digest.encode() in b"".join(f.read_bytes() for f in files)
        for file in files:
            assert token.encode() not in file.read_bytes(), file.name


def test_using_a_token_records_when_it_was_last_used(store: RunStore) -> None:
    token = store.create_token("acme", "ci")
    sql = "SELECT count(*) FROM tokens WHERE last_used_at IS NOT NULL"
    assert _count(store, sql) == 0
    store.account_for_token(token)
    assert _count(store, sql) == 1


# --------------------------------------------------------------------------- quarantine


CORRUPTIONS = {
    "trigger-not-a-trigger": "UPDATE runs SET trigger = '{\"cause\": \"bogus\"}' WHERE key = 'bad'",
    "unknown-status-code": "UPDATE runs SET status = 99 WHERE key = 'bad'",
    "step-argv-not-a-list": "UPDATE run_steps SET argv = '{\"a\": 1}' WHERE run_id = "
    "(SELECT id FROM runs WHERE key = 'bad')",
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_run_is_quarantined_not_fatal(
    store: RunStore, corruption: str, caplog: pytest.LogCaptureFixture
) -> None:
    _check_quarantine_of_one_bad_run(store, CORRUPTIONS[corruption], caplog)


def test_json_text_that_is_not_json_is_quarantined(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite only: PostgreSQL's jsonb refuses such text, so it cannot be stored there."""
    store = RunStore(f"sqlite:///{tmp_path / 'runslot.db'}")
    try:
        store.migrate()
        store.upsert_job(job_definition())
        corrupt = "UPDATE runs SET trigger = '{not json' WHERE key = 'bad'"
        _check_quarantine_of_one_bad_run(store, corrupt, caplog)
    finally:
        store.close()


def _check_quarantine_of_one_bad_run(
    store: RunStore, corrupt: str, caplog: pytest.LogCaptureFixture
) -> None:
    for key in ("good-1", "bad", "good-2"):
        write = snapshot(key, OK, steps=1)
        write.trigger = TriggerRequest()
        store.record_run(write)
    _execute(store, corrupt)
    assert store.get_run_by_key("acme", "bad") is None

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="activities.store.records"):
        page = store.list_runs("acme", include_steps=True)
    assert [r.key for r in page.items] == ["good-1", "good-2"]
    assert page.total_count == 3
    assert [(q.table, q.reason != "") for q in page.quarantined] == [("runs", True)]
    assert "quarantined runs row" in caplog.text

    # The next snapshot of the run repairs it.
    repaired = snapshot("bad", OK, seq=1, steps=1)
    repaired.trigger = TriggerRequest()
    store.record_run(repaired)
    assert store.get_run_by_key("acme", "bad") is not None


def test_a_corrupt_job_is_quarantined_not_fatal(
    store: RunStore, caplog: pytest.LogCaptureFixture
) -> None:
    store.upsert_job(job_definition("bad"))
    _execute(store, "UPDATE jobs SET definition = '{\"name\": \"no steps\"}' WHERE key = 'bad'")
    with caplog.at_level(logging.WARNING, logger="activities.store.records"):
        page = store.list_jobs("acme")
    assert [j.key for j in page.items] == ["daily"]
    assert page.quarantined[0].table == "jobs"
    assert store.get_job_by_key("acme", "bad") is None
    assert "definition.job_id: Field required" in caplog.text


def test_rows_written_by_a_newer_release_stay_readable(store: RunStore) -> None:
    """A rollback must not make new data unreadable: unknown JSON fields are ignored."""
    write = snapshot("a", OK)
    write.trigger = TriggerRequest()
    store.record_run(write)
    newer = '{"cause": "api", "added_later": 1, "overrides": {"also_new": true}}'
    _execute(store, "UPDATE runs SET trigger = :t WHERE key = 'a'", t=newer)
    definition = job_definition().model_dump(mode="json")
    definition["environment"]["added_later"] = "x"
    job = store.get_job_by_key("acme", "daily")
    assert job is not None
    with store.engine.begin() as conn:
        conn.execute(sa.update(Base.metadata.tables["jobs"]).values(definition=definition))
    assert store.get_run_by_key("acme", "a") is not None
    assert store.get_job("acme", job.id) is not None


# --------------------------------------------------------------------------- activities


async def test_store_activities_are_idempotent_when_retried(store: RunStore) -> None:
    activities, env = StoreActivities(store), ActivityEnvironment()
    save = UpsertJobInput(job=job_definition("hourly"), account=AccountSettings(account_id="acme"))
    saved = [await env.run(activities.upsert_job, save) for _ in range(2)]
    assert saved[0] == saved[1] and saved[0].job_id == "hourly"

    allocate = AllocateRunInput(account_id="acme", job_id="hourly", request_key="api-1")
    allocated = [await env.run(activities.allocate_run, allocate) for _ in range(2)]
    assert allocated[0] == allocated[1] and allocated[0].run_id == str(allocated[0].id)

    record = snapshot(allocated[0].run_id, OK, seq=1, job_key="hourly", steps=2)
    recorded = [await env.run(activities.record_run, record) for _ in range(2)]
    assert [r.applied for r in recorded] == [True, True]
    assert _count(store, "SELECT count(*) FROM runs") == 1
    assert _count(store, "SELECT count(*) FROM run_steps") == 2


async def test_store_activity_errors_say_whether_a_retry_can_help(store: RunStore) -> None:
    activities, env = StoreActivities(store), ActivityEnvironment()
    unknown_job = AllocateRunInput(account_id="acme", job_id="nope", request_key="k")
    with pytest.raises(ApplicationError) as caught:
        await env.run(activities.allocate_run, unknown_job)
    assert (caught.value.type, caught.value.non_retryable) == ("StoreUnknownJob", False)

    with pytest.raises(ApplicationError) as caught:
        await env.run(activities.record_run, snapshot("12345", R))
    assert (caught.value.type, caught.value.non_retryable) == ("StoreUnknownRun", True)
