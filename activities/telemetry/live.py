"""Live gauges (queue depth, slots in use), read from Temporal rather than from events.

A finished run's event says nothing about the runs queued or running *now*, so these values
cannot be derived from events honestly. Temporal is the source of truth for what is queued
and in flight: a background task in the telemetry worker asks it, with the ``describe``
query of

- ``slots:{account}`` for every account seen: holders (slots in use), capacity, and waiters
  (runs that left their job's queue and wait for a slot);
- ``job:{account}:{job}`` for every job seen: the runs waiting in the job's own queue.

"Seen" means a run of that account or job finished since this worker started: the sink
calls ``track`` for every event. The observable gauges' callbacks run in the metric
reader's thread and only read the last snapshot, so they never wait on Temporal.

Bounded by construction:

- at most ``max_accounts`` accounts and ``max_jobs`` jobs are tracked (least recently seen
  dropped first); one that no longer exists or is closed is dropped at once;
- one refresh every ``interval`` seconds, never two at once, at most ``concurrency``
  queries in flight, each with a ``query_timeout`` (an RPC deadline and a local timeout);
- queries add no history events; each is one query task on the workflows worker;
- a value that could not be refreshed for ``3 * interval`` is no longer reported: a gauge
  goes missing rather than showing a stale number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from opentelemetry.metrics import CallbackOptions, Observation
from temporalio.client import Client, WorkflowQueryRejectedError
from temporalio.common import QueryRejectCondition
from temporalio.service import RPCError, RPCStatusCode

from activities.telemetry.names import ACCOUNT, JOB, QUEUE
from workflows import constants as c
from workflows.models import JobDescription, SlotsState

log = logging.getLogger(__name__)

STALE_AFTER_INTERVALS = 3

T = TypeVar("T")
K = TypeVar("K")


@dataclass(frozen=True)
class SlotsSample:
    in_use: int
    waiting: int
    capacity: int
    at: float
    """``time.monotonic()`` of the answer."""


@dataclass(frozen=True)
class QueueSample:
    depth: int
    at: float


class _GoneError(Exception):
    """The workflow does not exist or is closed: stop tracking it."""


class LiveState:
    def __init__(
        self,
        client: Client,
        *,
        interval: float = 60.0,
        query_timeout: float = 2.0,
        concurrency: int = 4,
        max_accounts: int = 100,
        max_jobs: int = 1000,
    ) -> None:
        self._client = client
        self.interval = interval
        self._query_timeout = query_timeout
        self._concurrency = concurrency
        self._max_accounts = max_accounts
        self._max_jobs = max_jobs
        self._accounts: OrderedDict[str, None] = OrderedDict()
        self._jobs: OrderedDict[tuple[str, str], None] = OrderedDict()
        # Replaced whole by each refresh; read from the metric reader's thread.
        self._slots: dict[str, SlotsSample] = {}
        self._queues: dict[tuple[str, str], QueueSample] = {}
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ event loop side

    def track(self, account_id: str, job_id: str) -> None:
        """Remember an account and a job (cheap; called for every finished run)."""
        _touch(self._accounts, account_id, self._max_accounts)
        _touch(self._jobs, (account_id, job_id), self._max_jobs)

    def tracked(self) -> tuple[list[str], list[tuple[str, str]]]:
        """The accounts and jobs asked about at the next refresh, least recently seen first."""
        return list(self._accounts), list(self._jobs)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="runslot-telemetry-live-state")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def refresh(self) -> None:
        """Ask Temporal once for every tracked account and job (bounded, never raises)."""
        accounts, jobs = list(self._accounts), list(self._jobs)
        gate = asyncio.Semaphore(self._concurrency)
        slots = dict(self._slots)
        queues = dict(self._queues)

        async def one_account(account_id: str) -> None:
            async with gate:
                try:
                    state = await self._query(c.slots_workflow_id(account_id), SlotsState)
                except _GoneError:
                    self._accounts.pop(account_id, None)
                    slots.pop(account_id, None)
                    return
                except Exception as err:  # noqa: BLE001 - keep the old value; it ages out
                    log.debug("slots of %s not refreshed: %s", account_id, err)
                    return
            slots[account_id] = SlotsSample(
                in_use=len(state.holders),
                waiting=len(state.waiters),
                capacity=state.capacity,
                at=time.monotonic(),
            )

        async def one_job(key: tuple[str, str]) -> None:
            async with gate:
                try:
                    desc = await self._query(c.job_workflow_id(*key), JobDescription)
                except _GoneError:
                    self._jobs.pop(key, None)
                    queues.pop(key, None)
                    return
                except Exception as err:  # noqa: BLE001 - keep the old value; it ages out
                    log.debug("queue of %s/%s not refreshed: %s", *key, err)
                    return
            queues[key] = QueueSample(depth=len(desc.state.queue), at=time.monotonic())

        await asyncio.gather(*map(one_account, accounts), *map(one_job, jobs))
        # Forget what is no longer tracked (evicted while this refresh ran, or gone).
        self._slots = {k: v for k, v in slots.items() if k in self._accounts}
        self._queues = {k: v for k, v in queues.items() if k in self._jobs}

    async def _query(self, workflow_id: str, result_type: type[T]) -> T:
        handle = self._client.get_workflow_handle(workflow_id)
        try:
            result = await asyncio.wait_for(
                handle.query(
                    c.QUERY_DESCRIBE,
                    result_type=result_type,
                    reject_condition=QueryRejectCondition.NOT_OPEN,
                    rpc_timeout=timedelta(seconds=self._query_timeout),
                ),
                self._query_timeout + 0.5,
            )
        except WorkflowQueryRejectedError:
            raise _GoneError from None
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                raise _GoneError from None
            raise
        if not isinstance(result, result_type):
            raise TypeError(f"describe of {workflow_id} returned {type(result).__name__}")
        return result

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:  # pragma: no cover - refresh never raises; belt and braces
                log.exception("live telemetry refresh failed")

    # ------------------------------------------------------------------ metric reader side

    def _fresh(self, at: float) -> bool:
        return time.monotonic() - at <= STALE_AFTER_INTERVALS * self.interval

    def observe_queue_depth(self, _options: CallbackOptions) -> Iterable[Observation]:
        """Runs queued: in each job's own queue, and per account waiting for a slot."""
        out = [
            Observation(sample.depth, {ACCOUNT: account_id, JOB: job_id, QUEUE: "job"})
            for (account_id, job_id), sample in self._queues.items()
            if self._fresh(sample.at)
        ]
        out += [
            Observation(sample.waiting, {ACCOUNT: account_id, QUEUE: "slots"})
            for account_id, sample in self._slots.items()
            if self._fresh(sample.at)
        ]
        return out

    def observe_slots_in_use(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(sample.in_use, {ACCOUNT: account_id})
            for account_id, sample in self._slots.items()
            if self._fresh(sample.at)
        ]

    def observe_slots_capacity(self, _options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(sample.capacity, {ACCOUNT: account_id})
            for account_id, sample in self._slots.items()
            if self._fresh(sample.at)
        ]


def _touch(seen: OrderedDict[K, None], key: K, limit: int) -> None:
    seen[key] = None
    seen.move_to_end(key)
    while len(seen) > limit:
        seen.popitem(last=False)
