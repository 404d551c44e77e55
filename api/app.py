"""The app factory: dbt Cloud's Administrative API surface over Runslot (spec §2).

Every route is served with and without its trailing slash and never redirects; every
answer, errors included, is dbt Cloud's JSON envelope.
"""

from __future__ import annotations

import importlib
import importlib.util

from fastapi import APIRouter, FastAPI

from api import routes_accounts, routes_jobs, routes_runs
from api.context import ApiContext
from api.envelope import install_error_handlers

GITHUB_MODULE = "api.github"
"""The GitHub webhook router, included when it is installed."""


def create_app(context: ApiContext) -> FastAPI:
    app = FastAPI(
        title="Runslot",
        summary="A dbt Cloud-compatible Administrative API over Runslot",
        # No redirects between /x and /x/: both forms are routes of their own.
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.runslot = context
    install_error_handlers(app)
    for module in (routes_accounts, routes_jobs, routes_runs):
        app.include_router(module.router)
    if importlib.util.find_spec(GITHUB_MODULE) is not None:
        github: APIRouter = importlib.import_module(GITHUB_MODULE).router
        app.include_router(github)
    return app
