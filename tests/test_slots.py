"""Rule 4 (run slots): FIFO grants, the request answered at once (and its fallback by
signal), resize, the reaper after a terminate, and continue-as-new carrying state."""

from __future__ import annotations

import asyncio
import functools
from collections import Counter
from datetime import timedelta

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.control import acquire_slot
from starter import jobs
from tests.builders import account, job, wait_for, wait_run
from tests.conftest import fresh_queues, running_stack, temporal_cli, unique
from tests.fakes import FakeDbtExecutor
from workflows import constants as c
from workflows.models import (
    RunStatus,
    SlotRelease,
    SlotRequest,
    SlotsStartRequest,
    SlotsState,
    TaskQueues,
    TriggerRequest,
)

pytestmark = pytest.mark.devserver


async def _holders(client: Client, acct: str) -> list[str]:
    return [h.request_id for h in (await jobs.describe_slots(client, acct)).holders]


async def _waiters(client: Client, acct: str) -> list[str]:
    return [w.request_id for w in (await jobs.describe_slots(client, acct)).waiters]


async def _three_gated_jobs(client: Client, acct: str, queues: TaskQueues, slots: int) -> list[str]:
    run_ids = []
    for n in range(3):
        await jobs.save_job(client, job(acct, f"j{n}", [f"dbt run -s gate:g{n}"]),
                            account(acct, run_slots=slots), queues)  # fmt: skip
    for n in range(3):
        res = await jobs.trigger(client, acct, f"j{n}", TriggerRequest())
        run_ids.append(res.run_id)
        # Requests reach the semaphore in trigger order (FIFO is by arrival).
        known = functools.partial(_known_to_slots, client, acct, res.run_id)
        await wait_for(known, what=f"request of {res.run_id}")
    return run_ids


async def _known_to_slots(client: Client, acct: str, run_id: str) -> bool:
    try:
        return run_id in (await _holders(client, acct)) + (await _waiters(client, acct))
    except Exception:  # noqa: BLE001 - the slots workflow may not exist yet
        return False


async def test_slots_are_granted_fifo_and_a_run_executes_only_while_holding_one(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("fifo")
    async with running_stack(client, fake_dbt) as queues:
        r0, r1, r2 = await _three_gated_jobs(client, acct, queues, slots=1)
        await wait_for(lambda: fake_dbt.running == {r0}, what="r0 running")
        assert await _holders(client, acct) == [r0]
        assert await _waiters(client, acct) == [r1, r2]
        fake_dbt.open("g0")
        await wait_for(lambda: fake_dbt.running == {r1}, what="r1 gets the slot next")
        assert await _waiters(client, acct) == [r2]
        fake_dbt.open("g1")
        fake_dbt.open("g2")
        results = [await wait_run(client, acct, r) for r in (r0, r1, r2)]
    assert [r.status for r in results] == [RunStatus.SUCCESS] * 3
    assert fake_dbt.max_running == 1
    # Wait time is queued -> slot; the later runs waited for the earlier ones.
    assert results[2].wait_time is not None and results[0].wait_time is not None
    assert results[2].wait_time > results[0].wait_time


async def test_growing_slots_grants_waiters_at_once_and_shrinking_kills_no_run(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("resize")
    async with running_stack(client, fake_dbt) as queues:
        r0, r1, r2 = await _three_gated_jobs(client, acct, queues, slots=1)
        await wait_for(lambda: fake_dbt.running == {r0}, what="one running")
        state = await jobs.resize_slots(client, acct, 3)
        assert state.capacity == 3
        await wait_for(lambda: fake_dbt.running == {r0, r1, r2}, what="all three running")
        state = await jobs.resize_slots(client, acct, 1)
        await asyncio.sleep(1)
        assert fake_dbt.running == {r0, r1, r2}, "shrinking must not stop a running run"
        assert fake_dbt.cancelled_steps == []
        # A new run now waits until holders drop below the new capacity of 1.
        extra = await jobs.trigger(client, acct, "j0", TriggerRequest())
        for gate in ("g1", "g2"):
            fake_dbt.open(gate)
        await wait_run(client, acct, r1)
        await wait_run(client, acct, r2)
        assert extra.run_id not in fake_dbt.started_runs()
        fake_dbt.open("g0")
        assert (await wait_run(client, acct, extra.run_id)).status == RunStatus.SUCCESS
        slots_handle = client.get_workflow_handle(c.slots_workflow_id(acct))
        with pytest.raises(WorkflowUpdateFailedError):
            await slots_handle.execute_update(c.UPDATE_RESIZE, {"capacity": -1})
        assert (await jobs.describe_slots(client, acct)).capacity == 1


async def test_a_terminated_run_gets_its_slot_back_within_the_reap_interval(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    client, acct = dev_env.client, unique("reap")
    async with running_stack(client, fake_dbt) as queues:
        r0, r1, _ = await _three_gated_jobs(client, acct, queues, slots=1)
        await wait_for(lambda: fake_dbt.running == {r0}, what="r0 holds the slot")
        # Terminate from the temporal CLI: no cleanup runs, no release is sent. Only the
        # reaper can free the slot.
        await temporal_cli(
            client,
            "workflow",
            "terminate",
            "--workflow-id",
            c.run_workflow_id(acct, r0),
            "--reason",
            "operator",
        )
        start = asyncio.get_running_loop().time()
        await wait_for(lambda: r1 in fake_dbt.running, timeout=10, what="r1 granted after reap")
        freed_after = asyncio.get_running_loop().time() - start
        slots = await jobs.describe_slots(client, acct)
        assert [h.request_id for h in slots.holders] == [r1]
        assert slots.reaped_total == 1
        # The job notices the terminate (child result) and records it.
        desc = await wait_for(
            lambda: _recent(client, acct, "j0"), what="job j0 recorded the terminated run"
        )
        assert desc[r0][0] == RunStatus.CANCELLED and "terminated" in desc[r0][1]
        for gate in ("g1", "g2"):
            fake_dbt.open(gate)
        await wait_run(client, acct, r1)
    # Reap interval is 2 s in tests (tests/builders.account); allow one interval plus slack.
    assert freed_after < 2 * 2 + 2


async def _recent(client: Client, acct: str, job_id: str) -> dict[str, tuple[RunStatus, str]]:
    desc = await jobs.describe_job(client, acct, job_id)
    return {r.run_id: (r.status, r.message) for r in desc.state.recent}


@pytest.mark.slow
async def test_continue_as_new_keeps_queued_runs_and_held_slots(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    """The test server suggests continue-as-new at 300 events (tests/conftest.DEV_SERVER_ARGS)."""
    client, acct = dev_env.client, unique("can")
    n_runs = 40
    async with running_stack(client, fake_dbt) as queues:
        settings = account(acct, run_slots=2)
        await jobs.save_job(client, job(acct, "hold", ["dbt run -s gate:hold"]), settings, queues)
        await jobs.save_job(client, job(acct, "churn"), settings, queues)
        held = await jobs.trigger(client, acct, "hold", TriggerRequest())
        await wait_for(lambda: held.run_id in fake_dbt.running, what="hold holds a slot")
        queued = [
            (await jobs.trigger(client, acct, "churn", TriggerRequest())).run_id
            for _ in range(n_runs)
        ]
        results = [await wait_run(client, acct, r, timeout=120) for r in queued]
        slots = await jobs.describe_slots(client, acct)
        churn = await jobs.describe_job(client, acct, "churn")
        assert slots.generation >= 1, "slots workflow should have continued-as-new"
        assert churn.state.generation >= 1, "job workflow should have continued-as-new"
        assert [h.request_id for h in slots.holders] == [held.run_id]
        fake_dbt.open("hold")
        assert (await wait_run(client, acct, held.run_id)).status == RunStatus.SUCCESS
    assert [r.status for r in results] == [RunStatus.SUCCESS] * n_runs
    starts = fake_dbt.started_runs()
    assert sorted(starts) == sorted([held.run_id, *queued]), "each run started exactly once"


def _acquire(acct: str, queues: TaskQueues, run_id: str, capacity: int) -> SlotsStartRequest:
    return SlotsStartRequest(
        account_id=acct,
        capacity=capacity,
        reap_interval=timedelta(seconds=30),
        workflow_task_queue=queues.workflows,
        request=SlotRequest(request_id=run_id, workflow_id=f"gone-{run_id}"),
    )


async def test_a_free_slot_is_granted_in_the_answer_and_a_repeat_is_answered_the_same(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    """The run's request is an update answered at once: granted, or queued behind a full
    house (the grant then comes by signal). Asking again never takes a second slot."""
    client, acct = dev_env.client, unique("acquire")
    requester = ActivityEnvironment(client=client)
    async with running_stack(client, fake_dbt, which=("workflows",)) as queues:
        first = await requester.run(acquire_slot, _acquire(acct, queues, "r1", 2))
        second = await requester.run(acquire_slot, _acquire(acct, queues, "r2", 2))
        third = await requester.run(acquire_slot, _acquire(acct, queues, "r3", 2))
        again = await requester.run(acquire_slot, _acquire(acct, queues, "r1", 2))
        queued_again = await requester.run(acquire_slot, _acquire(acct, queues, "r3", 2))
        state = await jobs.describe_slots(client, acct)
        events = await _slots_events(client, acct)
    assert first.granted_at is not None and second.granted_at is not None
    assert third.granted_at is None and queued_again.granted_at is None
    assert again.granted_at == first.granted_at
    assert [h.request_id for h in state.holders] == ["r1", "r2"]
    assert [w.request_id for w in state.waiters] == ["r3"]
    assert state.grants_total == 2
    # Answers by update only: no request signal, no grant signal. A repeat has the same
    # update id, so the server answers it from the first (no new event).
    assert events["WORKFLOW_EXECUTION_UPDATE_COMPLETED"] == 3, events
    assert events["WORKFLOW_EXECUTION_SIGNALED"] == 0, events
    assert events["SIGNAL_EXTERNAL_WORKFLOW_EXECUTION_INITIATED"] == 0, events


async def test_a_request_the_slots_workflow_cannot_answer_in_time_goes_by_signal_once(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    """No worker polls the slots workflow's queue (down, or far behind): the update is not
    answered within its bound, so each request goes as the ``request`` signal and the run
    waits for the grant signal. When a worker comes, the late updates and the signals name
    the same requests: each is granted once, none is counted twice."""
    client, acct = dev_env.client, unique("late")
    requester = ActivityEnvironment(client=client)
    queues = fresh_queues()  # nobody polls them yet
    answers = await asyncio.gather(
        *(requester.run(acquire_slot, _acquire(acct, queues, f"r{n}", 2)) for n in range(3))
    )
    assert [a.granted_at for a in answers] == [None, None, None]  # queued, by signal
    events = await _slots_events(client, acct)
    assert events["WORKFLOW_EXECUTION_SIGNALED"] == 3, events
    async with running_stack(client, fake_dbt, queues=queues, which=("workflows",)):
        # The requesters are gone (no such workflows): each grant signal fails and frees
        # the slot for the next, so every request is granted exactly once.
        state = await wait_for(lambda: _settled(client, acct), what="every request granted once")
    assert state.grants_total == 3, state
    assert not state.waiters, state
    assert len({h.request_id for h in state.holders}) == len(state.holders), state


async def _settled(client: Client, acct: str) -> SlotsState | None:
    state = await jobs.describe_slots(client, acct)
    return state if not state.waiters and state.grants_total >= 3 else None


async def _slots_events(client: Client, acct: str) -> Counter[str]:
    history = await client.get_workflow_handle(c.slots_workflow_id(acct)).fetch_history()
    return Counter(EventType.Name(e.event_type).removeprefix("EVENT_TYPE_") for e in history.events)


async def test_a_request_with_an_absurd_lease_cannot_stop_the_semaphore(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor
) -> None:
    """A hand-sent request whose lease would overflow the clock is granted with a capped
    lease; the slots workflow keeps answering (every run of the account depends on it)."""
    client, acct = dev_env.client, unique("lease")
    requester = ActivityEnvironment(client=client)
    async with running_stack(client, fake_dbt, which=("workflows",)) as queues:
        first = await requester.run(acquire_slot, _acquire(acct, queues, "r0", 1))
        assert first.granted_at is not None
        absurd = SlotRequest(request_id="r1", workflow_id="gone-r1", lease=timedelta.max)
        handle = client.get_workflow_handle(c.slots_workflow_id(acct))
        await handle.signal(c.SIGNAL_SLOT_REQUEST, absurd)
        await handle.signal(c.SIGNAL_SLOT_RELEASE, SlotRelease(request_id="r0"))
        # r1 is granted (its requester is gone, so the slot is freed again): r2 gets it.
        await wait_for(lambda: _granted(client, acct, 2), what="r1 granted and freed")
        last = await requester.run(acquire_slot, _acquire(acct, queues, "r2", 1))
    assert last.granted_at is not None


async def _granted(client: Client, acct: str, total: int) -> bool:
    state = await jobs.describe_slots(client, acct)
    return state.grants_total >= total and not state.holders
