"""What every API route needs, built once by the app factory and kept in ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from temporalio.client import Client

from activities.artifacts import ArtifactStore
from activities.store import RunStore
from workflows.models import TaskQueues


@dataclass
class ApiContext:
    store: RunStore
    """The run store: what the API reads (and the few admin writes: job ids, environments)."""
    client: Client
    """Temporal: every change to a job or run goes through its workflow."""
    artifacts: ArtifactStore
    """Step logs and dbt artifacts, as the workers wrote them."""
    queues: TaskQueues
    """Task queues of the stack the API starts job workflows on."""
    data_dir: Path
    """The stack's data directory (the signing key of webhooks lives there by default)."""


def get_context(request: Request) -> ApiContext:
    """FastAPI dependency: the context the app factory stored in ``app.state.runslot``."""
    context: ApiContext = request.app.state.runslot
    return context
