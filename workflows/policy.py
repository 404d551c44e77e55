"""All scheduling rules as pure functions over ``JobState``: no Temporal, no I/O.

The job workflow calls these; tests call them directly too. Everything here must be
deterministic: no wall clock (callers pass ``now``), no randomness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

from workflows.constants import (
    DEDUPE_KEYS_KEPT,
    MAX_QUEUED_RUNS_PER_JOB,
    RECENT_RUNS_KEPT,
    REJECTED_KEPT,
)
from workflows.models import (
    FinishedRun,
    JobDefinition,
    JobState,
    JobType,
    QueuedRun,
    Rejected,
    RerunPlan,
    RunStatus,
    TriggerCause,
    TriggerOverrides,
    TriggerRequest,
)

# --------------------------------------------------------------------------- cron


def _exists(naive: datetime, tz: ZoneInfo) -> bool:
    aware = naive.replace(tzinfo=tz)
    return aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None) == naive


def _wall_to_utc(naive: datetime, tz: ZoneInfo) -> datetime:
    """Local wall time to a UTC instant, with DST defined.

    * A wall time inside a spring-forward gap (02:30 on the day clocks jump 02:00→03:00)
      fires at the end of the gap (03:00 local).
    * A wall time that occurs twice (the fall-back hour) fires once, at its first occurrence.
    """
    if not _exists(naive, tz):
        probe = naive.replace(second=0, microsecond=0)
        for _ in range(24 * 60):  # gaps are at most a few hours
            probe += timedelta(minutes=1)
            if _exists(probe, tz):
                naive = probe
                break
    return naive.replace(tzinfo=tz, fold=0).astimezone(UTC)


def next_cron_fire(expr: str, timezone: str, after: datetime) -> datetime:
    """The first fire of ``expr`` in ``timezone`` strictly after ``after`` (a UTC instant)."""
    tz = ZoneInfo(timezone)
    after = after.astimezone(UTC)
    wall = after.astimezone(tz).replace(tzinfo=None)
    it = croniter(expr, wall)
    # Candidates in the repeated fall-back hour map to their first occurrence, which may be
    # before ``after``: skip them. Bounded: a day of minutely candidates at most.
    for _ in range(2 * 24 * 60 + 2):
        candidate = _wall_to_utc(it.get_next(datetime), tz)
        if candidate > after:
            return candidate
    raise ValueError(f"cron expression {expr!r} has no fire time after {after.isoformat()}")


# --------------------------------------------------------------------------- queue rules

OVER_SCHEDULED_MESSAGE = (
    "Cancelled because a newer scheduled run of this job was queued while this one was "
    "still waiting: the job is over-scheduled (its runs take longer than its schedule "
    "interval). Make the job run faster or schedule it less often."
)
MERGE_SUPERSEDED_MESSAGE = (
    "Cancelled because a more recent merge run of this job was queued; a merge job keeps "
    "only its most recent queued run."
)
PR_SUPERSEDED_MESSAGE = "Cancelled because a newer commit was pushed to pull request #{pr_id}."
DEACTIVATED_MESSAGE = (
    "Job {job_id} is deactivated after {failures} consecutive failed runs, so its triggers no "
    "longer enqueue runs. Fix the job and save it, or use Run now (cause 'manual'), "
    "to reactivate it."
)


def queue_timeout_message(waited: timedelta, limit: timedelta) -> str:
    return (
        f"Cancelled after waiting {format_duration(waited)} in the queue, longer than the "
        f"account's maximum queue wait of {format_duration(limit)}. Add run slots, or make "
        f"the runs ahead of it finish sooner."
    )


def run_timeout_message(timeout: timedelta) -> str:
    return (
        f"This run timed out after running for {format_duration(timeout)}, the job's timeout. "
        "Raise the timeout or make the job faster."
    )


def format_duration(value: timedelta) -> str:
    total = int(value.total_seconds())
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [f"{hours}h"] if hours else []
    if minutes or hours:
        parts.append(f"{minutes}m")
    parts.append(f"{seconds}s")
    return " ".join(parts)


class TriggerRejectedError(ValueError):
    """A trigger the job refuses: the message says what to do instead."""


@dataclass(frozen=True)
class Cancellation:
    run_id: str
    message: str
    running: bool
    """True when the run has a workflow (cancel it); False when it was only queued."""
    cause: TriggerCause | None = None


def is_ci(job: JobDefinition, trigger: TriggerRequest) -> bool:
    return job.job_type == JobType.CI or trigger.cause == TriggerCause.PULL_REQUEST


def check_trigger(job: JobDefinition, state: JobState, trigger: TriggerRequest) -> None:
    """Raise ``TriggerRejectedError`` if this trigger must not enqueue a run. Read-only."""
    if existing_run_for(state, trigger) is not None:
        return  # a repeat: answered with the first run's id, never rejected
    if state.deleted:
        raise TriggerRejectedError(f"job {job.job_id} was deleted; it takes no new runs")
    if trigger.rerun_of is not None and trigger.overrides.steps_override is not None:
        raise TriggerRejectedError(
            "a rerun from failure takes its steps from the failed run; "
            "remove steps_override or rerun_of"
        )
    if state.deactivated and trigger.cause != TriggerCause.MANUAL:
        raise TriggerRejectedError(
            DEACTIVATED_MESSAGE.format(job_id=job.job_id, failures=state.consecutive_failures)
        )
    if trigger.cause == TriggerCause.PULL_REQUEST and job.job_type != JobType.CI:
        raise TriggerRejectedError(
            f"job {job.job_id} is a {job.job_type.value} job; pull request runs need a CI job"
        )
    if len(state.queue) >= MAX_QUEUED_RUNS_PER_JOB:
        raise TriggerRejectedError(
            f"job {job.job_id} already has {len(state.queue)} queued runs, the maximum; "
            "wait for them to finish or cancel some"
        )


def existing_run_for(state: JobState, trigger: TriggerRequest) -> str | None:
    """The run id a repeated trigger (same dedupe key or run id) already created."""
    if trigger.dedupe_key is not None and trigger.dedupe_key in state.dedupe:
        return state.dedupe[trigger.dedupe_key]
    if trigger.run_id is not None:
        known = [q.run_id for q in state.queue] + [r.run_id for r in state.in_flight]
        if trigger.run_id in known:
            return trigger.run_id
    return None


RETRY_SUBCOMMANDS = frozenset(
    {"build", "clone", "compile", "retry", "run", "run-operation", "seed", "snapshot", "test"}
)
"""Commands ``dbt retry`` can resume (it re-runs the previous invocation's failed nodes);
any other failed step (``deps``, ``docs generate``, ``source freshness``) runs again as is."""

DOCS_STEP = ["dbt", "docs", "generate"]


def planned_steps(job: JobDefinition, overrides: TriggerOverrides) -> list[list[str]]:
    """The steps a run executes: the override or the job's, then ``docs generate`` when the
    job generates docs (unless the steps already end with it)."""
    steps = [list(s) for s in (overrides.steps_override or job.execute_steps)]
    docs = job.generate_docs
    if overrides.generate_docs_override is not None:
        docs = overrides.generate_docs_override
    if docs and (not steps or steps[-1][:3] != DOCS_STEP):
        steps.append(list(DOCS_STEP))
    return steps


def rerun_steps(job: JobDefinition, plan: RerunPlan) -> list[list[str]]:
    """Rerun from failure: ``dbt retry`` in place of the failed step, then the steps after it.

    A run that failed before its first step reruns every step; a failed step ``dbt retry``
    cannot resume (``deps``, ``source freshness``, ...) is run again as it was.
    """
    base = [list(s) for s in (plan.steps_override or job.execute_steps)]
    if plan.failed_step is None or plan.failed_argv is None:
        return base
    failed = plan.failed_argv
    resumed = ["dbt", "retry"] if len(failed) > 1 and failed[1] in RETRY_SUBCOMMANDS else failed
    return [resumed, *base[plan.failed_step :]]


def enqueue(
    job: JobDefinition, state: JobState, trigger: TriggerRequest, run_id: str, now: datetime
) -> list[Cancellation]:
    """Put a run in the queue and apply rules 3, 5 and 6. Returns the runs it supersedes.

    Manual runs reactivate a deactivated job (rule 8).
    """
    cancellations: list[Cancellation] = []
    if trigger.cause == TriggerCause.MANUAL and state.deactivated:
        state.deactivated = False
        state.consecutive_failures = 0
    if trigger.cause == TriggerCause.SCHEDULED:
        # Rule 3: at most one scheduled run waits; API runs are never touched.
        cancellations += _drop_queued(
            state, lambda q: q.trigger.cause == TriggerCause.SCHEDULED, OVER_SCHEDULED_MESSAGE
        )
    if job.job_type == JobType.MERGE and trigger.cause == TriggerCause.MERGE:
        # Rule 6: only the most recent merge run stays queued.
        cancellations += _drop_queued(
            state, lambda q: q.trigger.cause == TriggerCause.MERGE, MERGE_SUPERSEDED_MESSAGE
        )
    if trigger.cause == TriggerCause.PULL_REQUEST and trigger.pr_id is not None:
        # Rule 5: a new commit on the PR cancels the PR's older run, queued or running.
        message = PR_SUPERSEDED_MESSAGE.format(pr_id=trigger.pr_id)
        cancellations += _drop_queued(state, lambda q: q.trigger.pr_id == trigger.pr_id, message)
        cancellations += [
            Cancellation(r.run_id, message, running=True)
            for r in state.in_flight
            if r.pr_id == trigger.pr_id
        ]
    state.queue.append(QueuedRun(run_id=run_id, trigger=trigger, queued_at=now))
    if trigger.dedupe_key is not None:
        state.dedupe[trigger.dedupe_key] = run_id
        while len(state.dedupe) > DEDUPE_KEYS_KEPT:
            del state.dedupe[next(iter(state.dedupe))]
    return cancellations


def _drop_queued(
    state: JobState, match: Callable[[QueuedRun], bool], message: str
) -> list[Cancellation]:
    dropped = [q for q in state.queue if match(q)]
    state.queue = [q for q in state.queue if not match(q)]
    return [Cancellation(q.run_id, message, running=False, cause=q.trigger.cause) for q in dropped]


def runs_to_start(job: JobDefinition, state: JobState) -> list[QueuedRun]:
    """Queued runs that may start now (rule 2: serial; rule 5: CI runs are concurrent)."""
    ready: list[QueuedRun] = []
    serial_busy = any(not _in_flight_is_ci(job, r.cause) for r in state.in_flight)
    for queued in state.queue:
        if is_ci(job, queued.trigger):
            ready.append(queued)
        elif not serial_busy:
            ready.append(queued)
            serial_busy = True
    return ready


def _in_flight_is_ci(job: JobDefinition, cause: TriggerCause) -> bool:
    return job.job_type == JobType.CI or cause == TriggerCause.PULL_REQUEST


def expired_queued(
    state: JobState, now: datetime, max_wait: timedelta
) -> list[tuple[QueuedRun, timedelta]]:
    """Rule 9: queued runs that waited longer than the account's max queue wait."""
    return [(q, now - q.queued_at) for q in state.queue if now - q.queued_at >= max_wait]


def next_queue_deadline(state: JobState, max_wait: timedelta) -> datetime | None:
    return min((q.queued_at + max_wait for q in state.queue), default=None)


def record_finished(job: JobDefinition, state: JobState, finished: FinishedRun) -> bool:
    """Rule 8 bookkeeping. Returns True if this finish deactivated the job."""
    state.recent.append(finished)
    del state.recent[:-RECENT_RUNS_KEPT]
    if finished.status == RunStatus.SUCCESS:
        state.consecutive_failures = 0
    elif finished.status == RunStatus.ERROR:
        state.consecutive_failures += 1
        if not state.deactivated and state.consecutive_failures >= job.deactivate_after_failures:
            state.deactivated = True
            return True
    return False


def reactivate(state: JobState) -> None:
    """Saving the job reactivates it (rule 8)."""
    state.deactivated = False
    state.consecutive_failures = 0


def reject(state: JobState, handler: str, reason: str, now: datetime) -> None:
    state.rejected.append(Rejected(at=now, handler=handler, reason=reason[:500]))
    del state.rejected[:-REJECTED_KEPT]


def completion_matches(job: JobDefinition, upstream_job_id: str, status: RunStatus) -> bool:
    """Rule 7: does a finished run of ``upstream_job_id`` trigger ``job``?"""
    return any(
        t.job_id == upstream_job_id and status in t.statuses for t in job.triggers.on_job_completion
    )
