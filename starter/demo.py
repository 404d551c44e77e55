"""The demo account `runslot dev` creates on a new data directory.

A new user should see real, successful dbt runs within a minute: the demo account gets a
job on a 5-minute cron (seed + build of sample/jaffle into a DuckDB file in the data dir),
a job triggered by its completion, and one run queued at once.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from starter import jobs
from workflows import constants as c
from workflows.models import (
    AccountSettings,
    CompletionTrigger,
    CronSchedule,
    Environment,
    JobDefinition,
    JobTriggers,
    TriggerCause,
    TriggerRequest,
)

log = logging.getLogger(__name__)

DEMO_ACCOUNT = "demo"
SAMPLE_PROJECT = Path(__file__).resolve().parent.parent / "sample" / "jaffle"


def demo_jobs(data_dir: Path, project: Path = SAMPLE_PROJECT) -> list[JobDefinition]:
    environment = Environment(
        project_dir=str(project),
        profile={"type": "duckdb", "path": str(data_dir.resolve() / "demo-warehouse.duckdb")},
    )
    return [
        JobDefinition(
            account_id=DEMO_ACCOUNT,
            job_id="build",
            name="Build every 5 minutes",
            environment=environment,
            execute_steps=["dbt seed", "dbt build"],
            triggers=JobTriggers(schedule=CronSchedule(cron="*/5 * * * *")),
        ),
        JobDefinition(
            account_id=DEMO_ACCOUNT,
            job_id="docs",
            name="Docs after each successful build",
            environment=environment,
            execute_steps=["dbt docs generate"],
            triggers=JobTriggers(on_job_completion=[CompletionTrigger(job_id="build")]),
        ),
    ]


async def seed_demo(client: Client, data_dir: Path) -> str | None:
    """Create the demo account's jobs and queue a first run, once per data directory.

    Returns the first run's id, or None when the demo already exists or cannot be made.
    """
    if not (SAMPLE_PROJECT / "dbt_project.yml").exists():
        log.warning("no sample project at %s: skipping the demo account", SAMPLE_PROJECT)
        return None
    try:
        await client.get_workflow_handle(c.job_workflow_id(DEMO_ACCOUNT, "build")).describe()
        return None  # seeded on an earlier start: leave the user's state alone
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
    account = AccountSettings(
        account_id=DEMO_ACCOUNT, run_slots=2, max_queue_wait=timedelta(minutes=30)
    )
    for job in demo_jobs(data_dir):
        await jobs.save_job(client, job, account)
    first = await jobs.trigger(
        client,
        DEMO_ACCOUNT,
        "build",
        TriggerRequest(cause=TriggerCause.MANUAL, cause_text="First run of the demo"),
    )
    return first.run_id
