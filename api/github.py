"""GitHub webhooks in: pull requests trigger CI jobs, merges trigger merge jobs (rule 5, 6).

``POST /api/webhooks/github/{account_id}`` (with or without the trailing slash). Configure it
on the repository with content type ``application/json`` and the account's secret,
``activities.signing.github_secret`` (derived from the server key, never stored). The
signature (``X-Hub-Signature-256``) is checked on the raw body before anything is parsed.

* ``ping``: 200. Other events, and pull request actions not listed here: 202, ignored.
* ``opened`` / ``synchronize`` / ``reopened`` / ``ready_for_review``: a run of every CI job
  of the account that builds this repository, on the head commit (a new commit cancels the
  PR's older run: the job workflow applies rule 5). Deduplicated by the delivery id, so a
  redelivery queues nothing twice. A draft pull request runs only the jobs saved with
  dbt Cloud's ``triggers_on_draft_pr``.
* ``closed``: each such CI job drops the PR's schema; if merged, every merge job of the
  account that builds this repository runs on the merge commit.

Which jobs build the repository: a job whose environment's ``git_url`` is the repository
(its clone, SSH or web URL, or any URL ending in ``owner/name``); a job on a plain local
directory (no ``git_url``) builds whatever the account pushes to it, so it matches too.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from temporalio.client import WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from activities.secrets import EnvSecrets
from activities.signing import github_secret, server_key, verify_github
from activities.store import RunStore, StoredJob
from api.context import ApiContext, get_context
from api.envelope import error_response, ok, validation_message
from api.routing import route
from starter import jobs
from workflows import constants as c
from workflows.models import (
    JobType,
    PullRequestClosed,
    TriggerCause,
    TriggerOverrides,
    TriggerRequest,
)

router = APIRouter()

PR_RUN_ACTIONS = frozenset({"opened", "synchronize", "reopened", "ready_for_review"})
JOBS_PAGE = 100
DRAFT_REFUSAL = "draft pull request: the job's triggers_on_draft_pr is off"
COMMIT = r"^[0-9a-fA-F]{7,40}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GitRef(_Model):
    sha: str = Field(pattern=COMMIT)
    ref: str = Field(min_length=1, max_length=255)


class PullRequest(_Model):
    head: GitRef
    base: GitRef
    draft: bool = False
    merged: bool = False
    merge_commit_sha: str | None = Field(default=None, pattern=COMMIT)


class Repository(_Model):
    full_name: str
    clone_url: str = ""
    ssh_url: str = ""
    html_url: str = ""


class PullRequestEvent(_Model):
    """The fields of GitHub's ``pull_request`` event Runslot reads."""

    action: str
    number: int = Field(ge=1)
    pull_request: PullRequest
    repository: Repository


@dataclass
class Outcome:
    """What an event did: the response's ``data`` (``unavailable`` makes it a 503)."""

    action: str
    pr_id: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    """CI jobs told the pull request closed."""
    unavailable: bool = False


@route(router, "/api/webhooks/github/{account_id}/", "POST")
async def github_webhook(
    account_id: str, request: Request, ctx: Annotated[ApiContext, Depends(get_context)]
) -> JSONResponse:
    body = await request.body()
    refused = await _authenticate(ctx, account_id, request, body)
    if refused is not None:
        return refused
    event = request.headers.get("x-github-event", "")
    if event != "pull_request":
        return ok({"event": "ping"}) if event == "ping" else _ignored(event)
    try:
        pr = PullRequestEvent.model_validate_json(body)
    except ValidationError as err:
        return error_response(400, f"Not a GitHub pull_request event: {validation_message(err)}")
    if pr.action not in PR_RUN_ACTIONS and pr.action != "closed":
        return _ignored(event, pr.action)
    outcome = await _handle(ctx, account_id, pr, request.headers.get("x-github-delivery"))
    if outcome.unavailable:
        return error_response(
            503, "Temporal is unavailable: redeliver this event (nothing runs twice)."
        )
    data = asdict(outcome)
    del data["unavailable"]
    return ok(data)


async def _authenticate(
    ctx: ApiContext, account_id: str, request: Request, body: bytes
) -> JSONResponse | None:
    """401 unless the body is signed with the account's secret, then 404 for an unknown
    account (checked second: an unsigned request learns nothing about accounts)."""
    key = await asyncio.to_thread(server_key, ctx.data_dir, EnvSecrets())
    signature = request.headers.get("x-hub-signature-256")
    if not verify_github(github_secret(key, account_id), body, signature):
        return error_response(
            401,
            "Invalid signature: sign the payload with the account's GitHub webhook secret.",
            "X-Hub-Signature-256 is missing or is not sha256=<hex HMAC of the body>",
        )
    if await asyncio.to_thread(ctx.store.get_account, account_id) is None:
        return error_response(404, f"Account {account_id} was not found.")
    return None


def _ignored(event: str, action: str | None = None) -> JSONResponse:
    return ok({"event": event, "action": action, "ignored": True}, code=202)


async def _handle(
    ctx: ApiContext, account_id: str, pr: PullRequestEvent, delivery: str | None
) -> Outcome:
    outcome = Outcome(action=pr.action, pr_id=pr.number)
    head, base = pr.pull_request.head, pr.pull_request.base
    builds = [
        j
        for j in await asyncio.to_thread(_active_jobs, ctx.store, account_id)
        if _builds(j, pr.repository)
    ]
    ci = [j for j in builds if _is_ci(j)]
    if pr.action in PR_RUN_ACTIONS:
        run = TriggerRequest(
            cause=TriggerCause.PULL_REQUEST,
            pr_id=pr.number,
            cause_text=f"Kicked off by pull request #{pr.number} ({head.ref} @ {head.sha[:7]})",
            dedupe_key=f"github:{delivery or head.sha}",
            overrides=TriggerOverrides(git_sha=head.sha, git_branch=head.ref),
        )
        if pr.pull_request.draft:
            # dbt Cloud's triggers_on_draft_pr (off by default): a draft runs no CI until ready.
            held = [j for j in ci if not j.extra.get("triggers_on_draft_pr", False)]
            outcome.refused += [{**_who(j), "reason": DRAFT_REFUSAL} for j in held]
            ci = [j for j in ci if j not in held]
        await _trigger_all(ctx, account_id, ci, run, outcome)
        return outcome
    await _close(ctx, account_id, ci, pr.number, outcome)
    if pr.pull_request.merged:
        merge_sha = pr.pull_request.merge_commit_sha
        merge = TriggerRequest(
            cause=TriggerCause.MERGE,
            cause_text=f"Kicked off by merging pull request #{pr.number} into {base.ref}",
            dedupe_key=f"github:{delivery or merge_sha or head.sha}",
            overrides=TriggerOverrides(git_sha=merge_sha, git_branch=base.ref),
        )
        await _trigger_all(ctx, account_id, [j for j in builds if _is_merge(j)], merge, outcome)
    return outcome


def _active_jobs(store: RunStore, account_id: str) -> list[StoredJob]:
    found: list[StoredJob] = []
    while True:
        page = store.list_jobs(account_id, limit=JOBS_PAGE, offset=len(found))
        found += page.items
        if not page.items or len(found) >= page.total_count:
            return found


def _who(job: StoredJob) -> dict[str, Any]:
    return {"job_id": job.key, "job_definition_id": job.id}


def _is_ci(job: StoredJob) -> bool:
    return job.job_type == JobType.CI or job.definition.triggers.git_provider_webhook


def _is_merge(job: StoredJob) -> bool:
    return job.job_type == JobType.MERGE or job.definition.triggers.on_merge


def _builds(job: StoredJob, repo: Repository) -> bool:
    """Whether the job's project is this repository (a local-directory job matches any)."""
    git_url = job.definition.environment.git_url
    if git_url is None:
        return True

    def norm(url: str) -> str:
        return url.strip().lower().rstrip("/").removesuffix(".git")

    url, name = norm(git_url), repo.full_name.lower()
    known = {norm(u) for u in (repo.clone_url, repo.ssh_url, repo.html_url) if u}
    return url in known or url.endswith((f"/{name}", f":{name}"))


async def _trigger_all(
    ctx: ApiContext,
    account_id: str,
    targets: list[StoredJob],
    request: TriggerRequest,
    outcome: Outcome,
) -> None:
    async def one(job: StoredJob) -> None:
        who = _who(job)
        try:
            result = await jobs.trigger(ctx.client, account_id, job.key, request)
        except WorkflowUpdateFailedError as err:  # the job refuses it, and says why
            outcome.refused.append({**who, "reason": str(err.cause or err)})
            return
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:
                reason = "the job's workflow is not running: save the job to start it"
                outcome.refused.append({**who, "reason": reason})
            else:
                outcome.unavailable = True
            return
        outcome.runs.append(
            {
                **who,
                "run_id": result.run_id,
                "cause": request.cause.value,
                "deduplicated": result.deduplicated,
                "cancelled_run_ids": result.cancelled_run_ids,
            }
        )

    await asyncio.gather(*(one(job) for job in targets))


async def _close(
    ctx: ApiContext, account_id: str, targets: list[StoredJob], pr_id: int, outcome: Outcome
) -> None:
    """Tell each CI job the pull request closed: its runs are cancelled, its schema dropped."""

    async def one(job: StoredJob) -> None:
        handle = ctx.client.get_workflow_handle(c.job_workflow_id(account_id, job.key))
        try:
            await handle.signal(c.SIGNAL_PR_CLOSED, PullRequestClosed(pr_id=pr_id))
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                outcome.unavailable = True
            return
        outcome.closed.append(job.key)

    await asyncio.gather(*(one(job) for job in targets))
