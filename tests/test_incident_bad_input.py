"""Wrong-typed input (issue 5, item 1; dbt Cloud, August 2023).

An integer in a subprocess env dict broke every run; runs sat queued and had to be cancelled
by hand. Here a stream of bad input reaches one job through the REST API and through its
workflow directly (updates and signals, as the ``temporal`` CLI sends them): a non-string
env value, a bad cron, an unknown field, an oversized body. Each is refused at the edge with
a message naming what to fix, and nothing is enqueued (the run store and the job's own
``describe`` agree). Meanwhile the account's scheduled jobs keep firing: with each kind of
bad input a job whose carried state makes its tick due starts (as after an outage, see
tests/test_timers.py), and each must fire once and succeed.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import FailureError
from temporalio.service import RPCError

from starter import jobs
from tests.api_fixtures import ApiStack, refused
from tests.builders import job, wait_for, wait_run
from tests.incident_helpers import (
    Figures,
    SlotSampler,
    duplicates,
    hourly_cron_far_from,
    server_now,
    start_job_with_state,
)
from workflows import constants as c
from workflows.models import (
    AccountSettings,
    CronSchedule,
    JobState,
    JobTriggers,
    RunStatus,
    TriggerCause,
)

pytestmark = [pytest.mark.incident, pytest.mark.devserver]

SLOTS = 2  # the ``api`` fixture's account
TOO_BIG = b'{"name": "' + b"x" * (1024 * 1024) + b'"}'
"""Over the API's 1 MiB body limit."""
SIGNAL_TOO_BIG = 3 * 1024 * 1024
"""Over Temporal's 2 MiB payload limit."""


async def _updates_accepted(handle: WorkflowHandle[Any, Any]) -> int:
    """Updates the job's history accepted (a refused update never enters history)."""
    history = await handle.fetch_history()
    accepted = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    return sum(event.event_type == accepted for event in history.events)


async def _update_refused(
    handle: WorkflowHandle[Any, Any], name: str, payload: Any, *needles: str
) -> str:
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await handle.execute_update(name, payload)
    # A payload that does not decode is refused by the SDK ("Failed decoding arguments"),
    # with pydantic's error, which names the field, as its cause.
    reasons: list[str] = []
    cause: BaseException | None = info.value.cause
    while isinstance(cause, FailureError):
        reasons.append(cause.message)
        cause = cause.cause
    message = " <- ".join(reasons)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


async def test_bad_input_is_a_clear_4xx_that_queues_nothing_while_schedules_keep_firing(
    api: ApiStack, capsys: pytest.CaptureFixture[str]
) -> None:
    client, acct = api.client, api.account_id
    settings = AccountSettings(
        account_id=acct, run_slots=SLOTS, slot_reap_interval=timedelta(seconds=2)
    )
    now = server_now()
    cron = hourly_cron_far_from(now)
    target = await api.create_job(name="target of the bad input")
    key, job_url = str(target["id"]), f"{api.v2}/jobs/{target['id']}/"
    handle = jobs.job_handle(client, acct, key)
    envs_url = f"{api.v3}/projects/{api.project_id}/environments/"
    environment_before = api.store.get_environment(acct, api.environment_id)
    accepted_before = await _updates_accepted(handle)
    jobs_before = api.store.list_jobs(acct, state=None).total_count
    cron_jobs: list[str] = []
    injected: Counter[str] = Counter()

    def api_refused(response: httpx.Response, code: int, *needles: str) -> None:
        refused(response, code, *needles)
        injected[f"api_{code}"] += 1

    async def update_refused(name: str, payload: Any, *needles: str) -> None:
        await _update_refused(handle, name, payload, *needles)
        injected["workflow_updates_refused"] += 1

    async def signal(name: str, payload: Any) -> None:
        await handle.signal(name, payload)
        injected["signals_rejected"] += 1

    async def due_cron_job() -> None:
        """A scheduled job back from an outage: its tick is due the moment it starts."""
        cron_key = f"cron-{len(cron_jobs)}"
        cron_jobs.append(cron_key)
        schedule = JobTriggers(schedule=CronSchedule(cron=cron))
        await start_job_with_state(
            client,
            job(acct, cron_key, triggers=schedule),
            settings,
            api.queues,
            JobState(last_cron_fire=now - timedelta(hours=2)),
        )

    async def non_string_env_values() -> None:
        bad: list[Any] = [4, 1.5, True, ["a"], {"k": "v"}, None]
        for value in bad:
            body = {
                "name": "production",
                "runslot": {"project_dir": "/p", "env_vars": {"THREADS": value}},
            }
            api_refused(await api.http.post(envs_url, json=body), 400, "runslot.env_vars.THREADS")
        overrides = {"cause": "api", "overrides": {"env_vars": {"THREADS": 4}}}
        await update_refused(c.UPDATE_TRIGGER, overrides, "env_vars.THREADS")
        await signal(c.SIGNAL_TRIGGER, overrides)

    async def bad_crons() -> None:
        for cron_expr, needle in (
            ("61 * * * *", "schedule.cron '61 * * * *' is not a valid cron expression"),
            ("0 0 31 2 *", "not a valid cron expression"),
            ("every day", "expected 5 fields"),
        ):
            body = {
                "environment_id": api.environment_id,
                "name": "n",
                "execute_steps": ["dbt run"],
                "triggers": {"schedule": True},
                "schedule": {"cron": cron_expr},
            }
            api_refused(await api.http.post(f"{api.v2}/jobs/", json=body), 400, needle)
            update = {"triggers": {"schedule": True}, "schedule": {"cron": cron_expr}}
            api_refused(await api.http.post(job_url, json=update), 400, needle)
        saved = (await jobs.describe_job(client, acct, key)).job.model_dump(mode="json")
        saved["triggers"]["schedule"] = {"cron": "61 * * * *", "timezone": "UTC"}
        await update_refused(c.UPDATE_CONFIGURE, {"job": saved}, "invalid cron")

    async def unknown_fields() -> None:
        body = {"name": "production", "runslot": {"project_dir": "/p", "env_var": {"A": "b"}}}
        api_refused(await api.http.post(envs_url, json=body), 400, "runslot.env_var")
        typo = {"cause": "api", "priority": "high"}
        await update_refused(c.UPDATE_TRIGGER, typo, "priority", "Extra inputs")
        await signal(c.SIGNAL_TRIGGER, typo)
        saved = (await jobs.describe_job(client, acct, key)).job.model_dump(mode="json")
        saved["retries"] = 3
        await update_refused(c.UPDATE_CONFIGURE, {"job": saved}, "job.retries")
        await signal("trigger_run", {"cause": "api"})  # a handler that does not exist

    async def oversized_bodies() -> None:
        for url in (f"{api.v2}/jobs/", job_url, f"{job_url}run/", envs_url):
            response = await api.http.post(url, content=TOO_BIG)
            api_refused(response, 413, "larger than 1048576 bytes")
        long_text = {"cause": "api", "cause_text": "x" * 300_000}
        await update_refused(c.UPDATE_TRIGGER, long_text, "cause_text", "255")
        with pytest.raises(RPCError) as info:  # the server refuses it: never in history
            await handle.signal(
                c.SIGNAL_TRIGGER, {"cause": "api", "cause_text": "x" * SIGNAL_TOO_BIG}
            )
        assert "size" in str(info.value).lower(), info.value
        injected["signals_refused_by_server"] += 1

    phases: list[Callable[[], Awaitable[None]]] = [
        non_string_env_values,
        bad_crons,
        unknown_fields,
        oversized_bodies,
    ]
    async with SlotSampler(client, acct) as slots:
        for phase in phases:
            # The bad input and a due cron tick of another job, at the same moment.
            await asyncio.gather(phase(), due_cron_job())

        async def fired() -> dict[str, list[Any]] | None:
            recent = {k: (await jobs.describe_job(client, acct, k)).state.recent for k in cron_jobs}
            return recent if all(recent.values()) else None

        cron_runs = await wait_for(fired, timeout=60, what="every due cron job fired")
        await asyncio.sleep(1)  # a second fire of any of them would show by now
        desc = await jobs.describe_job(client, acct, key)
        accepted_after = await _updates_accepted(handle)
        stored_target_runs = api.store.list_runs(acct, job_id=target["id"]).total_count
        # Work behind the bad input still flows: the same job takes a good trigger.
        good = await api.http.post(f"{job_url}run/", json={"cause": "after the bad input"})
        assert good.status_code == 200, good.text
        good_run = await wait_run(client, acct, str(good.json()["data"]["id"]))
        cron_again = {k: (await jobs.describe_job(client, acct, k)).state.recent for k in cron_jobs}
    # Nothing was enqueued: not in the job, not in the store, not in its history.
    assert desc.state.queue == [] and desc.state.in_flight == [] and desc.state.recent == []
    assert stored_target_runs == 0
    assert accepted_after == accepted_before
    assert api.store.get_environment(acct, api.environment_id) == environment_before
    assert api.store.list_jobs(acct, state=None).total_count == jobs_before + len(cron_jobs)
    # The signals (which cannot answer) were kept with the reason, the field named.
    reasons = [(r.handler, r.reason) for r in desc.state.rejected]
    assert [h for h, _ in reasons] == ["trigger", "trigger", "trigger_run"], reasons
    assert "env_vars.THREADS" in reasons[0][1] and "priority" in reasons[1][1]
    assert "unknown signal 'trigger_run'" in reasons[2][1]
    cron_statuses = [r.status for runs in cron_runs.values() for r in runs]
    all_runs = api.store.list_runs(acct, limit=1000).items
    figures = Figures(
        "bad-input",
        runs=len(cron_statuses) + 1,
        faults=sum(injected.values()),
        lost=sum(s != RunStatus.SUCCESS for s in cron_statuses)
        + (good_run.status != RunStatus.SUCCESS),
        duplicates=duplicates(api.dbt.started_runs())
        + sum(len(runs) - 1 for runs in cron_again.values())
        + max(0, len(all_runs) - len(cron_jobs) - 1),
        max_slot_overrun=slots.overrun(SLOTS),
        notes={
            **dict(sorted(injected.items())),
            "cron_jobs": len(cron_jobs),
            "max_slots_in_use": slots.max_in_use,
        },
    )
    figures.report(capsys)
    assert all(r.cause == TriggerCause.SCHEDULED for runs in cron_runs.values() for r in runs)
