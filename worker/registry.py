"""The ONE list of workflows and activities, used by the worker main and by the tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.control import CONTROL_ACTIVITIES
from activities.executor import Executor, ExecutorActivities
from activities.report import RunReporter
from activities.store import RunStore
from activities.store.activities import StoreActivities
from activities.telemetry import TelemetryActivities, TelemetryQueue, TelemetrySink
from activities.webhooks import WebhookActivities, WebhookConfig, WebhookPublisher
from workflows.job import JobWorkflow
from workflows.models import TaskQueues
from workflows.run import RunWorkflow
from workflows.slots import SlotsWorkflow
from workflows.webhooks import WebhooksWorkflow

WORKFLOWS: Sequence[type] = (JobWorkflow, RunWorkflow, SlotsWorkflow, WebhooksWorkflow)

PASSTHROUGH_MODULES = ("croniter", "dateutil", "yaml", "psutil", "activities", "workflows")
"""Imported once outside the sandbox: deterministic code (models, policy) and heavy or
import-time-impure modules (croniter calls platform at import)."""


def workflow_runner() -> SandboxedWorkflowRunner:
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH_MODULES)
    )


@dataclass
class Pools:
    """Everything the workers need from the outside world."""

    executor: Executor
    telemetry: TelemetrySink
    store: RunStore | None = None
    """The run store: the workflow pool writes it (local activities) and reads it (reruns,
    job-completion fan-out, webhook subscriptions); the telemetry pool reads subscriptions
    and writes the webhook delivery log. Required by those two pools."""
    webhooks: WebhookConfig | None = None
    telemetry_queue: TelemetryQueue | None = None
    """Where the workflow pool hands finished runs' telemetry (over ``telemetry``); the
    owner closes it after the workers stop, to emit what is left. None: one is made here."""
    """The signing key (telemetry pool) and delivery policy (workflow pool) of outgoing
    webhooks. None: the telemetry pool refuses deliveries (non-retryable), the constants'
    policy applies."""


def build_workers(
    client: Client,
    pools: Pools,
    *,
    which: Sequence[str] = ("workflows", "steps", "telemetry"),
    queues: TaskQueues | None = None,
    max_concurrent_steps: int = 4,
    step_activities_per_second: float | None = None,
    max_cached_workflows: int = 1000,
    graceful_shutdown_seconds: float = 30.0,
) -> list[Worker]:
    """Build the worker of each pool named in ``which``.

    ``queues`` lets tests run isolated stacks against one server (fresh queue names).
    """
    queues = queues or TaskQueues()
    workers: list[Worker] = []
    executor_acts = ExecutorActivities(pools.executor)
    if "workflows" in which:
        if pools.store is None:
            raise ValueError("the workflows pool needs the run store (Pools.store)")
        publisher = WebhookPublisher(pools.store, pools.webhooks.policy if pools.webhooks else None)
        workers.append(
            Worker(
                client,
                task_queue=queues.workflows,
                workflows=list(WORKFLOWS),
                # Local activities run on the workflow worker: slot requests, liveness, every
                # run store call (ids, snapshots, reruns, dependents) and webhook publishing.
                activities=[
                    *CONTROL_ACTIVITIES,
                    *StoreActivities(pools.store).all(),
                    publisher.publish_run_event,
                    *RunReporter(
                        pools.store,
                        publisher,
                        pools.telemetry_queue or TelemetryQueue(pools.telemetry),
                    ).all(),
                ],
                workflow_runner=workflow_runner(),
                max_cached_workflows=max_cached_workflows,
                graceful_shutdown_timeout=_seconds(graceful_shutdown_seconds),
            )
        )
    if "steps" in which:
        step_activities: list[Callable[..., Any]] = [
            executor_acts.prepare_run,
            executor_acts.run_step,
            executor_acts.collect_artifacts,
            executor_acts.cleanup_run,
            executor_acts.drop_ci_schema,
        ]
        workers.append(
            Worker(
                client,
                task_queue=queues.steps,
                activities=step_activities,
                max_concurrent_activities=max_concurrent_steps,
                max_task_queue_activities_per_second=step_activities_per_second,
                # Cancellation reaches an activity only through a heartbeat response: send
                # them at least every 2 s so a cancelled step is killed within seconds.
                max_heartbeat_throttle_interval=_seconds(2.0),
                default_heartbeat_throttle_interval=_seconds(2.0),
                graceful_shutdown_timeout=_seconds(graceful_shutdown_seconds),
            )
        )
    if "telemetry" in which:
        if pools.store is None:
            raise ValueError("the telemetry pool needs the run store (Pools.store)")
        telemetry = TelemetryActivities(pools.telemetry)
        webhooks = WebhookActivities(pools.store, pools.webhooks)
        workers.append(
            Worker(
                client,
                task_queue=queues.telemetry,
                activities=[telemetry.emit_run_telemetry, webhooks.deliver_webhook],
                max_concurrent_activities=50,
                graceful_shutdown_timeout=_seconds(5.0),
            )
        )
    return workers


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)
