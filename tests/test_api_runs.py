"""Runs through the API (endpoints 6-12, spec §2.3, §2.4, §2.6): trigger, watch, cancel,
rerun, list, steps with their logs, and artifacts, end to end over real HTTP."""

from __future__ import annotations

import json
import ssl
from typing import Any

import httpx
import pytest

from starter import jobs
from tests.api_fixtures import ApiServer, ApiStack
from tests.builders import account, job, wait_for
from workflows.models import RunStatus, TriggerCause

pytestmark = pytest.mark.devserver


async def trigger(api: ApiStack, job_id: int, **body: Any) -> dict[str, Any]:
    response = await api.http.post(f"{api.v2}/jobs/{job_id}/run/", json={"cause": "t", **body})
    assert response.status_code == 200, response.text
    run: dict[str, Any] = response.json()["data"]
    return run


async def run_until(
    http: httpx.AsyncClient, path: str, done: Any = None, timeout: float = 30.0
) -> dict[str, Any]:
    """GET ``path`` until the run it returns is complete (or ``done(run)`` holds)."""

    async def probe() -> dict[str, Any] | None:
        run: dict[str, Any] = (await http.get(path)).json()["data"]
        return run if (done(run) if done else run["is_complete"]) else None

    found: dict[str, Any] = await wait_for(probe, timeout=timeout, what=f"{path} to get there")
    return found


async def test_a_triggered_run_queues_then_succeeds_with_its_steps_logs_and_trigger(
    api: ApiStack,
) -> None:
    created = await api.create_job(execute_steps=["dbt seed -s ok", "dbt run -s ok"])
    # What dbt-cloud-cli sends: account_id and job_id beside the overrides, explicit nulls.
    body = {
        "account_id": int(api.account_id),
        "job_id": created["id"],
        "cause": "x" * 300,
        "git_sha": None,
        "git_branch": "main",
        "azure_pull_request_id": None,
        "github_pull_request_id": None,
        "gitlab_merge_request_id": None,
        "schema_override": "dbt_alice",
        "dbt_version_override": None,
        "threads_override": 2,
        "target_name_override": "ci",
        "generate_docs_override": True,
        "timeout_seconds_override": 600,
        "steps_override": ["dbt seed -s ok", "dbt build -s ok"],
        "something_new": 1,
    }
    response = await api.http.post(f"{api.v2}/jobs/{created['id']}/run/", json=body)
    assert response.status_code == 200, response.text
    queued = response.json()["data"]
    assert queued["status"] == 1 and queued["status_humanized"] == "Queued"
    assert queued["in_progress"] is True and queued["is_complete"] is False
    assert queued["job_definition_id"] == queued["job_id"] == created["id"]
    assert queued["environment_id"] == api.environment_id and queued["project_id"] == 1
    assert queued["account_id"] == int(api.account_id) and queued["href"]
    trigger_obj = queued["trigger"]
    assert trigger_obj["cause"] == "x" * 255 and trigger_obj["cause_category"] == "api"
    assert trigger_obj["steps_override"] == ["dbt seed -s ok", "dbt build -s ok"]
    assert trigger_obj["schema_override"] == "dbt_alice" and trigger_obj["threads_override"] == 2
    assert trigger_obj["git_branch"] == "main" and trigger_obj["generate_docs_override"] is True

    path = f"{api.v2}/runs/{queued['id']}/?include_related=run_steps,job,trigger,debug_logs"
    done = await run_until(api.http, path)
    assert done["status"] == 10 and done["is_success"] is True and done["in_progress"] is False
    assert done["finished_at"] and done["started_at"] and done["dequeued_at"]
    assert len(done["duration"]) == 8 and done["duration_humanized"]
    assert done["job"]["id"] == created["id"] and done["trigger"]["cause"] == "x" * 255
    steps = done["run_steps"]
    assert [s["name"] for s in steps] == [
        "Invoke dbt with `dbt seed -s ok`",
        "Invoke dbt with `dbt build -s ok`",
        "Invoke dbt with `dbt docs generate`",
    ]
    assert [s["index"] for s in steps] == [1, 2, 3]
    assert all(s["status"] == 10 and s["status_humanized"] == "Success" for s in steps)
    assert "Running with dbt: dbt build -s ok" in steps[1]["logs"]
    assert "Completed successfully" in steps[1]["debug_logs"]
    assert steps[1]["truncated_debug_logs"] == steps[1]["logs"]
    assert done["has_docs_generated"] is True and done["artifacts_saved"] is True
    prepared = api.dbt.prepared[str(queued["id"])]
    assert prepared.schema_override == "dbt_alice" and prepared.threads == 2
    assert prepared.target_name == "ci" and prepared.git_branch == "main"
    assert api.dbt.steps_of(str(queued["id"]))[1] == ["dbt", "build", "-s", "ok"]
    stored = api.store.get_run(api.account_id, queued["id"])
    assert stored is not None and stored.trigger is not None
    assert stored.trigger.overrides.timeout_seconds_override == 600


async def test_artifacts_are_listed_and_served_raw_by_step_with_404_envelopes(
    api: ApiStack,
) -> None:
    created = await api.create_job(execute_steps=["dbt seed -s ok", "dbt run -s ok"])
    run = await trigger(api, created["id"], generate_docs_override=True)
    await run_until(api.http, f"{api.v2}/runs/{run['id']}/")
    base = f"{api.v2}/runs/{run['id']}/artifacts"
    listed = (await api.http.get(f"{base}/")).json()
    assert listed["data"] == ["catalog.json", "manifest.json", "run_results.json"]
    manifest = await api.http.get(f"{base}/manifest.json")
    assert manifest.status_code == 200
    assert manifest.headers["content-type"].startswith("application/json")
    assert "status" not in manifest.json()  # the file itself, no envelope
    assert manifest.json()["metadata"]["step"] == 3  # the last step that has it
    first = await api.http.get(f"{base}/manifest.json", params={"step": 1})
    assert first.json()["metadata"]["argv"] == ["dbt", "seed", "-s", "ok"]
    assert (await api.http.get(f"{base}/catalog.json")).json()["metadata"]["step"] == 3
    for path, params, needle in (
        ("catalog.json", {"step": 1}, "No artifact 'catalog.json' in step 1"),
        ("run/jaffle/models/customers.sql", {}, "No artifact 'run/jaffle/models/customers.sql'"),
        ("no-such.json", {}, "No artifact 'no-such.json'"),
    ):
        missing = await api.http.get(f"{base}/{path}", params=params)
        assert missing.status_code == 404, path
        assert missing.json()["status"]["is_success"] is False
        assert needle in missing.json()["status"]["user_message"], missing.text
    bad_step = await api.http.get(f"{base}/manifest.json", params={"step": 0})
    assert bad_step.status_code == 400
    assert "step must be 1 or more" in bad_step.json()["status"]["user_message"]
    unknown_run = await api.http.get(f"{api.v2}/runs/999999/artifacts/manifest.json")
    assert unknown_run.status_code == 404
    assert unknown_run.json()["status"]["user_message"] == "Run 999999 not found"


async def test_cancel_stops_running_and_queued_runs_and_returns_a_finished_run_unchanged(
    api: ApiStack,
) -> None:
    created = await api.create_job(execute_steps=["dbt run -s gate:cancel-me"])
    running = await trigger(api, created["id"])
    queued = await trigger(api, created["id"])  # runs of one job never overlap: it waits
    await wait_for(lambda: api.dbt.running == {str(running["id"])}, what="the first run")
    for run in (queued, running):
        response = await api.http.post(f"{api.v2}/runs/{run['id']}/cancel/")
        assert response.status_code == 200, response.text
        shown = response.json()["data"]
        assert shown["status"] == 30 and shown["is_cancelled"] is True
        assert shown["in_progress"] is False and shown["is_complete"] is True
        ended = await run_until(api.http, f"{api.v2}/runs/{run['id']}/")
        assert ended["status"] == 30 and ended["status_humanized"] == "Cancelled", ended
    assert str(running["id"]) in api.dbt.cancelled_steps
    again = await api.http.post(f"{api.v2}/runs/{running['id']}/cancel/")
    assert again.json()["data"]["status"] == 30

    ok_job = await api.create_job()
    ok_run = await trigger(api, ok_job["id"])
    await run_until(api.http, f"{api.v2}/runs/{ok_run['id']}/")
    unchanged = await api.http.post(f"{api.v2}/runs/{ok_run['id']}/cancel")
    assert unchanged.status_code == 200 and unchanged.json()["data"]["status"] == 10


async def test_the_run_list_filters_by_job_status_environment_and_project(api: ApiStack) -> None:
    env2 = await api.http.post(
        f"{api.v3}/projects/2/environments/",
        json={"name": "other", "runslot": {"project_dir": "/fake/other"}},
    )
    env2_id = env2.json()["data"]["id"]
    first = await api.create_job(name="first")
    second = await api.create_job(name="second", environment_id=env2_id, project_id=2)
    ok_run = await trigger(api, first["id"])
    await run_until(api.http, f"{api.v2}/runs/{ok_run['id']}/")
    failed = await trigger(api, first["id"], steps_override=["dbt run -s fail"])
    failed_done = await run_until(api.http, f"{api.v2}/runs/{failed['id']}/")
    assert failed_done["status"] == 20 and failed_done["is_error"] is True
    assert failed_done["status_message"] and failed_done["can_retry"] is True
    other = await trigger(api, second["id"])
    await run_until(api.http, f"{api.v2}/runs/{other['id']}/")

    async def ids(**params: Any) -> list[int]:
        response = await api.http.get(f"{api.v2}/runs/", params={"order_by": "id", **params})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["extra"]["pagination"]["total_count"] == len(body["data"])
        return [r["id"] for r in body["data"]]

    assert await ids() == [ok_run["id"], failed["id"], other["id"]]
    assert await ids(job_definition_id=first["id"]) == [ok_run["id"], failed["id"]]
    assert await ids(status=20) == [failed["id"]]
    assert await ids(status__in="[10]") == [ok_run["id"], other["id"]]
    assert await ids(environment_id=env2_id) == [other["id"]]
    assert await ids(project_id=1) == [ok_run["id"], failed["id"]]
    assert await ids(project_id__in="[1, 2]", status=10) == [ok_run["id"], other["id"]]
    assert await ids(job_definition_id=second["id"], project_id=1) == []
    assert await ids(deferring_run_id=1) == []
    listed = await api.http.get(
        f"{api.v2}/runs/", params={"job_definition_id": first["id"], "include_related": "run_steps"}
    )
    logs = [step["logs"] for run in listed.json()["data"] for step in run["run_steps"]]
    assert any("Encountered an error" in log for log in logs), logs


async def test_rerun_resumes_a_failed_run_from_failure_and_otherwise_starts_a_new_run(
    api: ApiStack,
) -> None:
    steps = ["dbt seed -s ok", "dbt run -s fail", "dbt test -s ok"]
    created = await api.create_job(execute_steps=steps)
    failed = await trigger(api, created["id"])
    assert (await run_until(api.http, f"{api.v2}/runs/{failed['id']}/"))["status"] == 20
    response = await api.http.post(f"{api.v2}/jobs/{created['id']}/rerun/")
    assert response.status_code == 200, response.text
    rerun = response.json()["data"]
    assert rerun["retrying_run_id"] == failed["id"] and rerun["trigger"]["rerun_of"] == failed["id"]
    done = await run_until(api.http, f"{api.v2}/runs/{rerun['id']}/")
    assert done["status"] == 10
    assert api.dbt.steps_of(str(rerun["id"])) == [["dbt", "retry"], ["dbt", "test", "-s", "ok"]]
    fresh = (await api.http.post(f"{api.v2}/jobs/{created['id']}/rerun", json={})).json()["data"]
    assert fresh["retrying_run_id"] is None and fresh["trigger"]["rerun_of"] is None


async def test_a_pull_request_run_of_a_ci_job_is_a_ci_run_and_elsewhere_only_echoed(
    api: ApiStack,
) -> None:
    ci_job = await api.create_job(job_type="ci", triggers={"github_webhook": True})
    ci_run = await trigger(api, ci_job["id"], github_pull_request_id=7, git_sha="abc1234")
    assert ci_run["trigger"]["github_pull_request_id"] == 7
    assert ci_run["trigger"]["cause_category"] == "github_pull_request"
    done = await run_until(api.http, f"{api.v2}/runs/{ci_run['id']}/")
    assert done["schema_override"] == f"dbt_cloud_pr_{ci_job['id']}_7"
    stored = api.store.get_run(api.account_id, ci_run["id"])
    assert stored is not None and stored.cause == TriggerCause.PULL_REQUEST

    plain = await api.create_job()
    plain_run = await trigger(api, plain["id"], gitlab_merge_request_id=8)
    assert plain_run["trigger"]["cause_category"] == "api"
    assert plain_run["trigger"]["github_pull_request_id"] == 8
    done = await run_until(api.http, f"{api.v2}/runs/{plain_run['id']}/")
    assert done["schema_override"] is None and done["status"] == 10


async def test_a_trigger_the_job_refuses_is_a_409_with_its_reason_and_queues_nothing(
    api: ApiStack,
) -> None:
    flaky = job(api.account_id, "flaky", ["dbt run -s fail"], deactivate_after_failures=1)
    await jobs.save_job(api.client, flaky, account(api.account_id), api.queues)
    stored = api.store.get_job_by_key(api.account_id, "flaky")
    assert stored is not None
    first = await trigger(api, stored.id)
    assert (await run_until(api.http, f"{api.v2}/runs/{first['id']}/"))["status"] == 20
    refused = await api.http.post(f"{api.v2}/jobs/{stored.id}/run/", json={"cause": "again"})
    assert refused.status_code == 409, refused.text
    assert (
        "is deactivated after 1 consecutive failed runs" in refused.json()["status"]["user_message"]
    )
    assert api.store.list_runs(api.account_id).total_count == 1


@pytest.mark.slow
async def test_a_real_dbt_run_through_the_client_fixture_succeeds_over_http_and_https(
    api_server: ApiServer,
) -> None:
    headers = {"Authorization": f"Token {api_server.token}"}
    v2 = f"/api/v2/accounts/{api_server.account_id}"
    tls = ssl.create_default_context(cafile=api_server.cert_path)
    async with (
        httpx.AsyncClient(base_url=api_server.base_url, headers=headers, timeout=60) as http,
        httpx.AsyncClient(
            base_url=api_server.https_url, headers=headers, timeout=60, verify=tls
        ) as https,
    ):
        body = {
            "environment_id": api_server.environment_id,
            "project_id": api_server.project_id,
            "name": "real dbt",
            "execute_steps": ["dbt build"],
        }
        created = await https.post(f"{v2}/jobs/", json=body)
        assert created.status_code == 201, created.text
        job_id = created.json()["data"]["id"]
        run = (await http.post(f"{v2}/jobs/{job_id}/run/", json={"cause": "real"})).json()
        run_id = run["data"]["id"]
        done = await run_until(https, f"{v2}/runs/{run_id}/?include_related=run_steps", timeout=180)
        assert done["status"] == RunStatus.SUCCESS, json.dumps(done)[:2000]
        [step] = done["run_steps"]
        assert step["name"] == "Invoke dbt with `dbt build`"
        assert "Completed successfully" in step["logs"]
        manifest = await http.get(f"{v2}/runs/{run_id}/artifacts/manifest.json")
        assert "model.jaffle.customers" in manifest.json()["nodes"]
        results = await https.get(f"{v2}/runs/{run_id}/artifacts/run_results.json?step=1")
        built = {r["unique_id"] for r in results.json()["results"]}
        assert {"seed.jaffle.raw_orders", "model.jaffle.customers"} <= built
        assert (await http.delete(f"{v2}/jobs/{job_id}/")).json()["data"]["state"] == 2
