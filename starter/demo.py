"""The demo account `runslot dev` creates on a new data directory.

A new user should see real, successful dbt runs within a minute, and reach them with the
dbt Cloud tools they already have: the demo is account ``1`` (named ``demo``, so
``DBT_CLOUD_ACCOUNT_ID=1`` works as is), with environment ``demo`` (project 1) on
sample/jaffle, a job on a 5-minute cron (seed + build into a DuckDB file in the data dir),
a job triggered by its success, an API token, and one run queued at once.

The account and its token are written to the run store (admin writes); the environment, the
jobs and the first run go through the REST API, exactly as ``runslot jobs apply`` and
``runslot run`` would send them. The token is kept in ``<data-dir>/demo-token`` (0600),
which also marks the demo as made: later starts only print the token again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from activities.store import RunStore
from starter.admin import save_account, write_private_file
from starter.api_client import RunslotApi
from starter.jobs_file import EnvironmentSpec, JobsFile, PlannedJob, apply_jobs_file
from workflows.models import (
    AccountSettings,
    CompletionTrigger,
    CronSchedule,
    Environment,
    JobDefinition,
    JobTriggers,
)

log = logging.getLogger(__name__)

DEMO_ACCOUNT = "1"
DEMO_ACCOUNT_NAME = "demo"
DEMO_ENVIRONMENT = "demo"
DEMO_PROJECT = 1
TOKEN_FILE = "demo-token"  # noqa: S105 - the file's name, not a token
SAMPLE_PROJECT = Path(__file__).resolve().parent.parent / "sample" / "jaffle"


@dataclass(frozen=True)
class Demo:
    """The demo account as ``runslot dev`` shows it."""

    token: str
    token_file: Path
    first_run_id: int | None
    """The run queued at creation; None when the demo was made on an earlier start."""


def demo_spec(data_dir: Path, project: Path = SAMPLE_PROJECT) -> JobsFile:
    """The demo account as a jobs file: what ``runslot jobs apply`` would send."""
    environment = Environment(
        project_dir=str(project),
        profile={"type": "duckdb", "path": str(data_dir.resolve() / "demo-warehouse.duckdb")},
    )
    jobs = [
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
    return JobsFile(
        # One slot: the demo's warehouse is one DuckDB file, which takes one writer at a
        # time, so a docs run must not overlap a cron build (a real warehouse takes more).
        account=AccountSettings(
            account_id=DEMO_ACCOUNT, run_slots=1, max_queue_wait=timedelta(minutes=30)
        ),
        environments={
            DEMO_ENVIRONMENT: EnvironmentSpec(project_id=DEMO_PROJECT, environment=environment)
        },
        jobs=[PlannedJob(definition=job, environment=DEMO_ENVIRONMENT) for job in jobs],
    )


def seed_demo(data_dir: Path, store_url: str, api_url: str) -> Demo | None:
    """Create the demo account once per data directory; return its token and first run.

    Returns the existing token when the demo was made on an earlier start, and None when
    there is no sample project to run. Blocking (store and HTTP calls): async callers run
    it in a thread. Every step before the token file is written is idempotent, so a start
    interrupted half way makes the demo again on the next one.
    """
    token_file = data_dir / TOKEN_FILE
    if token_file.exists():
        return Demo(token=token_file.read_text().strip(), token_file=token_file, first_run_id=None)
    if not (SAMPLE_PROJECT / "dbt_project.yml").exists():
        log.warning("no sample project at %s: skipping the demo account", SAMPLE_PROJECT)
        return None
    spec = demo_spec(data_dir)
    assert spec.account is not None
    store = RunStore(store_url)
    try:
        save_account(store, spec.account, name=DEMO_ACCOUNT_NAME)
        token = store.create_token(DEMO_ACCOUNT, "demo")
    finally:
        store.close()
    with RunslotApi(api_url, token, DEMO_ACCOUNT) as api:
        applied = apply_jobs_file(api, spec)
        build = next(a.id for a in applied if a.kind == "job" and a.key == "build")
        first = api.trigger_run(build, "First run of the demo")
    write_private_file(token_file, token + "\n")
    return Demo(token=token, token_file=token_file, first_run_id=int(first["id"]))
