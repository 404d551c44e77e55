"""The local executor: a workspace directory per run and each step a ``dbt`` subprocess.

Each step runs in its own process group (``start_new_session``) so a cancel, a timeout or
the memory limit kills dbt *and* its children (adapters spawn threads and sometimes
processes). argv is passed straight to ``exec``: there is no shell anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import psutil
import yaml

from activities.executor import Progress
from workflows.errors import (
    memory_limit_exceeded,
    prep_failed,
    step_failed,
    step_start_failed,
)
from workflows.models import (
    ArtifactsInput,
    ArtifactsResult,
    CleanupInput,
    DropSchemaInput,
    Environment,
    PreparedRun,
    PrepareInput,
    StepInput,
    StepOutcome,
)

log = logging.getLogger(__name__)

ARTIFACT_FILES = ("manifest.json", "run_results.json", "catalog.json", "sources.json")
KILL_GRACE_SECONDS = 5.0
MEMORY_POLL_SECONDS = 0.25
ENV_FILE = ".runslot-env.json"
# Variables a dbt subprocess inherits from the worker; everything else comes from the job.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE")
DROP_SCHEMA_MACRO = """\
{% macro runslot_drop_schema(schema) %}
  {% set relation = api.Relation.create(database=target.database, schema=schema) %}
  {% do adapter.drop_schema(relation) %}
  {{ log("dropped schema " ~ schema, info=True) }}
{% endmacro %}
"""


@dataclass(frozen=True)
class LocalExecutorSettings:
    workspace_root: Path
    dbt_executable: str | None = None
    """Defaults to the ``dbt`` next to the worker's Python, else the one on PATH."""


def find_dbt(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit
    sibling = Path(sys.executable).parent / "dbt"
    if sibling.exists():
        return str(sibling)
    return shutil.which("dbt")


def installed_dbt_version() -> str:
    try:
        return metadata.version("dbt-core")
    except metadata.PackageNotFoundError:
        return "unknown"


class LocalExecutor:
    """Runs dbt as local subprocesses under ``workspace_root/{account}/{run}``."""

    def __init__(self, settings: LocalExecutorSettings) -> None:
        self._settings = settings
        self._dbt = find_dbt(settings.dbt_executable)

    def workspace(self, account_id: str, run_id: str) -> Path:
        return self._settings.workspace_root / account_id / run_id

    # ------------------------------------------------------------------ prepare

    async def prepare(self, request: PrepareInput) -> PreparedRun:
        return await asyncio.to_thread(self._prepare_sync, request)

    def _prepare_sync(self, request: PrepareInput) -> PreparedRun:
        env = request.environment
        installed = installed_dbt_version()
        if env.dbt_version and not _version_matches(env.dbt_version, installed):
            raise prep_failed(
                f"dbt {env.dbt_version} is not available on this worker; installed: "
                f"{installed}. Set the environment's dbt_version to {installed} or leave it "
                "empty.",
                retryable=False,
            )
        workspace = self.workspace(request.account_id, request.run_id)
        project = _copy_project(env, workspace / "project")
        profile_name = _profile_name(project)
        output: dict[str, object] = {**env.profile, "threads": request.threads}
        _ensure_duckdb_dir(output)
        if request.schema_override:
            output["schema"] = request.schema_override
        profiles = {
            profile_name: {"target": request.target_name, "outputs": {request.target_name: output}}
        }
        profiles_dir = workspace / "profiles"
        profiles_dir.mkdir(parents=True, exist_ok=True)
        _write_private(profiles_dir / "profiles.yml", yaml.safe_dump(profiles))
        step_env = {**env.env_vars, **request.env_vars}
        _write_private(workspace / ENV_FILE, json.dumps(step_env))
        (workspace / "logs").mkdir(exist_ok=True)
        return PreparedRun(workspace=str(workspace), dbt_version=installed)

    # ------------------------------------------------------------------ steps

    async def run_step(self, request: StepInput, progress: Progress) -> StepOutcome:
        workspace = Path(request.workspace)
        log_path = workspace / "logs" / f"step-{request.index}.log"
        argv = self._argv(request.argv)
        env = self._env(workspace)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=workspace / "project",
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except (OSError, ValueError, TypeError) as err:
            # The incident of August 2023: a process that cannot start fails this run only,
            # with the reason, instead of leaving it queued forever.
            raise step_start_failed(f"could not start {' '.join(request.argv)}: {err}") from err
        memory_watch = asyncio.create_task(self._watch_memory(proc.pid, request.memory_limit_mb))
        reader = asyncio.create_task(_pump(proc, log_path, progress))
        deadline = request.timeout_seconds
        try:
            done, _ = await asyncio.wait(
                {reader, memory_watch}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED
            )
            if memory_watch in done and memory_watch.result():
                await _kill_group(proc)
                raise memory_limit_exceeded()
            if not done:
                await _kill_group(proc)
                raise step_failed(f"step timed out after {deadline:.0f}s", None)
            exit_code = await proc.wait()
        finally:
            memory_watch.cancel()
            if proc.returncode is None:
                await _kill_group(proc)  # cancelled, or our own error: never leave dbt behind
            reader.cancel()
        if exit_code != 0:
            raise step_failed(
                f"{' '.join(request.argv[:3])} exited with code {exit_code}", exit_code
            )
        return StepOutcome(exit_code=exit_code, log_path=str(log_path))

    def _argv(self, argv: list[str]) -> list[str]:
        if not self._dbt:
            raise step_start_failed("no dbt executable found on this worker")
        return [self._dbt, *argv[1:]]

    @staticmethod
    def _env(workspace: Path) -> dict[str, str]:
        env = {name: os.environ[name] for name in INHERITED_ENV if name in os.environ}
        stored = json.loads((workspace / ENV_FILE).read_text())
        env.update(stored)
        env.update(
            {
                "DBT_PROFILES_DIR": str(workspace / "profiles"),
                "DBT_LOG_PATH": str(workspace / "logs" / "dbt"),
                "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
                "DBT_VERSION_CHECK": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    @staticmethod
    async def _watch_memory(pid: int, limit_mb: int | None) -> bool:
        """Return True once the process tree's resident memory exceeds ``limit_mb``."""
        if limit_mb is None:
            await asyncio.Event().wait()  # never: the reader ends the step
        limit = (limit_mb or 0) * 1024 * 1024
        while True:
            if _tree_rss(pid) > limit:
                return True
            await asyncio.sleep(MEMORY_POLL_SECONDS)

    # ------------------------------------------------------------------ after the steps

    async def collect_artifacts(self, request: ArtifactsInput) -> ArtifactsResult:
        def collect() -> ArtifactsResult:
            workspace = Path(request.workspace)
            target = workspace / "project" / "target"
            out = workspace / "artifacts"
            out.mkdir(parents=True, exist_ok=True)
            files = []
            for name in ARTIFACT_FILES:
                if (target / name).exists():
                    shutil.copy2(target / name, out / name)
                    files.append(name)
            return ArtifactsResult(files=files)

        return await asyncio.to_thread(collect)

    async def cleanup(self, request: CleanupInput) -> None:
        def clean() -> None:
            workspace = Path(request.workspace)
            shutil.rmtree(workspace / "project", ignore_errors=True)
            (workspace / ENV_FILE).unlink(missing_ok=True)
            shutil.rmtree(workspace / "profiles", ignore_errors=True)

        await asyncio.to_thread(clean)

    async def drop_schema(self, request: DropSchemaInput) -> None:
        run_id = f"drop-{request.schema_name}-{int(time.time() * 1000)}"
        prepared = await self.prepare(
            PrepareInput(
                account_id=request.account_id,
                job_id=request.job_id,
                run_id=run_id,
                environment=request.environment,
                target_name=request.environment.target_name,
                threads=1,
                schema_override=request.schema_name,
            )
        )
        macros = Path(prepared.workspace) / "project" / "macros"
        macros.mkdir(parents=True, exist_ok=True)
        (macros / "_runslot_drop_schema.sql").write_text(DROP_SCHEMA_MACRO)
        args = json.dumps({"schema": request.schema_name})
        step = StepInput(
            account_id=request.account_id,
            run_id=run_id,
            workspace=prepared.workspace,
            index=0,
            argv=["dbt", "run-operation", "runslot_drop_schema", "--args", args],
            timeout_seconds=300,
        )
        try:
            await self.run_step(step, lambda _line: None)
        finally:
            await self.cleanup(
                CleanupInput(**step.model_dump(include={"account_id", "run_id", "workspace"}))
            )


def _version_matches(wanted: str, installed: str) -> bool:
    wanted_parts = wanted.removeprefix("v").split(".")
    return installed.split(".")[: len(wanted_parts)] == wanted_parts


def _copy_project(env: Environment, dest: Path) -> Path:
    source = Path(env.project_dir) / env.subdirectory
    if not (source / "dbt_project.yml").is_file():
        raise prep_failed(f"no dbt_project.yml in {source}", retryable=False)
    if dest.exists():
        shutil.rmtree(dest)  # a retried prep starts clean: idempotent
    shutil.copytree(
        source, dest, ignore=shutil.ignore_patterns("target", "logs", "*.duckdb", ".user.yml")
    )
    return dest


def _ensure_duckdb_dir(output: dict[str, object]) -> None:
    """DuckDB creates its file but not the directory: a missing one fails every step."""
    path = output.get("path")
    local_file = isinstance(path, str) and os.path.isabs(path) and "://" not in path
    if output.get("type") == "duckdb" and local_file:
        Path(str(path)).parent.mkdir(parents=True, exist_ok=True)


def _profile_name(project: Path) -> str:
    data = yaml.safe_load((project / "dbt_project.yml").read_text()) or {}
    name = data.get("profile") or data.get("name")
    if not isinstance(name, str):
        raise prep_failed("dbt_project.yml names no profile", retryable=False)
    return name


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


async def _pump(proc: asyncio.subprocess.Process, log_path: Path, progress: Progress) -> None:
    assert proc.stdout is not None
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        while line := await proc.stdout.readline():
            out.write(line)
            out.flush()
            progress(line.decode(errors="replace").rstrip())
    await proc.wait()


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the step's process group, then SIGKILL whatever is left after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), KILL_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), KILL_GRACE_SECONDS)
