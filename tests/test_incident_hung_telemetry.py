"""Hung telemetry (issue 5, item 2; dbt Cloud, February 2026).

Post-run telemetry hung with no timeout, held capacity for up to 24 hours and cascaded. Here
200 runs go through an account with 5 slots while the telemetry sink misbehaves on every
single run: for the first half it never returns, for the second half it raises. Each run must
end with the status its steps earned (a mix of successes and failures), no slot may ever be
held by a run whose telemetry has begun, slots in use return to 0 while telemetry is still
hung, and the telemetry attempts stay within ``TELEMETRY_RETRY`` (2 per run).
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.store import RunStore
from starter import jobs
from tests.builders import account, job, wait_for, wait_run
from tests.conftest import unique
from tests.fakes import FakeDbtExecutor
from tests.incident_helpers import Figures, SlotSample, SlotSampler, duplicates, workers
from workflows import constants as c
from workflows.models import (
    RunStatus,
    TelemetryEvent,
    TriggerOverrides,
    TriggerRequest,
)

pytestmark = [pytest.mark.incident, pytest.mark.devserver, pytest.mark.slow]

RUNS = 200
JOBS = 10
SLOTS = 5
HELD_TOO_LONG = 0.5
"""A slot holder whose run's telemetry began this long before the sample was asked for is a
violation. (A run releases its slot before it schedules telemetry, and a query answers after
the signals delivered before it; the margin only covers the two clocks' reading order.)"""


class MisbehavingSink:
    """Telemetry that never returns for the first half of the runs (the store allocates run
    ids 1, 2, ... in trigger order) and raises for the second half. (Hung calls end with
    the telemetry queue's timeout, 10 s per attempt, 2 attempts; 50 at a time, so the
    failing half's calls wait behind them and many are still queued when the test ends.)"""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = defaultdict(int)
        self.first_attempt: dict[str, float] = {}
        self.hanging = 0
        self.max_hanging = 0
        self.cancelled = 0

    @staticmethod
    def hangs(run_id: str) -> bool:
        return int(run_id) <= RUNS // 2

    async def emit(self, event: TelemetryEvent) -> None:
        run_id = event.run.run_id
        self.attempts[run_id] += 1
        self.first_attempt.setdefault(run_id, time.monotonic())
        if not self.hangs(run_id):
            raise RuntimeError("telemetry backend is down")
        self.hanging += 1
        self.max_hanging = max(self.max_hanging, self.hanging)
        try:
            await asyncio.Event().wait()  # the incident's infinite loop, as a hang
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.hanging -= 1


def expected_status(n: int) -> RunStatus:
    """Every third run's step fails: a run's real status is a mix of the two."""
    return RunStatus.ERROR if n % 3 == 0 else RunStatus.SUCCESS


async def test_hung_and_failing_telemetry_never_hold_a_slot_or_change_a_status(
    dev_env: WorkflowEnvironment,
    fake_dbt: FakeDbtExecutor,
    run_store: RunStore,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client, acct = dev_env.client, unique("telherd")
    sink = MisbehavingSink()
    settings = account(acct, run_slots=SLOTS)
    started = time.monotonic()
    async with (
        workers(client, fake_dbt, store=run_store, telemetry=sink) as queues,
        SlotSampler(client, acct, interval=0.1) as slots,
    ):
        keys = [f"j{i}" for i in range(JOBS)]
        for key in keys:
            await jobs.save_job(client, job(acct, key), settings, queues)
        expected: dict[str, RunStatus] = {}
        gate = asyncio.Semaphore(20)

        async def trigger(n: int) -> None:
            step = "dbt run -s fail" if expected_status(n) == RunStatus.ERROR else "dbt run -s ok"
            request = TriggerRequest(overrides=TriggerOverrides(steps_override=[step]))
            async with gate:
                result = await jobs.trigger(client, acct, keys[n % JOBS], request)
            expected[result.run_id] = expected_status(n)

        await asyncio.gather(*(trigger(n) for n in range(RUNS)))

        def stored_statuses() -> dict[str, RunStatus]:
            runs = run_store.list_runs(acct, limit=1000).items
            return {r.key: r.status for r in runs if r.status.is_finished}

        await wait_for(
            lambda: len(stored_statuses()) >= RUNS,
            timeout=120,
            interval=0.5,
            what="every run's final status in the store",
        )
        all_ended = time.monotonic()

        async def no_slot_in_use() -> SlotSample | None:
            sample = await slots.sample()
            return sample if sample is not None and not sample.holders else None

        # Slots in use are back to 0 at once (hung telemetry calls may still be running).
        at_end = await wait_for(no_slot_in_use, timeout=5, what="slots in use back to 0")
        hung_at_end = sink.hanging
        # Each run workflow ends too, once its telemetry has timed out (schedule-to-close).
        results = await asyncio.gather(
            *(wait_run(client, acct, run_id, timeout=90) for run_id in expected)
        )
        closed = time.monotonic()
    stored = stored_statuses()
    wrong = [r.run_id for r in results if r.status != expected[r.run_id]]
    wrong += [k for k, status in stored.items() if status != expected.get(k)]
    # A holder sampled after its run's telemetry began (by more than HELD_TOO_LONG).
    held_by_telemetry = [
        (sample.at, run_id)
        for sample in slots.samples
        for run_id in sample.holders
        if run_id in sink.first_attempt and sample.at - sink.first_attempt[run_id] > HELD_TOO_LONG
    ]
    attempts = list(sink.attempts.values())
    figures = Figures(
        "hung-telemetry",
        runs=len(results),
        faults=sum(attempts),
        lost=RUNS - len(stored) + len(wrong),
        duplicates=duplicates(fake_dbt.started_runs()) + max(0, len(stored) - RUNS),
        max_slot_overrun=max(slots.overrun(SLOTS), len(held_by_telemetry)),
        notes={
            "slots": SLOTS,
            "max_slots_in_use": slots.max_in_use,
            "slot_samples": len(slots.samples),
            "holders_with_telemetry_begun": len(held_by_telemetry),
            "runs_with_telemetry_attempts": len(attempts),
            "max_attempts_per_run": max(attempts, default=0),
            "hung_calls_max": sink.max_hanging,
            "hung_calls_when_slots_were_0": hung_at_end,
            "hung_calls_after_shutdown": sink.hanging,
            "hung_calls_cancelled": sink.cancelled,
            "runs_s": round(all_ended - started, 1),
            "workflows_closed_s": round(closed - started, 1),
        },
    )
    figures.report(capsys)
    assert at_end.holders == () and at_end.waiters == 0
    assert held_by_telemetry == []
    assert max(attempts) <= c.TELEMETRY_RETRY.maximum_attempts
    assert sorted(expected) == sorted(stored)
    assert fake_dbt.max_running <= SLOTS
