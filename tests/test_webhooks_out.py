"""Outgoing webhooks (dbt Cloud's job.run.* events) end to end: real Temporal, real workers
(fake dbt), a real SQLite run store and a real HTTP receiver on a free port."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, timedelta
from typing import Any

import pytest
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment

from activities.signing import webhook_secret
from activities.store import RunStore
from activities.webhooks import WebhookConfig
from starter import jobs
from tests.builders import account, job, wait_for, wait_run
from tests.conftest import running_stack, unique
from tests.fakes import FakeDbtExecutor
from tests.webhook_helpers import FAST_POLICY, FAST_WEBHOOKS, HANG, SIGNING_KEY, Receiver
from workflows import constants as c
from workflows.models import (
    RunStatus,
    TaskQueues,
    TriggerRequest,
    WebhookDeliveries,
    WebhookDelivery,
    WebhookDeliveryPolicy,
    WebhooksState,
)

pytestmark = pytest.mark.devserver

ALL_EVENTS = list(c.WEBHOOK_EVENT_TYPES)
ISO_PRECISE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@asynccontextmanager
async def _receiving(
    client: Client,
    fake_dbt: FakeDbtExecutor,
    store: RunStore,
    receiver: Receiver,
    *,
    webhooks: WebhookConfig = FAST_WEBHOOKS,
) -> AsyncIterator[tuple[str, TaskQueues]]:
    """The receiver over HTTP, then workers that send it webhooks; yields its base URL and the
    workers' queues (the receiver closes last)."""
    async with (
        receiver.running() as url,
        running_stack(client, fake_dbt, store=store, webhooks=webhooks) as q,
    ):
        yield url, q


async def _job_store_id(client: Client, store: RunStore, acct: str, key: str, q: TaskQueues) -> int:
    await jobs.save_job(client, job(acct, key), account(acct), q)
    stored = store.get_job_by_key(acct, key)
    assert stored is not None
    return stored.id


def _signature(webhook_id: int, body: bytes) -> str:
    secret = webhook_secret(SIGNING_KEY, webhook_id).encode()
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


async def _signal_deliveries(
    client: Client,
    acct: str,
    q: TaskQueues,
    policy: WebhookDeliveryPolicy,
    deliveries: WebhookDeliveries | dict[str, Any],
) -> WorkflowHandle[Any, Any]:
    """Signal ``deliveries`` to the account's webhooks workflow, starting it if need be, as
    ``publish_run_event`` does; a dict is sent as it is, valid or not."""
    return await client.start_workflow(
        c.WEBHOOKS_WORKFLOW,
        WebhooksState(account_id=acct, queues=q, policy=policy),
        id=c.webhooks_workflow_id(acct),
        task_queue=q.workflows,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        start_signal=c.SIGNAL_WEBHOOK_DELIVERIES,
        start_signal_args=[deliveries],
    )


async def test_a_completed_run_sends_started_then_completed_signed_with_dbt_clouds_payload(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, acct, receiver = dev_env.client, unique("whok"), Receiver()
    async with _receiving(client, fake_dbt, run_store, receiver) as (url, q):
        job_id = await _job_store_id(client, run_store, acct, "daily", q)
        other_id = await _job_store_id(client, run_store, acct, "other", q)
        hook = run_store.create_webhook(
            acct, name="ops", url=f"{url}/ops", event_types=ALL_EVENTS, job_ids=[job_id]
        )
        elsewhere = run_store.create_webhook(
            acct, name="other", url=f"{url}/other", event_types=ALL_EVENTS, job_ids=[other_id]
        )
        res = await jobs.trigger(client, acct, "daily", TriggerRequest(cause_text="nightly"))
        result = await wait_run(client, acct, res.run_id)
        got = await wait_for(lambda: len(receiver.at("ops")) == 2 and receiver.at("ops"))
    assert result.status == RunStatus.SUCCESS and result.started_at and result.finished_at
    started, completed = (r.json for r in got)
    assert [started["eventType"], completed["eventType"]] == [
        "job.run.started",
        "job.run.completed",
    ]
    for request in got:
        assert request.headers["authorization"] == _signature(hook, request.body)
        assert request.headers["content-type"] == "application/json"
    assert started["eventId"] != completed["eventId"]
    for payload in (started, completed):
        assert payload["accountId"] == acct
        assert payload["webhooksID"] == str(hook)
        assert payload["webhookName"] == "ops"
        assert payload["eventId"].startswith("wev_")
        assert ISO_PRECISE.match(payload["timestamp"])
        data = payload["data"]
        assert data["jobId"] == str(job_id) and data["jobName"] == "job daily"
        assert data["runId"] == res.run_id
        assert data["runReason"] == "nightly"
        assert data["projectName"] == "project"  # /fake/project
        assert data["runStartedAt"] == result.started_at.astimezone(UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        assert {"environmentId", "environmentName", "dbtVersion", "projectId"} <= data.keys()
    assert (started["data"]["runStatus"], started["data"]["runStatusCode"]) == ("Running", 3)
    assert "runFinishedAt" not in started["data"]
    assert (completed["data"]["runStatus"], completed["data"]["runStatusCode"]) == ("Success", 10)
    assert completed["data"]["runStatusMessage"] == "None"  # dbt Cloud's spelling of no message
    assert completed["data"]["runFinishedAt"] == result.finished_at.astimezone(UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    # The subscription for another job got nothing; the delivery log has one row per event.
    assert receiver.at("other") == []
    assert run_store.list_deliveries(acct, webhook_id=elsewhere) == []
    log = run_store.list_deliveries(acct, webhook_id=hook)
    assert sorted((d.event_type, d.attempts, d.succeeded, d.status_code) for d in log) == [
        ("job.run.completed", 1, True, 200),
        ("job.run.started", 1, True, 200),
    ]
    assert {d.run_id for d in log} == {int(res.run_id)}


async def test_an_errored_run_sends_completed_and_errored(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, acct, receiver = dev_env.client, unique("wherr"), Receiver()
    async with _receiving(client, fake_dbt, run_store, receiver) as (url, q):
        await jobs.save_job(client, job(acct, "j", ["dbt run -s fail"]), account(acct), q)
        run_store.create_webhook(
            acct, name="alerts", url=f"{url}/alerts", event_types=[c.EVENT_RUN_COMPLETED,
            c.EVENT_RUN_ERRORED],
        )  # fmt: skip
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        result = await wait_run(client, acct, res.run_id)
        got = await wait_for(lambda: len(receiver.at("alerts")) == 2 and receiver.at("alerts"))
    assert result.status == RunStatus.ERROR
    by_type = {r.json["eventType"]: r.json["data"] for r in got}
    assert set(by_type) == {"job.run.completed", "job.run.errored"}, "no started: not subscribed"
    for data in by_type.values():
        assert (data["runStatus"], data["runStatusCode"]) == ("Errored", 20)
        assert data["runStatusMessage"] == result.status_message
        assert "failed" in data["runStatusMessage"]
    assert by_type["job.run.errored"]["runErroredAt"] == by_type["job.run.errored"]["runFinishedAt"]
    assert "runErroredAt" not in by_type["job.run.completed"]


async def test_a_receiver_failing_twice_gets_the_event_on_the_third_attempt_all_logged(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, acct = dev_env.client, unique("whflaky")
    receiver = Receiver(scripts={"flaky": [500, 500]})
    async with _receiving(client, fake_dbt, run_store, receiver) as (url, q):
        await jobs.save_job(client, job(acct, "j"), account(acct), q)
        hook = run_store.create_webhook(
            acct, name="flaky", url=f"{url}/flaky", event_types=[c.EVENT_RUN_COMPLETED]
        )
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_run(client, acct, res.run_id)
        delivered = await wait_for(
            lambda: [d for d in run_store.list_deliveries(acct) if d.succeeded],
            what="the delivery to succeed",
        )
        # Idle (FAST_POLICY: 2 s with nothing to deliver), the account's workflow ends.
        webhooks = client.get_workflow_handle(c.webhooks_workflow_id(acct))
        await asyncio.wait_for(webhooks.result(), 15)
    assert [(d.webhook_id, d.attempts, d.status_code, d.error) for d in delivered] == [
        (hook, 3, 200, "")
    ]
    attempts = receiver.at("flaky")
    assert len(attempts) == 3
    assert len({a.body for a in attempts}) == 1, "every attempt sends the same signed event"
    assert len({a.headers["authorization"] for a in attempts}) == 1


async def test_a_hanging_receiver_delays_no_run_and_holds_no_slot(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, receiver = dev_env.client, Receiver(scripts={"hang": [HANG] * 10})
    quiet, hooked = unique("whquiet"), unique("whhang")
    two_attempts = WebhookConfig(
        signing_key=SIGNING_KEY,
        http_timeout=timedelta(seconds=2),  # a run that waited for it would take 2 s more
        policy=FAST_POLICY.model_copy(update={"maximum_attempts": 2}),
    )
    async with (  # the receiver closes first: it lets its hanging requests go
        running_stack(client, fake_dbt, store=run_store, webhooks=two_attempts) as q,
        receiver.running() as url,
    ):
        for acct in (quiet, hooked):
            await jobs.save_job(client, job(acct, "j"), account(acct, run_slots=1), q)
        run_store.create_webhook(hooked, name="h", url=f"{url}/hang", event_types=ALL_EVENTS)
        loop = asyncio.get_running_loop()
        elapsed: dict[str, float] = {}
        for acct in (quiet, hooked):  # the same run, without and with a hanging receiver
            began = loop.time()
            res = await jobs.trigger(client, acct, "j", TriggerRequest())
            assert (await wait_run(client, acct, res.run_id)).status == RunStatus.SUCCESS
            elapsed[acct] = loop.time() - began
        assert (await jobs.describe_slots(client, hooked)).holders == []
        assert receiver.at("hang"), "the receiver was called (and hangs)"
        # The next run of the account starts at once, while the deliveries still hang.
        again = await jobs.trigger(client, hooked, "j", TriggerRequest())
        await wait_for(lambda: again.run_id in fake_dbt.started_runs(), timeout=5)
        given_up = await wait_for(
            lambda: [d for d in run_store.list_deliveries(hooked) if d.attempts == 2],
            timeout=20,
            what="two timed-out attempts logged",
        )
    assert elapsed[hooked] < elapsed[quiet] + 1.0, elapsed
    assert all(not d.succeeded and d.status_code is None for d in given_up)
    assert all(d.error.startswith("no response within") for d in given_up)


async def test_an_account_without_subscriptions_starts_no_webhooks_workflow(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, acct = dev_env.client, unique("whnone")
    async with running_stack(client, fake_dbt, store=run_store, webhooks=FAST_WEBHOOKS) as q:
        await jobs.save_job(client, job(acct, "j", ["dbt run -s ok", "dbt run -s fail"]),
                            account(acct), q)  # fmt: skip
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_run(client, acct, res.run_id)
        with pytest.raises(RPCError) as info:
            await client.get_workflow_handle(c.webhooks_workflow_id(acct)).describe()
        assert info.value.status == RPCStatusCode.NOT_FOUND
        run = client.get_workflow_handle(c.run_workflow_id(acct, res.run_id))
        history = await run.fetch_history()
    # What webhooks cost such a run: nothing of their own. Both publishes (started;
    # completed + errored) ride in the run's reports, a marker each that the run writes
    # anyway, and no publish_run_event marker is left.
    markers = [
        e.marker_recorded_event_attributes.SerializeToString()
        for e in history.events
        if e.HasField("marker_recorded_event_attributes")
    ]
    assert sum(b"report_run" in m for m in markers) == 2
    assert not any(b"publish_run_event" in m for m in markers)


async def test_a_bad_message_is_recorded_and_the_webhooks_workflow_keeps_delivering(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, acct, receiver = dev_env.client, unique("whbad"), Receiver()
    patient = FAST_POLICY.model_copy(update={"idle_timeout": timedelta(minutes=5)})
    config = WebhookConfig(signing_key=SIGNING_KEY, policy=patient)
    async with _receiving(client, fake_dbt, run_store, receiver, webhooks=config) as (url, q):
        await jobs.save_job(client, job(acct, "j"), account(acct), q)
        run_store.create_webhook(acct, name="x", url=f"{url}/x", event_types=ALL_EVENTS)
        handle = await _signal_deliveries(client, acct, q, patient, {"deliveries": "not a list"})
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_run(client, acct, res.run_id)
        state = await wait_for(lambda: _delivered(handle, 2), what="two deliveries")
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        await handle.terminate("test over")
    assert [r.handler for r in state.rejected] == [c.SIGNAL_WEBHOOK_DELIVERIES]
    assert len(receiver.at("x")) == 2


async def _delivered(handle: WorkflowHandle[Any, Any], count: int) -> WebhooksState | None:
    state = await handle.query(c.QUERY_DESCRIBE, result_type=WebhooksState)
    return state if state.delivered_total == count else None


@pytest.mark.slow
async def test_continue_as_new_carries_undelivered_events_and_delivers_each_once(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, acct, receiver = dev_env.client, unique("whcan"), Receiver()
    async with _receiving(client, fake_dbt, run_store, receiver) as (url, q):
        await jobs.save_job(client, job(acct, "j"), account(acct), q)
        hook = run_store.create_webhook(acct, name="x", url=f"{url}/x", event_types=ALL_EVENTS)
        # Build one real event, then fan it out as 60 runs' events (the dev server suggests
        # continue-as-new at 300 history events: about 40 deliveries).
        res = await jobs.trigger(client, acct, "j", TriggerRequest())
        await wait_run(client, acct, res.run_id)
        first = await wait_for(lambda: receiver.at("x"))
        template = WebhookDelivery.model_validate(
            {"webhook_id": hook, "event": _event_of(first[0].json, acct)}
        )
        batch = [
            template.model_copy(
                update={"event": template.event.model_copy(update={"event_id": f"wev_{n}"})}
            )
            for n in range(60)
        ]
        handle = client.get_workflow_handle(c.webhooks_workflow_id(acct))
        for chunk in (batch[:30], batch[30:], batch[:10]):  # the last ten are repeats
            await _signal_deliveries(
                client, acct, q, FAST_POLICY, WebhookDeliveries(deliveries=chunk)
            )
        await wait_for(lambda: len({r.json["eventId"] for r in receiver.at("x")}) >= 62,
                       timeout=60)  # fmt: skip
        state = await handle.query(c.QUERY_DESCRIBE, result_type=WebhooksState)
    ids = [r.json["eventId"] for r in receiver.at("x")]
    assert sorted(i for i in ids if i.startswith("wev_") and i[4:].isdigit()) == sorted(
        f"wev_{n}" for n in range(60)
    ), "each event delivered exactly once"
    assert state.generation >= 1, "the workflow continued as new"


def _event_of(payload: dict[str, object], acct: str) -> dict[str, object]:
    """A WebhookEvent (wire form) for a received payload's run: enough for fan-out tests."""
    data = payload["data"]
    assert isinstance(data, dict)
    return {
        "event_id": payload["eventId"],
        "event_type": payload["eventType"],
        "account_id": acct,
        "occurred_at": "2026-03-01T12:00:00Z",
        "data": {
            "job_id": int(data["jobId"]),
            "job_name": data["jobName"],
            "run_id": data["runId"],
            "status": data["runStatusCode"],
        },
    }
