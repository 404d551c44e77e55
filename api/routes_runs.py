"""Runs (endpoints 8 to 12): list, get (with steps and their logs), cancel, artifacts."""

from __future__ import annotations

import asyncio
import mimetypes

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from activities.artifacts import ArtifactNotFoundError, ArtifactStore, StepKey, StoredArtifact
from activities.store import StoredRun
from api.auth import Account, Context
from api.calls import WorkflowGoneError, call_workflow
from api.context import ApiContext
from api.convert import api_account_id
from api.convert_runs import LIST_LOG_TAIL_BYTES, LOG_TAIL_BYTES, StepLog
from api.envelope import ApiError, bad_request, not_found, ok
from api.params import (
    in_filter,
    include_related,
    int_filter,
    list_extra,
    order_by,
    paging,
    wanted,
)
from api.routing import route
from api.views import AccountView, account_view
from starter import jobs
from workflows.models import RunStatus

router = APIRouter()

RUNS = "/api/v2/accounts/{account_id}/runs/"
RUN = "/api/v2/accounts/{account_id}/runs/{run_id}/"
RUN_ORDERS = ("id", "created_at", "updated_at", "started_at", "finished_at", "status")


async def existing_run(ctx: ApiContext, account: str, run_id: int) -> StoredRun:
    run = await asyncio.to_thread(ctx.store.get_run, account, run_id)
    if run is None:
        raise not_found(f"Run {run_id} not found")
    return run


async def read_tail(artifacts: ArtifactStore, key: StepKey, limit: int) -> StepLog | None:
    """The last ``limit`` bytes of a step's log, marked when cut; None if it has no log."""
    try:
        size = (await artifacts.read_log(key, 0, 0)).size
        start = max(0, size - limit)
        data = (await artifacts.read_log(key, start, limit)).data
    except (ArtifactNotFoundError, ValueError):
        return None
    text = data.decode(errors="replace")
    if start > 0:
        # Cut at a line boundary, and say so: a reader should not take a tail for the log.
        text = text.split("\n", 1)[1] if "\n" in text else text
        text = f"[log truncated: the first {start} of {size} bytes are not shown]\n{text}"
    return StepLog(text=text, size=size)


async def step_logs(artifacts: ArtifactStore, run: StoredRun, limit: int) -> dict[int, StepLog]:
    keys = {step.index: StepKey(run.account_id, run.key, step.index) for step in run.steps}
    read = await asyncio.gather(*(read_tail(artifacts, key, limit) for key in keys.values()))
    return {index: log for index, log in zip(keys, read, strict=True) if log is not None}


# --------------------------------------------------------------------------- list / get


@route(router, RUNS, "GET")
async def list_runs(request: Request, account: Account, ctx: Context) -> JSONResponse:
    q = request.query_params
    page = paging(q)
    order = order_by(q, RUN_ORDERS, "id")
    include = include_related(q)
    job_ids = wanted(int_filter(q, "job_definition_id"), in_filter(q, "job_definition_id__in"))
    statuses = wanted(int_filter(q, "status"), in_filter(q, "status__in"))
    projects = wanted(int_filter(q, "project_id"), in_filter(q, "project_id__in"))
    environments = wanted(int_filter(q, "environment_id"), in_filter(q, "environment_id__in"))
    deferring = int_filter(q, "deferring_run_id")
    if statuses is not None and not statuses <= {int(s) for s in RunStatus}:
        unknown = sorted(statuses - {int(s) for s in RunStatus})
        raise bad_request(
            f"unknown run status {unknown}; use 1 (Queued), 2 (Starting), 3 (Running), "
            "10 (Success), 20 (Error) or 30 (Cancelled)"
        )

    def work() -> tuple[AccountView, list[StoredRun], int]:
        v = account_view(request, ctx, account)
        allowed = job_ids
        if projects is not None or environments is not None:
            allowed = set()
            offset = 0
            while True:
                batch = ctx.store.list_jobs(account, state=None, limit=1000, offset=offset)
                for job in batch.items:
                    fields = v.fields(job)
                    if projects is not None and fields["project_id"] not in projects:
                        continue
                    if environments is not None and fields["environment_id"] not in environments:
                        continue
                    if job_ids is None or job.id in job_ids:
                        allowed.add(job.id)
                offset += len(batch.items) + len(batch.quarantined)
                if offset >= batch.total_count:
                    break
        if deferring is not None:
            allowed = set()  # Runslot runs never defer to another run
        found = ctx.store.list_runs_of_jobs(
            account,
            allowed,
            status=[RunStatus(s) for s in statuses] if statuses is not None else None,
            limit=page.limit,
            offset=page.offset,
            order_by=order,
            include_steps="run_steps" in include,
        )
        return v, found.items, found.total_count

    v, runs, total = await asyncio.to_thread(work)
    logs: dict[int, dict[int, StepLog]] = {}
    if "run_steps" in include:
        for run in runs:
            logs[run.id] = await step_logs(ctx.artifacts, run, LIST_LOG_TAIL_BYTES)
    items = await asyncio.to_thread(
        lambda: [v.run_object(run, include, logs=logs.get(run.id)) for run in runs]
    )
    filters = {
        "account_id": api_account_id(account),
        "job_definition_id": int_filter(q, "job_definition_id"),
        "job_definition_id__in": in_filter(q, "job_definition_id__in"),
        "status": int_filter(q, "status"),
        "status__in": in_filter(q, "status__in"),
        "project_id": int_filter(q, "project_id"),
        "project_id__in": in_filter(q, "project_id__in"),
        "environment_id": int_filter(q, "environment_id"),
        "environment_id__in": in_filter(q, "environment_id__in"),
        "deferring_run_id": deferring,
        "include_related": sorted(include) or None,
    }
    return ok(items, extra=list_extra(filters, order, page, len(items), total))


@route(router, RUN, "GET")
async def get_run(request: Request, run_id: int, account: Account, ctx: Context) -> JSONResponse:
    include = include_related(request.query_params)
    run = await existing_run(ctx, account, run_id)
    logs = await step_logs(ctx.artifacts, run, LOG_TAIL_BYTES) if "run_steps" in include else None
    data = await asyncio.to_thread(
        lambda: account_view(request, ctx, account).run_object(run, include, logs=logs)
    )
    return ok(data)


@route(router, RUN + "cancel/", "POST")
async def cancel_run(request: Request, run_id: int, account: Account, ctx: Context) -> JSONResponse:
    """Cancel a queued or running run (answered as Cancelled at once: the run store shows
    it within seconds); a finished run is returned as it is."""
    run = await existing_run(ctx, account, run_id)
    status: RunStatus | None = None
    if not run.status.is_finished:
        try:
            await call_workflow(
                f"cancel run {run_id}",
                jobs.cancel_run(ctx.client, account, run.job_key, run.key),
            )
            status = RunStatus.CANCELLED
        except (ApiError, WorkflowGoneError) as err:
            # It may have ended meanwhile: then it is returned as it ended.
            run = await existing_run(ctx, account, run_id)
            if not run.status.is_finished:
                if isinstance(err, ApiError):
                    raise
                raise ApiError(
                    409, f"Could not cancel run {run_id}: its job has no workflow"
                ) from None
    data = await asyncio.to_thread(
        lambda: account_view(request, ctx, account).run_object(run, status=status)
    )
    return ok(data)


# --------------------------------------------------------------------------- artifacts


async def _artifacts(ctx: ApiContext, run: StoredRun) -> list[StoredArtifact]:
    try:
        return await ctx.artifacts.list_run(run.account_id, run.key)
    except ValueError:
        return []


@route(router, RUN + "artifacts/", "GET")
async def list_artifacts(
    request: Request, run_id: int, account: Account, ctx: Context
) -> JSONResponse:
    run = await existing_run(ctx, account, run_id)
    names = sorted({artifact.name for artifact in await _artifacts(ctx, run)})
    return ok(names)


@route(router, RUN + "artifacts/{path:path}", "GET")
async def get_artifact(
    request: Request, run_id: int, path: str, account: Account, ctx: Context
) -> Response:
    """The artifact's raw content (no envelope); ``?step=N`` picks the step, else the last
    step that has it."""
    step = int_filter(request.query_params, "step")
    if step is not None and step < 1:
        raise bad_request(f"step must be 1 or more (steps are numbered from 1), got {step}")
    run = await existing_run(ctx, account, run_id)
    name = path.strip("/")
    if not name:
        listing: Response = await list_artifacts(request, run_id, account, ctx)
        return listing
    stored = [a for a in await _artifacts(ctx, run) if a.name == name]
    if step is not None:
        stored = [a for a in stored if a.step == step]
    if not stored:
        where = f"step {step} of run {run_id}" if step is not None else f"run {run_id}"
        raise not_found(f"No artifact {name!r} in {where}")
    chosen = max(stored, key=lambda a: a.step)
    try:
        content = await ctx.artifacts.get_file(StepKey(run.account_id, run.key, chosen.step), name)
    except (ArtifactNotFoundError, ValueError):
        raise not_found(f"No artifact {name!r} in run {run_id}") from None
    media = "application/json" if name.endswith(".json") else None
    media = media or mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Response(content, media_type=media)
