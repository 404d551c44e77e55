"""JobWorkflow ``job:{account}:{job}``: a job as a long-lived entity.

It owns the job's cron loop and trigger queue, applies the queue rules of ``policy`` and
starts one RunWorkflow per run (from a local activity, not as a child: a child's start and
end would cost the job two workflow tasks per run). A run reports its end by the
``run_finished`` signal (its report has already sent the job-completion triggers); the job
also checks on its runs in flight as often as the slots reaper does, so a run *terminated*
from the CLI (which cannot signal) still frees the job's queue and triggers the jobs that
run on its completion. Signals never raise: a message the job cannot use is logged and
kept in a small ``rejected`` list. Updates validate first,
so a bad trigger is refused before it touches history. The job waits on one durable timer
(next cron tick, queue deadline, check on runs), kept across wake-ups that do not move it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RawValue, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
)

with workflow.unsafe.imports_passed_through():
    from activities.control import closed_workflows, start_run_workflow
    from workflows import constants as c
    from workflows import policy
    from workflows.models import (
        AbandonedRuns,
        AllocateRunInput,
        AllocateRunResult,
        CancelRequest,
        ClosedWorkflow,
        DropSchemaInput,
        FinishedRun,
        HolderLiveness,
        InFlightRun,
        JobDelete,
        JobDescription,
        JobState,
        JobUpdate,
        JobWorkflowInput,
        NotifyDependentsInput,
        PullRequestClosed,
        QueuedRun,
        RecordRunInput,
        RecordRunResult,
        RerunPlan,
        RerunPlanInput,
        RunFinished,
        RunInput,
        RunResult,
        RunStatus,
        StartRunInput,
        TriggerCause,
        TriggerRequest,
        TriggerResult,
        UpsertJobInput,
        UpsertJobResult,
        UpstreamFinished,
    )

MIN_WAIT = timedelta(seconds=1)
T = TypeVar("T")


@workflow.defn(name=c.JOB_WORKFLOW)
class JobWorkflow:
    @workflow.init
    def __init__(self, inp: JobWorkflowInput) -> None:
        self.job = inp.job
        self.account = inp.account
        self.st = inp.state or JobState()
        self.queues = inp.queues
        self._dirty = True
        self._cancels: list[policy.Cancellation] = []
        self._orphan_check_at: datetime | None = None
        # Triggers are accepted one at a time: each awaits the run store for its run id, and
        # dedupe keys and queue rules must never see a half-accepted trigger.
        self._accepting = asyncio.Lock()
        # The job as saved in the run store: a version counter, bumped by every change the
        # store shows (definition, account, deactivation); saves are serialized by the lock.
        self._version = 0
        self._saved_version = 0 if self.st.store_id is not None else -1
        self._api_fields: dict[str, Any] | None = None  # to save with the next job write
        self._store_retry_at: datetime | None = None
        self._timer: asyncio.Task[None] | None = None  # the one durable timer (``_wait``)
        self._timer_at: datetime | None = None

    @workflow.run
    async def run(self, inp: JobWorkflowInput) -> None:
        if self.st.last_cron_fire is None:
            # A new job fires at its next tick, never for ticks before it existed.
            self.st.last_cron_fire = workflow.now()
        while True:
            # Cleared before the awaits below: anything arriving meanwhile sets it again.
            self._dirty = False
            now = workflow.now()
            if self._store_retry_at is None or now >= self._store_retry_at:
                self._store_retry_at = None
                async with self._accepting:
                    await self._save_job_if_needed()
            await self._fire_cron_if_due(now)
            self._expire_queue(now)
            await self._send_cancels()
            await self._start_ready()
            await self._flush_side_effects()
            await self._check_orphans()
            if self.st.deleted and not self.st.in_flight and not self.st.pending_records:
                await workflow.wait_condition(workflow.all_handlers_finished)
                await self._drop_timer()
                # Complete in a later workflow task than the one that accepted the delete:
                # if the server refuses a completing task (a signal arrived meanwhile), an
                # update accepted in that same task would be lost with it.
                await workflow.sleep(MIN_WAIT)
                if not self.st.in_flight and not self._dirty:
                    return  # deleted, and every run has ended: the job's workflow is done
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                if not self._dirty and not self._cancels:
                    await self._drop_timer()
                    self._continue_as_new()
            await self._wait(self._next_wakeup())

    async def _wait(self, deadline: datetime | None) -> None:
        """Until a message sets ``_dirty``, or until ``deadline`` (the next cron tick, queue
        deadline, check on runs in flight or store retry).

        One durable timer, kept across wake-ups while the deadline stays the same: a
        trigger or a signal that does not move it costs no timer events (re-arming costs a
        cancel and a start, two events, on every wake-up). A deadline that moved, either
        way, gets a new timer: an earlier one must not be missed, and a later one would
        otherwise cost a useless wake-up (four events) instead of a cancel (one).
        """
        if self._timer is not None and (self._timer.done() or self._timer_at != deadline):
            await self._drop_timer()
        if self._timer is None and deadline is not None:
            self._timer_at = deadline
            self._timer = asyncio.create_task(
                workflow.sleep(
                    max(deadline - workflow.now(), MIN_WAIT),
                    summary="next cron tick / queue deadline / check on runs",
                )
            )
        timer = self._timer
        await workflow.wait_condition(
            lambda: (
                self._dirty
                or workflow.info().is_continue_as_new_suggested()
                or (timer is not None and timer.done())
            )
        )

    async def _drop_timer(self) -> None:
        """Cancel the pending timer and wait for the cancel to be issued, so the workflow
        never completes or continues as new with a timer still open: the commands a
        workflow task sends must not depend on when a cancelled task next runs."""
        timer, self._timer, self._timer_at = self._timer, None, None
        if timer is None:
            return
        if not timer.done():
            timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timer

    def _continue_as_new(self) -> None:
        self.st.generation += 1
        workflow.continue_as_new(
            JobWorkflowInput(job=self.job, account=self.account, state=self.st, queues=self.queues)
        )

    # ------------------------------------------------------------------ triggers

    @workflow.update(name=c.UPDATE_TRIGGER)
    async def trigger(self, req: TriggerRequest) -> TriggerResult:
        """Queue a run; returns its id at once. Repeats of a dedupe key return the first id."""
        try:
            return await self._accept(req)
        except policy.TriggerRejectedError as err:
            # The job changed while the update waited its turn (deactivated, queue full).
            raise ApplicationError(str(err), type="TriggerRejected", non_retryable=True) from err

    @trigger.validator
    def _validate_trigger(self, req: TriggerRequest) -> None:
        policy.check_trigger(self.job, self.st, req)

    @workflow.signal(name=c.SIGNAL_TRIGGER)
    async def trigger_signal(self, raw: Any) -> None:
        """Signal form of ``trigger`` for ``temporal workflow signal`` (fire and forget)."""
        try:
            req = TriggerRequest.model_validate(raw)
            policy.check_trigger(self.job, self.st, req)
            await self._accept(req)
        except Exception as err:  # noqa: BLE001 - a signal handler must never raise
            self._reject("trigger", err)

    async def _accept(self, req: TriggerRequest) -> TriggerResult:
        """Give the trigger a run id from the run store and queue the run.

        Raises:
            TriggerRejectedError: The job refuses the trigger now (checked again: the job may
                have changed since the update's validator ran).
            ApplicationError: The run store could not plan a rerun or allocate the id.
        """
        async with self._accepting:
            existing = policy.existing_run_for(self.st, req)
            if existing is not None:
                return TriggerResult(run_id=existing, deduplicated=True)
            policy.check_trigger(self.job, self.st, req)
            if req.rerun_of is not None:
                req = await self._plan_rerun(req)
            run_id = req.run_id or await self._allocate(req)
            was_deactivated = self.st.deactivated
            cancellations = policy.enqueue(self.job, self.st, req, run_id, workflow.now())
            if was_deactivated and not self.st.deactivated:
                self._show_activation()  # a manual "Run now" reactivated the job
            self._apply_cancellations(cancellations)
            self._dirty = True
            return TriggerResult(run_id=run_id, cancelled_run_ids=[x.run_id for x in cancellations])

    async def _allocate(self, req: TriggerRequest) -> str:
        """A new run id from the run store, keyed so that a retried call returns the same id."""
        await self._save_job_if_needed(required=True)
        result = await self._store_call(
            "store_allocate_run",
            AllocateRunInput(
                account_id=self.account.account_id,
                job_id=self.job.job_id,
                request_key=self._request_key(req),
                trigger=req,
                abandoned=AbandonedRuns(
                    key_prefix=f"{workflow.info().workflow_id}:",
                    known=[
                        *(r.run_id for r in self.st.queue),
                        *(r.run_id for r in self.st.in_flight),
                        *(r.run_id for r in self.st.pending_records),
                    ],
                ),
            ),
            AllocateRunResult,
            "allocate a run id",
        )
        return result.run_id

    def _request_key(self, req: TriggerRequest) -> str:
        """The store's idempotency key of this trigger's run: the same trigger always gets
        the same run, however often its workflow task or activity is retried.

        An update is keyed by its id, which the client keeps across its own retries and the
        server keeps when it redelivers the update (a failed task, a continue-as-new); a
        random key would follow the order of delivery and could hand one update's run to
        another. The job's own triggers (cron ticks, upstream runs) are keyed by their
        dedupe keys, unique for the job's lifetime. Only a trigger *signal* without a
        dedupe key falls back to a replay-stable random key.
        """
        prefix = workflow.info().workflow_id
        update = workflow.current_update_info()
        if update is not None:
            return f"{prefix}:update:{update.id}"
        if req.dedupe_key and req.dedupe_key.startswith(("cron:", "upstream:")):
            return f"{prefix}:{req.dedupe_key}"
        return f"{prefix}:{workflow.uuid4()}"

    async def _plan_rerun(self, req: TriggerRequest) -> TriggerRequest:
        """Rerun from failure: the failed run's commit, and its steps from the failed one."""
        assert req.rerun_of is not None
        plan = await self._store_call(
            "store_rerun_plan",
            RerunPlanInput(
                account_id=self.account.account_id, job_id=self.job.job_id, run_id=req.rerun_of
            ),
            RerunPlan,
            f"look up run {req.rerun_of}",
        )
        overrides = req.overrides.model_copy(
            update={
                "steps_override": policy.rerun_steps(self.job, plan),
                "git_sha": req.overrides.git_sha or plan.git_sha,
            }
        )
        return req.model_copy(update={"overrides": overrides})

    async def _store_call(self, activity: str, arg: Any, result_type: type[T], what: str) -> T:
        """A run store local activity; its failure becomes one clear ApplicationError."""
        try:
            result: T = await workflow.execute_local_activity(
                activity,
                arg,
                result_type=result_type,
                start_to_close_timeout=c.LOCAL_ACTIVITY_TIMEOUT,
                retry_policy=c.STORE_RETRY,
                summary=what,
            )
        except FailureError as err:
            cause = err.cause if isinstance(err, ActivityError) else err
            # The store's own refusals are non-retryable ApplicationErrors (StoreUnknownRun,
            # StoreRerunRefused, ...); anything else means the store could not be reached.
            if isinstance(cause, ApplicationError) and cause.non_retryable and cause.type:
                kind, message = cause.type, cause.message
            else:
                kind, message = c.STORE_UNAVAILABLE, str(cause or err)
            raise ApplicationError(
                f"the run store could not {what}: {message}", type=kind, non_retryable=True
            ) from err
        return result

    async def _save_job_if_needed(self, *, required: bool = False) -> None:
        """Write the job (definition, account, deactivated flag) to the run store when it
        changed. The caller holds ``_accepting``, so saves never overtake each other.
        ``required``: the caller needs the row (raise if it cannot be written)."""
        version = self._version
        if self._saved_version == version:
            return
        try:
            saved = await self._store_call(
                "store_upsert_job",
                UpsertJobInput(
                    job=self.job,
                    account=self.account,
                    deactivated=self.st.deactivated,
                    extra=self._api_fields,
                    state=2 if self.st.deleted else 1,
                ),
                UpsertJobResult,
                "save the job",
            )
        except ApplicationError as err:
            if required:
                raise
            workflow.logger.warning("job %s not saved in the run store: %s", self.job.job_id, err)
            self._store_retry_at = workflow.now() + c.STORE_RETRY_AFTER
            return
        self.st.store_id = saved.id
        self._saved_version = version
        self._api_fields = None

    @workflow.signal(name=c.SIGNAL_UPSTREAM_FINISHED)
    async def upstream_finished(self, raw: Any) -> None:
        """Rule 7: another job's run ended; run this job if it lists that job and status."""
        try:
            event = UpstreamFinished.model_validate(raw)
            if not policy.completion_matches(self.job, event.job_id, event.status):
                return
            req = TriggerRequest(
                cause=TriggerCause.JOB_COMPLETION,
                cause_text=f"Triggered by run {event.run_id} of job {event.job_id} "
                f"({event.status.humanized})",
                dedupe_key=f"upstream:{event.job_id}:{event.run_id}",
            )
            policy.check_trigger(self.job, self.st, req)
            await self._accept(req)
        except Exception as err:  # noqa: BLE001
            self._reject("upstream_finished", err)

    # ------------------------------------------------------------------ job management

    @workflow.update(name=c.UPDATE_CONFIGURE)
    async def configure(self, upd: JobUpdate) -> JobDescription:
        """Save the job: a new definition takes effect at once and reactivates the job.

        Returns once the run store has it too (its ``store_id`` is in the description), so
        a caller reading the store next finds the job; if the store is down, the job still
        takes the new definition and writes it to the store later.
        """
        upstream_before = self._upstream()
        self.job = upd.job
        self.st.deleted = False  # saving a deleted job's key again brings it back
        if upd.api_fields is not None:
            self._api_fields = upd.api_fields
        if upd.account is not None:
            self.account = upd.account
        was_deactivated = self.st.deactivated
        policy.reactivate(self.st)
        if was_deactivated:
            self._show_activation()
        if self._upstream() != upstream_before:
            workflow.upsert_search_attributes([c.SA_UPSTREAM.value_set(self._upstream())])
        self._dirty = True
        self._version += 1
        async with self._accepting:
            await self._save_job_if_needed()
        return self.describe()

    @workflow.update(name=c.UPDATE_DELETE)
    async def delete(self, req: JobDelete) -> JobDescription:
        """dbt Cloud's soft delete: no new runs, queued and running ones are cancelled, the
        store shows the job with ``state`` 2, and the workflow ends once its runs have."""
        self.st.deleted = True
        self._apply_cancellations(
            [policy.Cancellation(q.run_id, req.reason, running=False) for q in self.st.queue]
            + [policy.Cancellation(r.run_id, req.reason, running=True) for r in self.st.in_flight]
        )
        self._version += 1
        self._dirty = True
        async with self._accepting:
            await self._save_job_if_needed()
        return self.describe()

    @configure.validator
    def _validate_configure(self, upd: JobUpdate) -> None:
        if (upd.job.account_id, upd.job.job_id) != (self.job.account_id, self.job.job_id):
            raise ValueError(
                f"this workflow is job {self.job.job_id} of account {self.job.account_id}; "
                f"got job {upd.job.job_id} of account {upd.job.account_id}"
            )
        if upd.account is not None and upd.account.account_id != self.job.account_id:
            raise ValueError("account settings are for another account")

    @workflow.update(name=c.UPDATE_CANCEL_RUN)
    def cancel_run(self, req: CancelRequest) -> RunStatus:
        """Cancel a queued run (leaves the queue at once) or a running one (its step is killed)."""
        return self._cancel(req)

    @cancel_run.validator
    def _validate_cancel(self, req: CancelRequest) -> None:
        if not self._is_known(req.run_id):
            raise ValueError(f"run {req.run_id} is not queued or running in job {self.job.job_id}")

    @workflow.signal(name=c.SIGNAL_CANCEL_RUN)
    def cancel_run_signal(self, raw: Any) -> None:
        try:
            req = CancelRequest.model_validate(raw)
            self._validate_cancel(req)
            self._cancel(req)
        except Exception as err:  # noqa: BLE001
            self._reject("cancel_run", err)

    def _cancel(self, req: CancelRequest) -> RunStatus:
        running = any(r.run_id == req.run_id for r in self.st.in_flight)
        self._apply_cancellations([policy.Cancellation(req.run_id, req.reason, running=running)])
        self._dirty = True
        return RunStatus.RUNNING if running else RunStatus.CANCELLED

    @workflow.signal(name=c.SIGNAL_PR_CLOSED)
    def pull_request_closed(self, raw: Any) -> None:
        """Rule 5: a closed PR cancels its runs and drops its temporary schema."""
        try:
            event = PullRequestClosed.model_validate(raw)
            reason = f"Cancelled because pull request #{event.pr_id} was closed."
            self._apply_cancellations(
                [
                    policy.Cancellation(q.run_id, reason, running=False)
                    for q in self.st.queue
                    if q.trigger.pr_id == event.pr_id
                ]
                + [
                    policy.Cancellation(r.run_id, reason, running=True)
                    for r in self.st.in_flight
                    if r.pr_id == event.pr_id
                ]
            )
            schema = c.ci_schema_name(self.job.job_id, event.pr_id)
            if schema not in self.st.pending_schema_drops:
                self.st.pending_schema_drops.append(schema)
            self._dirty = True
        except Exception as err:  # noqa: BLE001
            self._reject("pull_request_closed", err)

    @workflow.signal(name=c.SIGNAL_RUN_FINISHED)
    def run_finished(self, raw: Any) -> None:
        try:
            self._on_finished(RunFinished.model_validate(raw))
        except Exception as err:  # noqa: BLE001
            self._reject("run_finished", err)

    @workflow.signal(dynamic=True)
    def unknown_signal(self, name: str, args: Sequence[RawValue]) -> None:
        self._reject(name, ValueError(f"unknown signal {name!r}"))

    @workflow.query(name=c.QUERY_DESCRIBE)
    def describe(self) -> JobDescription:
        return JobDescription(
            job=self.job, account=self.account, state=self.st, next_cron_fire=self._next_cron()
        )

    # ------------------------------------------------------------------ rules

    def _next_cron(self) -> datetime | None:
        schedule = self.job.triggers.schedule
        if schedule is None or self.job.job_type == "ci" or self.st.deleted:
            return None
        base = self.st.last_cron_fire or workflow.now()
        try:
            return policy.next_cron_fire(schedule.cron, schedule.timezone, base)
        except Exception as err:  # noqa: BLE001 - a schedule with no next tick must not fail the job
            workflow.logger.warning("job %s: no next cron tick: %s", self.job.job_id, err)
            return None

    async def _fire_cron_if_due(self, now: datetime) -> None:
        due = self._next_cron()
        if due is None or now < due:
            return
        if self._store_retry_at is not None and now < self._store_retry_at:
            return
        req = TriggerRequest(
            cause=TriggerCause.SCHEDULED,
            cause_text="Triggered by the job's schedule",
            dedupe_key=f"cron:{due.isoformat()}",
            scheduled_at=due,
        )
        try:
            await self._accept(req)
        except policy.TriggerRejectedError as err:
            self._reject("schedule", err)
        except ApplicationError as err:
            # No run id (the run store is down): the tick stays due and fires once when the
            # store is back, like a tick missed while the worker was down.
            self._reject("schedule", err)
            self._store_retry_at = now + c.STORE_RETRY_AFTER
            return
        # One fire however many ticks were missed (worker down): never a burst.
        self.st.last_cron_fire = now

    def _expire_queue(self, now: datetime) -> None:
        """Rule 9: queued runs past the account's max queue wait are cancelled."""
        limit = self.account.max_queue_wait
        for queued, waited in policy.expired_queued(self.st, now, limit):
            self._apply_cancellations(
                [
                    policy.Cancellation(
                        queued.run_id, policy.queue_timeout_message(waited, limit), running=False
                    )
                ]
            )

    def _apply_cancellations(self, cancellations: list[policy.Cancellation]) -> None:
        for cancellation in cancellations:
            if cancellation.running:
                self._cancels.append(cancellation)
                continue
            # The policy may already have taken it out of the queue (superseded runs).
            queued = next((q for q in self.st.queue if q.run_id == cancellation.run_id), None)
            self.st.queue = [q for q in self.st.queue if q.run_id != cancellation.run_id]
            cause = queued.trigger.cause if queued is not None else cancellation.cause
            if cause is None:
                continue
            self._record(
                FinishedRun(
                    run_id=cancellation.run_id,
                    cause=cause,
                    status=RunStatus.CANCELLED,
                    message=cancellation.message,
                    finished_at=workflow.now(),
                ),
                to_store=True,  # its run workflow never started: the job writes its end
            )

    async def _send_cancels(self) -> None:
        cancels, self._cancels = self._cancels, []
        for cancellation in cancels:
            run = next((r for r in self.st.in_flight if r.run_id == cancellation.run_id), None)
            if run is None:
                continue
            try:
                await workflow.get_external_workflow_handle(run.workflow_id).signal(
                    "cancel", cancellation.message
                )
            except Exception as err:  # noqa: BLE001 - a run that is gone reports itself
                workflow.logger.warning("cancel of %s not delivered: %s", run.run_id, err)

    async def _start_ready(self) -> None:
        ready = policy.runs_to_start(self.job, self.st)
        if ready:
            await asyncio.gather(*(self._start_run(q) for q in ready))

    async def _start_run(self, queued: QueuedRun) -> None:
        self.st.queue = [q for q in self.st.queue if q.run_id != queued.run_id]
        workflow_id = c.run_workflow_id(self.account.account_id, queued.run_id)
        flight = InFlightRun(
            run_id=queued.run_id,
            workflow_id=workflow_id,
            cause=queued.trigger.cause,
            pr_id=queued.trigger.pr_id,
            queued_at=queued.queued_at,
            started_at=workflow.now(),
        )
        self.st.in_flight.append(flight)
        run_input = RunInput(
            account=self.account,
            job=self.job,
            run_id=queued.run_id,
            trigger=queued.trigger,
            queued_at=queued.queued_at,
            job_workflow_id=workflow.info().workflow_id,
            queues=self.queues,
        )
        try:
            await workflow.execute_local_activity(
                start_run_workflow,
                StartRunInput(
                    run=run_input,
                    workflow_id=workflow_id,
                    task_queue=self.queues.workflows,
                    summary=f"run {queued.run_id} of job {self.job.name} "
                    f"({queued.trigger.cause.value})",
                ),
                start_to_close_timeout=c.LOCAL_ACTIVITY_TIMEOUT,
                retry_policy=c.CONTROL_RETRY,
                summary=f"start run {queued.run_id}",
            )
        except FailureError as err:
            self._on_finished(
                RunFinished(
                    run_id=queued.run_id,
                    status=RunStatus.ERROR,
                    message=f"The run could not start: {err}",
                ),
                to_store=True,
            )

    async def _check_orphans(self) -> None:
        """Runs in flight report their end by signal; check on them slowly in case one
        never does (terminated, or its workflow failed)."""
        if not self.st.in_flight:
            self._orphan_check_at = None
            return
        now = workflow.now()
        if self._orphan_check_at is None:
            self._orphan_check_at = now + self._orphan_interval()
        if now < self._orphan_check_at:
            return
        self._orphan_check_at = now + self._orphan_interval()
        flights = list(self.st.in_flight)
        try:
            closed = await workflow.execute_local_activity(
                closed_workflows,
                HolderLiveness(workflow_ids=[r.workflow_id for r in flights]),
                start_to_close_timeout=c.LOCAL_ACTIVITY_TIMEOUT,
                retry_policy=c.CONTROL_RETRY,
            )
        except FailureError as err:
            workflow.logger.warning("orphan check failed: %s", err)
            return
        for run in flights:
            end = closed.details.get(run.workflow_id)
            if end is None and run.workflow_id in closed.workflow_ids:
                end = ClosedWorkflow(close_status="NOT_FOUND")  # from an earlier release
            if end is not None:
                finished, to_store = _finished_unreported(run.run_id, end)
                self._on_finished(finished, to_store=to_store)

    def _orphan_interval(self) -> timedelta:
        """As often as the slots reaper looks at holders while a run is new: a run that was
        terminated holds up the job's queue no longer than it would hold a slot. Slowly
        once every run in flight has been going for a while (each check is a workflow
        task in the job's history)."""
        newest = max((r.started_at for r in self.st.in_flight), default=workflow.now())
        if workflow.now() - newest >= c.ORPHAN_CHECK_SLOW_AFTER:
            return c.ORPHAN_CHECK_SLOW_INTERVAL
        return min(c.ORPHAN_CHECK_INTERVAL, self.account.slot_reap_interval)

    def _on_finished(self, finished: RunFinished, *, to_store: bool = False) -> None:
        flight = next((r for r in self.st.in_flight if r.run_id == finished.run_id), None)
        if flight is None:
            return  # already recorded (the signal, and the check on runs in flight)
        self.st.in_flight = [r for r in self.st.in_flight if r.run_id != finished.run_id]
        self._record(
            FinishedRun(
                run_id=finished.run_id,
                cause=flight.cause,
                status=finished.status,
                message=finished.message,
                finished_at=finished.finished_at or workflow.now(),
            ),
            to_store=to_store,
        )
        ci = policy.is_ci(self.job, TriggerRequest(cause=flight.cause, pr_id=flight.pr_id))
        if not ci and not finished.dependents_notified:  # else the run's report did it
            self.st.pending_notifications.append(
                UpstreamFinished(
                    job_id=self.job.job_id, run_id=finished.run_id, status=finished.status
                )
            )
        self._dirty = True

    def _record(self, finished: FinishedRun, *, to_store: bool) -> None:
        """Count a finished run (rule 8). ``to_store``: the run's own workflow could not write
        its end to the run store (never started, terminated), so the job writes it."""
        if to_store:
            if len(self.st.pending_records) >= c.PENDING_RECORDS_KEPT:
                dropped = self.st.pending_records.pop(0)
                workflow.logger.warning("run %s: store write dropped", dropped.run_id)
            self.st.pending_records.append(finished)
        if policy.record_finished(self.job, self.st, finished):
            workflow.logger.warning(
                "job %s deactivated after %d consecutive failed runs",
                self.job.job_id, self.st.consecutive_failures,
            )  # fmt: skip
            self._show_activation()

    def _show_activation(self) -> None:
        """Only on a change, so `RunslotStatus='Deactivated'` finds deactivated jobs."""
        status = "Deactivated" if self.st.deactivated else "Active"
        workflow.upsert_search_attributes([c.SA_STATUS.value_set(status)])
        self._version += 1  # the run store shows it too

    async def _flush_side_effects(self) -> None:
        await self._flush_records()
        while self.st.pending_notifications:
            event = self.st.pending_notifications.pop(0)
            try:
                await workflow.execute_local_activity(
                    "notify_dependents",
                    NotifyDependentsInput(
                        account_id=self.account.account_id,
                        job_id=event.job_id,
                        run_id=event.run_id,
                        status=event.status,
                        source_workflow_id=workflow.info().workflow_id,
                    ),
                    start_to_close_timeout=c.LOCAL_ACTIVITY_TIMEOUT,
                    retry_policy=c.CONTROL_RETRY,
                )
            except FailureError as err:
                # Local activity failures can surface unwrapped (an ApplicationError rather
                # than an ActivityError): catch the base so the entity never fails on them.
                workflow.logger.warning("completion of %s not fanned out: %s", event.run_id, err)
        while self.st.pending_schema_drops:
            schema = self.st.pending_schema_drops.pop(0)
            try:
                await workflow.execute_activity(
                    "drop_ci_schema",
                    DropSchemaInput(
                        account_id=self.account.account_id,
                        job_id=self.job.job_id,
                        environment=self.job.environment,
                        schema_name=schema,
                    ),
                    task_queue=self.queues.steps,
                    start_to_close_timeout=c.PREP_TIMEOUT,
                    heartbeat_timeout=c.STEP_HEARTBEAT_TIMEOUT,
                    retry_policy=c.PREP_RETRY,
                    summary=f"drop CI schema {schema}",
                )
            except ActivityError as err:
                workflow.logger.warning("schema %s not dropped: %s", schema, err)

    async def _flush_records(self) -> None:
        """Write runs the job ended itself to the run store; on failure, retry later."""
        if self._store_retry_at is not None and workflow.now() < self._store_retry_at:
            return
        while self.st.pending_records:
            finished = self.st.pending_records[0]
            try:
                await self._store_call(
                    "store_record_run",
                    RecordRunInput(
                        run=RunResult(
                            run_id=finished.run_id,
                            account_id=self.account.account_id,
                            job_id=self.job.job_id,
                            status=finished.status,
                            status_message=finished.message,
                            cause=finished.cause,
                            created_at=finished.finished_at,
                            finished_at=finished.finished_at,
                        )
                    ),
                    RecordRunResult,
                    f"record the end of run {finished.run_id}",
                )
            except ApplicationError as err:
                if err.type != c.STORE_UNAVAILABLE:
                    # The store refuses this record for good (an unknown run): drop it.
                    workflow.logger.warning("%s", err)
                    self.st.pending_records.pop(0)
                    continue
                workflow.logger.warning("%s; retrying later", err)
                self._store_retry_at = workflow.now() + c.STORE_RETRY_AFTER
                return
            self.st.pending_records.pop(0)

    def _next_wakeup(self) -> datetime | None:
        deadlines = [
            d
            for d in (
                self._next_cron(),
                policy.next_queue_deadline(self.st, self.account.max_queue_wait),
                self._orphan_check_at,
                self._store_retry_at,
            )
            if d is not None
        ]
        return min(deadlines) if deadlines else None

    def _upstream(self) -> list[str]:
        return sorted({t.job_id for t in self.job.triggers.on_job_completion})

    def _is_known(self, run_id: str) -> bool:
        return any(q.run_id == run_id for q in self.st.queue) or any(
            r.run_id == run_id for r in self.st.in_flight
        )

    def _reject(self, handler: str, err: Exception) -> None:
        workflow.logger.warning("job %s rejected %s: %s", self.job.job_id, handler, err)
        policy.reject(self.st, handler, str(err), workflow.now())


def _finished_unreported(run_id: str, end: ClosedWorkflow) -> tuple[RunFinished, bool]:
    """A run that ended without telling the job, and whether the job must write its end
    to the store (a completed run wrote its own)."""
    known = {int(status) for status in RunStatus}
    if end.close_status == "COMPLETED" and end.result_status in known:
        status = RunStatus(end.result_status)
        if status.is_finished:
            return RunFinished(run_id=run_id, status=status, message=end.result_message), False
    if end.close_status in ("FAILED", "TIMED_OUT"):
        message = f"The run's workflow ended with {end.close_status.replace('_', ' ').lower()}"
        return RunFinished(run_id=run_id, status=RunStatus.ERROR, message=message), True
    message = {
        "TERMINATED": "The run's workflow was terminated",
        "CANCELED": "Cancelled",
    }.get(end.close_status, "The run's workflow ended without reporting")
    return RunFinished(run_id=run_id, status=RunStatus.CANCELLED, message=message), True


def job_search_attributes(inp: JobWorkflowInput) -> TypedSearchAttributes:
    deactivated = inp.state is not None and inp.state.deactivated
    pairs: list[SearchAttributePair[Any]] = [
        SearchAttributePair(c.SA_ACCOUNT, inp.account.account_id),
        SearchAttributePair(c.SA_JOB, inp.job.job_id),
        SearchAttributePair(c.SA_STATUS, "Deactivated" if deactivated else "Active"),
    ]
    upstream = sorted({t.job_id for t in inp.job.triggers.on_job_completion})
    if upstream:
        pairs.append(SearchAttributePair(c.SA_UPSTREAM, upstream))
    return TypedSearchAttributes(pairs)
