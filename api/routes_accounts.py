"""The account (endpoint 13), the bare root (14), and the v3 projects, environments and
job env-var overrides (15 to 17). Projects are derived from environments' ``project_id``.

Runslot extension: ``POST /api/v3/accounts/{a}/projects/{p}/environments/`` with
``{"name": ..., "runslot": {<Environment fields>}}`` creates or replaces the environment of
that name (what a job's ``environment_id`` names); the jobs using it are saved again, so
they run with the new one at once.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from activities.store import StoredEnvironment
from api.auth import Account, Context, token_account
from api.convert import api_account_id, timestamp
from api.envelope import ApiError, bad_request, not_found, ok, validation_message
from api.params import in_filter, int_filter, json_object, list_extra, paging, wanted
from api.routing import route
from api.saving import resave
from api.views import AccountView, account_view
from workflows.models import Environment

router = APIRouter()

V2 = "/api/v2/accounts/{account_id}/"
V3 = "/api/v3/accounts/{account_id}/"
PROJECT = V3 + "projects/{project_id}/"


@route(router, "/", "GET")
async def root() -> JSONResponse:
    """A connection test (one client calls the bare base URL)."""
    return ok({"name": "Runslot", "api": "dbt Cloud-compatible", "versions": ["v2", "v3"]})


async def _account_object(ctx: Context, account: str) -> dict[str, Any]:
    stored = await asyncio.to_thread(ctx.store.get_account, account)
    if stored is None:
        raise not_found(f"Account {account} not found")
    return {
        "id": api_account_id(stored.id),
        "name": stored.name,
        "state": 1,
        "plan": "enterprise",
        "run_slots": stored.run_slots,
        "run_memory_limit_mb": stored.run_memory_limit_mb,
        "max_queue_wait_seconds": stored.max_queue_wait_seconds,
        "developer_seats": 0,
        "read_only_seats": 0,
        "it_seats": 0,
        "locked": False,
        "lock_reason": None,
        "pending_cancel": False,
        "docs_job_id": None,
        "freshness_job_id": None,
        "created_at": timestamp(stored.created_at),
        "updated_at": timestamp(stored.updated_at),
    }


@route(router, "/api/v2/accounts/", "GET")
async def list_accounts(
    account: Annotated[str, Depends(token_account)], ctx: Context
) -> JSONResponse:
    """The accounts this token can see: its own."""
    return ok([await _account_object(ctx, account)])


@route(router, V2, "GET")
async def get_account(account: Account, ctx: Context) -> JSONResponse:
    return ok(await _account_object(ctx, account))


@route(router, V3, "GET")
async def get_account_v3(account: Account, ctx: Context) -> JSONResponse:
    return ok(await _account_object(ctx, account))


# --------------------------------------------------------------------------- projects


@route(router, V3 + "projects/", "GET")
async def list_projects(request: Request, account: Account, ctx: Context) -> JSONResponse:
    q = request.query_params
    page = paging(q)
    ids = wanted(int_filter(q, "id"), in_filter(q, "id__in"))
    name = (q.get("name__icontains") or "").lower() or None

    def work() -> list[dict[str, Any]]:
        v = account_view(request, ctx, account)
        found = [v.project_object(p) for p in v.project_ids() if ids is None or p in ids]
        return [p for p in found if p is not None and (name is None or name in p["name"].lower())]

    projects = await asyncio.to_thread(work)
    shown = projects[page.offset : page.offset + page.limit]
    filters = {"account_id": api_account_id(account), "name__icontains": name, "id__in": ids}
    return ok(shown, extra=list_extra(filters, "id", page, len(shown), len(projects)))


@route(router, PROJECT, "GET")
async def get_project(
    request: Request, project_id: int, account: Account, ctx: Context
) -> JSONResponse:
    project = await asyncio.to_thread(
        lambda: account_view(request, ctx, account).project_object(project_id)
    )
    if project is None:
        raise not_found(f"Project {project_id} not found")
    return ok(project)


# --------------------------------------------------------------------------- environments


async def _environments(
    request: Request, ctx: Context, account: str, projects: set[int] | None
) -> tuple[AccountView, list[StoredEnvironment]]:
    v = account_view(request, ctx, account)
    envs = await asyncio.to_thread(v.environments)
    return v, [e for e in envs if projects is None or e.project_id in projects]


def _env_list(
    request: Request, account: str, v: AccountView, envs: list[StoredEnvironment]
) -> JSONResponse:
    q = request.query_params
    page = paging(q)
    name = (q.get("name__icontains") or "").lower() or None
    matching = [e for e in envs if name is None or name in e.name.lower()]
    shown = [v.environment_object(e) for e in matching[page.offset : page.offset + page.limit]]
    filters = {
        "account_id": api_account_id(account),
        "project_id": int_filter(q, "project_id"),
        "project_id__in": in_filter(q, "project_id__in"),
        "name__icontains": name,
    }
    return ok(shown, extra=list_extra(filters, "id", page, len(shown), len(matching)))


@route(router, V3 + "environments/", "GET")
async def list_environments(request: Request, account: Account, ctx: Context) -> JSONResponse:
    q = request.query_params
    projects = wanted(int_filter(q, "project_id"), in_filter(q, "project_id__in"))
    v, envs = await _environments(request, ctx, account, projects)
    return _env_list(request, account, v, envs)


@route(router, PROJECT + "environments/", "GET")
async def list_project_environments(
    request: Request, project_id: int, account: Account, ctx: Context
) -> JSONResponse:
    v, envs = await _environments(request, ctx, account, {project_id})
    return _env_list(request, account, v, envs)


@route(router, PROJECT + "environments/{environment_id}/", "GET")
async def get_environment(
    request: Request, project_id: int, environment_id: int, account: Account, ctx: Context
) -> JSONResponse:
    v, envs = await _environments(request, ctx, account, {project_id})
    env = next((e for e in envs if e.id == environment_id), None)
    if env is None:
        raise not_found(f"Environment {environment_id} not found in project {project_id}")
    return ok(v.environment_object(env))


@route(router, PROJECT + "environments/", "POST")
async def put_environment(
    request: Request, project_id: int, account: Account, ctx: Context
) -> JSONResponse:
    """Runslot extension: create or replace the environment called ``name``."""
    body = await json_object(request)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 255:
        raise bad_request("name is required: the environment's name (1 to 255 characters)")
    if project_id < 1:
        raise bad_request(f"project_id must be 1 or more, got {project_id}")
    settings = body.get("runslot")
    if not isinstance(settings, dict):
        raise bad_request(
            'runslot is required: an object of the environment\'s settings, e.g. {"project_dir": '
            '"/path/to/dbt/project", "profile": {"type": "duckdb", "path": "..."}} (also '
            "git_url, subdirectory, dbt_version, target_name, env_vars)"
        )
    try:
        definition = Environment.model_validate(settings)
    except ValidationError as err:
        raise bad_request(validation_message(err, prefix="runslot")) from None
    v = account_view(request, ctx, account)
    before = await asyncio.to_thread(v.environments)
    existed = next((e for e in before if e.name == name), None)
    env_id = await asyncio.to_thread(
        ctx.store.put_environment, account, name, definition, project_id=project_id
    )
    if existed is not None:
        await _resave_jobs_of(request, ctx, account, env_id)
    fresh = account_view(request, ctx, account)
    env = await asyncio.to_thread(fresh.environment, env_id)
    assert env is not None
    return ok(fresh.environment_object(env), code=200 if existed is not None else 201)


async def _resave_jobs_of(request: Request, ctx: Context, account: str, env_id: int) -> None:
    """Save every job of environment ``env_id`` again, so it runs with the new settings."""

    def using() -> list[tuple[Any, dict[str, Any]]]:
        v = account_view(request, ctx, account)
        page = ctx.store.list_jobs(account, limit=1000)
        return [(job, f) for job in page.items if (f := v.fields(job))["environment_id"] == env_id]

    failed = []
    for job, fields in await asyncio.to_thread(using):
        try:
            await resave(ctx, account, job, fields)
        except ApiError as err:
            failed.append(f"job {job.id}: {err.message}")
    if failed:
        raise ApiError(
            503,
            f"Environment {env_id} was saved, but not every job using it was: "
            f"{'; '.join(failed)}. Send the request again to retry.",
        )


# --------------------------------------------------------------------------- env vars


@route(router, PROJECT + "environment-variables/job/", "GET")
async def job_environment_variables(
    request: Request, project_id: int, account: Account, ctx: Context
) -> JSONResponse:
    """Job-level env-var overrides: Runslot has none (env vars live in environments)."""
    job_id = int_filter(request.query_params, "job_definition_id")
    if job_id is not None:
        job = await asyncio.to_thread(ctx.store.get_job, account, job_id)
        if job is None:
            raise not_found(f"Job {job_id} not found")
    return ok({})
