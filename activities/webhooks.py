"""Outgoing webhooks: dbt Cloud's ``job.run.started`` / ``completed`` / ``errored`` events.

Two activities:

* ``publish_run_event`` (local, on the workflow worker, called by a run): finds the account's
  subscriptions that want the event in the run store and, only if there is one, hands the
  deliveries to ``webhooks:{account}`` by signal-with-start. No subscriber: a store read and
  nothing else, so an account without webhooks pays one marker per event.
* ``deliver_webhook`` (telemetry task queue, called by the webhooks workflow): one signed POST
  of one event to one subscription, every attempt written to the delivery log. A receiver
  that is slow, down or failing costs this activity its timeout and retries, never a run.

The body is dbt Cloud's, byte for byte what is signed: ``Authorization`` carries the hex
HMAC-SHA256 of the raw body keyed by the subscription's secret (``activities.signing``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath
from typing import Any

import httpx
from temporalio import activity
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError

from activities.signing import sign, webhook_secret
from activities.store import RunStore, StoredJob, StoredWebhook
from workflows.constants import (
    EVENT_RUN_ERRORED,
    EVENT_RUN_STARTED,
    SA_ACCOUNT,
    SIGNAL_WEBHOOK_DELIVERIES,
    WEBHOOK_DELIVERY_FAILED,
    WEBHOOK_HTTP_TIMEOUT,
    WEBHOOK_NOT_CONFIGURED,
    WEBHOOKS_WORKFLOW,
    webhooks_workflow_id,
)
from workflows.models import (
    Environment,
    PublishResult,
    RunEventData,
    RunEventInput,
    RunStatus,
    TriggerCause,
    WebhookDeliveries,
    WebhookDelivery,
    WebhookDeliveryPolicy,
    WebhookDeliveryResult,
    WebhookEvent,
    WebhooksState,
)

USER_AGENT = "Runslot-Webhooks/1"

RUN_STATUS_NAMES = {
    RunStatus.QUEUED: "Queued",
    RunStatus.STARTING: "Starting",
    RunStatus.RUNNING: "Running",
    RunStatus.SUCCESS: "Success",
    RunStatus.ERROR: "Errored",
    RunStatus.CANCELLED: "Cancelled",
}
"""``runStatus`` as dbt Cloud's webhooks spell it ("Errored", where its API says "Error")."""

RUN_REASONS = {
    TriggerCause.SCHEDULED: "Kicked off by the job's schedule",
    TriggerCause.API: "Kicked off from the API",
    TriggerCause.MANUAL: "Kicked off manually (Run now)",
    TriggerCause.JOB_COMPLETION: "Kicked off by the completion of another job",
    TriggerCause.PULL_REQUEST: "Kicked off by a pull request",
    TriggerCause.MERGE: "Kicked off by a merged pull request",
}
"""``runReason`` when the trigger gave no ``cause_text``."""


@dataclass(frozen=True)
class WebhookConfig:
    """What the workers need to send webhooks."""

    signing_key: bytes
    """The server key (``activities.signing.server_key``) subscription secrets derive from."""
    http_timeout: timedelta = WEBHOOK_HTTP_TIMEOUT
    policy: WebhookDeliveryPolicy | None = None
    """Delivery timeouts and retries; None: the constants' (tests pass short ones)."""


# --------------------------------------------------------------------------- publish


class WebhookPublisher:
    """``publish_run_event``: a local activity of the run workflow."""

    def __init__(self, store: RunStore, policy: WebhookDeliveryPolicy | None = None) -> None:
        self._store = store
        self._policy = policy

    @activity.defn(name="publish_run_event")
    async def publish_run_event(self, request: RunEventInput) -> PublishResult:
        deliveries = await asyncio.to_thread(self._deliveries, request)
        if not deliveries:
            return PublishResult()
        account_id = request.account_id
        await activity.client().start_workflow(
            WEBHOOKS_WORKFLOW,
            WebhooksState(account_id=account_id, queues=request.queues, policy=self._policy),
            id=webhooks_workflow_id(account_id),
            task_queue=request.queues.workflows,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            start_signal=SIGNAL_WEBHOOK_DELIVERIES,
            start_signal_args=[WebhookDeliveries(deliveries=deliveries)],
            search_attributes=TypedSearchAttributes([SearchAttributePair(SA_ACCOUNT, account_id)]),
            static_summary=f"webhooks of account {account_id}",
        )
        return PublishResult(deliveries=len(deliveries))

    def _deliveries(self, request: RunEventInput) -> list[WebhookDelivery]:
        if not self._store.has_active_webhooks(request.account_id):
            return []  # the common case, without reading and validating the job
        job = self._store.get_job_by_key(request.account_id, request.job_id)
        if job is None:
            raise ApplicationError(
                f"job {request.job_id} is not in the run store: no subscription can match",
                non_retryable=True,
            )
        wanted = {
            event_type: self._store.webhooks_for(request.account_id, event_type, job.id)
            for event_type in request.event_types
        }
        if not any(wanted.values()):
            return []
        data = self._event_data(request, job)
        return [
            WebhookDelivery(
                webhook_id=hook.id,
                event=WebhookEvent(
                    event_id=event_id(request.account_id, request.run_id, event_type),
                    event_type=event_type,
                    account_id=request.account_id,
                    occurred_at=request.occurred_at,
                    data=data,
                ),
            )
            for event_type, hooks in wanted.items()
            for hook in hooks
        ]

    def _event_data(self, request: RunEventInput, job: StoredJob) -> RunEventData:
        environment_id = job.extra.get("environment_id")
        environment = (
            self._store.get_environment(request.account_id, environment_id)
            if isinstance(environment_id, int)
            else None
        )
        project_id = job.extra.get("project_id", environment.project_id if environment else None)
        return RunEventData(
            job_id=job.id,
            job_name=job.name,
            run_id=request.run_id,
            environment_id=_text(environment_id),
            environment_name=environment.name if environment else "",
            project_id=_text(project_id),
            project_name=project_name(job.definition.environment),
            dbt_version=request.dbt_version or job.definition.environment.dbt_version or "",
            status=request.status,
            status_message=request.status_message,
            reason=request.cause_text or RUN_REASONS.get(request.cause, ""),
            started_at=request.started_at,
            finished_at=request.finished_at,
        )


def event_id(account_id: str, run_id: str, event_type: str) -> str:
    """A run's event always gets the same id (a republished event is the same event)."""
    digest = hashlib.sha256(f"{account_id}\0{run_id}\0{event_type}".encode()).hexdigest()
    return f"wev_{digest[:27]}"


def project_name(environment: Environment) -> str:
    """The dbt project's directory name: Runslot has no named projects."""
    source = (environment.git_url or environment.project_dir).rstrip("/").removesuffix(".git")
    return PurePosixPath(environment.subdirectory or source).name


def _text(value: object) -> str:
    return "" if value is None else str(value)


# --------------------------------------------------------------------------- deliver


class WebhookActivities:
    """``deliver_webhook``: the telemetry worker's side."""

    def __init__(self, store: RunStore, config: WebhookConfig | None) -> None:
        self._store = store
        self._config = config

    @activity.defn(name="deliver_webhook")
    async def deliver_webhook(self, delivery: WebhookDelivery) -> WebhookDeliveryResult:
        """POST one event to one subscription; raise (to be retried) unless it answers 2xx."""
        if self._config is None:
            raise ApplicationError(
                "this telemetry worker has no signing key: webhooks cannot be sent",
                type=WEBHOOK_NOT_CONFIGURED,
                non_retryable=True,
            )
        event = delivery.event
        hook = await asyncio.to_thread(self._subscription, event.account_id, delivery.webhook_id)
        if hook is None or not hook.active:
            activity.logger.info(
                "webhook %s was deleted or paused: event %s not sent",
                delivery.webhook_id, event.event_id,
            )  # fmt: skip
            return WebhookDeliveryResult(skipped=True)
        body = event_body(delivery, hook)
        secret = webhook_secret(self._config.signing_key, hook.id)
        headers = {
            "Content-Type": "application/json",
            "Authorization": sign(secret, body),
            "User-Agent": USER_AGENT,
        }
        status, error = await _post(hook.url, body, headers, self._config.http_timeout)
        succeeded = status is not None and 200 <= status < 300
        attempts = await asyncio.to_thread(
            lambda: self._store.record_delivery_attempt(
                webhook_id=hook.id,
                account_id=event.account_id,
                event_id=event.event_id,
                event_type=event.event_type,
                run_id=int(event.data.run_id) if event.data.run_id.isdigit() else None,
                status_code=status,
                error=error,
                succeeded=succeeded,
            )
        )
        if not succeeded:
            # Retryable: the workflow's retry policy is the backoff. The URL stays out of the
            # message (it often carries a token), the subscription id names it.
            raise ApplicationError(
                f"webhook {hook.id}: {error} (attempt {attempts})", type=WEBHOOK_DELIVERY_FAILED
            )
        return WebhookDeliveryResult(status_code=status, attempts=attempts)

    def _subscription(self, account_id: str, webhook_id: int) -> StoredWebhook | None:
        return next((h for h in self._store.list_webhooks(account_id) if h.id == webhook_id), None)


async def _post(
    url: str, body: bytes, headers: dict[str, str], limit: timedelta
) -> tuple[int | None, str]:
    """(HTTP status or None, error text or ""), within ``limit`` from connect to last byte."""
    seconds = limit.total_seconds()
    try:
        # httpx's timeout bounds each read; the outer one bounds a receiver that drips bytes.
        async with asyncio.timeout(seconds):
            async with httpx.AsyncClient(timeout=seconds, follow_redirects=False) as http:
                response = await http.post(url, content=body, headers=headers)
    except (TimeoutError, httpx.TimeoutException):
        return None, f"no response within {seconds:g} s"
    except Exception as err:  # noqa: BLE001 - any failure to send is a failed, logged attempt
        return None, f"{type(err).__name__}: {err}".replace(url, "<url>")[:500]
    if 200 <= response.status_code < 300:
        return response.status_code, ""
    return response.status_code, f"HTTP {response.status_code} {response.reason_phrase}".strip()


def event_body(delivery: WebhookDelivery, hook: StoredWebhook) -> bytes:
    """The JSON body dbt Cloud sends for this event to this subscription."""
    event, run = delivery.event, delivery.event.data
    data: dict[str, Any] = {
        "jobId": str(run.job_id),
        "jobName": run.job_name,
        "runId": run.run_id,
        "environmentId": run.environment_id,
        "environmentName": run.environment_name,
        "dbtVersion": run.dbt_version,
        "projectName": run.project_name,
        "projectId": run.project_id,
        "runStatus": RUN_STATUS_NAMES[run.status],
        "runStatusCode": int(run.status),
        # dbt Cloud writes Python's str(None) for a run without a message.
        "runStatusMessage": run.status_message or "None",
        "runReason": run.reason,
    }
    if run.started_at is not None:
        data["runStartedAt"] = _seconds(run.started_at)
    if event.event_type != EVENT_RUN_STARTED and run.finished_at is not None:
        data["runFinishedAt"] = _seconds(run.finished_at)
        if event.event_type == EVENT_RUN_ERRORED:
            data["runErroredAt"] = data["runFinishedAt"]
    payload = {
        # dbt Cloud's account ids are integers; Runslot's are names, sent as they are.
        "accountId": int(event.account_id) if event.account_id.isdigit() else event.account_id,
        "webhooksID": str(hook.id),
        "eventId": event.event_id,
        "timestamp": event.occurred_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "eventType": event.event_type,
        "webhookName": hook.name,
        "data": data,
    }
    return json.dumps(payload, separators=(",", ":")).encode()


def _seconds(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
