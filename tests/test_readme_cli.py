"""The README's `temporal` CLI commands, read from README.md and run against a real stack.

If the README and the workflows drift apart (a renamed handler, a changed payload), this
fails: the documented commands are the tested ones.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.store import RunStore
from starter import jobs
from tests.builders import account, job, wait_for, wait_run
from tests.conftest import running_stack, temporal_cli, unique
from tests.fakes import FakeDbtExecutor
from workflows.models import RunStatus, TriggerCause

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## Triggering, cancelling and resizing with the `temporal` CLI"


def readme_commands() -> list[list[str]]:
    """The ``temporal ...`` lines of the README section, split as a shell would."""
    text = README.read_text()
    section = text[text.index(SECTION) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "the section has no bash block"
    return [
        shlex.split(line) for line in block.group(1).splitlines() if line.startswith("temporal ")
    ]


def for_account(argv: list[str], acct: str) -> list[str]:
    """The README's example account ``1`` becomes the test's; the job stays ``daily``."""
    return [arg.replace("job:1:", f"job:{acct}:").replace("slots:1", f"slots:{acct}")
            for arg in argv]  # fmt: skip


async def test_the_readme_temporal_cli_commands_work_as_documented(
    dev_env: WorkflowEnvironment, fake_dbt: FakeDbtExecutor, run_store: RunStore
) -> None:
    client, acct = dev_env.client, unique("readme")
    trigger, signal, cancel, rerun, resize, query = (
        for_account(argv, acct) for argv in readme_commands()
    )
    # Run 1 waits at its first step, then fails at its second: run 2 queues behind it, the
    # README cancels run 2 and reruns run 1 from failure.
    steps = ["dbt run -s gate:g", "dbt run -s fail"]
    async with running_stack(client, fake_dbt, store=run_store) as queues:
        await jobs.save_job(client, job(acct, "daily", steps), account(acct), queues)
        out = await temporal_cli(client, *trigger[1:])
        assert "run_id:1 " in out, out  # the CLI prints the result as a Go map
        await wait_for(lambda: fake_dbt.running == {"1"}, what="run 1 running")
        await temporal_cli(client, *signal[1:])
        await wait_for(lambda: _queued(client, acct), what="run 2 queued behind run 1")
        await temporal_cli(client, *cancel[1:])
        fake_dbt.open("g")
        first = await wait_run(client, acct, "1")
        assert first.status == RunStatus.ERROR
        await temporal_cli(client, *rerun[1:])
        await temporal_cli(client, *resize[1:])
        described = await temporal_cli(client, *query[1:])
        assert "daily" in described
        rerun_run = await wait_run(client, acct, "3")
        assert (await jobs.describe_slots(client, acct)).capacity == 3
    assert rerun_run.status == RunStatus.SUCCESS, rerun_run.status_message
    assert fake_dbt.steps_of("3") == [["dbt", "retry"]]
    second = run_store.get_run_by_key(acct, "2")
    assert second is not None and second.status == RunStatus.CANCELLED
    assert second.cause == TriggerCause.MANUAL


async def _queued(client: Client, acct: str) -> bool:
    desc = await jobs.describe_job(client, acct, "daily")
    return [q.run_id for q in desc.state.queue] == ["2"]
