"""Saving a job from a dbt Cloud body: validate, build the definition, save it through the
job's workflow (which writes the run store), undo a create that failed half-way."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

from temporalio.service import RPCError

from activities.store import StoredJob
from api.calls import WorkflowGoneError, call_workflow
from api.context import ApiContext
from api.convert_jobs import (
    JobIn,
    UpstreamKey,
    build_definition,
    parse_job,
    resolved_job_type,
    stored_fields,
)
from api.envelope import ApiError, bad_request
from starter import jobs
from workflows import constants as c
from workflows.models import Environment, JobDefinition

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


async def save(
    ctx: ApiContext, account: str, definition: JobDefinition, fields: dict[str, Any]
) -> None:
    """Save the job through its workflow (which writes the run store)."""
    stored_account = await asyncio.to_thread(ctx.store.get_account, account)
    if stored_account is None:
        raise ApiError(404, f"Account {account} not found")
    try:
        await call_workflow(
            f"save job {definition.job_id}",
            jobs.save_job(
                ctx.client, definition, stored_account.settings, ctx.queues, api_fields=fields
            ),
        )
    except WorkflowGoneError as err:
        raise ApiError(503, f"Could not save job {definition.job_id}: {err}") from None


def upstream_resolver(ctx: ApiContext, account: str) -> UpstreamKey:
    def upstream_key(job_id: int) -> str | None:
        job = ctx.store.get_job(account, job_id)
        return job.key if job is not None and job.state == 1 else None

    return upstream_key


async def prepare(
    ctx: ApiContext,
    account: str,
    fields: dict[str, Any],
    key: str,
    *,
    current: tuple[int, Environment, int] | None = None,
) -> tuple[JobDefinition, dict[str, Any]]:
    """Validate a job body and build its definition and echo; raises 400 saying what to fix.

    ``current``: an updated job's environment id, environment and project id, kept when the
    body leaves the environment as it is and no environment row has that id (a job saved
    outside the API, whose environment is its own)."""
    job: JobIn = parse_job(stored_fields(fields))
    stored_env = await asyncio.to_thread(ctx.store.get_environment, account, job.environment_id)
    environment: Environment
    if stored_env is not None:
        environment, project_id = stored_env.definition, stored_env.project_id
    elif current is not None and current[0] == job.environment_id:
        environment, project_id = current[1], current[2]
    else:
        raise bad_request(
            f"environment_id {job.environment_id} does not exist in account {account}. Create "
            f"one with POST /api/v3/accounts/{account}/projects/{{project_id}}/environments/ "
            'and a body {"name": ..., "runslot": {"project_dir": ... or "git_url": ..., '
            '"profile": {...}}}, or list them with GET '
            f"/api/v3/accounts/{account}/environments/"
        )
    if job.project_id is not None and stored_env is not None and job.project_id != project_id:
        raise bad_request(
            f"project_id {job.project_id} does not match environment {job.environment_id}, "
            f"which belongs to project {project_id}"
        )
    definition = await asyncio.to_thread(
        build_definition,
        job,
        account_id=account,
        key=key,
        environment=environment,
        upstream_key=upstream_resolver(ctx, account),
    )
    echo = stored_fields(fields)
    echo["job_type"] = resolved_job_type(job).value
    echo["project_id"] = project_id
    echo["environment_id"] = job.environment_id
    return definition, echo


def runslot_key(body: dict[str, Any]) -> str | None:
    key = body.get("runslot_key")
    if key is None:
        return None
    if not isinstance(key, str) or not _KEY.match(key) or key.isdigit():
        raise bad_request(
            "runslot_key must be an identifier of letters, digits, '_', '.' and '-' (at most "
            "64, starting with a letter or digit, not digits only)"
        )
    return key


async def undo_create(ctx: ApiContext, account: str, key: str, job_id: int | None) -> None:
    """A create whose workflow save failed: end the workflow if it started, hide the row."""
    with contextlib.suppress(RPCError):  # never started, or already gone
        await ctx.client.get_workflow_handle(c.job_workflow_id(account, key)).terminate(
            "the API's create call failed"
        )
    if job_id is None:
        found = await asyncio.to_thread(ctx.store.get_job_by_key, account, key)
        job_id = found.id if found is not None else None
    if job_id is not None:
        await asyncio.to_thread(ctx.store.set_job_state, account, job_id, 2)


async def resave(ctx: ApiContext, account: str, job: StoredJob, fields: dict[str, Any]) -> None:
    """Save a job again as it is (its environment changed): ``fields`` are its current ones."""
    kept = (fields["environment_id"], job.definition.environment, fields["project_id"])
    definition, echo = await prepare(ctx, account, fields, job.key, current=kept)
    await save(ctx, account, definition, echo)
