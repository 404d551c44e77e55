"""Jobs through the API (endpoints 1-7, spec §2.5): what is sent is echoed, what is saved is
what the job workflow runs, and every change goes through the workflow."""

from __future__ import annotations

from typing import Any

import pytest

from api import calls
from api.app import create_app
from api.context import ApiContext
from starter import jobs
from tests import api_fixtures
from tests.api_fixtures import ApiStack, serve
from tests.builders import job, wait_for
from tests.conftest import fresh_queues
from workflows.models import AccountSettings, Environment, JobType, RunStatus

pytestmark = pytest.mark.devserver


def jobs_as_code_payload(api: ApiStack, threads: int = 4) -> dict[str, Any]:
    """The body dbt-jobs-as-code 1.22 sends (``JobDefinition.to_payload``) for recipe §3.4."""
    return {
        "id": None,
        "account_id": int(api.account_id),
        "project_id": api.project_id,
        "environment_id": api.environment_id,
        "dbt_version": None,
        "name": "Nightly build [[nightly]]",
        "settings": {"threads": threads, "target_name": "prod"},
        "execution": {"timeout_seconds": 0},
        "deferring_job_definition_id": None,
        "deferring_environment_id": None,
        "run_generate_sources": False,
        "run_lint": False,
        "errors_on_lint_failure": True,
        "execute_steps": ["dbt build"],
        "generate_docs": False,
        "schedule": {
            "cron": "0 2 * * *",
            "date": {"type": "custom_cron", "cron": "0 2 * * *"},
            "time": {"type": "every_hour", "interval": 1},
        },
        "triggers": {
            "github_webhook": False,
            "git_provider_webhook": False,
            "schedule": True,
            "on_merge": False,
        },
        "description": "Managed by dbt-jobs-as-code",
        "state": 1,
        "run_compare_changes": False,
        "compare_changes_flags": "--select state:modified",
        "job_type": "scheduled",
        "cost_optimization_features": [],
        "triggers_on_draft_pr": False,
        "job_completion_trigger_condition": None,
        "some_future_field": {"kept": [1, 2]},
    }


def assert_echoes(sent: dict[str, Any], shown: dict[str, Any]) -> None:
    """Every field a client sent comes back as it was sent (``id`` is the server's)."""
    for name, value in sent.items():
        if name in ("id",):
            continue
        if isinstance(value, dict) and isinstance(shown.get(name), dict):
            for sub, sub_value in value.items():
                assert shown[name].get(sub) == sub_value, (name, sub, shown[name])
        else:
            assert shown.get(name) == value, (name, value, shown.get(name))


async def test_a_job_round_trips_with_every_field_it_was_sent_and_is_saved_as_a_definition(
    api: ApiStack,
) -> None:
    payload = jobs_as_code_payload(api)
    created = await api.http.post(f"{api.v2}/jobs/", json=payload)
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["status"]["code"] == 201
    job_id = body["data"]["id"]
    assert_echoes(payload, body["data"])
    stored = api.store.get_job(api.account_id, job_id)
    assert stored is not None and stored.key == str(job_id)
    definition = stored.definition
    assert definition.settings.threads == 4 and definition.settings.target_name == "prod"
    assert definition.triggers.schedule is not None
    assert definition.triggers.schedule.cron == "0 2 * * *"
    assert definition.execute_steps == [["dbt", "build"]]
    assert definition.job_type == JobType.SCHEDULED
    described = await jobs.describe_job(api.client, api.account_id, stored.key)
    assert described.job == definition and described.state.store_id == job_id

    fetched = (await api.http.get(f"{api.v2}/jobs/{job_id}/")).json()["data"]
    assert_echoes(payload, fetched)
    assert fetched["next_run"] is not None and fetched["raw_dbt_version"] is None
    assert "is_deferrable" in fetched and fetched["deactivated"] is False
    [listed] = (await api.http.get(f"{api.v2}/jobs/?project_id=1")).json()["data"]
    assert_echoes(payload, listed)

    # A full update (dbt-jobs-as-code sends everything back, id included).
    updated_payload = {**jobs_as_code_payload(api, threads=8), "id": job_id}
    updated = await api.http.post(f"{api.v2}/jobs/{job_id}/", json=updated_payload)
    assert updated.status_code == 200, updated.text
    assert_echoes(updated_payload, updated.json()["data"])
    described = await jobs.describe_job(api.client, api.account_id, stored.key)
    assert described.job.settings.threads == 8

    # A partial update keeps everything else.
    partial = await api.http.post(
        f"{api.v2}/jobs/{job_id}", json={"settings": {"threads": 2}, "description": "short"}
    )
    shown = partial.json()["data"]
    assert shown["settings"] == {"threads": 2, "target_name": "prod"}
    assert shown["description"] == "short" and shown["execute_steps"] == ["dbt build"]
    assert shown["schedule"]["cron"] == "0 2 * * *" and shown["some_future_field"] == {
        "kept": [1, 2]
    }
    again = api.store.get_job(api.account_id, job_id)
    assert again is not None and again.definition.settings.threads == 2

    deleted = await api.http.delete(f"{api.v2}/jobs/{job_id}/")
    assert deleted.status_code == 200 and deleted.json()["data"]["state"] == 2
    assert (await api.http.get(f"{api.v2}/jobs/{job_id}/")).json()["data"]["state"] == 2
    assert (await api.http.get(f"{api.v2}/jobs/")).json()["data"] == []
    [gone] = (await api.http.get(f"{api.v2}/jobs/?state=2")).json()["data"]
    assert gone["id"] == job_id
    assert (await jobs.describe_job(api.client, api.account_id, str(job_id))).state.deleted
    again_deleted = await api.http.delete(f"{api.v2}/jobs/{job_id}/")
    assert again_deleted.status_code == 200 and again_deleted.json()["data"]["state"] == 2
    refused = await api.http.post(f"{api.v2}/jobs/{job_id}/run/", json={"cause": "x"})
    assert refused.status_code == 404 and "deleted" in refused.json()["status"]["user_message"]


@pytest.mark.parametrize(
    ("triggers", "expected"),
    [
        ({"github_webhook": True}, "ci"),
        ({"git_provider_webhook": True}, "ci"),
        ({"on_merge": True}, "merge"),
        ({"schedule": True}, "scheduled"),
        ({}, "other"),
    ],
    ids=["github-webhook", "git-provider-webhook", "on-merge", "schedule", "nothing"],
)
async def test_a_null_job_type_is_derived_from_the_triggers(
    api: ApiStack, triggers: dict[str, bool], expected: str
) -> None:
    created = await api.create_job(job_type=None, triggers=triggers, schedule={"cron": "0 * * * *"})
    assert created["job_type"] == expected
    stored = api.store.get_job(api.account_id, created["id"])
    assert stored is not None and stored.definition.job_type == JobType(expected)
    assert stored.definition.triggers.git_provider_webhook == (expected == "ci")
    assert (stored.definition.triggers.schedule is not None) == (expected == "scheduled")


async def test_a_job_completion_trigger_names_the_upstream_job_by_id_and_runs_after_it(
    api: ApiStack,
) -> None:
    upstream = await api.create_job(name="upstream")
    condition = {"job_id": upstream["id"], "project_id": 1, "statuses": [10, 20]}
    downstream = await api.create_job(
        name="downstream", job_completion_trigger_condition={"condition": condition}
    )
    assert downstream["job_completion_trigger_condition"] == {"condition": condition}
    stored = api.store.get_job(api.account_id, downstream["id"])
    assert stored is not None
    [trigger] = stored.definition.triggers.on_job_completion
    assert trigger.job_id == str(upstream["id"])
    assert trigger.statuses == [RunStatus.SUCCESS, RunStatus.ERROR]
    await api.http.post(f"{api.v2}/jobs/{upstream['id']}/run/", json={"cause": "go"})

    async def downstream_ran() -> bool:
        runs = await api.http.get(
            f"{api.v2}/runs/", params={"job_definition_id": downstream["id"], "status": 10}
        )
        return bool(runs.json()["data"])

    await wait_for(downstream_ran, what="the downstream job's run")
    [run] = (
        await api.http.get(
            f"{api.v2}/runs/",
            params={"job_definition_id": downstream["id"], "include_related": "trigger"},
        )
    ).json()["data"]
    assert run["trigger"]["cause_category"] == "job_completion"


async def test_a_runslot_key_makes_creating_idempotent_and_reads_a_schedule_time_zone(
    api: ApiStack,
) -> None:
    body = {
        "runslot_key": "nightly",
        "environment_id": api.environment_id,
        "name": "Nightly",
        "execute_steps": ["dbt seed", "dbt build"],
        "triggers": {"schedule": True},
        "schedule": {"cron": "30 1 * * *", "timezone": "Europe/Paris"},
    }
    first = await api.http.post(f"{api.v2}/jobs/", json=body)
    assert first.status_code == 201, first.text
    again = await api.http.post(f"{api.v2}/jobs/", json={**body, "name": "Nightly v2"})
    assert again.status_code == 200, again.text
    assert again.json()["data"]["id"] == first.json()["data"]["id"]
    assert again.json()["data"]["runslot_key"] == "nightly"
    assert again.json()["data"]["name"] == "Nightly v2"
    stored = api.store.get_job_by_key(api.account_id, "nightly")
    assert stored is not None and stored.definition.name == "Nightly v2"
    assert stored.definition.triggers.schedule is not None
    assert stored.definition.triggers.schedule.timezone == "Europe/Paris"
    assert api.store.list_jobs(api.account_id).total_count == 1
    changing = await api.http.post(
        f"{api.v2}/jobs/{stored.id}/", json={"runslot_key": "something-else"}
    )
    assert changing.status_code == 400
    assert "runslot_key cannot change" in changing.json()["status"]["user_message"]


async def test_a_job_saved_outside_the_api_shows_what_it_now_does(api: ApiStack) -> None:
    created = await api.create_job(description="kept", execute_steps=["dbt run -s ok"])
    stored = api.store.get_job(api.account_id, created["id"])
    assert stored is not None
    changed = stored.definition.model_copy(
        update={"execute_steps": [["dbt", "seed"], ["dbt", "test", "-s", "a b"]]}
    )
    settings = AccountSettings(account_id=api.account_id)
    await jobs.save_job(api.client, changed, settings, api.queues)
    shown = (await api.http.get(f"{api.v2}/jobs/{created['id']}/")).json()["data"]
    assert shown["execute_steps"] == ["dbt seed", "dbt test -s 'a b'"]
    assert shown["description"] == "kept"

    # A job that never went through the API: its environment is matched by definition.
    outside = job(api.account_id, "outside", project_dir="/fake/project")
    await jobs.save_job(api.client, outside, settings, api.queues)
    [listed] = [
        j
        for j in (await api.http.get(f"{api.v2}/jobs/")).json()["data"]
        if j.get("runslot_key") == "outside"
    ]
    assert listed["environment_id"] == api.environment_id and listed["project_id"] == 1
    assert listed["execute_steps"] == ["dbt run -s ok"] and listed["job_type"] == "scheduled"
    assert listed["schedule"]["cron"] and listed["settings"]["threads"] == 4


async def test_a_deactivated_job_keeps_its_triggers_in_the_echo_but_nothing_starts_it(
    api: ApiStack,
) -> None:
    created = await api.create_job(
        deactivated=True, triggers={"schedule": True}, schedule={"cron": "* * * * *"}
    )
    assert created["deactivated"] is True and created["triggers"]["schedule"] is True
    stored = api.store.get_job(api.account_id, created["id"])
    assert stored is not None and stored.definition.triggers.schedule is None
    assert created["next_run"] is None
    reactivated = await api.http.post(
        f"{api.v2}/jobs/{created['id']}/", json={"deactivated": False}
    )
    assert reactivated.json()["data"]["deactivated"] is False
    stored = api.store.get_job(api.account_id, created["id"])
    assert stored is not None and stored.definition.triggers.schedule is not None


async def test_replacing_an_environment_saves_its_jobs_again_and_hides_secret_values(
    api: ApiStack,
) -> None:
    url = f"{api.v3}/projects/2/environments/"
    first = {
        "name": "staging",
        "runslot": {
            "project_dir": "/fake/a",
            "profile": {
                "type": "postgres",
                "password": "{{ secret('PG_PASSWORD') }}",
                "token": "literal-value",
            },
            "env_vars": {"DBT_TARGET": "staging"},
        },
    }
    created = await api.http.post(url, json=first)
    assert created.status_code == 201, created.text
    env = created.json()["data"]
    assert env["project_id"] == 2 and env["name"] == "staging"
    assert env["runslot"]["profile"]["password"] == "{{ secret('PG_PASSWORD') }}"
    assert env["runslot"]["profile"]["token"] == "********"
    job_obj = await api.create_job(environment_id=env["id"], project_id=2)
    replaced = await api.http.post(url, json={**first, "runslot": {"project_dir": "/fake/b"}})
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["data"]["id"] == env["id"]
    stored = api.store.get_job(api.account_id, job_obj["id"])
    assert stored is not None and stored.definition.environment.project_dir == "/fake/b"
    described = await jobs.describe_job(api.client, api.account_id, stored.key)
    assert described.job.environment == Environment(project_dir="/fake/b")
    project = (await api.http.get(f"{api.v3}/projects/2/")).json()["data"]
    assert project["name"] == "b" and project["connection"]["type"] is None
    names = (await api.http.get(f"{api.v3}/projects/?name__icontains=B")).json()
    assert [p["id"] for p in names["data"]] == [2]
    listed = (await api.http.get(f"{api.v3}/environments/?project_id=2")).json()
    assert [e["id"] for e in listed["data"]] == [env["id"]]


async def test_a_create_no_worker_answers_is_a_503_and_leaves_nothing_visible(
    api: ApiStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(calls, "WORKFLOW_TIMEOUT_SECONDS", 1.0)
    ctx = ApiContext(
        store=api.store,
        client=api.client,
        artifacts=api.artifacts,
        queues=fresh_queues(),  # nobody polls these
        data_dir=api_fixtures.SAMPLE,
    )
    async with serve(create_app(ctx)) as url:
        body = {"environment_id": api.environment_id, "name": "lost", "execute_steps": ["dbt run"]}
        response = await api.http.post(f"{url}{api.v2}/jobs/", json=body)
    assert response.status_code == 503, response.text
    message = response.json()["status"]["user_message"]
    assert "no workflow worker answered" in message and "Nothing was created" in message
    assert (await api.http.get(f"{api.v2}/jobs/")).json()["data"] == []
    [hidden] = api.store.list_jobs(api.account_id, state=2).items
    handle = api.client.get_workflow_handle(f"job:{api.account_id}:{hidden.key}")
    assert (await handle.describe()).status is not None

    async def terminated() -> bool:
        return (await handle.describe()).status.name == "TERMINATED"  # type: ignore[union-attr]

    await wait_for(terminated, what="the half-created job's workflow to be terminated")
