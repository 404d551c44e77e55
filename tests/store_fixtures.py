"""Helpers for the run store tests: a throwaway PostgreSQL cluster, frozen column snapshots
of every migration revision, and payload builders.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from workflows.models import (
    Environment,
    JobDefinition,
    RecordRunInput,
    RunResult,
    RunStatus,
    StepResult,
    TriggerCause,
)

POSTGRES_URL_ENV = "RUNSLOT_TEST_POSTGRES_URL"

# --------------------------------------------------------------------------- expand/contract

REVISION_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "0001": {
        "accounts": (
            "id", "name", "run_slots", "run_memory_limit_mb", "max_queue_wait_seconds",
            "settings", "created_at", "updated_at",
        ),
        "jobs": (
            "id", "account_id", "key", "name", "job_type", "definition", "extra", "deactivated",
            "state", "created_at", "updated_at",
        ),
        "runs": (
            "id", "account_id", "job_id", "key", "request_key", "status", "status_message",
            "cause", "cause_text", "trigger", "created_at", "updated_at", "dequeued_at",
            "started_at", "finished_at", "git_sha", "git_branch", "schema_name", "dbt_version",
            "artifacts", "updated_seq",
        ),
        "run_steps": (
            "run_id", "index", "name", "argv", "status", "started_at", "finished_at",
            "exit_code", "message", "log_key",
        ),
        "tokens": ("id", "account_id", "name", "token_hash", "created_at", "last_used_at"),
    },
}  # fmt: skip
REVISION_COLUMNS["0002"] = {
    **REVISION_COLUMNS["0001"],
    "environments": (
        "id", "account_id", "project_id", "name", "definition", "state", "created_at",
        "updated_at",
    ),
    "webhooks": (
        "id", "account_id", "name", "url", "event_types", "job_ids", "active", "created_at",
        "updated_at",
    ),
    "webhook_deliveries": (
        "id", "webhook_id", "account_id", "event_id", "event_type", "run_id", "attempts",
        "status_code", "error", "succeeded", "created_at", "updated_at",
    ),
}  # fmt: skip
"""The columns each release reads, frozen per migration revision.

When a revision is added, freeze a copy of its columns here (never edit an older entry):
the tests then check that every earlier release's reads still work on the migrated schema,
and that columns it does not know can be left out of its inserts."""


# --------------------------------------------------------------------------- payloads

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def job_definition(
    key: str = "daily", account_id: str = "acme", name: str = "Daily"
) -> JobDefinition:
    return JobDefinition(
        account_id=account_id,
        job_id=key,
        name=name,
        environment=Environment(project_dir="sample/jaffle"),
        execute_steps=["dbt seed", "dbt run"],
    )


def snapshot(
    run_key: str,
    status: RunStatus,
    *,
    seq: int = 0,
    job_key: str = "daily",
    account_id: str = "acme",
    steps: int = 0,
    message: str = "",
    created_at: datetime = T0,
) -> RecordRunInput:
    """A run snapshot as the run workflow would record it, with ``steps`` steps so far."""
    started = created_at + timedelta(seconds=5) if status >= RunStatus.RUNNING else None
    finished = created_at + timedelta(minutes=1) if status.is_finished else None
    return RecordRunInput(
        run=RunResult(
            run_id=run_key,
            account_id=account_id,
            job_id=job_key,
            status=status,
            status_message=message,
            cause=TriggerCause.API,
            created_at=created_at,
            dequeued_at=created_at + timedelta(seconds=1) if status >= RunStatus.STARTING else None,
            started_at=started,
            finished_at=finished,
            steps=[
                StepResult(
                    index=i,
                    name=f"Invoke dbt with `dbt step{i}`",
                    argv=["dbt", "run", "-s", f"step{i}"],
                    status=RunStatus.SUCCESS if i < steps or finished else RunStatus.RUNNING,
                    started_at=created_at + timedelta(seconds=5 + i),
                )
                for i in range(1, steps + 1)
            ],
        ),
        seq=seq,
    )


# --------------------------------------------------------------------------- PostgreSQL


def find_initdb() -> Path | None:
    """Debian's newest ``initdb`` (/usr/lib/postgresql/<version>/bin/initdb), if installed."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


FREE_PORTS = range(20000, 32000)
"""Below Linux's ephemeral range (32768-60999): a port the OS hands out for port 0 may be
handed out again to an outgoing connection before our server binds it; these are not."""


def free_port() -> int:
    """A port nothing listens on now, for a server a test starts in another process."""
    rng = random.SystemRandom()
    for _ in range(100):
        port = rng.choice(FREE_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {FREE_PORTS}")


@contextmanager
def throwaway_cluster(initdb: Path) -> Iterator[str]:
    """A PostgreSQL cluster in a temporary directory on 127.0.0.1; yields a database URL.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user.
    fsync is off: the cluster lives for one test session.
    """
    bindir = initdb.parent
    # As root the cluster runs as `postgres`, which must reach it: /tmp, not a private TMPDIR.
    root = Path(tempfile.mkdtemp(prefix="runslot-pg-", dir="/tmp" if os.geteuid() == 0 else None))
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    port = free_port()

    def run(*argv: str | Path) -> None:
        subprocess.run(
            [*run_as, *(str(a) for a in argv)], cwd=root, check=True, capture_output=True
        )

    started = False
    try:
        run(bindir / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--no-sync")  # fmt: skip
        options = (
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-o", options,
            "-w", "-t", "60", "start")  # fmt: skip
        started = True
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
            "runslot_test")  # fmt: skip
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/runslot_test"
    except subprocess.CalledProcessError as err:
        log = root / "server.log"
        detail = log.read_text() if log.exists() else ""
        raise RuntimeError(
            f"{err.cmd} failed: {err.stderr.decode(errors='replace')}\n{detail}"
        ) from err
    finally:
        if started:
            subprocess.run(
                [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                 "stop"], cwd=root, check=False, capture_output=True,
            )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
