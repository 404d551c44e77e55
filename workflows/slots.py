"""SlotsWorkflow ``slots:{account}``: the account's run slots as an N-slot semaphore.

FIFO grants by request arrival; release frees a held slot or withdraws a queued request;
resize grows at once and shrinking never kills a run. Each holder has a lease (its run's
maximum duration plus grace) and a periodic reaper asks Temporal whether holders are still
running, so a run workflow *terminated* from the CLI (no ``finally`` runs) gets its slot
back within one reap interval. Signal handlers never raise: one bad message must not fail
the semaphore every job of the account depends on.

A run asks with the ``acquire`` update, answered in the workflow task that receives it: a
free slot (nobody waiting) is granted in the answer, with no signal either way; otherwise
the run is queued and granted later by signal. The ``request`` signal is the fallback (an
update not answered in time, a cluster's limit of updates in flight). Both are idempotent
by request id.

Grants by signal are the workflow's own signals, not local activities: sending them from a local
activity saved ~3 history events per run, but under heavy load (a local activity outliving
its workflow task) a replay of this history failed ("Missing associated machine for
LocalActivity"), and this workflow must always replay: every run of the account waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.control import closed_workflows
    from workflows import constants as c
    from workflows.models import (
        HolderLiveness,
        Rejected,
        Resize,
        SlotAnswer,
        SlotGrant,
        SlotHolder,
        SlotRelease,
        SlotRequest,
        SlotsState,
        SlotWaiter,
    )

MIN_WAIT = timedelta(seconds=1)
MAX_LEASE = timedelta(days=366)
"""Longer than any run may last; a lease beyond it (an absurd account setting, a hand-sent
signal) would overflow the clock in the grant loop, and this workflow must never fail."""


def _lease(req: SlotRequest) -> timedelta:
    return min(max(req.lease, MIN_WAIT), MAX_LEASE)


@workflow.defn(name=c.SLOTS_WORKFLOW)
class SlotsWorkflow:
    @workflow.init
    def __init__(self, state: SlotsState) -> None:
        self.s = state
        self._dirty = True
        self._regrant: list[str] = []
        self._wake_at: datetime | None = None  # when the loop's current wait times out

    @workflow.run
    async def run(self, state: SlotsState) -> None:
        next_reap = workflow.now() + self.s.reap_interval
        while True:
            # Cleared before the awaits below: anything arriving meanwhile sets it again.
            self._dirty = False
            self._expire_leases()
            await self._grant()
            if workflow.info().is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                if not self._dirty:
                    self.s.generation += 1
                    workflow.continue_as_new(self.s)
            deadlines = [h.lease_expires_at for h in self.s.holders]
            if self.s.holders:
                # Only holders can leak capacity. A dead waiter needs no timer: its grant
                # fails and the next waiter is served (and a reap pass drops it too).
                deadlines.append(next_reap)
            timeout = None
            self._wake_at = None
            if deadlines:
                timeout = max(min(deadlines) - workflow.now(), MIN_WAIT)
                self._wake_at = workflow.now() + timeout
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._dirty or workflow.info().is_continue_as_new_suggested(),
                    timeout=timeout,
                    timeout_summary="reap holders / lease expiry",
                )
            if workflow.now() >= next_reap:
                if self.s.holders:
                    await self._reap()
                next_reap = workflow.now() + self.s.reap_interval

    # ------------------------------------------------------------------ messages

    @workflow.signal(name=c.SIGNAL_SLOT_REQUEST)
    def request(self, req: SlotRequest) -> None:
        try:
            if any(h.request_id == req.request_id for h in self.s.holders):
                self._regrant.append(req.request_id)  # the requester asks again: answer again
            elif not any(w.request_id == req.request_id for w in self.s.waiters):
                self.s.waiters.append(
                    SlotWaiter(
                        request_id=req.request_id,
                        workflow_id=req.workflow_id,
                        requested_at=req.requested_at or workflow.now(),
                        lease=_lease(req),
                    )
                )
            self._dirty = True
        except Exception as err:  # noqa: BLE001 - a signal handler must never raise
            self._reject("request", err)

    @workflow.update(name=c.UPDATE_SLOT_ACQUIRE)
    def acquire(self, req: SlotRequest) -> SlotAnswer:
        """A slot now if one is free and nobody waits (FIFO), else a place in the queue.

        Never waits, so an update is in flight for one workflow task at most. A grant
        answered here costs no signal either way; a queued request is granted later by
        signal, like one that arrived as a ``request`` signal. Idempotent by request id.
        """
        try:
            holder = next((h for h in self.s.holders if h.request_id == req.request_id), None)
            if holder is not None:
                return SlotAnswer(granted_at=holder.granted_at)
            if any(w.request_id == req.request_id for w in self.s.waiters):
                return SlotAnswer()
            now = workflow.now()
            if not self.s.waiters and len(self.s.holders) < self.s.capacity:
                holder = SlotHolder(
                    request_id=req.request_id,
                    workflow_id=req.workflow_id,
                    granted_at=now,
                    lease_expires_at=now + _lease(req),
                )
                self.s.holders.append(holder)
                self.s.grants_total += 1
                # Wake the loop only if its timer must move (the first holder, or a lease
                # ending before the current wake-up): each wake-up re-arms the timer.
                if self._wake_at is None or holder.lease_expires_at < self._wake_at:
                    self._dirty = True
                return SlotAnswer(granted_at=now)
            self.s.waiters.append(
                SlotWaiter(
                    request_id=req.request_id,
                    workflow_id=req.workflow_id,
                    requested_at=req.requested_at or now,
                    lease=_lease(req),
                )
            )
            if len(self.s.holders) < self.s.capacity:
                self._dirty = True  # others wait for a free slot: the loop grants in order
            return SlotAnswer()  # else a release wakes the loop, which grants in order
        except Exception as err:  # an update may fail, the workflow task never
            self._reject("acquire", err)
            raise ApplicationError(f"acquire refused: {err}", non_retryable=True) from err

    @acquire.validator
    def _validate_acquire(self, req: SlotRequest) -> None:
        # Never accepted in the workflow task that continues as new (the requester falls
        # back to the ``request`` signal, which the next run receives).
        if workflow.info().is_continue_as_new_suggested():
            raise ApplicationError("slots are continuing as new: send the request signal")

    @workflow.signal(name=c.SIGNAL_SLOT_RELEASE)
    def release(self, rel: SlotRelease) -> None:
        try:
            self.s.holders = [h for h in self.s.holders if h.request_id != rel.request_id]
            self.s.waiters = [w for w in self.s.waiters if w.request_id != rel.request_id]
            self._dirty = True
        except Exception as err:  # noqa: BLE001
            self._reject("release", err)

    @workflow.update(name=c.UPDATE_RESIZE)
    def resize(self, req: Resize) -> SlotsState:
        self.s.capacity = req.capacity
        self._dirty = True
        return self.s

    @resize.validator
    def _validate_resize(self, req: Resize) -> None:
        Resize.model_validate(req.model_dump())

    @workflow.signal(name=c.SIGNAL_RESIZE)
    def resize_signal(self, req: Resize) -> None:
        """Signal form of ``resize`` for ``temporal workflow signal``."""
        try:
            self.s.capacity = Resize.model_validate(req.model_dump()).capacity
            self._dirty = True
        except Exception as err:  # noqa: BLE001
            self._reject("resize", err)

    @workflow.query(name=c.QUERY_DESCRIBE)
    def describe(self) -> SlotsState:
        return self.s

    # ------------------------------------------------------------------ internals

    async def _grant(self) -> None:
        grants: list[SlotHolder] = []
        now = workflow.now()
        while self.s.waiters and len(self.s.holders) < self.s.capacity:
            waiter = self.s.waiters.pop(0)
            holder = SlotHolder(
                request_id=waiter.request_id,
                workflow_id=waiter.workflow_id,
                granted_at=now,
                lease_expires_at=now + waiter.lease,
            )
            self.s.holders.append(holder)
            self.s.grants_total += 1
            grants.append(holder)
        regrants = [h for h in self.s.holders if h.request_id in set(self._regrant)]
        self._regrant.clear()
        if not grants and not regrants:
            return
        results = await asyncio.gather(
            *(self._signal_grant(h) for h in [*grants, *regrants]), return_exceptions=True
        )
        for holder, result in zip([*grants, *regrants], results, strict=True):
            if isinstance(result, BaseException):
                # The requester is gone (closed or terminated): free the slot for the next one.
                workflow.logger.info("grant to %s failed (%s); freeing", holder.workflow_id, result)
                self.s.holders = [h for h in self.s.holders if h.request_id != holder.request_id]
                self._dirty = True

    async def _signal_grant(self, holder: SlotHolder) -> None:
        handle = workflow.get_external_workflow_handle(holder.workflow_id)
        await handle.signal(
            c.SIGNAL_SLOT_GRANTED,
            SlotGrant(request_id=holder.request_id, granted_at=holder.granted_at),
        )

    def _expire_leases(self) -> None:
        now = workflow.now()
        expired = [h for h in self.s.holders if h.lease_expires_at <= now]
        if expired:
            workflow.logger.warning("lease expired for %s", [h.request_id for h in expired])
            self.s.expired_total += len(expired)
            self.s.holders = [h for h in self.s.holders if h.lease_expires_at > now]

    async def _reap(self) -> None:
        """Free the slots (and queued requests) of workflows that are no longer running."""
        ids = sorted(
            {h.workflow_id for h in self.s.holders} | {w.workflow_id for w in self.s.waiters}
        )
        try:
            closed = await workflow.execute_activity(
                closed_workflows,
                HolderLiveness(workflow_ids=ids),
                start_to_close_timeout=c.VISIBILITY_ACTIVITY_TIMEOUT,
                retry_policy=c.CONTROL_RETRY,
                summary=f"reaper: check {len(ids)} holders/waiters",
            )
        except ActivityError as err:
            workflow.logger.warning("reaper check failed, will retry next interval: %s", err)
            return
        gone = set(closed.workflow_ids)
        if not gone:
            return
        before = len(self.s.holders)
        self.s.holders = [h for h in self.s.holders if h.workflow_id not in gone]
        self.s.waiters = [w for w in self.s.waiters if w.workflow_id not in gone]
        self.s.reaped_total += before - len(self.s.holders)
        self._dirty = True

    def _reject(self, handler: str, err: Exception) -> None:
        workflow.logger.warning("rejected %s message: %s", handler, err)
        self.s.rejected.append(Rejected(at=workflow.now(), handler=handler, reason=str(err)[:500]))
        del self.s.rejected[: -c.REJECTED_KEPT]
