"""The conventions every endpoint follows (dbt-cloud-api.md §2.1), over real HTTP against a
real Temporal dev server, real workers and a real SQLite run store."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from api.app import create_app
from api.context import ApiContext
from api.main import ApiSettings, uvicorn_config
from tests.api_fixtures import ApiStack, serve, unique_account
from tests.builders import wait_for
from tests.store_fixtures import free_port
from workflows.models import AccountSettings

pytestmark = pytest.mark.devserver


def assert_envelope(response: httpx.Response, code: int) -> dict[str, Any]:
    """The response is JSON in dbt Cloud's envelope, with ``code`` in both places."""
    assert response.status_code == code, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: dict[str, Any] = response.json()
    status = body["status"]
    assert status["code"] == code, body
    assert status["is_success"] is (200 <= code < 300), body
    assert isinstance(status["user_message"], str) and isinstance(
        status["developer_message"], str
    ), body
    assert "data" in body, body
    return body


async def finished_run(api: ApiStack, run_id: int) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        run: dict[str, Any] = (await api.http.get(f"{api.v2}/runs/{run_id}/")).json()["data"]
        return run if run["is_complete"] else None

    found: dict[str, Any] = await wait_for(probe, what=f"run {run_id} to finish")
    return found


async def test_every_route_answers_with_and_without_its_trailing_slash_and_never_redirects(
    api: ApiStack,
) -> None:
    created = await api.http.post(
        f"{api.v2}/jobs",
        json={"environment_id": api.environment_id, "name": "n", "execute_steps": ["dbt run"]},
    )
    assert_envelope(created, 201)
    job_id = created.json()["data"]["id"]
    run = await api.http.post(f"{api.v2}/jobs/{job_id}/run", json={"cause": "no slash"})
    run_id = assert_envelope(run, 200)["data"]["id"]
    await finished_run(api, run_id)
    paths = [
        f"{api.v2}/",
        f"{api.v2}/jobs/",
        f"{api.v2}/jobs/{job_id}/",
        f"{api.v2}/runs/",
        f"{api.v2}/runs/{run_id}/",
        f"{api.v2}/runs/{run_id}/artifacts/",
        f"{api.v3}/",
        f"{api.v3}/projects/",
        f"{api.v3}/projects/{api.project_id}/",
        f"{api.v3}/projects/{api.project_id}/environments/",
        f"{api.v3}/projects/{api.project_id}/environments/{api.environment_id}/",
        f"{api.v3}/environments/",
        f"{api.v3}/projects/{api.project_id}/environment-variables/job/",
        "/api/v2/accounts/",
    ]
    for path in paths:
        for form in (path, path.rstrip("/")):
            response = await api.http.get(form, follow_redirects=False)
            assert_envelope(response, 200)
    artifact = await api.http.get(f"{api.v2}/runs/{run_id}/artifacts/manifest.json")
    assert artifact.status_code == 200 and artifact.json()["name"] == "manifest.json"
    for path in (f"{api.v2}/runs/{run_id}/cancel", f"{api.v2}/runs/{run_id}/cancel/"):
        assert_envelope(await api.http.post(path, follow_redirects=False), 200)


async def test_token_and_bearer_schemes_both_authenticate_and_bad_tokens_get_a_401_envelope(
    api: ApiStack,
) -> None:
    url = f"{api.base_url}{api.v2}/jobs/"
    async with httpx.AsyncClient() as http:
        for header in (f"Token {api.token}", f"Bearer {api.token}", f"bearer  {api.token}"):
            assert_envelope(await http.get(url, headers={"Authorization": header}), 200)
        for headers in (
            {},
            {"Authorization": "Token not-a-token"},
            {"Authorization": f"Basic {api.token}"},
            {"Authorization": "Bearer"},
        ):
            body = assert_envelope(await http.get(url, headers=headers), 401)
            assert body["data"] is None
            assert "token" in body["status"]["user_message"].lower(), body


async def test_another_accounts_path_is_a_404_that_never_reveals_the_account_exists(
    api: ApiStack,
) -> None:
    other = unique_account()
    api.store.upsert_account(AccountSettings(account_id=other))
    other_token = api.store.create_token(other, "other")
    other_job = await api.http.post(
        f"/api/v2/accounts/{other}/jobs/",
        json={"environment_id": api.environment_id, "name": "x", "execute_steps": ["dbt run"]},
        headers={"Authorization": f"Token {other_token}"},
    )
    # The other account has no environment 1: it never got to create anything.
    assert_envelope(other_job, 400)
    missing = unique_account()
    for account in (other, missing):
        for path in ("/", "/jobs/", "/runs/"):
            body = assert_envelope(await api.http.get(f"/api/v2/accounts/{account}{path}"), 404)
            assert body["status"]["user_message"] == f"Account {account} not found"
        body = assert_envelope(await api.http.get(f"/api/v3/accounts/{account}/projects/"), 404)


async def test_every_error_is_a_json_envelope_unknown_routes_methods_and_crashes_included(
    api: ApiStack,
) -> None:
    body = assert_envelope(await api.http.get("/api/v2/no/such/thing/"), 404)
    assert "No such endpoint" in body["status"]["user_message"]
    wrong = await api.http.put(f"{api.v2}/jobs/")
    body = assert_envelope(wrong, 405)
    assert "GET" in wrong.headers["allow"] and "POST" in wrong.headers["allow"]
    assert "not allowed" in body["status"]["user_message"]
    assert_envelope(await api.http.post("/"), 405)

    # A route that crashes: the catch-all answers with a 500 envelope (and logs it).
    ctx: ApiContext = api_app_context(api)
    app = create_app(ctx)

    async def boom() -> None:
        raise RuntimeError("kaboom")

    app.add_api_route("/boom", boom)
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as http:
        body = assert_envelope(await http.get("/boom"), 500)
        assert "kaboom" in body["status"]["developer_message"]


def api_app_context(api: ApiStack) -> ApiContext:
    return ApiContext(
        store=api.store,
        client=api.client,
        artifacts=api.artifacts,
        queues=api.queues,
        data_dir=Path("."),
    )


async def test_gets_with_a_json_content_type_and_no_body_are_fine(api: ApiStack) -> None:
    headers = {"Content-Type": "application/json"}
    assert_envelope(await api.http.get(f"{api.v2}/jobs/", headers=headers), 200)
    assert_envelope(await api.http.get(f"{api.v2}/", headers=headers), 200)


async def test_the_bare_root_answers_200_without_a_token(api: ApiStack) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        for path in ("/", ""):
            body = assert_envelope(await http.get(path), 200)
            assert body["data"]["name"] == "Runslot"


async def test_lists_page_with_limit_and_offset_and_echo_them_as_ints(api: ApiStack) -> None:
    ids = [(await api.create_job(name=f"job {i}"))["id"] for i in range(3)]
    first = assert_envelope(await api.http.get(f"{api.v2}/jobs/?limit=2&offset=0"), 200)
    assert [j["id"] for j in first["data"]] == ids[:2]
    assert first["extra"]["pagination"] == {"count": 2, "total_count": 3}
    assert first["extra"]["filters"]["limit"] == 2 and first["extra"]["filters"]["offset"] == 0
    assert first["extra"]["order_by"] == "id"
    last = assert_envelope(await api.http.get(f"{api.v2}/jobs/?limit=2&offset=2"), 200)
    assert [j["id"] for j in last["data"]] == ids[2:]
    assert last["extra"]["pagination"] == {"count": 1, "total_count": 3}
    default = assert_envelope(await api.http.get(f"{api.v2}/jobs/"), 200)
    assert default["extra"]["filters"]["limit"] == 100
    assert default["extra"]["filters"]["offset"] == 0
    assert default["extra"]["filters"]["account_id"] == int(api.account_id)
    past = assert_envelope(await api.http.get(f"{api.v2}/jobs/?offset=10"), 200)
    assert past["data"] == [] and past["extra"]["pagination"] == {"count": 0, "total_count": 3}
    for query, word in (
        ("limit=101", "limit"),
        ("limit=0", "limit"),
        ("limit=ten", "limit"),
        ("offset=-1", "offset"),
        ("offset=1.5", "offset"),
    ):
        for path in ("/jobs/", "/runs/"):
            body = assert_envelope(await api.http.get(f"{api.v2}{path}?{query}"), 400)
            assert word in body["status"]["user_message"], (query, body)
    environments = assert_envelope(await api.http.get(f"{api.v3}/environments/?limit=1"), 200)
    assert environments["extra"]["filters"]["limit"] == 1
    assert environments["extra"]["pagination"] == {"count": 1, "total_count": 1}


async def test_in_filters_take_json_arrays_with_or_without_spaces(api: ApiStack) -> None:
    job = await api.create_job(execute_steps=["dbt run -s ok"])
    ok_run = (await api.http.post(f"{api.v2}/jobs/{job['id']}/run/", json={"cause": "ok"})).json()
    await finished_run(api, ok_run["data"]["id"])
    failing = {"cause": "fail", "steps_override": ["dbt run -s fail"]}
    bad_run = (await api.http.post(f"{api.v2}/jobs/{job['id']}/run/", json=failing)).json()
    await finished_run(api, bad_run["data"]["id"])
    for value in ("[10,20]", "[10, 20]", "[ 10 , 20 ]", "10,20"):
        body = assert_envelope(
            await api.http.get(f"{api.v2}/runs/", params={"status__in": value}), 200
        )
        assert body["extra"]["pagination"]["total_count"] == 2, value
        assert body["extra"]["filters"]["status__in"] == [10, 20]
    only_error = await api.http.get(f"{api.v2}/runs/", params={"status__in": "[20]"})
    assert [r["id"] for r in assert_envelope(only_error, 200)["data"]] == [bad_run["data"]["id"]]
    for value in ("[1,2]", "[1, 2]"):
        jobs = await api.http.get(f"{api.v2}/jobs/", params={"project_id__in": value})
        assert [j["id"] for j in assert_envelope(jobs, 200)["data"]] == [job["id"]]
    none = await api.http.get(f"{api.v2}/jobs/", params={"project_id__in": "[2, 3]"})
    assert assert_envelope(none, 200)["data"] == []
    for value in ("[ten]", '["10"]', "[1.5]", "{}"):
        body = assert_envelope(
            await api.http.get(f"{api.v2}/runs/", params={"status__in": value}), 400
        )
        assert "status__in must be a JSON array of integers" in body["status"]["user_message"]


async def test_include_related_takes_three_encodings_and_the_empty_string_means_none(
    api: ApiStack,
) -> None:
    job = await api.create_job()
    triggered = await api.http.post(f"{api.v2}/jobs/{job['id']}/run/", json={"cause": "c"})
    run_id = triggered.json()["data"]["id"]
    await finished_run(api, run_id)
    url = f"{api.v2}/runs/{run_id}/"
    encodings: list[list[tuple[str, str | int | float | bool | None]]] = [
        [("include_related", "trigger"), ("include_related", "job")],
        [("include_related", "trigger,job")],
        [("include_related", "trigger, job,unknown_thing")],
        [("include_related", json.dumps(["trigger", "job"]))],
    ]
    for params in encodings:
        run = assert_envelope(await api.http.get(url, params=params), 200)["data"]
        assert run["trigger"]["cause"] == "c", params
        assert run["job"]["id"] == job["id"], params
        assert run["run_steps"] == [], params
    bare = assert_envelope(await api.http.get(url, params={"include_related": ""}), 200)["data"]
    assert bare["trigger"] is None and bare["job"] is None and bare["run_steps"] == []
    listed = await api.http.get(f"{api.v2}/runs/", params={"include_related": '["run_steps"]'})
    [item] = assert_envelope(listed, 200)["data"]
    assert item["run_steps"][0]["name"] == "Invoke dbt with `dbt run -s ok`"
    with_env = await api.http.get(
        f"{api.v2}/jobs/{job['id']}/",
        params={"include_related": "environment,most_recent_run,most_recent_completed_run"},
    )
    data = assert_envelope(with_env, 200)["data"]
    assert data["environment"]["id"] == api.environment_id
    assert data["most_recent_run"]["id"] == data["most_recent_completed_run"]["id"] == run_id


async def test_order_by_sorts_both_ways_and_unknown_fields_are_refused(api: ApiStack) -> None:
    a = await api.create_job(name="b job")
    b = await api.create_job(name="a job")
    by_name = assert_envelope(await api.http.get(f"{api.v2}/jobs/?order_by=name"), 200)
    assert [j["id"] for j in by_name["data"]] == [b["id"], a["id"]]
    newest = assert_envelope(await api.http.get(f"{api.v2}/jobs/?order_by=-id"), 200)
    assert [j["id"] for j in newest["data"]] == [b["id"], a["id"]]
    assert newest["extra"]["order_by"] == "-id"
    runs = []
    for job in (a, b):
        response = await api.http.post(f"{api.v2}/jobs/{job['id']}/run/", json={"cause": "o"})
        runs.append(response.json()["data"]["id"])
    for order, expected in (("-id", runs[::-1]), ("id", runs), ("-created_at", runs[::-1])):
        listed = await api.http.get(f"{api.v2}/runs/", params={"order_by": order})
        assert [r["id"] for r in assert_envelope(listed, 200)["data"]] == expected, order
    for path in ("/jobs/", "/runs/"):
        body = assert_envelope(await api.http.get(f"{api.v2}{path}?order_by=colour"), 400)
        assert "cannot order by 'colour'" in body["status"]["user_message"]


async def test_the_api_serves_https_when_given_a_certificate_and_key(
    api: ApiStack, tmp_path: Path
) -> None:
    from tests.clients.harness import make_cert  # noqa: PLC0415 - written alongside

    cert, key = make_cert(tmp_path / "tls")
    port = free_port()
    settings = ApiSettings(ssl_certfile=cert, ssl_keyfile=key, port=port)
    assert settings.scheme == "https"
    app: FastAPI = create_app(api_app_context(api))
    server = uvicorn.Server(uvicorn_config(app, settings))
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started or task.done(), what="the HTTPS server")
        async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=cert)) as http:
            response = await http.get(
                f"https://127.0.0.1:{port}{api.v2}/jobs/",
                headers={"Authorization": f"Bearer {api.token}"},
            )
            assert_envelope(response, 200)
    finally:
        server.should_exit = True
        await task
    with pytest.raises(ValueError, match="needs both --ssl-certfile and --ssl-keyfile"):
        ApiSettings(ssl_certfile=cert)
