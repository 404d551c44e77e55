"""The scheduling rules as pure functions: cron with DST, and the queue rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tests.builders import job
from workflows import policy
from workflows.models import (
    CompletionTrigger,
    FinishedRun,
    JobDefinition,
    JobState,
    JobTriggers,
    JobType,
    RerunPlan,
    RunStatus,
    TriggerCause,
    TriggerOverrides,
    TriggerRequest,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NY = "America/New_York"


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


@pytest.mark.parametrize(
    ("cron", "tz", "after", "expected"),
    [
        ("*/15 * * * *", "UTC", "2026-01-01T10:07:00+00:00", "2026-01-01T10:15:00+00:00"),
        ("0 9 * * *", "Europe/Paris", "2026-01-01T00:00:00+00:00", "2026-01-01T09:00:00+01:00"),
        ("0 9 * * *", "Europe/Paris", "2026-07-01T00:00:00+00:00", "2026-07-01T09:00:00+02:00"),
        # Spring forward (America/New_York, 2026-03-08 02:00 -> 03:00): 02:30 does not exist
        # and fires at the end of the gap, 03:00 EDT.
        ("30 2 * * *", NY, "2026-03-08T00:00:00-05:00", "2026-03-08T03:00:00-04:00"),
        # ...and the next day is back to 02:30.
        ("30 2 * * *", NY, "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"),
        # Fall back (2026-11-01 02:00 EDT -> 01:00 EST): 01:30 occurs twice, fires once (first).
        ("30 1 * * *", NY, "2026-11-01T00:00:00-04:00", "2026-11-01T01:30:00-04:00"),
        ("30 1 * * *", NY, "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"),
        # An hourly job in the repeated hour: the second pass through 01:xx is skipped.
        ("30 * * * *", NY, "2026-11-01T01:30:00-04:00", "2026-11-01T02:30:00-05:00"),
    ],
    ids=[
        "utc-quarter-hour", "paris-winter", "paris-summer", "dst-gap-fires-at-gap-end",
        "dst-gap-next-day-normal", "dst-repeat-first-occurrence", "dst-repeat-fires-once",
        "dst-repeat-hourly-skips-second-pass",
    ],
)  # fmt: skip
def test_next_cron_fire(cron: str, tz: str, after: str, expected: str) -> None:
    assert policy.next_cron_fire(cron, tz, _utc(after)) == _utc(expected)


def test_hourly_cron_across_spring_forward_fires_once_per_wall_hour_without_duplicates() -> None:
    fires = []
    at = _utc("2026-03-08T00:00:00-05:00")
    for _ in range(5):
        at = policy.next_cron_fire("0,30 * * * *", NY, at)
        fires.append(at.astimezone(UTC).strftime("%H:%M"))
    # 00:30 EST, 01:00, 01:30, then 02:00/02:30 fall in the gap -> both at 03:00 EDT (once),
    # then 03:30 EDT.
    assert fires == ["05:30", "06:00", "06:30", "07:00", "07:30"]
    assert len(set(fires)) == len(fires)


def _trigger(cause: TriggerCause, **kw: object) -> TriggerRequest:
    return TriggerRequest.model_validate({"cause": cause, **kw})


def test_newer_scheduled_run_cancels_older_queued_scheduled_run_but_not_api_runs() -> None:
    j, st = job("a", "j"), JobState()
    policy.enqueue(j, st, _trigger(TriggerCause.API), "api-1", T0)
    policy.enqueue(j, st, _trigger(TriggerCause.SCHEDULED), "cron-1", T0)
    cancelled = policy.enqueue(j, st, _trigger(TriggerCause.SCHEDULED), "cron-2", T0)
    assert [c.run_id for c in cancelled] == ["cron-1"]
    assert "over-scheduled" in cancelled[0].message
    assert [q.run_id for q in st.queue] == ["api-1", "cron-2"]


def test_merge_job_keeps_only_the_most_recent_queued_merge_run() -> None:
    j, st = job("a", "m", job_type=JobType.MERGE), JobState()
    for n in range(3):
        policy.enqueue(j, st, _trigger(TriggerCause.MERGE), f"merge-{n}", T0)
    assert [q.run_id for q in st.queue] == ["merge-2"]


def test_serial_job_starts_one_run_at_a_time_and_ci_runs_start_together() -> None:
    deploy, st = job("a", "d"), JobState()
    for n in range(3):
        policy.enqueue(deploy, st, _trigger(TriggerCause.API), f"r{n}", T0)
    assert [q.run_id for q in policy.runs_to_start(deploy, st)] == ["r0"]
    ci, st_ci = job("a", "c", job_type=JobType.CI), JobState()
    for pr in (1, 2, 3):
        policy.enqueue(ci, st_ci, _trigger(TriggerCause.PULL_REQUEST, pr_id=pr), f"pr{pr}", T0)
    assert len(policy.runs_to_start(ci, st_ci)) == 3


def test_queued_runs_expire_after_the_max_queue_wait() -> None:
    j, st = job("a", "j"), JobState()
    policy.enqueue(j, st, _trigger(TriggerCause.API), "old", T0)
    policy.enqueue(j, st, _trigger(TriggerCause.API), "new", T0 + timedelta(minutes=20))
    expired = policy.expired_queued(st, T0 + timedelta(minutes=30), timedelta(minutes=30))
    assert [(q.run_id, waited) for q, waited in expired] == [("old", timedelta(minutes=30))]
    msg = policy.queue_timeout_message(timedelta(minutes=30), timedelta(minutes=30))
    assert "waiting 30m 0s" in msg and "maximum queue wait of 30m 0s" in msg


def _finish(st: JobState, j: JobDefinition, status: RunStatus, n: int) -> bool:
    finished = FinishedRun(
        run_id=f"r{n}", cause=TriggerCause.SCHEDULED, status=status, finished_at=T0
    )
    return policy.record_finished(j, st, finished)


def test_one_hundred_consecutive_failures_deactivate_and_a_manual_run_reactivates() -> None:
    j, st = job("a", "j"), JobState()
    flags = [_finish(st, j, RunStatus.ERROR, n) for n in range(99)]
    assert not any(flags) and not st.deactivated
    assert _finish(st, j, RunStatus.ERROR, 99) is True
    assert st.deactivated
    with pytest.raises(policy.TriggerRejectedError, match="deactivated after 100 consecutive"):
        policy.check_trigger(j, st, _trigger(TriggerCause.SCHEDULED))
    with pytest.raises(policy.TriggerRejectedError):
        policy.check_trigger(j, st, _trigger(TriggerCause.API))
    policy.check_trigger(j, st, _trigger(TriggerCause.MANUAL))  # allowed
    policy.enqueue(j, st, _trigger(TriggerCause.MANUAL), "manual", T0)
    assert not st.deactivated and st.consecutive_failures == 0


def test_a_success_resets_the_failure_count_and_cancellations_do_not_count() -> None:
    j, st = job("a", "j"), JobState()
    for n in range(50):
        _finish(st, j, RunStatus.ERROR, n)
    _finish(st, j, RunStatus.CANCELLED, 50)
    assert st.consecutive_failures == 50
    _finish(st, j, RunStatus.SUCCESS, 51)
    assert st.consecutive_failures == 0


def test_dedupe_key_returns_the_first_run() -> None:
    j, st = job("a", "j"), JobState()
    first = _trigger(TriggerCause.API, dedupe_key="k")
    policy.enqueue(j, st, first, "41", T0)
    assert policy.existing_run_for(st, _trigger(TriggerCause.API, dedupe_key="k")) == "41"
    assert policy.existing_run_for(st, _trigger(TriggerCause.API, dedupe_key="other")) is None


def test_rerun_resumes_the_failed_step_with_dbt_retry_then_runs_the_rest() -> None:
    j = job("a", "j", steps=["dbt seed", "dbt build -s +orders", "dbt test"])
    plan = RerunPlan(run_id="7", failed_step=2, failed_argv=["dbt", "build", "-s", "+orders"])
    assert policy.rerun_steps(j, plan) == [["dbt", "retry"], ["dbt", "test"]]


def test_rerun_of_a_step_dbt_retry_cannot_resume_runs_that_step_again() -> None:
    j = job("a", "j", steps=["dbt deps", "dbt build"])
    plan = RerunPlan(run_id="7", failed_step=1, failed_argv=["dbt", "deps"])
    assert policy.rerun_steps(j, plan) == [["dbt", "deps"], ["dbt", "build"]]


def test_rerun_of_a_run_that_failed_before_its_steps_runs_them_all() -> None:
    j = job("a", "j", steps=["dbt seed", "dbt build"])
    assert policy.rerun_steps(j, RerunPlan(run_id="7", failed_step=None)) == [
        ["dbt", "seed"], ["dbt", "build"],
    ]  # fmt: skip


def test_rerun_follows_the_failed_runs_own_steps_override() -> None:
    j = job("a", "j", steps=["dbt build"])
    plan = RerunPlan(
        run_id="7", failed_step=1, failed_argv=["dbt", "run"],
        steps_override=[["dbt", "run"], ["dbt", "test"]],
    )  # fmt: skip
    assert policy.rerun_steps(j, plan) == [["dbt", "retry"], ["dbt", "test"]]


def test_docs_generate_is_appended_once() -> None:
    j = job("a", "j", steps=["dbt build"], generate_docs=True)
    docs = ["dbt", "docs", "generate"]
    assert policy.planned_steps(j, TriggerOverrides()) == [["dbt", "build"], docs]
    # A rerun whose failed step was the docs step itself does not get a second one.
    rerun = TriggerOverrides(steps_override=["dbt docs generate"])
    assert policy.planned_steps(j, rerun) == [docs]


def test_completion_trigger_matches_listed_job_and_status_only() -> None:
    listed = CompletionTrigger(job_id="a1", statuses=[RunStatus.SUCCESS, RunStatus.ERROR])
    b = job("a", "b", triggers=JobTriggers(on_job_completion=[listed]))
    assert policy.completion_matches(b, "a1", RunStatus.SUCCESS)
    assert policy.completion_matches(b, "a1", RunStatus.ERROR)
    assert not policy.completion_matches(b, "a1", RunStatus.CANCELLED)
    assert not policy.completion_matches(b, "other", RunStatus.SUCCESS)


def test_queue_is_bounded() -> None:
    j, st = job("a", "j"), JobState()
    for n in range(100):
        policy.enqueue(j, st, _trigger(TriggerCause.API), f"r{n}", T0)
    with pytest.raises(policy.TriggerRejectedError, match="100 queued runs"):
        policy.check_trigger(j, st, _trigger(TriggerCause.API))


def test_a_rerun_cannot_also_override_the_steps() -> None:
    both = TriggerRequest(rerun_of="7", overrides=TriggerOverrides(steps_override=["dbt run"]))
    with pytest.raises(policy.TriggerRejectedError, match="remove steps_override or rerun_of"):
        policy.check_trigger(job("a", "j"), JobState(), both)
