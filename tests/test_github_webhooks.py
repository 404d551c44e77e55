"""GitHub webhooks in: the router in a minimal FastAPI app over real HTTP, real Temporal and
workers (fake dbt), a real SQLite run store."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.artifacts import LocalArtifactStore
from activities.secrets import EnvSecrets
from activities.signing import github_secret, server_key
from activities.store import RunStore
from api.context import ApiContext
from api.github import router
from starter import jobs
from tests.api_fixtures import serve
from tests.builders import account, job, wait_for, wait_run
from tests.conftest import running_stack, unique
from tests.fakes import FakeDbtExecutor
from workflows.models import (
    Environment,
    JobType,
    RunStatus,
    TaskQueues,
    TriggerCause,
)

pytestmark = pytest.mark.devserver

SHA1, SHA2, MERGED = "1" * 40, "2" * 40, "abcdef0" * 5 + "abcde"


@asynccontextmanager
async def github_api(
    client: Client, store: RunStore, queues: TaskQueues, data_dir: Path
) -> AsyncIterator[httpx.AsyncClient]:
    """The router alone in an app, served over HTTP; yields a client for it."""
    app = FastAPI(redirect_slashes=False)
    app.state.runslot = ApiContext(
        store=store,
        client=client,
        artifacts=LocalArtifactStore(data_dir / "artifacts"),
        queues=queues,
        data_dir=data_dir,
    )
    app.include_router(router)
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as http:
        yield http


class GitHub:
    """Sends what GitHub sends: a JSON body signed with the account's secret."""

    def __init__(self, http: httpx.AsyncClient, account_id: str, data_dir: Path) -> None:
        self.http, self.account_id = http, account_id
        self.secret = github_secret(server_key(data_dir, EnvSecrets()), account_id)

    async def send(
        self,
        event: str,
        payload: dict[str, Any] | bytes,
        *,
        delivery: str | None = None,
        signature: str | None = None,
        account_id: str | None = None,
        path_suffix: str = "",
    ) -> httpx.Response:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        digest = hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": f"sha256={digest}" if signature is None else signature,
        }
        path = f"/api/webhooks/github/{account_id or self.account_id}{path_suffix}"
        return await self.http.post(path, content=body, headers=headers)


def pr_event(
    action: str,
    number: int,
    sha: str,
    branch: str = "feature",
    *,
    merged: bool = False,
    draft: bool = False,
    repo: str = "acme/analytics",
) -> dict[str, Any]:
    return {
        "action": action,
        "number": number,
        "pull_request": {
            "number": number,
            "title": "Add orders",
            "head": {"sha": sha, "ref": branch},
            "base": {"sha": "0" * 40, "ref": "main"},
            "draft": draft,
            "merged": merged,
            "merge_commit_sha": MERGED if merged else None,
        },
        "repository": {
            "full_name": repo,
            "clone_url": f"https://github.com/{repo}.git",
            "ssh_url": f"git@github.com:{repo}.git",
            "html_url": f"https://github.com/{repo}",
        },
    }


async def _save_jobs(client: Client, acct: str, queues: TaskQueues) -> None:
    settings = account(acct)
    other_repo = Environment(git_url="https://github.com/acme/other.git")
    for definition in (
        job(acct, "ci", ["dbt build -s gate:ci"], job_type=JobType.CI),
        job(acct, "ci-other", job_type=JobType.CI).model_copy(update={"environment": other_repo}),
        job(acct, "merge", ["dbt build -s ok"], job_type=JobType.MERGE),
        job(acct, "daily"),
    ):
        await jobs.save_job(client, definition, settings, queues)


@asynccontextmanager
async def github_with_jobs(
    client: Client, fake_dbt: FakeDbtExecutor, store: RunStore, data_dir: Path, acct: str
) -> AsyncIterator[GitHub]:
    """Workers, the router over HTTP and the account's jobs (``_save_jobs``); yields GitHub
    sending to that account."""
    async with (
        running_stack(client, fake_dbt, store=store) as queues,
        github_api(client, store, queues, data_dir) as http,
    ):
        await _save_jobs(client, acct, queues)
        yield GitHub(http, acct, data_dir)


async def test_an_opened_pull_request_queues_a_ci_run_of_its_head_commit(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("ghopen")
    async with github_with_jobs(client, fake_dbt, run_store, tmp_path, acct) as github:
        resp = await github.send("pull_request", pr_event("opened", 7, SHA1), delivery="d-1")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["status"]["is_success"] and body["status"]["code"] == 200
        runs = body["data"]["runs"]
        assert [(r["job_id"], r["cause"]) for r in runs] == [("ci", "pull_request")]
        run_id = runs[0]["run_id"]
        # GitHub redelivers the same delivery: the same run, nothing queued twice.
        again = await github.send("pull_request", pr_event("opened", 7, SHA1), delivery="d-1")
        assert again.json()["data"]["runs"][0]["run_id"] == run_id
        assert again.json()["data"]["runs"][0]["deduplicated"] is True
        # A draft runs no CI (dbt Cloud's triggers_on_draft_pr is off by default).
        draft = await github.send("pull_request", pr_event("opened", 8, SHA2, draft=True))
        assert draft.json()["data"]["runs"] == []
        assert [r["job_id"] for r in draft.json()["data"]["refused"]] == ["ci"]
        await wait_for(lambda: run_id in fake_dbt.prepared)
        fake_dbt.open("ci")
        result = await wait_run(client, acct, run_id)
    prepared = fake_dbt.prepared[run_id]
    assert (prepared.git_sha, prepared.git_branch) == (SHA1, "feature")
    assert result.status == RunStatus.SUCCESS and result.schema_name == "dbt_cloud_pr_ci_7"
    stored = run_store.get_run_by_key(acct, run_id)
    assert stored is not None and stored.trigger is not None
    assert (stored.trigger.cause, stored.trigger.pr_id) == (TriggerCause.PULL_REQUEST, 7)
    assert fake_dbt.started_runs() == [run_id], "no other job ran (other repo, not CI)"


async def test_a_new_commit_on_the_pull_request_cancels_its_older_run(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("ghsync")
    async with github_with_jobs(client, fake_dbt, run_store, tmp_path, acct) as github:
        first = await github.send("pull_request", pr_event("opened", 3, SHA1))
        old = first.json()["data"]["runs"][0]["run_id"]
        await wait_for(lambda: old in fake_dbt.running)
        second = await github.send("pull_request", pr_event("synchronize", 3, SHA2))
        assert second.status_code == 200, second.text
        [new] = second.json()["data"]["runs"]
        assert new["cancelled_run_ids"] == [old]
        assert (await wait_run(client, acct, old)).status == RunStatus.CANCELLED
        await wait_for(lambda: new["run_id"] in fake_dbt.prepared)
        fake_dbt.open("ci")
        assert (await wait_run(client, acct, new["run_id"])).status == RunStatus.SUCCESS
    assert fake_dbt.prepared[new["run_id"]].git_sha == SHA2


async def test_closing_drops_the_schema_and_merging_runs_the_merge_jobs_on_the_merge_commit(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("ghclose")
    async with github_with_jobs(client, fake_dbt, run_store, tmp_path, acct) as github:
        closed = await github.send("pull_request", pr_event("closed", 4, SHA1))
        assert closed.status_code == 200, closed.text
        assert closed.json()["data"]["closed"] == ["ci"] and closed.json()["data"]["runs"] == []
        merged = await github.send("pull_request", pr_event("closed", 5, SHA2, merged=True))
        assert merged.status_code == 200, merged.text
        [run] = merged.json()["data"]["runs"]
        assert (run["job_id"], run["cause"]) == ("merge", "merge")
        result = await wait_run(client, acct, run["run_id"])
        await wait_for(lambda: len(fake_dbt.dropped_schemas) == 2)
    assert sorted(fake_dbt.dropped_schemas) == ["dbt_cloud_pr_ci_4", "dbt_cloud_pr_ci_5"]
    assert result.status == RunStatus.SUCCESS and result.cause == TriggerCause.MERGE
    prepared = fake_dbt.prepared[run["run_id"]]
    assert (prepared.git_sha, prepared.git_branch) == (MERGED, "main")


async def test_a_bad_signature_is_refused_before_anything_runs(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore, tmp_path: Path
) -> None:
    client, acct = dev_env.client, unique("ghsig")
    async with github_with_jobs(client, fake_dbt, run_store, tmp_path, acct) as github:
        event = pr_event("opened", 1, SHA1)
        forged = "sha256=" + "0" * 64
        other_account = hmac.new(
            github_secret(server_key(tmp_path, EnvSecrets()), "elsewhere").encode(),
            json.dumps(event).encode(),
            hashlib.sha256,
        ).hexdigest()
        for signature in (forged, "", f"sha256={other_account}", "sha1=abc"):
            resp = await github.send("pull_request", event, signature=signature)
            assert resp.status_code == 401, signature
            assert resp.json()["status"]["is_success"] is False and resp.json()["data"] is None
            assert "signature" in resp.json()["status"]["user_message"]
        # Forged and not JSON: 401, not 400 (the signature is checked before any parsing).
        garbage = await github.send("pull_request", b"{not json", signature=forged)
        assert garbage.status_code == 401
        desc = await jobs.describe_job(client, acct, "ci")
    assert desc.state.queue == [] and desc.state.in_flight == []
    assert run_store.list_runs(acct).total_count == 0 and fake_dbt.started_runs() == []


async def test_ping_answers_other_events_are_ignored_and_bad_payloads_are_400(
    dev_env: WorkflowEnvironment, run_store: RunStore, tmp_path: Path
) -> None:
    acct = unique("ghping")
    run_store.upsert_account(account(acct))
    async with github_api(dev_env.client, run_store, TaskQueues(), tmp_path) as http:
        github = GitHub(http, acct, tmp_path)
        ping = await github.send("ping", {"zen": "Keep it logically awesome."})
        slashed = await github.send("ping", {"zen": "x"}, path_suffix="/")
        push = await github.send("push", {"ref": "refs/heads/main"})
        labeled = await github.send("pull_request", pr_event("labeled", 2, SHA1))
        garbage = await github.send("pull_request", b"{not json")
        missing = await github.send("pull_request", {"action": "opened", "number": 2})
        not_a_sha = await github.send("pull_request", pr_event("opened", 2, "main"))
        # An account that does not exist: signed with what its secret would be.
        stranger = GitHub(http, unique("nobody"), tmp_path)
        unknown = await stranger.send("ping", {"zen": "x"})
    assert (ping.status_code, slashed.status_code) == (200, 200)
    assert ping.json()["status"]["is_success"] is True
    assert (push.status_code, labeled.status_code) == (202, 202)
    assert push.json()["data"]["ignored"] is True
    for bad in (garbage, missing, not_a_sha):
        assert bad.status_code == 400, bad.text
        assert bad.json()["status"]["is_success"] is False and bad.json()["data"] is None
    assert "pull_request" in missing.json()["status"]["user_message"]
    assert unknown.status_code == 404 and unknown.json()["status"]["code"] == 404
