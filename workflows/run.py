"""RunWorkflow ``run:{account}:{run}``: one execution of a job.

slot (not for CI) → prep → steps (each stores its artifacts; the last one also removes the
workspace) → release → final status → tell the job → webhooks → telemetry. Every activity
has a start-to-close timeout and the long ones heartbeat, so a hung step or a dead worker
can never hold a slot. The slot is released *before* the final status is written and before
the job is told; telemetry is handed to the worker's bounded queue after all of it, so
nothing after the last step can hold capacity. The run publishes ``job.run.started`` (first
step) and ``job.run.completed``/``errored`` (after its final status) for the account's
webhooks, which deliver them without the run waiting.

The run timeout is a deadline, not a timer: prep's schedule-to-close ends by it, and each
step is stopped at it (``StepInput.deadline``, enforced around every executor) with
schedule-to-close backstops.

History budget (tests/test_history_budget.py): a one-step run is 22 events when a slot is
free (62 before issue 6): its request is an update the slots workflow answers at once, so
no queue-wait timer and no grant signal unless it must wait, and the same local activity
(``request_slot``) stores the Starting snapshot when granted. At its first step and at its
end the run reports once (local activity ``report_run``: release, snapshot, job-completion
triggers, the job's signal, webhook events, telemetry hand-off), a marker each.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    FailureError,
)
from temporalio.exceptions import (
    TimeoutError as TemporalTimeoutError,
)
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.artifacts import StepKey
    from activities.control import signal_workflow
    from workflows import constants as c
    from workflows import policy
    from workflows.errors import MEMORY_LIMIT_MESSAGE, ErrorType
    from workflows.models import (
        CleanupInput,
        NotifyDependentsInput,
        PreparedRun,
        PrepareInput,
        PublishResult,
        RecordRunInput,
        RecordRunResult,
        ReportRunInput,
        ReportRunResult,
        RunEventInput,
        RunFinished,
        RunInput,
        RunResult,
        RunStatus,
        SignalWorkflowInput,
        SlotAnswer,
        SlotGrant,
        SlotRelease,
        SlotRequest,
        SlotsStartRequest,
        StepInput,
        StepOutcome,
        StepResult,
        TelemetryEvent,
    )

MIN_WAIT = timedelta(seconds=1)
RETRY_STEP = ["dbt", "retry"]
STEP_GRACE = timedelta(minutes=1)


@workflow.defn(name=c.RUN_WORKFLOW)
class RunWorkflow:
    @workflow.init
    def __init__(self, inp: RunInput) -> None:
        self.inp = inp
        self.grant: SlotGrant | None = None
        self.cancel_reason: str | None = None
        self._finishing = False
        self._main: asyncio.Task[RunResult] | None = None
        self._seq = 0  # run store snapshots written so far
        self._starting_stored = False  # the slot request's answer wrote Starting
        self._cleaned_up = False  # the last step removed the workspace
        # The run's timeout as a moment, set when it leaves the queue. Enforced by the
        # activities (prep's schedule-to-close, the step's deadline), not by a timer.
        self._deadline: datetime | None = None
        self._timed_out = False
        self.r = RunResult(
            run_id=inp.run_id,
            account_id=inp.account.account_id,
            job_id=inp.job.job_id,
            status=RunStatus.QUEUED,
            cause=inp.trigger.cause,
            created_at=inp.queued_at,
        )
        self._ci = policy.is_ci(inp.job, inp.trigger)
        if self._ci and inp.trigger.pr_id is not None:
            self.r.schema_name = c.ci_schema_name(inp.job.job_id, inp.trigger.pr_id)

    @workflow.run
    async def run(self, inp: RunInput) -> RunResult:
        # A Temporal cancel of this workflow propagates into the awaited task, which records
        # Cancelled, frees the slot and tells the job before returning.
        self._main = asyncio.create_task(self._lifecycle())
        return await self._main

    # ------------------------------------------------------------------ messages

    @workflow.signal(name=c.SIGNAL_SLOT_GRANTED)
    def slot_granted(self, grant: SlotGrant) -> None:
        if grant.request_id == self.inp.run_id:
            self.grant = grant

    @workflow.signal(name="cancel")
    def cancel(self, reason: Any) -> None:
        """Cancel with a reason (the job uses this for superseded runs)."""
        if self._finishing or self._main is None or self._main.done():
            return
        self.cancel_reason = reason if isinstance(reason, str) and reason else "Cancelled"
        self._main.cancel()

    @workflow.query(name=c.QUERY_DESCRIBE)
    def describe(self) -> RunResult:
        return self.r

    # ------------------------------------------------------------------ lifecycle

    async def _lifecycle(self) -> RunResult:
        slot_requested = acquired = False
        prepared: list[PreparedRun] = []
        try:
            if not self._ci:
                slot_requested = True
                acquired = await self._acquire_slot()
            if self._ci or acquired:
                await self._start_and_execute(prepared)
        except asyncio.CancelledError:
            self.r.status = RunStatus.CANCELLED
            self.r.status_message = self.cancel_reason or "Cancelled by request"
            for step in self.r.steps:
                if not step.status.is_finished:
                    step.status = RunStatus.CANCELLED
                    step.finished_at = workflow.now()
        except Exception as err:  # noqa: BLE001 - any surprise ends the run in Error, never stuck
            workflow.logger.exception("run %s failed unexpectedly", self.inp.run_id)
            self.r.status = RunStatus.ERROR
            self.r.status_message = f"Internal error: {err}"
        # Not a ``finally``: on worker cache eviction the SDK closes this coroutine with
        # GeneratorExit, and workflow calls there would fail. Every real ending gets here.
        self._finishing = True
        await self._finish(slot_requested, prepared)
        return self.r

    async def _start_and_execute(self, prepared: list[PreparedRun]) -> None:
        # Wait time ends when the slot is granted (in the slots workflow's time).
        self.r.dequeued_at = self.grant.granted_at if self.grant is not None else workflow.now()
        # No search attribute for Starting (prep is short; each upsert is an event and a
        # visibility write): RunslotStatus goes Queued → Running → the final status.
        self._set_status(RunStatus.STARTING, "preparing", search_attribute=False)
        if not self._starting_stored:
            await self._store()
        self._deadline = self.r.dequeued_at + self._run_timeout()
        await self._execute(prepared)
        if self._timed_out:
            timeout = self._run_timeout()
            self.r.status = RunStatus.ERROR
            self.r.status_message = policy.run_timeout_message(timeout)
            for step in self.r.steps:
                if not step.status.is_finished or step.status == RunStatus.ERROR:
                    step.status = RunStatus.ERROR
                    step.finished_at = step.finished_at or workflow.now()
                    step.message = "stopped by the run timeout"

    async def _acquire_slot(self) -> bool:
        """Wait for a slot within the queue-wait budget. False if the run was cancelled."""
        account = self.inp.account
        lease = self._run_timeout() + c.SLOT_LEASE_GRACE
        workflow.set_current_details("waiting for a run slot")
        # Granted at once, the same local activity writes the Starting snapshot (numbered
        # now; unused if it is not written, as the store only wants them increasing).
        starting = self.r.model_copy(update={"status": RunStatus.STARTING})
        answer = await workflow.execute_local_activity(
            "request_slot",
            SlotsStartRequest(
                account_id=account.account_id,
                capacity=account.run_slots,
                reap_interval=account.slot_reap_interval,
                workflow_task_queue=self.inp.queues.workflows,
                request=SlotRequest(
                    request_id=self.inp.run_id,
                    workflow_id=workflow.info().workflow_id,
                    lease=lease,
                    requested_at=workflow.now(),
                ),
                starting=RecordRunInput(run=starting, seq=self._seq + 1),
            ),
            result_type=SlotAnswer,
            start_to_close_timeout=c.LOCAL_ACTIVITY_TIMEOUT,
            retry_policy=c.CONTROL_RETRY,
            summary="request a run slot",
        )
        self._seq += 1
        if answer.granted_at is not None and self.grant is None:
            # Granted in the answer: no queue-wait timer, no signal, no workflow task.
            self.grant = SlotGrant(request_id=self.inp.run_id, granted_at=answer.granted_at)
            self._starting_stored = answer.recorded
        if self.grant is not None:
            return True
        budget = account.max_queue_wait - (workflow.now() - self.inp.queued_at)
        try:
            await workflow.wait_condition(
                lambda: self.grant is not None,
                timeout=max(budget, MIN_WAIT),
                timeout_summary="max queue wait",
            )
        except TimeoutError:
            waited = workflow.now() - self.inp.queued_at
            self.r.status = RunStatus.CANCELLED
            self.r.status_message = policy.queue_timeout_message(waited, account.max_queue_wait)
            return False
        return True

    def _run_timeout(self) -> timedelta:
        override = self.inp.trigger.overrides.timeout_seconds_override
        seconds = override if override is not None else self.inp.job.timeout_seconds
        cap = self.inp.account.max_run_duration
        return min(timedelta(seconds=seconds), cap) if seconds else cap

    async def _execute(self, prepared: list[PreparedRun]) -> None:
        inp, job = self.inp, self.inp.job
        overrides = inp.trigger.overrides
        try:
            prepared_run = await self._prepare()
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):
                raise asyncio.CancelledError from err
            if self._past_deadline(err):
                self._timed_out = True
                return
            # A run that cannot be prepared fails alone, saying why (a missing project, an
            # unavailable dbt version, a secret the worker lacks): never "internal error".
            self.r.status = RunStatus.ERROR
            self.r.status_message = f"Preparing the run failed: {_failure_message(err)}"
            return
        prepared.append(prepared_run)
        workspace = prepared[0].workspace
        self.r.git_sha = prepared[0].git_sha
        self.r.dbt_version = prepared[0].dbt_version or None
        steps = policy.planned_steps(job, overrides)
        for index, argv in enumerate(steps, start=1):
            now = workflow.now()
            if self._remaining() <= timedelta(0):
                self._timed_out = True
                return
            step_timeout = self._remaining() + STEP_GRACE
            if index == 1:
                self.r.started_at = now
                self._set_status(RunStatus.RUNNING, "running steps")
            step = StepResult(
                index=index, name=" ".join(argv)[:255], argv=argv,
                status=RunStatus.RUNNING, started_at=now,
            )  # fmt: skip
            self.r.steps.append(step)
            workflow.set_current_details(f"step {index}/{len(steps)}: {' '.join(argv)[:120]}")
            if index == 1:
                await self._report(publish=(c.EVENT_RUN_STARTED,))
            else:
                await self._store()
            try:
                outcome = await workflow.execute_activity(
                    "run_step",
                    StepInput(
                        account_id=inp.account.account_id,
                        run_id=inp.run_id,
                        workspace=workspace,
                        index=index,
                        argv=argv,
                        memory_limit_mb=inp.account.run_memory_limit_mb,
                        timeout_seconds=step_timeout.total_seconds(),
                        deadline=self._deadline,
                        cleanup_after=index == len(steps),
                    ),
                    result_type=StepOutcome,
                    task_queue=self.inp.queues.steps,
                    start_to_close_timeout=step_timeout,
                    # A step still waiting for a steps worker at the deadline ends too.
                    schedule_to_close_timeout=step_timeout,
                    heartbeat_timeout=c.STEP_HEARTBEAT_TIMEOUT,
                    retry_policy=c.STEP_RETRY,
                    cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
                    summary=" ".join(argv)[:200],
                )
            except ActivityError as err:
                self._step_failed(step, err)
                return
            step.status = RunStatus.SUCCESS
            step.exit_code = outcome.exit_code
            step.log_key = outcome.log_key
            step.artifacts = outcome.artifacts
            step.finished_at = workflow.now()
            self._cleaned_up = outcome.cleaned_up
        # Artifacts are stored by each step as it ends (``StepOutcome.artifacts``).
        self.r.status = RunStatus.SUCCESS

    def _step_failed(self, step: StepResult, err: ActivityError) -> None:
        """Record how a step's activity failed; a cancel carries on as a cancel."""
        step.finished_at = workflow.now()
        # No outcome on failure, but the log was streamed under a known key.
        step.log_key = StepKey(self.inp.account.account_id, self.inp.run_id, step.index).log_key
        if isinstance(err.cause, CancelledError):
            # WAIT_CANCELLATION_COMPLETED: the process is dead; carry the cancel on.
            step.status = RunStatus.CANCELLED
            raise asyncio.CancelledError from err
        step.status = RunStatus.ERROR
        if self._past_deadline(err):
            self._timed_out = True
            return
        step.message = _failure_message(err)
        step.exit_code = _exit_code(err)
        self.r.status = RunStatus.ERROR
        self.r.status_message = (
            step.message
            if step.message == MEMORY_LIMIT_MESSAGE
            else f"Step {step.index} ({step.name}) failed: {step.message}"
        )

    async def _prepare(self) -> PreparedRun:
        """The run's workspace: project checked out, profile rendered (an activity)."""
        inp, job = self.inp, self.inp.job
        overrides = inp.trigger.overrides
        prepared: PreparedRun = await workflow.execute_activity(
            "prepare_run",
            PrepareInput(
                account_id=inp.account.account_id,
                job_id=job.job_id,
                run_id=inp.run_id,
                environment=job.environment
                if overrides.dbt_version_override is None
                else job.environment.model_copy(
                    update={"dbt_version": overrides.dbt_version_override}
                ),
                target_name=overrides.target_name_override
                or job.settings.target_name
                or job.environment.target_name,
                threads=overrides.threads_override or job.settings.threads,
                schema_override=self.r.schema_name or overrides.schema_override,
                env_vars=overrides.env_vars,
                git_sha=overrides.git_sha,
                git_branch=overrides.git_branch,
                retry_of_run_id=inp.trigger.rerun_of
                if overrides.steps_override and overrides.steps_override[0] == RETRY_STEP
                else None,
            ),
            result_type=PreparedRun,
            task_queue=self.inp.queues.steps,
            start_to_close_timeout=c.PREP_TIMEOUT,
            # Prep, retries included, ends by the run's deadline.
            schedule_to_close_timeout=max(self._remaining(), MIN_WAIT),
            heartbeat_timeout=c.STEP_HEARTBEAT_TIMEOUT,
            retry_policy=c.PREP_RETRY,
            cancellation_type=ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"prepare run {inp.run_id}",
        )
        return prepared

    async def _finish(self, slot_requested: bool, prepared: list[PreparedRun]) -> None:
        """Release → final status → tell the job → webhooks → telemetry (one report), then
        clean up a workspace the last step did not remove. Each part is best effort."""
        account_id = self.inp.account.account_id
        self.r.finished_at = workflow.now()
        self._set_status(self.r.status, self.r.status.humanized)
        # Release (the reaper frees the slot if this fails) → final status → tell the job
        # (it also checks on runs that never report) → webhooks, after the final status is
        # in the store (a receiver may read the run back).
        release = None
        if slot_requested:
            release = SignalWorkflowInput(
                workflow_id=c.slots_workflow_id(account_id),
                signal=c.SIGNAL_SLOT_RELEASE,
                payload=SlotRelease(request_id=self.inp.run_id).model_dump(mode="json"),
            )
        finished = RunFinished(
            run_id=self.inp.run_id,
            status=self.r.status,
            message=self.r.status_message,
            finished_at=self.r.finished_at,
        )
        # Job-completion triggers (rule 7) go with the report, not from the job (one local
        # activity fewer there); CI runs trigger nothing.
        notify = None
        if not self._ci:
            notify = NotifyDependentsInput(
                account_id=account_id,
                job_id=self.inp.job.job_id,
                run_id=self.inp.run_id,
                status=self.r.status,
                source_workflow_id=self.inp.job_workflow_id,
            )
        events: tuple[str, ...] = (c.EVENT_RUN_COMPLETED,)
        if self.r.status == RunStatus.ERROR:
            events = (c.EVENT_RUN_COMPLETED, c.EVENT_RUN_ERRORED)
        reported = await self._report(
            final=True,
            release=release,
            notify=notify,
            finished=finished,
            publish=events,
            telemetry=True,
        )
        if prepared and not self._cleaned_up:
            try:
                await workflow.execute_activity(
                    "cleanup_run",
                    CleanupInput(
                        account_id=account_id,
                        run_id=self.inp.run_id,
                        workspace=prepared[0].workspace,
                    ),
                    task_queue=self.inp.queues.steps,
                    start_to_close_timeout=c.CLEANUP_TIMEOUT,
                    heartbeat_timeout=c.STEP_HEARTBEAT_TIMEOUT,
                    retry_policy=c.PREP_RETRY,
                    summary="clean up workspace",
                )
            except ActivityError as err:
                workflow.logger.warning("cleanup of %s failed: %s", self.inp.run_id, err)
        if reported:
            return  # the report handed the telemetry to the worker's queue
        try:
            await workflow.execute_activity(
                "emit_run_telemetry",
                TelemetryEvent(run=self.r),
                task_queue=self.inp.queues.telemetry,
                start_to_close_timeout=c.TELEMETRY_TIMEOUT,
                schedule_to_close_timeout=c.TELEMETRY_TIMEOUT * 3,
                retry_policy=c.TELEMETRY_RETRY,
                summary="post-run telemetry",
            )
        except ActivityError as err:
            # Telemetry never changes a run's status (dbt Cloud, February 2026).
            workflow.logger.warning("telemetry for %s failed: %s", self.inp.run_id, err)

    async def _report(
        self,
        *,
        final: bool = False,
        release: SignalWorkflowInput | None = None,
        notify: NotifyDependentsInput | None = None,
        finished: RunFinished | None = None,
        publish: tuple[str, ...] = (),
        telemetry: bool = False,
    ) -> bool:
        """Release, snapshot, job-completion triggers, tell the job, publish, hand off
        telemetry: one local activity (one marker). False if it failed for good (a store
        down for ~12 minutes at the end): then the release, the job's signal and the events
        are tried again on its own (telemetry by the caller), so the slot, the job and the
        webhooks never depend on the store; the job then sends the triggers itself."""

        def tell_job(notified: bool) -> SignalWorkflowInput | None:
            if finished is None:
                return None
            return SignalWorkflowInput(
                workflow_id=self.inp.job_workflow_id,
                signal=c.SIGNAL_RUN_FINISHED,
                payload=finished.model_copy(update={"dependents_notified": notified}).model_dump(
                    mode="json"
                ),
            )

        self._seq += 1
        try:
            await workflow.execute_local_activity(
                "report_run",
                ReportRunInput(
                    record=RecordRunInput(run=self.r, seq=self._seq),
                    release=release,
                    notify=notify,
                    finished=tell_job(notify is not None),
                    publish=self._event(*publish) if publish else None,
                    telemetry=telemetry,
                ),
                result_type=ReportRunResult,
                start_to_close_timeout=c.LOCAL_ACTIVITY_TIMEOUT,
                retry_policy=c.STORE_FINAL_RETRY if final else c.STORE_RETRY,
                summary=f"report run {self.inp.run_id} ({self.r.status.humanized})",
            )
        except FailureError as err:
            workflow.logger.warning("run %s not reported at once: %s", self.inp.run_id, err)
            for part in (release, tell_job(False)):
                if part is not None:
                    await self._signal(part.workflow_id, part.signal, part.payload)
            if publish:
                await self._publish(*publish)
            return False
        return True

    def _remaining(self) -> timedelta:
        """Time left before the run's deadline (its timeout)."""
        if self._deadline is None:
            return self._run_timeout()
        return self._deadline - workflow.now()

    def _past_deadline(self, err: ActivityError) -> bool:
        """Did this activity end because the run reached its timeout?"""
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.type == ErrorType.RUN_TIMEOUT:
            return True
        return isinstance(cause, TemporalTimeoutError) and self._remaining() <= timedelta(0)

    async def _signal(self, workflow_id: str, signal: str, payload: dict[str, Any]) -> None:
        """Signal another workflow from a local activity (best effort, logged on failure).

        One marker event, in the workflow task that is running anyway; a workflow's own
        signal would add two events and a workflow task to this run's history.
        """
        try:
            delivered = await workflow.execute_local_activity(
                signal_workflow,
                SignalWorkflowInput(workflow_id=workflow_id, signal=signal, payload=payload),
                start_to_close_timeout=c.LOCAL_ACTIVITY_TIMEOUT,
                retry_policy=c.CONTROL_RETRY,
                summary=f"signal {signal} to {workflow_id}",
            )
        except FailureError as err:
            workflow.logger.warning("%s to %s failed: %s", signal, workflow_id, err)
            return
        if not delivered:
            workflow.logger.warning("%s to %s: the workflow is gone", signal, workflow_id)

    async def _store(self) -> None:
        """Write this run's snapshot to the run store (a local activity: one marker event):
        Starting, and each step after the first (the first step's and the final snapshot go
        in ``_report``, whose final one retries for minutes after the slot is released).

        Snapshots are numbered, and the store applies them monotonically, so a retried or
        late one never moves the run backwards. A failed write is logged, never fatal.
        """
        self._seq += 1
        try:
            await workflow.execute_local_activity(
                "store_record_run",
                RecordRunInput(run=self.r, seq=self._seq),
                result_type=RecordRunResult,
                start_to_close_timeout=c.LOCAL_ACTIVITY_TIMEOUT,
                retry_policy=c.STORE_RETRY,
                summary=f"record run {self.inp.run_id} ({self.r.status.humanized})",
            )
        except FailureError as err:
            workflow.logger.warning("run %s not recorded in the store: %s", self.inp.run_id, err)

    async def _publish(self, *event_types: str) -> None:
        """Hand the run's events to its account's webhooks (a local activity: one marker).

        Delivery happens elsewhere (``WebhooksWorkflow``, telemetry queue): a slow or dead
        receiver never reaches this run. A failure to publish is logged, never fatal.
        """
        try:
            await workflow.execute_local_activity(
                "publish_run_event",
                self._event(*event_types),
                result_type=PublishResult,
                start_to_close_timeout=c.WEBHOOK_PUBLISH_TIMEOUT,
                retry_policy=c.WEBHOOK_PUBLISH_RETRY,
                summary=f"publish {', '.join(event_types)}",
            )
        except FailureError as err:
            workflow.logger.warning(
                "run %s: %s not published: %s", self.inp.run_id, "/".join(event_types), err
            )

    def _event(self, *event_types: str) -> RunEventInput:
        return RunEventInput(
            account_id=self.inp.account.account_id,
            job_id=self.inp.job.job_id,
            run_id=self.inp.run_id,
            event_types=list(event_types),
            occurred_at=workflow.now(),
            status=self.r.status,
            status_message=self.r.status_message,
            cause=self.inp.trigger.cause,
            cause_text=self.inp.trigger.cause_text,
            started_at=self.r.started_at,
            finished_at=self.r.finished_at,
            dbt_version=self.r.dbt_version,
            queues=self.inp.queues,
        )

    def _set_status(
        self, status: RunStatus, details: str, *, search_attribute: bool = True
    ) -> None:
        self.r.status = status
        if search_attribute:
            workflow.upsert_search_attributes([c.SA_STATUS.value_set(status.humanized)])
        workflow.set_current_details(f"**{status.humanized}**: {details}")


def _failure_message(err: ActivityError) -> str:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        if cause.type == ErrorType.MEMORY_LIMIT:
            return MEMORY_LIMIT_MESSAGE
        return cause.message
    if isinstance(cause, TemporalTimeoutError):
        return (
            f"the step worker stopped responding ({cause.type.name if cause.type else 'timeout'}"
            "); the step was abandoned"
        )
    if isinstance(cause, CancelledError):
        return "the step was cancelled"
    return str(cause or err)


def _exit_code(err: ActivityError) -> int | None:
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.details:
        first = cause.details[0]
        return first if isinstance(first, int) else None
    return None
