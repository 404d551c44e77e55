"""WebhooksWorkflow ``webhooks:{account}``: delivers the account's outgoing webhooks.

Runs never wait for it: a run's ``publish_run_event`` local activity signal-with-starts it
with deliveries (one per subscription and event) and moves on. Each delivery is a
``deliver_webhook`` activity on the telemetry task queue, bounded by a start-to-close timeout
and a retry policy that is the backoff (dbt Cloud's five attempts). Deliveries run
concurrently (bounded), those of one subscription and one run in order (started before
completed). Signal handlers never raise; the state is bounded; the workflow continues-as-new
when Temporal suggests it, carrying what is not delivered yet, and ends after a quiet spell,
so an account without traffic costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

from temporalio import workflow
from temporalio.common import RawValue, RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from workflows import constants as c
    from workflows.models import (
        Rejected,
        WebhookDeliveries,
        WebhookDelivery,
        WebhookDeliveryPolicy,
        WebhookDeliveryResult,
        WebhooksState,
    )

DEFAULT_POLICY = WebhookDeliveryPolicy(
    attempt_timeout=c.WEBHOOK_ATTEMPT_TIMEOUT,
    initial_interval=c.WEBHOOK_RETRY.initial_interval,
    backoff_coefficient=c.WEBHOOK_RETRY.backoff_coefficient,
    maximum_interval=c.WEBHOOK_RETRY.maximum_interval or c.WEBHOOK_RETRY.initial_interval,
    maximum_attempts=c.WEBHOOK_RETRY.maximum_attempts,
    deadline=c.WEBHOOK_DELIVERY_DEADLINE,
    idle_timeout=c.WEBHOOK_IDLE_TIMEOUT,
)


@workflow.defn(name=c.WEBHOOKS_WORKFLOW)
class WebhooksWorkflow:
    @workflow.init
    def __init__(self, state: WebhooksState) -> None:
        self.s = state
        self.policy = state.policy or DEFAULT_POLICY
        self._in_flight: dict[str, WebhookDelivery] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._dirty = True

    @workflow.run
    async def run(self, state: WebhooksState) -> None:
        while True:
            # Cleared before the awaits below: anything arriving meanwhile sets it again.
            self._dirty = False
            if workflow.info().is_continue_as_new_suggested():
                # Drain: start nothing new, let the deliveries in flight end (their retries are
                # bounded), then carry the rest. Cancelling them could POST an event twice.
                if not self._in_flight:
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    self.s.generation += 1
                    workflow.continue_as_new(self.s)
            else:
                self._start_ready()
            if self.s.pending or self._in_flight:
                await workflow.wait_condition(lambda: self._dirty)
                continue
            with contextlib.suppress(TimeoutError):
                await workflow.wait_condition(
                    lambda: self._dirty,
                    timeout=self.policy.idle_timeout,
                    timeout_summary="idle: end when nothing arrives",
                )
            if not self._dirty:
                await workflow.wait_condition(workflow.all_handlers_finished)
                if not self.s.pending and not self._in_flight:
                    return

    # ------------------------------------------------------------------ messages

    @workflow.signal(name=c.SIGNAL_WEBHOOK_DELIVERIES)
    def deliveries(self, raw: Any) -> None:
        """Queue deliveries; a (subscription, event) seen recently is dropped as a repeat."""
        try:
            batch = WebhookDeliveries.model_validate(raw)
            seen = set(self.s.seen)
            for delivery in batch.deliveries:
                if delivery.key in seen:
                    continue
                seen.add(delivery.key)
                self.s.seen.append(delivery.key)
                self.s.pending.append(delivery)
            del self.s.seen[: -c.WEBHOOK_SEEN_KEPT]
            overflow = len(self.s.pending) - c.WEBHOOK_PENDING_KEPT
            if overflow > 0:
                workflow.logger.warning("%d webhook deliveries dropped: backlog full", overflow)
                self.s.dropped_total += overflow
                del self.s.pending[:overflow]
            self._dirty = True
        except Exception as err:  # noqa: BLE001 - a signal handler must never raise
            self._reject(c.SIGNAL_WEBHOOK_DELIVERIES, err)

    @workflow.signal(dynamic=True)
    def unknown_signal(self, name: str, args: Sequence[RawValue]) -> None:
        self._reject(name, ValueError(f"unknown signal {name!r}"))

    @workflow.query(name=c.QUERY_DESCRIBE)
    def describe(self) -> WebhooksState:
        """The state, with the deliveries in flight first in ``pending``."""
        return self.s.model_copy(update={"pending": [*self._in_flight.values(), *self.s.pending]})

    # ------------------------------------------------------------------ deliveries

    def _start_ready(self) -> None:
        """Start pending deliveries, oldest first, within the in-flight bounds (the account's
        and each subscription's). A delivery waits while an earlier one to the same
        subscription about the same run is in flight: started arrives before completed."""
        busy = {_order_key(d) for d in self._in_flight.values()}
        per_hook = Counter(d.webhook_id for d in self._in_flight.values())
        waiting: list[WebhookDelivery] = []
        for delivery in self.s.pending:
            if (
                len(self._in_flight) >= c.WEBHOOK_MAX_IN_FLIGHT
                or per_hook[delivery.webhook_id] >= c.WEBHOOK_MAX_IN_FLIGHT_PER_SUBSCRIPTION
                or _order_key(delivery) in busy
            ):
                waiting.append(delivery)
                continue
            busy.add(_order_key(delivery))
            per_hook[delivery.webhook_id] += 1
            self._in_flight[delivery.key] = delivery
            task = asyncio.create_task(self._deliver(delivery))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.s.pending = waiting

    async def _deliver(self, delivery: WebhookDelivery) -> None:
        event, policy = delivery.event, self.policy
        try:
            result = await workflow.execute_activity(
                "deliver_webhook",
                delivery,
                result_type=WebhookDeliveryResult,
                task_queue=self.s.queues.telemetry,
                start_to_close_timeout=policy.attempt_timeout,
                schedule_to_close_timeout=policy.deadline,
                retry_policy=RetryPolicy(
                    initial_interval=policy.initial_interval,
                    backoff_coefficient=policy.backoff_coefficient,
                    maximum_interval=policy.maximum_interval,
                    maximum_attempts=policy.maximum_attempts,
                    non_retryable_error_types=c.WEBHOOK_RETRY.non_retryable_error_types,
                ),
                summary=f"{event.event_type} of run {event.data.run_id} to {delivery.webhook_id}",
            )
            if result.skipped:
                self.s.skipped_total += 1
            else:
                self.s.delivered_total += 1
        except ActivityError as err:
            # Every attempt is in the delivery log; the event is given up, no run is touched.
            workflow.logger.warning("webhook delivery %s given up: %s", delivery.key, err.cause)
            self.s.failed_total += 1
        finally:
            self._in_flight.pop(delivery.key, None)
            self._dirty = True

    def _reject(self, handler: str, err: Exception) -> None:
        workflow.logger.warning("rejected %s message: %s", handler, err)
        self.s.rejected.append(Rejected(at=workflow.now(), handler=handler, reason=str(err)[:500]))
        del self.s.rejected[: -c.REJECTED_KEPT]


def _order_key(delivery: WebhookDelivery) -> tuple[int, str]:
    return delivery.webhook_id, delivery.event.data.run_id
