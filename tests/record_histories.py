"""Record workflow histories from real runs for the replay test.

    .venv/bin/python -m tests.record_histories

Starts a dev server, drives a few scenarios through real workers (fake dbt executor, a
real HTTP webhook receiver), and writes each job, run, slots and webhooks workflow history to
tests/histories/. Re-record when a change is *meant* to be incompatible (and then patch or
version the workflow instead).
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from starter import jobs
from tests.builders import account, job, wait_for, wait_run
from tests.conftest import DEV_SERVER_ARGS, find_binary, new_store, running_stack
from tests.fakes import FakeDbtExecutor
from tests.webhook_helpers import FAST_WEBHOOKS, Receiver
from worker.main import exit_without_finalizing
from workflows import constants as c
from workflows.models import (
    CompletionTrigger,
    JobTriggers,
    JobType,
    PullRequestClosed,
    TriggerCause,
    TriggerRequest,
)

OUT = Path(__file__).parent / "histories"


async def _save(client: Client, workflow_id: str, name: str) -> None:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    (OUT / f"{name}.json").write_text(json.dumps(json.loads(history.to_json()), indent=1))


async def main() -> None:
    OUT.mkdir(exist_ok=True)
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=find_binary("temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=list(c.SEARCH_ATTRIBUTES),
        dev_server_extra_args=DEV_SERVER_ARGS,
    )
    client, fake, acct = env.client, FakeDbtExecutor(), "rec"
    scratch = tempfile.TemporaryDirectory(prefix="runslot-rec-")
    store = new_store(Path(scratch.name))
    receiver = Receiver(scripts={"flaky": [500]})  # the first delivery is retried once
    async with (
        receiver.running() as url,
        running_stack(client, fake, store=store, webhooks=FAST_WEBHOOKS) as queues,
    ):
        settings = account(acct, run_slots=1)
        # Serial runs, over-scheduling, a failure, a cancel, a completion trigger.
        await jobs.save_job(client, job(acct, "deploy", ["dbt run -s gate:g"]), settings, queues)
        chained = JobTriggers(on_job_completion=[CompletionTrigger(job_id="deploy")])
        await jobs.save_job(client, job(acct, "after", triggers=chained), settings, queues)
        first = await jobs.trigger(client, acct, "deploy", TriggerRequest())
        await wait_for(lambda: fake.running == {first.run_id})
        sched = TriggerRequest(cause=TriggerCause.SCHEDULED)
        await jobs.trigger(client, acct, "deploy", sched)
        kept = await jobs.trigger(client, acct, "deploy", sched)
        cancelled = await jobs.trigger(client, acct, "deploy", TriggerRequest())
        await jobs.cancel_run(client, acct, "deploy", cancelled.run_id)
        fake.open("g")
        await wait_run(client, acct, first.run_id)
        await wait_run(client, acct, kept.run_id)
        await jobs.save_job(client, job(acct, "deploy", ["dbt run -s fail"]), settings, queues)
        failed = await jobs.trigger(client, acct, "deploy", TriggerRequest())
        await wait_run(client, acct, failed.run_id)
        # Rerun from failure: planned from the run store, `dbt retry` in place of the step.
        rerun = await jobs.trigger(client, acct, "deploy", TriggerRequest(rerun_of=failed.run_id))
        await wait_run(client, acct, rerun.run_id)
        # CI: concurrent, superseded by a new commit, schema dropped on close.
        await jobs.save_job(
            client, job(acct, "ci", ["dbt build -s gate:ci"], job_type=JobType.CI), settings, queues
        )
        pr = TriggerRequest(cause=TriggerCause.PULL_REQUEST, pr_id=7)
        old = await jobs.trigger(client, acct, "ci", pr)
        await wait_for(lambda: old.run_id in fake.running)
        new = await jobs.trigger(client, acct, "ci", pr)
        fake.open("ci")
        await wait_run(client, acct, old.run_id)
        await wait_run(client, acct, new.run_id)
        await jobs.job_handle(client, acct, "ci").signal(
            c.SIGNAL_PR_CLOSED, PullRequestClosed(pr_id=7)
        )
        await wait_for(lambda: fake.dropped_schemas)
        # Deactivation after consecutive failures, then Run now reactivates. Its runs' ends
        # go to a webhook subscription (completed + errored), the first one retried.
        flaky = job(acct, "flaky", ["dbt run -s fail"], deactivate_after_failures=2)
        await jobs.save_job(client, flaky, settings, queues)
        stored_flaky = store.get_job_by_key(acct, "flaky")
        assert stored_flaky is not None
        store.create_webhook(
            acct,
            name="flaky",
            url=f"{url}/flaky",
            event_types=[c.EVENT_RUN_COMPLETED, c.EVENT_RUN_ERRORED],
            job_ids=[stored_flaky.id],
        )
        for _ in range(2):
            res = await jobs.trigger(client, acct, "flaky", TriggerRequest())
            await wait_run(client, acct, res.run_id)
        manual = await jobs.trigger(
            client, acct, "flaky", TriggerRequest(cause=TriggerCause.MANUAL)
        )
        await wait_run(client, acct, manual.run_id)
        after = await wait_for(lambda: _recent(client, acct, "after"))
        await wait_run(client, acct, after[0])
        for job_id in ("deploy", "after", "ci", "flaky"):
            await _save(client, c.job_workflow_id(acct, job_id), f"job-{job_id}")
        runs = {
            "run-success": first.run_id,
            "run-error": failed.run_id,
            "run-rerun": rerun.run_id,
            "run-ci-superseded": old.run_id,
            "run-ci": new.run_id,
            # Triggered by deploy's end while deploy's next run held the one slot: queued,
            # granted by signal (the others were granted in the answer to their request).
            "run-after": after[0],
        }
        for name, run_id in runs.items():
            await _save(client, c.run_workflow_id(acct, run_id), name)
        await _save(client, c.slots_workflow_id(acct), "slots")
        # The webhooks workflow ends once idle: its whole life, retry included.
        await wait_for(lambda: len(receiver.at("flaky")) >= 7, what="six events, one retried")
        await client.get_workflow_handle(c.webhooks_workflow_id(acct)).result()
        await _save(client, c.webhooks_workflow_id(acct), "webhooks")
    store.close()
    scratch.cleanup()
    await env.shutdown()


async def _recent(client: Client, acct: str, job_id: str) -> list[str]:
    return [r.run_id for r in (await jobs.describe_job(client, acct, job_id)).state.recent]


if __name__ == "__main__":
    exit_without_finalizing(lambda: asyncio.run(main()))
