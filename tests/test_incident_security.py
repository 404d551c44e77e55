"""Security (issue 5, item 8): accounts are walls, webhooks are signed, secrets stay secret,
and no request can make the API fail or leave a run stuck.

* Account A's token on account B's jobs, runs, artifacts and cancel: 404s, and nothing of
  B's changes (its running run goes on to succeed). A GitHub webhook for A signed with B's
  secret (and the other way round): 401, nothing queued anywhere.
* A secret set on an environment through the API (a ``{{ secret('X') }}`` reference, the
  value in the worker's ``RUNSLOT_SECRET_X``) runs real dbt and never appears in the
  workflow histories, the run store's file, the logs (ours and dbt's) or any API answer.
* Property-based fuzzing of every route with hypothesis: no 5xx, every answer dbt Cloud's
  envelope, and every run the fuzzing created reaches a finished status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import importlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from activities.artifacts import LocalArtifactStore
from activities.local import LocalExecutor, LocalExecutorSettings
from activities.secrets import EnvSecrets
from activities.signing import github_secret, server_key
from api.app import create_app
from api.context import ApiContext
from starter import jobs
from tests.api_fixtures import JOB_CALLS, SAMPLE, ApiStack, refused, serve, unique_account
from tests.builders import decoded_history, wait_for, wait_run
from tests.conftest import new_store, running_stack
from tests.incident_helpers import Figures, duplicates
from workflows import constants as c
from workflows.models import AccountSettings, Environment, RunStatus

pytestmark = [pytest.mark.incident, pytest.mark.devserver]

HYPOTHESIS_REQUIREMENT = "hypothesis>=6.100,<7"
"""The line the fuzz test needs in the dev extras ([project.optional-dependencies] dev)."""


# --------------------------------------------------------------------------- accounts


def _github_headers(secret: str, body: bytes) -> dict[str, str]:
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "Content-Type": "application/json",
        "X-GitHub-Event": "pull_request",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": f"sha256={digest}",
    }


def _pull_request(number: int) -> bytes:
    sha = "1234567" * 5 + "12345"
    event = {
        "action": "opened",
        "number": number,
        "pull_request": {
            "number": number,
            "head": {"sha": sha, "ref": "feature"},
            "base": {"sha": "0" * 40, "ref": "main"},
            "draft": False,
        },
        "repository": {
            "full_name": "acme/analytics",
            "clone_url": "https://github.com/acme/analytics.git",
        },
    }
    return json.dumps(event).encode()


async def test_no_account_reaches_another_through_the_api_or_its_webhooks(
    api: ApiStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, client = api.store, api.client
    a = api.account_id
    b = unique_account()
    store.upsert_account(AccountSettings(account_id=b, run_slots=2))
    b_token = store.create_token(b, "b")
    b_env = store.put_environment(b, "prod", Environment(project_dir="/fake/b"), project_id=1)
    as_b = {"Authorization": f"Bearer {b_token}"}
    b_v2 = f"/api/v2/accounts/{b}"

    async def b_job(**fields: Any) -> dict[str, Any]:
        body = {
            "environment_id": b_env,
            "name": f"b {uuid.uuid4().hex[:4]}",
            "execute_steps": ["dbt run -s ok"],
            **fields,
        }
        response = await api.http.post(f"{b_v2}/jobs/", json=body, headers=as_b)
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()["data"]
        return created

    # B's world: a finished run with logs and artifacts, a running one, a CI job.
    b_daily = await b_job()
    b_gated = await b_job(execute_steps=["dbt run -s gate:b"])
    b_ci = await b_job(job_type="ci", triggers={"github_webhook": True})
    a_ci = await api.create_job(job_type="ci", triggers={"github_webhook": True})
    done = await api.http.post(
        f"{b_v2}/jobs/{b_daily['id']}/run/", json={"cause": "b"}, headers=as_b
    )
    b_done = done.json()["data"]["id"]
    assert (await wait_run(client, b, str(b_done))).status == RunStatus.SUCCESS
    running = await api.http.post(
        f"{b_v2}/jobs/{b_gated['id']}/run/", json={"cause": "b"}, headers=as_b
    )
    b_running = running.json()["data"]["id"]
    await wait_for(lambda: str(b_running) in api.dbt.running, what="B's run running")
    # B itself reads them (so A's 404s below are walls, not missing things).
    for path in (f"runs/{b_done}/artifacts/manifest.json", f"jobs/{b_daily['id']}/"):
        assert (await api.http.get(f"{b_v2}/{path}", headers=as_b)).status_code == 200, path
    jobs_before = store.list_jobs(b, state=None).items
    runs_before = [r for r in store.list_runs(b).items if r.status.is_finished]

    attempts = 0
    # A's token, A's path, B's ids: as if they did not exist.
    for job_id in (b_daily["id"], b_gated["id"], b_ci["id"]):
        for method, suffix, body in JOB_CALLS:
            response = await api.http.request(method, f"{api.v2}/jobs/{job_id}/{suffix}", json=body)
            refused(response, 404, f"Job {job_id} not found")
            attempts += 1
    for run_id in (b_done, b_running):
        for method, suffix in (
            ("GET", ""),
            ("GET", '?include_related=["run_steps"]'),
            ("POST", "cancel/"),
            ("GET", "artifacts/"),
            ("GET", "artifacts/manifest.json"),
            ("GET", "artifacts/run_results.json?step=1"),
        ):
            response = await api.http.request(method, f"{api.v2}/runs/{run_id}/{suffix}")
            refused(response, 404, f"Run {run_id} not found")
            attempts += 1
    listed = await api.http.get(f"{api.v2}/runs/", params={"job_definition_id": b_daily["id"]})
    assert listed.status_code == 200 and listed.json()["data"] == []
    # A's token on B's path: B does not exist for A.
    for method, path in (
        ("GET", f"{b_v2}/"),
        ("GET", f"{b_v2}/jobs/"),
        ("GET", f"{b_v2}/runs/"),
        ("GET", f"{b_v2}/jobs/{b_daily['id']}/"),
        ("POST", f"{b_v2}/jobs/{b_daily['id']}/run/"),
        ("POST", f"{b_v2}/runs/{b_running}/cancel/"),
        ("GET", f"{b_v2}/runs/{b_done}/artifacts/manifest.json"),
        ("GET", f"/api/v3/accounts/{b}/projects/1/environments/{b_env}/"),
        ("POST", f"/api/v3/accounts/{b}/projects/1/environments/"),
    ):
        response = await api.http.request(method, path, json={"cause": "x", "name": "x"})
        refused(response, 404, f"Account {b} not found")
        attempts += 1
    # GitHub: A's URL signed with B's secret, B's URL with A's, and forgeries: all 401.
    key = server_key(tmp_path, EnvSecrets())
    secrets = {a: github_secret(key, a), b: github_secret(key, b)}
    event = _pull_request(7)
    for target, signer in ((a, b), (b, a)):
        headers = _github_headers(secrets[signer], event)
        response = await api.http.post(
            f"/api/webhooks/github/{target}", content=event, headers=headers
        )
        refused(response, 401, "Invalid signature")
        attempts += 1
    for forged in ("", "sha256=" + "0" * 64, "sha1=" + "0" * 40):
        headers = {**_github_headers(secrets[a], event), "X-Hub-Signature-256": forged}
        response = await api.http.post(f"/api/webhooks/github/{a}", content=event, headers=headers)
        refused(response, 401, "Invalid signature")
        attempts += 1
    for account_id, ci in ((a, a_ci), (b, b_ci)):
        desc = await jobs.describe_job(client, account_id, str(ci["id"]))
        assert desc.state.queue == [] and desc.state.in_flight == [] and desc.state.recent == []
    # Nothing of B's changed; its running run was not cancelled and goes on to succeed.
    assert store.list_jobs(b, state=None).items == jobs_before
    assert [r for r in store.list_runs(b).items if r.status.is_finished] == runs_before
    api.dbt.open("b")
    b_result = await wait_run(client, b, str(b_running))
    # The control: A's own event, signed with A's secret, queues A's CI job and nothing else.
    ok = await api.http.post(
        f"/api/webhooks/github/{a}", content=event, headers=_github_headers(secrets[a], event)
    )
    assert ok.status_code == 200, ok.text
    [queued] = ok.json()["data"]["runs"]
    a_result = await wait_run(client, a, str(queued["run_id"]))
    b_ci_desc = await jobs.describe_job(client, b, str(b_ci["id"]))
    statuses = [b_result.status, a_result.status]
    Figures(
        "security-accounts",
        runs=len(statuses) + 1,
        faults=attempts,
        lost=sum(s != RunStatus.SUCCESS for s in statuses),
        duplicates=duplicates(api.dbt.started_runs()) + len(b_ci_desc.state.recent),
        notes={"refused_404": attempts - 8, "refused_401": 8},
    ).report(capsys)


# --------------------------------------------------------------------------- secrets

PASSWORD = "pw-" + uuid.uuid4().hex
ECHOED = "tok-" + uuid.uuid4().hex


async def test_a_secret_set_on_an_environment_never_leaves_the_worker(
    dev_env: WorkflowEnvironment,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client, acct = dev_env.client, unique_account()
    monkeypatch.setenv("RUNSLOT_SECRET_WAREHOUSE_PASSWORD", PASSWORD)
    monkeypatch.setenv("RUNSLOT_SECRET_ECHO_TOKEN", ECHOED)
    caplog.set_level(logging.DEBUG)
    store = new_store(tmp_path)
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    executor = LocalExecutor(
        LocalExecutorSettings(workspace_root=tmp_path / "ws"), artifacts=artifacts
    )
    answers: list[str] = []
    async with running_stack(client, executor, store=store) as queues:
        store.upsert_account(
            AccountSettings(account_id=acct, run_slots=1, slot_reap_interval=timedelta(seconds=2))
        )
        token = store.create_token(acct, "secrets")
        ctx = ApiContext(
            store=store, client=client, artifacts=artifacts, queues=queues, data_dir=tmp_path
        )
        async with (
            serve(create_app(ctx)) as url,
            httpx.AsyncClient(
                base_url=url, headers={"Authorization": f"Token {token}"}, timeout=120
            ) as http,
        ):

            async def call(method: str, path: str, **kw: Any) -> httpx.Response:
                response = await http.request(method, path, **kw)
                answers.append(response.text)
                return response

            v2, v3 = f"/api/v2/accounts/{acct}", f"/api/v3/accounts/{acct}/projects/1"
            reference = "{{ secret('WAREHOUSE_PASSWORD') }}"
            environment = {
                "name": "prod",
                "runslot": {
                    "project_dir": str(SAMPLE),
                    "profile": {
                        "type": "duckdb",
                        "path": str(tmp_path / "w.duckdb"),
                        "password": reference,
                    },
                    # dbt echoes this one: no DBT_ENV_SECRET_ prefix, so dbt does not scrub it.
                    "env_vars": {"JAFFLE_ECHO": "{{ secret('ECHO_TOKEN') }}"},
                },
            }
            env = await call("POST", f"{v3}/environments/", json=environment)
            assert env.status_code == 201, env.text
            step = "dbt run-operation echo_env_var --args '{name: JAFFLE_ECHO}'"
            body = {
                "environment_id": env.json()["data"]["id"],
                "name": "secretive",
                "execute_steps": [step],
            }
            created = await call("POST", f"{v2}/jobs/", json=body)
            assert created.status_code == 201, created.text
            job_id = created.json()["data"]["id"]
            triggered = await call("POST", f"{v2}/jobs/{job_id}/run/", json={"cause": "secret"})
            run_id = triggered.json()["data"]["id"]
            result = await wait_run(client, acct, str(run_id), timeout=180)
            for path in (
                f'{v2}/runs/{run_id}/?include_related=["run_steps","job","trigger"]',
                f'{v2}/runs/?include_related=["run_steps"]',
                f"{v2}/jobs/{job_id}/",
                f"{v2}/jobs/",
                f"{v3}/environments/",
                f"{v2}/runs/{run_id}/artifacts/",
                f"{v2}/runs/{run_id}/artifacts/run_results.json",
                f"{v2}/runs/{run_id}/artifacts/manifest.json",
            ):
                assert (await call("GET", path)).status_code == 200, path
        histories = [
            decoded_history((await client.get_workflow_handle(w).fetch_history()).to_json())
            for w in (
                c.job_workflow_id(acct, str(job_id)),
                c.run_workflow_id(acct, str(run_id)),
                c.slots_workflow_id(acct),
            )
        ]
    store.close()  # the last connection checkpoints the WAL into the file
    assert result.status == RunStatus.SUCCESS, result.status_message
    log = (tmp_path / "artifacts").rglob("log")
    step_log = b"".join(p.read_bytes() for p in log)
    assert b"JAFFLE_ECHO is *****" in step_log, "dbt printed the variable, masked"
    database = b"".join(p.read_bytes() for p in tmp_path.glob("runslot.db*"))
    assert b"secret('WAREHOUSE_PASSWORD')" in database, "the scan reads the stored rows"
    assert all("secret('WAREHOUSE_PASSWORD')" in h for h in histories[:2]), "references travel"
    places: dict[str, bytes] = {
        "database": database,
        "our logs": caplog.text.encode(),
        **{f"history {i}": h.encode() for i, h in enumerate(histories)},
        **{f"answer {i}": a.encode() for i, a in enumerate(answers)},
        **{str(p): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()},
    }
    leaks = [
        where
        for where, content in places.items()
        for secret in (PASSWORD, ECHOED)
        if secret.encode() in content
    ]
    Figures(
        "security-secrets",
        runs=1,
        faults=2,
        lost=int(result.status != RunStatus.SUCCESS),
        notes={"places_scanned": len(places), "leaks": len(leaks)},
    ).report(capsys)
    assert leaks == []
    assert os.environ["RUNSLOT_SECRET_WAREHOUSE_PASSWORD"] == PASSWORD  # the worker had it


# --------------------------------------------------------------------------- fuzzing

FUZZ_EXAMPLES = 200
STEPS = ["dbt run", "dbt build -s ok", "dbt run -s fail", "dbt test", "dbt seed"]
"""Steps the fuzzer's valid jobs run. The fake dbt blocks on ``gate:`` and ``sleep:``
selectors, so generated text never reaches a step (it would be a test artefact, a run
stuck on purpose, not a finding)."""
QUERY_KEYS = [
    "limit",
    "offset",
    "order_by",
    "include_related",
    "status",
    "status__in",
    "job_definition_id",
    "job_definition_id__in",
    "project_id",
    "project_id__in",
    "environment_id",
    "state",
    "id__in",
    "name__icontains",
    "step",
    "job_definition_id__in",
    "deferring_run_id",
]


def _hypothesis() -> Any:
    """The hypothesis package; a missing one fails the test, saying what to install."""
    try:
        return importlib.import_module("hypothesis")
    except ImportError:
        pytest.fail(
            f"hypothesis is not installed: add {HYPOTHESIS_REQUIREMENT!r} to the dev extras "
            "([project.optional-dependencies] dev in pyproject.toml) and reinstall with "
            '`pip install -e ".[dev]"` (scripts/test does it when pyproject.toml changes)'
        )


def _requests(st: Any, api: ApiStack, job_ids: list[int], run_ids: list[int]) -> Any:
    """A strategy of (method, path, query, headers, body) aimed at every route."""
    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=12,
    )
    anything = json_values | st.text(max_size=30) | st.integers(min_value=-(2**70), max_value=2**70)
    ids = st.sampled_from(job_ids * 3 + run_ids * 2 + [0, -1, 2**63, 2**80]) | st.text(
        alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12
    )
    accounts = st.sampled_from([api.account_id] * 8 + ["1", "other", "", "%00", "../x"])
    steps = st.lists(
        st.sampled_from(STEPS) | st.text(max_size=15).filter(lambda s: ":" not in s),
        min_size=0,
        max_size=3,
    )
    job_body = st.fixed_dictionaries(
        {
            "environment_id": st.sampled_from([api.environment_id]) | anything,
            "name": st.text(max_size=30) | anything,
            "execute_steps": steps | anything,
        },
        optional={
            "project_id": st.sampled_from([api.project_id]) | anything,
            "job_type": st.sampled_from(["scheduled", "ci", "merge", "other", None]) | anything,
            "triggers": st.fixed_dictionaries(
                {},
                optional={
                    "schedule": st.booleans() | anything,
                    "github_webhook": st.booleans() | anything,
                    "on_merge": st.booleans(),
                },
            ),
            "schedule": st.fixed_dictionaries(
                {},
                optional={
                    "cron": st.sampled_from(["0 * * * *", "*/5 * * * *", "61 * * * *", "* *"])
                    | st.text(max_size=15),
                    "timezone": st.sampled_from(["UTC", "Europe/Paris", "Mars/Base"]) | anything,
                },
            ),
            "settings": st.dictionaries(st.sampled_from(["threads", "target_name", "x"]), anything),
            "execution": st.dictionaries(st.sampled_from(["timeout_seconds"]), anything),
            "job_completion_trigger_condition": anything,
            "runslot_key": st.text(max_size=20) | anything,
            "deactivated": st.booleans() | anything,
            "unknown_field": anything,
        },
    )
    trigger_body = st.fixed_dictionaries(
        {"cause": st.text(max_size=20) | anything},
        optional={
            "steps_override": steps | anything,
            "threads_override": anything,
            "schema_override": st.text(max_size=20) | anything,
            "git_sha": anything,
            "git_branch": anything,
            "timeout_seconds_override": anything,
            "github_pull_request_id": anything,
            "dbt_version_override": anything,
            "generate_docs_override": anything,
            "target_name_override": anything,
        },
    )
    env_body = st.fixed_dictionaries(
        {"name": st.text(max_size=20) | anything},
        optional={
            "runslot": st.fixed_dictionaries(
                {},
                optional={
                    "project_dir": st.text(max_size=20) | anything,
                    "git_url": anything,
                    "subdirectory": st.text(max_size=10) | anything,
                    "dbt_version": anything,
                    "profile": st.dictionaries(st.text(max_size=8), anything, max_size=3),
                    "env_vars": st.dictionaries(st.text(max_size=8), anything, max_size=3),
                    "target_name": anything,
                },
            )
            | anything
        },
    )
    # Bodies that pass validation, so that runs really start (and must really end).
    valid_trigger = st.fixed_dictionaries(
        {"cause": st.text(min_size=1, max_size=20).filter(str.strip)},
        optional={
            "steps_override": st.lists(st.sampled_from(STEPS), min_size=1, max_size=2),
            "threads_override": st.integers(1, 8),
            "git_branch": st.text(max_size=10),
        },
    )
    valid_job = st.fixed_dictionaries(
        {
            "environment_id": st.just(api.environment_id),
            "name": st.text(min_size=1, max_size=20).filter(str.strip),
            "execute_steps": st.lists(st.sampled_from(STEPS), min_size=1, max_size=3),
        },
        optional={
            "description": st.text(max_size=20),
            "settings": st.just({"threads": 2}),
            "triggers": st.just({"schedule": True}),
            "schedule": st.just({"cron": "0 * * * *"}),
        },
    )
    bodies = st.one_of(
        st.none(),
        json_values,
        job_body,
        trigger_body,
        env_body,
        st.binary(max_size=64),
        valid_trigger,
        valid_trigger,
        valid_job,
    )

    def route(
        method: str, template: str, account: str, id_: Any, path_tail: str
    ) -> tuple[str, str]:
        return method, template.format(
            a=quote(account, safe=""), id=quote(str(id_), safe=""), tail=quote(path_tail, safe="/.")
        )

    routes = st.sampled_from(
        [
            ("GET", "/"),
            ("GET", "/api/v2/accounts/"),
            ("GET", "/api/v2/accounts/{a}/"),
            ("GET", "/api/v3/accounts/{a}/"),
            ("GET", "/api/v3/accounts/{a}/projects/"),
            ("GET", "/api/v3/accounts/{a}/projects/{id}/"),
            ("GET", "/api/v3/accounts/{a}/environments/"),
            ("GET", "/api/v3/accounts/{a}/projects/{id}/environments/"),
            ("POST", "/api/v3/accounts/{a}/projects/{id}/environments/"),
            ("GET", "/api/v3/accounts/{a}/projects/1/environments/{id}/"),
            ("GET", "/api/v3/accounts/{a}/projects/1/environment-variables/job/"),
            ("GET", "/api/v2/accounts/{a}/jobs/"),
            ("POST", "/api/v2/accounts/{a}/jobs/"),
            ("GET", "/api/v2/accounts/{a}/jobs/{id}/"),
            ("POST", "/api/v2/accounts/{a}/jobs/{id}/"),
            ("DELETE", "/api/v2/accounts/{a}/jobs/{id}/"),
            *[("POST", "/api/v2/accounts/{a}/jobs/{id}/run/")] * 6,
            *[("POST", "/api/v2/accounts/{a}/jobs/{id}/rerun/")] * 2,
            *[("POST", "/api/v2/accounts/{a}/jobs/")] * 2,
            *[("POST", "/api/v2/accounts/{a}/runs/{id}/cancel/")] * 2,
            ("GET", "/api/v2/accounts/{a}/runs/"),
            ("GET", "/api/v2/accounts/{a}/runs/{id}/"),
            ("POST", "/api/v2/accounts/{a}/runs/{id}/cancel/"),
            ("GET", "/api/v2/accounts/{a}/runs/{id}/artifacts/"),
            ("GET", "/api/v2/accounts/{a}/runs/{id}/artifacts/{tail}"),
            ("POST", "/api/webhooks/github/{a}/"),
            ("PATCH", "/api/v2/accounts/{a}/jobs/{id}/"),
            ("PUT", "/api/v2/accounts/{a}/runs/"),
        ]
    )
    tails = st.sampled_from(
        ["manifest.json", "run_results.json", "../../etc/passwd", "step-1/log", "%2e%2e/x"]
    ) | st.text(max_size=10)
    paths = st.tuples(routes, accounts, ids, tails).map(
        lambda t: route(t[0][0], t[0][1], t[1], t[2], t[3])
    )
    queries = st.dictionaries(
        st.sampled_from(QUERY_KEYS), st.text(max_size=12) | st.integers().map(str), max_size=3
    )
    auth = st.sampled_from(
        [
            *[f"Token {api.token}"] * 5,
            f"Bearer {api.token}",
            f"token  {api.token}",
            "",
            "Token",
            "Token nope",
            "Basic abc",
        ]
    )
    chaotic = st.tuples(paths, queries, auth, bodies)
    # Well-formed calls among them, so that runs really start, get cancelled, get rerun (and
    # must really end): the account's own ids, a valid token, a body that validates.
    own = f"/api/v2/accounts/{api.account_id}"
    well_formed = st.one_of(
        st.tuples(
            st.sampled_from(job_ids).map(lambda j: ("POST", f"{own}/jobs/{j}/run/")),
            st.just({}),
            st.just(f"Token {api.token}"),
            valid_trigger,
        ),
        st.tuples(
            st.sampled_from(job_ids).map(lambda j: ("POST", f"{own}/jobs/{j}/rerun/")),
            st.just({}),
            st.just(f"Token {api.token}"),
            st.none(),
        ),
        st.tuples(
            st.integers(1, 40).map(lambda r: ("POST", f"{own}/runs/{r}/cancel/")),
            st.just({}),
            st.just(f"Token {api.token}"),
            st.none(),
        ),
    )
    # One call in five well-formed (hypothesis' one_of would not keep that share).
    return st.tuples(st.integers(0, 4), chaotic, well_formed).map(
        lambda t: t[2] if t[0] == 0 else t[1]
    )


async def test_fuzzing_the_api_finds_no_5xx_and_leaves_no_stuck_run(
    api: ApiStack, capsys: pytest.CaptureFixture[str]
) -> None:
    hypothesis = _hypothesis()
    st = importlib.import_module("hypothesis.strategies")
    # Something to aim at: jobs and runs that exist.
    seeds = [
        await api.create_job(),
        await api.create_job(job_type="ci", triggers={"github_webhook": True}),
    ]
    job_ids = [j["id"] for j in seeds]
    first = await api.http.post(f"{api.v2}/jobs/{job_ids[0]}/run/", json={"cause": "seed"})
    run_ids = [first.json()["data"]["id"]]
    # Found by this fuzzing once (a 500 each): ids and offsets past what the database holds.
    for huge in (2**31, 2**63, 2**80):
        for method, path in (
            ("GET", f"{api.v2}/jobs/{huge}/"),
            ("POST", f"{api.v2}/jobs/{huge}/run/"),
            ("POST", f"{api.v2}/jobs/{huge}/rerun/"),
            ("DELETE", f"{api.v2}/jobs/{huge}/"),
            ("GET", f"{api.v2}/runs/{huge}/"),
            ("POST", f"{api.v2}/runs/{huge}/cancel/"),
            ("GET", f"{api.v2}/runs/{huge}/artifacts/manifest.json"),
            ("GET", f"{api.v3}/projects/1/environments/{huge}/"),
            ("GET", f"{api.v3}/projects/1/environment-variables/job/?job_definition_id={huge}"),
        ):
            response = await api.http.request(method, path, json={"cause": "x"})
            assert response.status_code == 404, (path, response.text)
        for path in (
            f"{api.v2}/runs/?job_definition_id={huge}",
            f"{api.v2}/runs/?job_definition_id__in=[{huge}]",
        ):
            response = await api.http.get(path)
            assert response.status_code == 200 and response.json()["data"] == [], response.text
        refused(await api.http.get(f"{api.v2}/runs/?offset={huge}"), 400, "offset")
        body = {"environment_id": huge, "name": "n", "execute_steps": ["dbt run"]}
        refused(await api.http.post(f"{api.v2}/jobs/", json=body), 400, f"environment_id {huge}")
    loop = asyncio.get_running_loop()
    seen: dict[int, int] = {}
    failures: list[str] = []

    def send(method: str, path: str, query: dict[str, str], auth: str, body: Any) -> None:
        headers = {"Authorization": auth} if auth else {}
        if isinstance(body, bytes):
            kwargs: dict[str, Any] = {
                "content": body,
                "headers": {**headers, "Content-Type": "application/json"},
            }
        elif body is None:
            kwargs = {"headers": headers}
        else:
            kwargs = {"json": body, "headers": headers}
        future = asyncio.run_coroutine_threadsafe(
            bare.request(method, path, params=query, **kwargs), loop
        )
        response = future.result(timeout=120)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            failures.append(f"{method} {path} {query} {body!r:.200} -> {response.text[:300]}")
            return  # every 5xx is collected (and fails the test at the end), not just one
        if "/artifacts/" not in path or response.status_code >= 400:
            envelope = response.json()
            assert envelope["status"]["code"] == response.status_code, envelope

    def one_request(request: tuple[tuple[str, str], dict[str, str], str, Any]) -> None:
        (method, path), query, auth, body = request
        send(method, path, query, auth, body)

    fuzz: Callable[[], None] = hypothesis.settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,  # nothing written into the work tree
        derandomize=True,  # the same requests on every run: a finding reproduces
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.generate, hypothesis.Phase.shrink],
    )(hypothesis.given(_requests(st, api, job_ids, run_ids))(one_request))

    async with httpx.AsyncClient(base_url=api.base_url, timeout=120) as bare:
        await asyncio.to_thread(fuzz)
    # Every run the fuzzing created ends: none is left queued or running.
    for event in api.dbt.gates.values():
        event.set()  # (none should exist: generated steps never hold a gate)

    def unfinished() -> list[str]:
        runs = api.store.list_runs(api.account_id, limit=1000).items
        return [f"{r.key}:{r.status.humanized}" for r in runs if not r.status.is_finished]

    try:
        await wait_for(lambda: not unfinished(), timeout=120, interval=0.5, what="every run ends")
    except AssertionError:
        pytest.fail(f"runs left unfinished after fuzzing: {unfinished()}")
    runs = api.store.list_runs(api.account_id, limit=1000).items
    Figures(
        "security-fuzz",
        runs=len(runs),
        faults=sum(seen.values()),
        lost=len(unfinished()),
        duplicates=duplicates(api.dbt.started_runs()),
        notes={"responses": dict(sorted(seen.items())), "5xx": len(failures)},
    ).report(capsys)
    assert failures == [], "\n".join(failures)
