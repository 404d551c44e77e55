"""Bad input: each is a clear 4xx in dbt Cloud's envelope, with a message saying what to fix,
and creates nothing (checked in the run store, not only in the answer)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from activities.store import RunStore
from api.app import create_app
from api.context import ApiContext
from api.envelope import MAX_BODY_BYTES
from tests.api_fixtures import JOB_CALLS, ApiStack, refused, serve, unique_account
from workflows.models import AccountSettings, Environment

pytestmark = pytest.mark.devserver


@dataclass(frozen=True)
class Counts:
    jobs: int
    runs: int
    environments: int


def counts(api: ApiStack) -> Counts:
    return Counts(
        jobs=api.store.list_jobs(api.account_id, state=None).total_count,
        runs=api.store.list_runs(api.account_id).total_count,
        environments=len(api.store.list_environments(api.account_id)),
    )


def job_body(api: ApiStack, **fields: Any) -> dict[str, Any]:
    return {
        "environment_id": api.environment_id,
        "name": "n",
        "execute_steps": ["dbt run"],
        **fields,
    }


BAD_JOBS: list[tuple[dict[str, Any], list[str]]] = [
    ({"execute_steps": ["ls -la"]}, ["execute_steps.0", "must be a dbt command"]),
    ({"execute_steps": ["dbt frobnicate"]}, ["execute_steps.0", "unknown dbt subcommand"]),
    ({"execute_steps": [1]}, ["execute_steps.0", "valid string"]),
    ({"execute_steps": []}, ["execute_steps"]),
    ({"name": ""}, ["name"]),
    (
        {"triggers": {"schedule": True}, "schedule": {"cron": "61 * * * *"}},
        ["schedule.cron '61 * * * *' is not a valid cron expression", "out of range"],
    ),
    (
        {"triggers": {"schedule": True}, "schedule": {"cron": "0 0 31 2 *"}},
        ["not a valid cron expression", "failed to find next date"],
    ),
    ({"schedule": {"cron": "every day"}}, ["expected 5 fields"]),
    ({"triggers": {"schedule": True}}, ["set schedule.cron"]),
    (
        {"triggers": {"schedule": True}, "schedule": {"cron": "0 1 * * *", "timezone": "Mars"}},
        ["schedule.timezone", "unknown time zone"],
    ),
    ({"environment_id": 999}, ["environment_id 999 does not exist", "POST /api/v3/"]),
    ({"project_id": 5}, ["project_id 5 does not match environment"]),
    ({"job_type": "adaptive"}, ["job_type 'adaptive' is not supported"]),
    ({"settings": {"threads": 0}}, ["settings.threads"]),
    ({"execution": {"timeout_seconds": -1}}, ["execution.timeout_seconds"]),
    (
        {"job_type": "ci", "triggers": {"schedule": True}, "schedule": {"cron": "0 1 * * *"}},
        ["a CI job is triggered by pull requests"],
    ),
    (
        {"job_completion_trigger_condition": {"condition": {"job_id": 4242}}},
        ["condition.job_id: job 4242 does not exist"],
    ),
    ({"runslot_key": "1234"}, ["runslot_key must be an identifier", "not digits only"]),
    ({"runslot_key": "has space"}, ["runslot_key must be an identifier"]),
    ({"environment_id": "one"}, ["environment_id"]),
]


async def test_a_job_body_that_cannot_be_run_is_a_400_naming_the_field_and_creates_nothing(
    api: ApiStack,
) -> None:
    # One stack for every case (a loop, not parametrize): the whole API suite stays fast.
    before = counts(api)
    for fields, needles in BAD_JOBS:
        response = await api.http.post(f"{api.v2}/jobs/", json=job_body(api, **fields))
        refused(response, 400, *needles)
        assert counts(api) == before, fields


async def test_an_update_that_cannot_be_run_is_a_400_and_changes_nothing(api: ApiStack) -> None:
    job = await api.create_job(execute_steps=["dbt build"])
    stored = api.store.get_job(api.account_id, job["id"])
    for body, needle in (
        ({"execute_steps": ["rm -rf /"]}, "execute_steps.0"),
        ({"schedule": {"cron": "* * *"}, "triggers": {"schedule": True}}, "expected 5 fields"),
        ({"environment_id": 77}, "environment_id 77 does not exist"),
    ):
        refused(await api.http.post(f"{api.v2}/jobs/{job['id']}/", json=body), 400, needle)
    assert api.store.get_job(api.account_id, job["id"]) == stored


BAD_TRIGGERS: list[tuple[dict[str, Any], list[str]]] = [
    ({}, ["cause is required"]),
    ({"cause": "  "}, ["cause is required"]),
    ({"cause": 5}, ["cause", "valid string"]),
    ({"cause": "c", "steps_override": ["bash -c x"]}, ["steps_override.0", "dbt command"]),
    ({"cause": "c", "schema_override": "drop table;"}, ["schema_override"]),
    ({"cause": "c", "threads_override": "many"}, ["threads_override"]),
    ({"cause": "c", "threads_override": 0}, ["threads_override"]),
    ({"cause": "c", "git_sha": "not-a-sha"}, ["git_sha"]),
    ({"cause": "c", "timeout_seconds_override": -5}, ["timeout_seconds_override"]),
    (
        {"cause": "c", "github_pull_request_id": 0},
        ["github_pull_request_id must be a positive integer"],
    ),
    ({"cause": "c", "dbt_version_override": "1.10; rm"}, ["dbt_version_override"]),
]


async def test_a_trigger_that_cannot_run_is_a_400_naming_the_field_and_queues_nothing(
    api: ApiStack,
) -> None:
    job = await api.create_job()
    for body, needles in BAD_TRIGGERS:
        response = await api.http.post(f"{api.v2}/jobs/{job['id']}/run/", json=body)
        refused(response, 400, *needles)
    assert counts(api).runs == 0


async def test_unknown_and_other_accounts_jobs_and_runs_are_404s(api: ApiStack) -> None:
    other = unique_account()
    api.store.upsert_account(AccountSettings(account_id=other))
    env = api.store.put_environment(other, "e", Environment(project_dir="/fake/x"))
    other_token = api.store.create_token(other, "other")
    theirs = await api.http.post(
        f"/api/v2/accounts/{other}/jobs/",
        json={"environment_id": env, "name": "theirs", "execute_steps": ["dbt run"]},
        headers={"Authorization": f"Bearer {other_token}"},
    )
    assert theirs.status_code == 201, theirs.text
    their_id = theirs.json()["data"]["id"]
    theirs_run = await api.http.post(
        f"/api/v2/accounts/{other}/jobs/{their_id}/run/",
        json={"cause": "x"},
        headers={"Authorization": f"Bearer {other_token}"},
    )
    their_run = theirs_run.json()["data"]["id"]
    before = counts(api)
    for job_id in (their_id, 424242):
        for method, suffix, body in JOB_CALLS:
            response = await api.http.request(method, f"{api.v2}/jobs/{job_id}/{suffix}", json=body)
            refused(response, 404, f"Job {job_id} not found")
    for run_id in (their_run, 424242):
        for method, suffix in (
            ("GET", ""),
            ("POST", "cancel/"),
            ("GET", "artifacts/"),
            ("GET", "artifacts/manifest.json"),
        ):
            response = await api.http.request(method, f"{api.v2}/runs/{run_id}/{suffix}")
            refused(response, 404, f"Run {run_id} not found")
    refused(
        await api.http.get(
            f"{api.v3}/projects/1/environment-variables/job/",
            params={"job_definition_id": their_id},
        ),
        404,
        f"Job {their_id} not found",
    )
    refused(await api.http.get(f"{api.v3}/projects/9/"), 404, "Project 9 not found")
    refused(
        await api.http.get(f"{api.v3}/projects/1/environments/{env}/"),
        404,
        f"Environment {env} not found",
    )
    assert counts(api) == before
    mine = api.store.get_job(other, their_id)
    assert mine is not None and mine.name == "theirs" and mine.state == 1


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b'{"name": "x",', ["not valid JSON"]),
        (b"[1, 2]", ["must be a JSON object, not list"]),
        (b"", ["request body is empty"]),
        (b"\xff\xfe", ["not valid JSON"]),
    ],
    ids=["truncated", "array", "empty", "not-utf8"],
)
async def test_a_body_that_is_not_a_json_object_is_a_400_and_creates_nothing(
    api: ApiStack, content: bytes, needles: list[str]
) -> None:
    before = counts(api)
    headers = {"Content-Type": "application/json"}
    for path in (f"{api.v2}/jobs/", f"{api.v3}/projects/1/environments/"):
        refused(await api.http.post(path, content=content, headers=headers), 400, *needles)
    assert counts(api) == before


async def test_an_oversized_body_is_a_413_before_anything_parses_it(api: ApiStack) -> None:
    before = counts(api)
    big = b'{"name": "' + b"x" * MAX_BODY_BYTES + b'"}'
    sized = await api.http.post(f"{api.v2}/jobs/", content=big)
    refused(sized, 413, "larger than 1048576 bytes")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    streamed = await api.http.post(f"{api.v2}/jobs/", content=chunks())
    refused(streamed, 413, "larger than 1048576 bytes")
    assert counts(api) == before


async def test_an_environment_that_cannot_run_is_a_400_naming_the_field(api: ApiStack) -> None:
    before = counts(api)
    url = f"{api.v3}/projects/1/environments/"
    for body, needles in (
        (
            {"name": "e", "runslot": {"project_dir": "/p", "env_vars": {"THREADS": 4}}},
            ["runslot.env_vars.THREADS", "valid string"],
        ),
        ({"name": "e", "runslot": {}}, ["runslot", "needs a source"]),
        (
            {"name": "e", "runslot": {"project_dir": "/p", "git_url": "https://x"}},
            ["not both"],
        ),
        ({"name": "e", "runslot": {"project_dir": "/p", "typo": 1}}, ["runslot.typo"]),
        ({"runslot": {"project_dir": "/p"}}, ["name is required"]),
        ({"name": "e"}, ["runslot is required"]),
    ):
        refused(await api.http.post(url, json=body), 400, *needles)
    refused(
        await api.http.post(
            f"{api.v3}/projects/0/environments/",
            json={"name": "e", "runslot": {"project_dir": "/p"}},
        ),
        400,
        "project_id must be 1 or more",
    )
    assert counts(api) == before


async def test_bad_query_values_and_wrong_methods_are_clear_4xx(api: ApiStack) -> None:
    refused(await api.http.get(f"{api.v2}/runs/?status=7"), 400, "unknown run status [7]")
    refused(await api.http.get(f"{api.v2}/runs/?job_definition_id=abc"), 400, "job_definition_id")
    refused(await api.http.get(f"{api.v2}/jobs/?include_related=[oops"), 400, "include_related")
    refused(await api.http.get(f"{api.v2}/jobs/abc/"), 400, "job_id")
    message = refused(await api.http.delete(f"{api.v2}/runs/"), 405, "not allowed")
    assert "GET" in message
    refused(await api.http.patch(f"{api.v2}/jobs/1/"), 405, "DELETE, GET, POST")


async def test_an_unreachable_run_store_is_a_503_envelope(api: ApiStack, tmp_path: Path) -> None:
    down = RunStore(f"sqlite:///{tmp_path / 'missing' / 'runslot.db'}")  # no such directory
    ctx = ApiContext(
        store=down, client=api.client, artifacts=api.artifacts, queues=api.queues, data_dir=tmp_path
    )
    try:
        async with serve(create_app(ctx)) as url, httpx.AsyncClient(base_url=url) as http:
            response = await http.get(
                f"{api.v2}/jobs/", headers={"Authorization": f"Token {api.token}"}
            )
            refused(response, 503, "run store cannot be reached")
    finally:
        down.close()
