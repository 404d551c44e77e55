"""History counts read from the server: every figure here is counted from real histories.

A long-lived workflow (a job, the slots) may continue-as-new: ``chain`` walks its runs back
from the newest through ``continued_execution_run_id``, so the events it added during a
scenario are the chain's counts after minus before (histories only grow).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHistory
from temporalio.service import RPCError, RPCStatusCode

T = TypeVar("T")
CONCURRENCY = 20

WFT_COMPLETED = "WORKFLOW_TASK_COMPLETED"


def kind(event: HistoryEvent) -> str:
    return EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")


def count(history: WorkflowHistory) -> Counter[str]:
    """Events of a history by type; ``total`` is every event."""
    counts = Counter(kind(e) for e in history.events)
    counts["total"] = len(history.events)
    return counts


async def bounded(calls: Iterable[Awaitable[T]], limit: int = CONCURRENCY) -> list[T]:
    """Await ``calls`` with at most ``limit`` at once, results in order."""
    gate = asyncio.Semaphore(limit)

    async def one(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))


async def chain_histories(client: Client, workflow_id: str) -> dict[str, WorkflowHistory]:
    """Every run of a workflow id by run id, newest first (empty if none exists)."""
    runs: dict[str, WorkflowHistory] = {}
    run_id: str | None = None
    while True:
        try:
            history = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                return runs
            raise
        runs[run_id or _run_id_of(history)] = history
        first = history.events[0].workflow_execution_started_event_attributes
        run_id = first.continued_execution_run_id or None
        if run_id is None or run_id in runs:
            return runs


async def chain(client: Client, workflow_id: str) -> dict[str, Counter[str]]:
    """Event counts of every run of a workflow id, by run id."""
    return {run: count(h) for run, h in (await chain_histories(client, workflow_id)).items()}


def _run_id_of(history: WorkflowHistory) -> str:
    return history.events[0].workflow_execution_started_event_attributes.original_execution_run_id


def added(before: dict[str, Counter[str]], after: dict[str, Counter[str]]) -> Counter[str]:
    """Events a chain added between two reads."""
    total: Counter[str] = Counter()
    for counts in after.values():
        total.update(counts)
    for counts in before.values():
        total.subtract(counts)
    return +total


def per_item(counts: Iterable[Counter[str]], items: int | None = None) -> dict[str, float]:
    """Events by type summed over ``counts``, divided by ``items`` (default: how many)."""
    total: Counter[str] = Counter()
    seen = 0
    for one in counts:
        total.update(one)
        seen += 1
    divisor = items if items is not None else seen
    return {k: round(v / max(divisor, 1), 2) for k, v in total.most_common()}


async def chains(client: Client, workflow_ids: list[str]) -> dict[str, dict[str, Counter[str]]]:
    results = await bounded(chain(client, wid) for wid in workflow_ids)
    return dict(zip(workflow_ids, results, strict=True))


async def histories(client: Client, workflow_ids: list[str]) -> list[WorkflowHistory]:
    return await bounded(client.get_workflow_handle(wid).fetch_history() for wid in workflow_ids)


@dataclass(frozen=True)
class Signal:
    name: str
    at: float
    """Unix seconds, when the server took the signal."""
    payload: object


def signals(history: WorkflowHistory) -> list[Signal]:
    """Signals a workflow received, with their (JSON) payloads."""
    found = []
    for event in history.events:
        if event.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED:
            continue
        attrs = event.workflow_execution_signaled_event_attributes
        payloads = attrs.input.payloads
        payload = json.loads(payloads[0].data) if payloads else None
        found.append(Signal(attrs.signal_name, event.event_time.ToMicroseconds() / 1e6, payload))
    return found


@dataclass(frozen=True)
class Update:
    name: str
    at: float
    """Unix seconds, when the workflow accepted it (its admission is not in the history)."""
    payload: object
    result: object
    """The (JSON) answer, None until completed or if it failed."""


def updates(history: WorkflowHistory) -> list[Update]:
    """Updates a workflow accepted, with their (JSON) payloads and answers."""
    accepted: dict[str, tuple[str, float, object]] = {}
    answers: dict[str, object] = {}
    for event in history.events:
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED:
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            payloads = request.input.args.payloads
            at = event.event_time.ToMicroseconds() / 1e6
            payload = json.loads(payloads[0].data) if payloads else None
            accepted[request.meta.update_id] = (request.input.name, at, payload)
        elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            attrs = event.workflow_execution_update_completed_event_attributes
            success = attrs.outcome.success.payloads
            answers[attrs.meta.update_id] = json.loads(success[0].data) if success else None
    return [
        Update(name, at, payload, answers.get(update_id))
        for update_id, (name, at, payload) in accepted.items()
    ]
