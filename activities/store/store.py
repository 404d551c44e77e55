"""``RunStore``: the read model of accounts, jobs, runs, steps and API tokens.

Temporal stays the source of truth for what is scheduled; the store is what the API and the
CLI read. Every write is idempotent (an upsert keyed by id or key), so a retried activity
never duplicates a row. The engine is synchronous: async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from activities.store import hooks, jobs, migrate, queries, runs, tokens
from activities.store.engine import WRITE, create_store_engine
from activities.store.errors import RerunRefusedError
from activities.store.records import (
    Page,
    Quarantined,
    StoredAccount,
    StoredDelivery,
    StoredEnvironment,
    StoredJob,
    StoredRun,
    StoredWebhook,
    account_record,
    delivery_record,
    environment_record,
    job_record,
    read_or_quarantine,
    run_record,
    webhook_record,
)
from activities.store.schema import (
    AccountRow,
    EnvironmentRow,
    JobRow,
    RunRow,
    WebhookDeliveryRow,
    WebhookRow,
)
from workflows.models import (
    AbandonedRuns,
    AccountSettings,
    Environment,
    JobDefinition,
    RecordRunInput,
    RecordRunResult,
    RerunPlan,
    RunStatus,
    TriggerRequest,
)

T = TypeVar("T")

ID_RANGE = range(-(2**31), 2**31)
"""What an id column (``INTEGER``: 32 bits on PostgreSQL) can hold. A number outside it
matches no row, and handing it to the database fails (SQLite: OverflowError; PostgreSQL:
integer out of range), so lookups answer "no such row" without asking: an API path like
``/jobs/9223372036854775808/`` is a 404, never a 500."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


class RunStore:
    """The run store on one database (``sqlite:///path`` or ``postgresql+psycopg://…``)."""

    def __init__(self, url: str | sa.URL, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self.engine = create_store_engine(url)
        self._clock = clock
        self._dependents: dict[str, tuple[tuple[Any, ...], dict[str, list[str]]]] = {}
        """By account: (fingerprint of its active jobs, upstream key -> dependent keys)."""

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ schema

    def migrate(self) -> None:
        """Upgrade the schema to the newest revision (a no-op when it is there already)."""
        migrate.upgrade(self.engine, "head")

    def downgrade(self, revision: str) -> None:
        """Downgrade the schema to ``revision`` (``"base"`` drops everything). For tests."""
        migrate.downgrade(self.engine, revision)

    # ------------------------------------------------------------------ accounts

    def upsert_account(self, settings: AccountSettings, *, name: str | None = None) -> None:
        """Save an account's limits, and its display name when given (a new account is
        named after its id until then)."""
        self._write_retrying(
            lambda s: jobs.put_account(s, settings, overwrite=True, now=self._clock(), name=name)
        )

    def get_account(self, account_id: str) -> StoredAccount | None:
        with self._read() as s:
            row = s.get(AccountRow, account_id)
            if row is None:
                return None
            return read_or_quarantine("accounts", account_id, lambda: account_record(row), [])

    # ------------------------------------------------------------------ jobs

    def upsert_job(
        self,
        definition: JobDefinition,
        job_id: int | None = None,
        *,
        deactivated: bool = False,
        extra: Mapping[str, Any] | None = None,
        state: int | None = None,
    ) -> int:
        """Save a job, keyed by (account, ``definition.job_id``).

        Args:
            definition: The job as saved. Its account row is created with default limits
                if it does not exist yet.
            job_id: The job's store id when the caller knows it (an API update): the job
                must exist under that id with the definition's key.
            deactivated: Stored as given; False by default, so saving reactivates a job.
            extra: dbt Cloud job fields Runslot does not model (``description``, ...), echoed
                back by the API. None keeps the stored ones.
            state: 1 active, 2 deleted; None keeps the stored state (1 for a new job).

        Returns:
            The job's store id: allocated when the job is new, the same one ever after.

        Raises:
            UnknownJobError: ``job_id`` is not a job of this account.
            InvalidRecordError: The key does not match ``job_id``'s, or a new key is made of
                digits only (reserved for the ids the store allocates).
        """
        return self._write_retrying(
            lambda s: jobs.put_job(
                s,
                definition,
                job_id=job_id,
                deactivated=deactivated,
                extra=extra,
                now=self._clock(),
                state=state,
            )
        )

    def create_job(
        self, definition: JobDefinition, *, extra: Mapping[str, Any] | None = None
    ) -> int:
        """Create a job keyed by its new id (``key = str(id)``), as the API's create call does.

        ``definition.job_id`` is replaced by that key. Not idempotent, like the API call.
        """
        return self._write_retrying(
            lambda s: jobs.create_job(s, definition, extra=extra, now=self._clock())
        )

    def set_job_state(self, account_id: str, job_id: int, state: int) -> bool:
        """dbt Cloud's soft delete (``state=2``) and undelete (1). False: no such job."""
        if job_id not in ID_RANGE:
            return False
        with self._write() as s:
            row = s.get(JobRow, job_id)
            if row is None or row.account_id != account_id:
                return False
            row.state = state
            row.updated_at = self._clock()
            return True

    def get_job(self, account_id: str, job_id: int) -> StoredJob | None:
        if job_id not in ID_RANGE:
            return None
        return self._one_job(account_id, JobRow.id == job_id)

    def get_job_by_key(self, account_id: str, key: str) -> StoredJob | None:
        return self._one_job(account_id, JobRow.key == key)

    def list_jobs(
        self,
        account_id: str,
        *,
        state: int | None = 1,
        name_contains: str | None = None,
        limit: int = 100,
        offset: int = 0,
        order_by: str = "id",
    ) -> Page[StoredJob]:
        """Jobs of an account; ``state=None`` includes deleted ones (dbt Cloud hides them)."""
        query = sa.select(JobRow).where(JobRow.account_id == account_id)
        if state is not None:
            query = query.where(JobRow.state == state)
        if name_contains:
            query = query.where(JobRow.name.icontains(name_contains, autoescape=True))
        quarantined: list[Quarantined] = []
        with self._read() as s:
            total = queries.count(s, query)
            paged = queries.page(
                query, queries.JOB_ORDER, order_by=order_by, limit=limit, offset=offset
            )
            items = [
                job
                for row in s.scalars(paged)
                if (job := read_or_quarantine("jobs", row.id, _bind(job_record, row), quarantined))
            ]
        return Page(items=items, total_count=total, quarantined=quarantined)

    def dependent_jobs(self, account_id: str, job_key: str) -> list[str]:
        """Keys of the account's jobs that run when ``job_key``'s runs end (rule 7).

        Read from the stored definitions, which the job workflows write when saved: unlike
        Temporal's visibility, a job saved a moment ago is found at once. Every run's end
        asks, so the account's dependency graph is cached and rebuilt only when its active
        jobs change (count, newest save, newest id: one aggregate query per call). Reading
        every definition per run end made a 500-job cron storm spend a quarter of the
        worker's CPU here.
        """
        active = (JobRow.account_id == account_id, JobRow.state == 1)
        with self._read() as s:
            count, newest_save, newest_id = s.execute(
                sa.select(
                    sa.func.count(), sa.func.max(JobRow.updated_at), sa.func.max(JobRow.id)
                ).where(*active)
            ).one()
            fingerprint = (count, newest_save, newest_id)
            cached = self._dependents.get(account_id)
            if cached is None or cached[0] != fingerprint:
                graph: dict[str, list[str]] = {}
                rows = s.execute(
                    sa.select(JobRow.key, JobRow.definition).where(*active).order_by(JobRow.id)
                )
                for key, definition in rows:
                    for upstream in _upstream_keys(definition):
                        graph.setdefault(upstream, []).append(str(key))
                cached = (fingerprint, graph)
                self._dependents[account_id] = cached
        return list(cached[1].get(job_key, []))

    # ------------------------------------------------------------------ runs

    def allocate_run(
        self,
        account_id: str,
        job_key: str,
        request_key: str,
        *,
        trigger: TriggerRequest | None = None,
        abandoned: AbandonedRuns | None = None,
    ) -> int:
        """Allocate a run: insert it as Queued, once per request key.

        Args:
            account_id: The account.
            job_key: The job's key (its Temporal-level id).
            request_key: Idempotency key: the same key of the same account always returns
                the same run, concurrent calls included.
            trigger: Cause and overrides, stored for the API's ``run.trigger``.
            abandoned: The caller's runs it no longer knows are cancelled first.

        Returns:
            The run's store id. Its key (the Temporal-level run id) is ``str(id)``.

        Raises:
            UnknownJobError: The job is not in the store.
        """
        return self._write_retrying(
            lambda s: runs.allocate(
                s,
                account_id=account_id,
                job_key=job_key,
                request_key=request_key,
                trigger=trigger,
                now=self._clock(),
                abandoned=abandoned,
            )
        )

    def record_run(self, snapshot: RecordRunInput) -> RecordRunResult:
        """Upsert a run snapshot and its steps, keyed by (account, run key).

        Writes are monotonic (``runs.should_apply``): a snapshot that would move the status
        backwards, change a finished status, or carry an older ``seq`` changes nothing.
        Fields a snapshot leaves out (None, steps it does not list) keep their stored values.

        Args:
            snapshot: The run as its writer sees it now.

        Returns:
            The run's store id, whether the snapshot was applied, and the stored status.

        Raises:
            UnknownJobError: The run is new and its job is not in the store.
            UnknownRunError: The run key is made of digits (a store-allocated id) but no such
                run was allocated.
            InvalidRecordError: A naive datetime, or the key belongs to another job's run.
        """
        return self._write_retrying(lambda s: runs.record(s, snapshot, now=self._clock()))

    def get_run(self, account_id: str, run_id: int) -> StoredRun | None:
        if run_id not in ID_RANGE:
            return None
        return self._one_run(account_id, RunRow.id == run_id)

    def get_run_by_key(self, account_id: str, key: str) -> StoredRun | None:
        return self._one_run(account_id, RunRow.key == key)

    def list_runs(
        self,
        account_id: str,
        *,
        job_id: int | None = None,
        job_key: str | None = None,
        status: RunStatus | Collection[RunStatus] | None = None,
        limit: int = 100,
        offset: int = 0,
        order_by: str = "id",
        include_steps: bool = False,
    ) -> Page[StoredRun]:
        """Runs of an account, filtered, ordered and paged.

        Args:
            account_id: The account.
            job_id: Only runs of this job (store id).
            job_key: Only runs of this job (key).
            status: Only runs in this status, or in any of these.
            limit: Page size, 1 to 1000.
            offset: Rows to skip.
            order_by: ``id``, ``created_at``, ``updated_at``, ``started_at``,
                ``finished_at`` or ``status``; a ``-`` prefix reverses. NULLs sort last,
                ties by id.
            include_steps: Fill each run's ``steps``.

        Returns:
            The page; unreadable rows are left out and listed in ``quarantined``.

        Raises:
            ValueError: An unknown ``order_by`` field or an out-of-range page.
        """
        query = queries.runs_with_job_key(account_id)
        if job_id is not None:
            query = query.where(RunRow.job_id == job_id if job_id in ID_RANGE else sa.false())
        if job_key is not None:
            query = query.where(JobRow.key == job_key)
        if status is not None:
            wanted = [status] if isinstance(status, RunStatus) else list(status)
            query = query.where(RunRow.status.in_([int(s) for s in wanted]))
        quarantined: list[Quarantined] = []
        with self._read() as s:
            total = queries.count(s, query)
            paged = queries.page(
                query, queries.RUN_ORDER, order_by=order_by, limit=limit, offset=offset
            )
            rows = s.execute(paged).all()
            steps = queries.steps_of(s, [row.id for row, _ in rows]) if include_steps else {}
            items = [
                run
                for row, key in rows
                if (
                    run := read_or_quarantine(
                        "runs", row.id, _bind(run_record, row, key, steps.get(row.id)), quarantined
                    )
                )
            ]
        return Page(items=items, total_count=total, quarantined=quarantined)

    def list_runs_of_jobs(
        self,
        account_id: str,
        job_ids: Collection[int] | None,
        *,
        status: Collection[RunStatus] | None = None,
        limit: int = 100,
        offset: int = 0,
        order_by: str = "id",
        include_steps: bool = False,
    ) -> Page[StoredRun]:
        """Like ``list_runs``, for the runs of any of ``job_ids`` (None: every job), as the
        API's run listing filters them (by project or environment, through their jobs)."""
        query = queries.runs_with_job_key(account_id)
        if job_ids is not None:
            query = query.where(RunRow.job_id.in_([i for i in job_ids if i in ID_RANGE]))
        if status is not None:
            query = query.where(RunRow.status.in_([int(s) for s in status]))
        quarantined: list[Quarantined] = []
        with self._read() as s:
            total = queries.count(s, query)
            paged = queries.page(
                query, queries.RUN_ORDER, order_by=order_by, limit=limit, offset=offset
            )
            rows = s.execute(paged).all()
            steps = queries.steps_of(s, [row.id for row, _ in rows]) if include_steps else {}
            items = [
                run
                for row, key in rows
                if (
                    run := read_or_quarantine(
                        "runs", row.id, _bind(run_record, row, key, steps.get(row.id)), quarantined
                    )
                )
            ]
        return Page(items=items, total_count=total, quarantined=quarantined)

    def rerun_plan(self, account_id: str, job_key: str, run_key: str) -> RerunPlan:
        """What a rerun from failure of ``run_key`` needs: its failed step and commit.

        Raises:
            RerunRefusedError: No such run of this job, or the run did not fail.
        """
        run = self.get_run_by_key(account_id, run_key)
        if run is None or run.job_key != job_key:
            raise RerunRefusedError(f"run {run_key} is not a run of job {job_key}")
        if run.status != RunStatus.ERROR:
            raise RerunRefusedError(
                f"run {run_key} ended {run.status.humanized}: only a failed (Error) run can be "
                "rerun from failure; trigger a new run instead"
            )
        failed = next((step for step in run.steps if step.status == RunStatus.ERROR), None)
        overrides = run.trigger.overrides if run.trigger is not None else None
        return RerunPlan(
            run_id=run_key,
            failed_step=failed.index if failed is not None else None,
            failed_argv=list(failed.argv) if failed is not None else None,
            steps_override=(
                [list(argv) for argv in overrides.steps_override]
                if overrides is not None and overrides.steps_override
                else None
            ),
            # The commit prep resolved, else the one the run was pinned to.
            git_sha=run.git_sha or (overrides.git_sha if overrides is not None else None),
        )

    # ------------------------------------------------------------------ tokens

    def create_token(self, account_id: str, name: str) -> str:
        """Create an API token for an account.

        Args:
            account_id: The account it authenticates as.
            name: A label for people (``"ci"``).

        Returns:
            The token. This is its only appearance: the store keeps its sha256 only.

        Raises:
            UnknownAccountError: The account is not in the store.
        """
        with self._write() as s:
            return tokens.add_token(s, account_id, name, now=self._clock())

    def account_for_token(self, token: str) -> str | None:
        """The account a token belongs to, or None for an unknown token."""
        with self._read() as s:
            found = tokens.find_token(s, token)
        if found is None:
            return None
        token_id, account_id, last_used_at = found
        now = self._clock()
        if last_used_at is None or now - last_used_at >= tokens.TOUCH_INTERVAL:
            with self._write() as s:
                tokens.touch(s, token_id, now=now)
        return account_id

    # ------------------------------------------------------------------ environments

    def put_environment(
        self, account_id: str, name: str, environment: Environment, *, project_id: int = 1
    ) -> int:
        """Create or replace the account's environment ``name`` (what a job's
        ``environment_id`` names in the API); returns its id, stable across replacements.

        Raises:
            UnknownAccountError: The account is not in the store.
        """
        return self._write_retrying(
            lambda s: hooks.put_environment(
                s, account_id, name, environment, project_id=project_id, now=self._clock()
            )
        )

    def get_environment(self, account_id: str, environment_id: int) -> StoredEnvironment | None:
        if environment_id not in ID_RANGE:
            return None
        with self._read() as s:
            row = s.get(EnvironmentRow, environment_id)
            if row is None or row.account_id != account_id:
                return None
            return read_or_quarantine("environments", row.id, _bind(environment_record, row), [])

    def list_environments(
        self, account_id: str, *, project_id: int | None = None
    ) -> list[StoredEnvironment]:
        query = sa.select(EnvironmentRow).where(
            EnvironmentRow.account_id == account_id, EnvironmentRow.state == 1
        )
        if project_id is not None:
            query = query.where(EnvironmentRow.project_id == project_id)
        with self._read() as s:
            return [
                env
                for row in s.scalars(query.order_by(EnvironmentRow.id))
                if (
                    env := read_or_quarantine(
                        "environments", row.id, _bind(environment_record, row), []
                    )
                )
            ]

    # ------------------------------------------------------------------ webhooks out

    def create_webhook(
        self,
        account_id: str,
        *,
        name: str,
        url: str,
        event_types: Collection[str],
        job_ids: Collection[int] = (),
    ) -> int:
        """Subscribe ``url`` to the account's run events; returns the subscription id.

        Raises:
            UnknownAccountError: The account is not in the store.
        """
        with self._write() as s:
            return hooks.add_webhook(
                s,
                account_id,
                name=name,
                url=url,
                event_types=list(event_types),
                job_ids=list(job_ids),
                now=self._clock(),
            )

    def set_webhook_active(self, account_id: str, webhook_id: int, active: bool) -> bool:
        """Pause or resume a subscription. False: no such webhook in this account."""
        if webhook_id not in ID_RANGE:
            return False
        with self._write() as s:
            row = s.get(WebhookRow, webhook_id)
            if row is None or row.account_id != account_id:
                return False
            row.active, row.updated_at = active, self._clock()
            return True

    def list_webhooks(self, account_id: str) -> list[StoredWebhook]:
        query = sa.select(WebhookRow).where(WebhookRow.account_id == account_id)
        with self._read() as s:
            return [
                hook
                for row in s.scalars(query.order_by(WebhookRow.id))
                if (hook := read_or_quarantine("webhooks", row.id, _bind(webhook_record, row), []))
            ]

    def has_active_webhooks(self, account_id: str) -> bool:
        """Whether the account has any active subscription (one indexed query: every run
        publishes its events, and most accounts subscribe to none)."""
        query = sa.select(WebhookRow.id).where(
            WebhookRow.account_id == account_id, WebhookRow.active == sa.true()
        )
        with self._read() as s:
            return s.scalar(query.limit(1)) is not None

    def webhooks_for(self, account_id: str, event_type: str, job_id: int) -> list[StoredWebhook]:
        """Active subscriptions of the account that want this event of this job."""
        return [
            hook
            for hook in self.list_webhooks(account_id)
            if hook.active
            and event_type in hook.event_types
            and (not hook.job_ids or job_id in hook.job_ids)
        ]

    def record_delivery_attempt(
        self,
        *,
        webhook_id: int,
        account_id: str,
        event_id: str,
        event_type: str,
        run_id: int | None,
        status_code: int | None,
        error: str = "",
        succeeded: bool,
    ) -> int:
        """Log one attempt to deliver ``event_id`` to a webhook; returns the attempts so far."""
        return self._write_retrying(
            lambda s: hooks.record_attempt(
                s,
                webhook_id=webhook_id,
                account_id=account_id,
                event_id=event_id,
                event_type=event_type,
                run_id=run_id,
                status_code=status_code,
                error=error,
                succeeded=succeeded,
                now=self._clock(),
            )
        )

    def list_deliveries(
        self, account_id: str, *, webhook_id: int | None = None, limit: int = 100
    ) -> list[StoredDelivery]:
        """The delivery log, newest first."""
        query = sa.select(WebhookDeliveryRow).where(WebhookDeliveryRow.account_id == account_id)
        if webhook_id is not None:
            query = query.where(WebhookDeliveryRow.webhook_id == webhook_id)
        query = query.order_by(WebhookDeliveryRow.id.desc()).limit(limit)
        with self._read() as s:
            return [
                d
                for row in s.scalars(query)
                if (
                    d := read_or_quarantine(
                        "webhook_deliveries", row.id, _bind(delivery_record, row), []
                    )
                )
            ]

    # ------------------------------------------------------------------ internals

    @contextmanager
    def _read(self) -> Iterator[Session]:
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # A count and its page from one snapshot.
                conn.execution_options(isolation_level="REPEATABLE READ")
            with Session(bind=conn) as session, session.begin():
                yield session

    @contextmanager
    def _write(self) -> Iterator[Session]:
        with self.engine.connect() as conn:
            conn.execution_options(**{WRITE: True})
            with Session(bind=conn) as session, session.begin():
                yield session

    def _write_retrying(self, work: Callable[[Session], T]) -> T:
        """``work`` in a write transaction, run once more after a unique violation: a
        concurrent writer inserted the same key first, and the second run finds its row."""
        try:
            with self._write() as s:
                return work(s)
        except IntegrityError:
            with self._write() as s:
                return work(s)

    def _one_job(self, account_id: str, where: sa.ColumnElement[bool]) -> StoredJob | None:
        with self._read() as s:
            query = sa.select(JobRow).where(where, JobRow.account_id == account_id)
            row = s.scalars(query).one_or_none()
            if row is None:
                return None
            return read_or_quarantine("jobs", row.id, _bind(job_record, row), [])

    def _one_run(self, account_id: str, where: sa.ColumnElement[bool]) -> StoredRun | None:
        with self._read() as s:
            found = s.execute(queries.runs_with_job_key(account_id).where(where)).one_or_none()
            if found is None:
                return None
            row, key = found
            steps = queries.steps_of(s, [row.id]).get(row.id, [])
            return read_or_quarantine("runs", row.id, _bind(run_record, row, key, steps), [])


def _bind(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    return lambda: fn(*args)


def _upstream_keys(definition: Any) -> list[str]:
    """The jobs a stored definition runs after (``triggers.on_job_completion``), read
    without validating the whole definition; an unreadable one has none."""
    triggers = definition.get("triggers") if isinstance(definition, dict) else None
    completions = triggers.get("on_job_completion") if isinstance(triggers, dict) else None
    if not isinstance(completions, list):
        return []
    keys = (t.get("job_id") for t in completions if isinstance(t, dict))
    return [key for key in keys if isinstance(key, str)]
