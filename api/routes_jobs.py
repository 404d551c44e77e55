"""Jobs (endpoints 1 to 7): list, create, get, update, delete, trigger and rerun.

Routes stay thin: the run store is read here, and every change goes through the job's
workflow (``starter.jobs``), which writes the store itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError

from activities.store import StoredJob
from api.auth import Account, Context
from api.calls import WorkflowGoneError, call_workflow
from api.context import ApiContext
from api.convert import api_account_id
from api.convert_jobs import (
    merge_fields,
)
from api.envelope import ApiError, bad_request, not_found, ok, validation_message
from api.params import (
    in_filter,
    include_related,
    int_filter,
    json_object,
    list_extra,
    order_by,
    paging,
    wanted,
)
from api.routing import route
from api.saving import prepare, runslot_key, save, undo_create
from api.views import account_view
from starter import jobs
from workflows.models import (
    JobType,
    RunStatus,
    TriggerCause,
    TriggerOverrides,
    TriggerRequest,
)

log = logging.getLogger(__name__)

router = APIRouter()

JOBS = "/api/v2/accounts/{account_id}/jobs/"
JOB = "/api/v2/accounts/{account_id}/jobs/{job_id}/"
JOB_ORDERS = ("id", "name", "created_at", "updated_at")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
PR_FIELDS = (
    "github_pull_request_id",
    "gitlab_merge_request_id",
    "azure_pull_request_id",
    "non_native_pull_request_id",
)


async def existing_job(ctx: ApiContext, account: str, job_id: int) -> StoredJob:
    """The account's job (404 if unknown, another account's, or deleted)."""
    job = await asyncio.to_thread(ctx.store.get_job, account, job_id)
    if job is None:
        raise not_found(f"Job {job_id} not found")
    if job.state == 2:
        raise not_found(f"Job {job_id} was deleted")
    return job


# --------------------------------------------------------------------------- list


@route(router, JOBS, "GET")
async def list_jobs(request: Request, account: Account, ctx: Context) -> JSONResponse:
    q = request.query_params
    page = paging(q)
    order = order_by(q, JOB_ORDERS, "id")
    state = int_filter(q, "state")
    projects = wanted(int_filter(q, "project_id"), in_filter(q, "project_id__in"))
    environments = wanted(int_filter(q, "environment_id"), in_filter(q, "environment_id__in"))
    ids = in_filter(q, "id__in")
    name = q.get("name__icontains") or None
    include = include_related(q)

    def work() -> tuple[list[dict[str, Any]], int]:
        v = account_view(request, ctx, account)
        found: list[StoredJob] = []
        offset = 0
        while True:
            batch = ctx.store.list_jobs(
                account, state=state or 1, name_contains=name, limit=1000, offset=offset
            )
            found.extend(batch.items)
            offset += len(batch.items) + len(batch.quarantined)
            if offset >= batch.total_count:
                break
        matching = []
        for job in found:
            fields = v.fields(job)
            if projects is not None and fields["project_id"] not in projects:
                continue
            if environments is not None and fields["environment_id"] not in environments:
                continue
            if ids is not None and job.id not in ids:
                continue
            matching.append(job)
        field = order.removeprefix("-")
        matching.sort(key=lambda j: (getattr(j, field), j.id), reverse=order.startswith("-"))
        shown = matching[page.offset : page.offset + page.limit]
        return [v.job_object(job, include) for job in shown], len(matching)

    items, total = await asyncio.to_thread(work)
    filters = {
        "account_id": api_account_id(account),
        "state": state or 1,
        "project_id": int_filter(q, "project_id"),
        "project_id__in": in_filter(q, "project_id__in"),
        "environment_id": int_filter(q, "environment_id"),
        "environment_id__in": in_filter(q, "environment_id__in"),
        "id__in": ids,
        "name__icontains": name,
    }
    return ok(items, extra=list_extra(filters, order, page, len(items), total))


# --------------------------------------------------------------------------- create / update


@route(router, JOBS, "POST")
async def create_job(request: Request, account: Account, ctx: Context) -> JSONResponse:
    body = await json_object(request)
    key = runslot_key(body)
    definition, echo = await prepare(ctx, account, body, key or "pending")
    created = True
    job_id: int | None = None
    if key is not None:
        # Runslot's extension: the job is keyed by the caller's identifier, so creating it
        # again updates it (what `runslot jobs apply` relies on).
        before = await asyncio.to_thread(ctx.store.get_job_by_key, account, key)
        created = before is None or before.state == 2
    else:
        job_id = await asyncio.to_thread(ctx.store.create_job, definition, extra=echo)
        key = str(job_id)
        definition = definition.model_copy(update={"job_id": key})
    try:
        await save(ctx, account, definition, echo)
    except ApiError as err:
        if created:
            await undo_create(ctx, account, key, job_id)
        raise ApiError(
            503 if err.code >= 500 else err.code,
            f"{err.message} Nothing was created." if created else err.message,
        ) from None
    stored = await asyncio.to_thread(ctx.store.get_job_by_key, account, key)
    if stored is None:
        raise ApiError(503, f"Job {key} was saved but the run store does not show it yet")
    data = await asyncio.to_thread(lambda: account_view(request, ctx, account).job_object(stored))
    return ok(data, code=201 if created else 200)


@route(router, JOB, "GET")
async def get_job(request: Request, job_id: int, account: Account, ctx: Context) -> JSONResponse:
    include = include_related(request.query_params)
    job = await asyncio.to_thread(ctx.store.get_job, account, job_id)
    if job is None:
        raise not_found(f"Job {job_id} not found")
    data = await asyncio.to_thread(
        lambda: account_view(request, ctx, account).job_object(job, include)
    )
    return ok(data)


@route(router, JOB, "POST")
async def update_job(request: Request, job_id: int, account: Account, ctx: Context) -> JSONResponse:
    body = await json_object(request)
    current = await existing_job(ctx, account, job_id)
    key = runslot_key(body)
    if key is not None and key != current.key:
        raise bad_request(f"runslot_key cannot change: job {job_id} is {current.key!r}")
    base = await asyncio.to_thread(lambda: account_view(request, ctx, account).fields(current))
    merged = merge_fields(base, body)
    kept = (base["environment_id"], current.definition.environment, base["project_id"])
    definition, echo = await prepare(ctx, account, merged, current.key, current=kept)
    await save(ctx, account, definition, echo)
    stored = await asyncio.to_thread(ctx.store.get_job, account, job_id)
    assert stored is not None
    data = await asyncio.to_thread(lambda: account_view(request, ctx, account).job_object(stored))
    return ok(data)


@route(router, JOB, "DELETE")
async def delete_job(request: Request, job_id: int, account: Account, ctx: Context) -> JSONResponse:
    job = await asyncio.to_thread(ctx.store.get_job, account, job_id)
    if job is None:
        raise not_found(f"Job {job_id} not found")
    if job.state != 2:
        # No workflow (it ended): the store's row is all there is to mark.
        with contextlib.suppress(WorkflowGoneError):
            await call_workflow(
                f"delete job {job_id}", jobs.delete_job(ctx.client, account, job.key)
            )
        # The workflow writes state 2 itself; written here too so the answer never waits.
        await asyncio.to_thread(ctx.store.set_job_state, account, job_id, 2)
    stored = await asyncio.to_thread(ctx.store.get_job, account, job_id)
    assert stored is not None
    data = await asyncio.to_thread(lambda: account_view(request, ctx, account).job_object(stored))
    return ok(data)


# --------------------------------------------------------------------------- runs


class TriggerIn(BaseModel):
    """The trigger body (spec §2.3): every key optional or null, unknown keys ignored."""

    model_config = ConfigDict(extra="ignore")

    cause: str | None = None
    git_sha: str | None = None
    git_branch: str | None = None
    github_pull_request_id: int | None = None
    gitlab_merge_request_id: int | None = None
    azure_pull_request_id: int | None = None
    non_native_pull_request_id: int | None = None
    schema_override: str | None = None
    dbt_version_override: str | None = None
    threads_override: int | None = None
    target_name_override: str | None = None
    generate_docs_override: bool | None = None
    timeout_seconds_override: int | None = None
    steps_override: list[str] | None = None


def trigger_request(body: dict[str, Any], job: StoredJob) -> TriggerRequest:
    """The ``TriggerRequest`` a trigger body asks for (400 naming the field if invalid)."""
    try:
        t = TriggerIn.model_validate(body)
    except ValidationError as err:
        raise bad_request(validation_message(err)) from None
    if not t.cause or not t.cause.strip():
        raise bad_request("cause is required: a non-empty string saying why the job runs")
    pr_field = next((name for name in PR_FIELDS if getattr(t, name) is not None), None)
    pr_id: int | None = getattr(t, pr_field) if pr_field is not None else None
    if pr_id is not None and pr_id < 1:
        raise bad_request(f"{pr_field} must be a positive integer, got {pr_id}")
    try:
        overrides = TriggerOverrides(
            steps_override=t.steps_override or None,
            threads_override=t.threads_override,
            target_name_override=t.target_name_override,
            schema_override=t.schema_override,
            timeout_seconds_override=t.timeout_seconds_override,
            git_sha=t.git_sha,
            git_branch=t.git_branch,
            generate_docs_override=t.generate_docs_override,
            dbt_version_override=t.dbt_version_override,
        )
        ci = job.definition.job_type == JobType.CI and pr_id is not None
        return TriggerRequest(
            cause=TriggerCause.PULL_REQUEST if ci else TriggerCause.API,
            cause_text=t.cause[:255],
            # On a job that is not CI, the pull request is only echoed in run.trigger.
            pr_id=pr_id,
            overrides=overrides,
        )
    except ValidationError as err:
        raise bad_request(validation_message(err)) from None


async def _trigger(
    request: Request, ctx: ApiContext, account: str, job: StoredJob, req: TriggerRequest
) -> JSONResponse:
    try:
        result = await call_workflow(
            f"trigger job {job.id}", jobs.trigger(ctx.client, account, job.key, req)
        )
    except WorkflowGoneError:
        raise ApiError(
            409, f"Job {job.id} has no running workflow; save it again (POST the job) to restore it"
        ) from None
    run = await asyncio.to_thread(ctx.store.get_run_by_key, account, result.run_id)
    if run is None:
        raise ApiError(503, f"Run {result.run_id} was queued but the run store does not show it")
    data = await asyncio.to_thread(
        lambda: account_view(request, ctx, account).run_object(run, {"trigger", "job"})
    )
    return ok(data)


@route(router, JOB + "run/", "POST")
async def trigger_run(
    request: Request, job_id: int, account: Account, ctx: Context
) -> JSONResponse:
    body = await json_object(request, optional=True)
    job = await existing_job(ctx, account, job_id)
    return await _trigger(request, ctx, account, job, trigger_request(body, job))


@route(router, JOB + "rerun/", "POST")
async def rerun(request: Request, job_id: int, account: Account, ctx: Context) -> JSONResponse:
    """Rerun the job's newest run from failure if it failed, else start a new run."""
    body = await json_object(request, optional=True)
    job = await existing_job(ctx, account, job_id)
    cause = body.get("cause") if isinstance(body.get("cause"), str) else None
    newest = await asyncio.to_thread(
        lambda: ctx.store.list_runs(account, job_id=job.id, order_by="-id", limit=1).items
    )
    if newest and newest[0].status == RunStatus.ERROR:
        text = cause or f"Rerun of run {newest[0].id} from failure"
        req = TriggerRequest(cause=TriggerCause.API, cause_text=text[:255], rerun_of=newest[0].key)
    else:
        text = cause or "Rerun requested through the API"
        req = TriggerRequest(cause=TriggerCause.API, cause_text=text[:255])
    return await _trigger(request, ctx, account, job, req)
