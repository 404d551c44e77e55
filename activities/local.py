"""The local executor: a workspace directory per run and each step a ``dbt`` subprocess.

Each step runs in its own process group (``start_new_session``) so a cancel, a timeout or
the memory limit kills dbt *and* its children (adapters spawn threads and sometimes
processes). On Linux dbt also dies with its worker (``PR_SET_PDEATHSIG``): a worker killed
outright (SIGKILL, OOM killer) runs no cleanup, and its dbt would otherwise go on writing
to the warehouse after the run ended in Error and its slot went to the next run. argv is
passed straight to ``exec``: there is no shell anywhere.

A workspace, ``{workspace_root}/{account}/{run}/``, holds what one run needs and nothing
that must outlive it (cleanup removes it whole)::

    project/ or repo/      a copy of project_dir, or the git checkout at the run's commit
    target/                DBT_TARGET_PATH: artifacts, stored after each step
    profiles/profiles.yml  0600; secrets appear as env_var('DBT_ENV_SECRET_NAME')
    .runslot-env.json      0600; the step environment, with resolved secret values
    .runslot-run.json      0600; where the dbt project is, and the values to mask in logs
    logs/                  dbt's own debug log

Step output goes to the artifact store while the step runs, scrubbed of secret values.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
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

from activities.artifacts import (
    ArtifactNotFoundError,
    ArtifactStore,
    LocalArtifactStore,
    LogWriter,
    StepKey,
    stream_log,
)
from activities.executor import Progress
from activities.git import GitMirrors
from activities.secrets import (
    SECRET_ENV_PREFIX,
    Redactor,
    SecretError,
    SecretResolver,
    SecretSourceError,
    resolve_config,
    worker_secrets,
)
from workflows.errors import (
    MEMORY_LIMIT_MESSAGE,
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
RUN_FILE = ".runslot-run.json"
RUN_RESULTS = "run_results.json"
# Variables a dbt subprocess inherits from the worker; everything else comes from the job.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SSL_CERT_FILE")
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# Run by the worker's Python between fork and dbt: ask Linux to SIGKILL this process when
# the thread that forked it (the worker's event loop thread) ends, then become dbt (exec
# keeps the pid, the process group and the death signal). Nobody is left to escalate from
# SIGTERM once the worker is gone, hence SIGKILL. A worker gone before prctl ran is seen
# as a changed parent pid: then dbt never starts.
DIE_WITH_WORKER = f"""\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl({PR_SET_PDEATHSIG}, signal.SIGKILL)
if os.getppid() != int(sys.argv[1]):
    sys.exit(137)
try:
    os.execv(sys.argv[2], sys.argv[2:])
except OSError as err:
    print(f"runslot: could not start {{sys.argv[2]}}: {{err}}", flush=True)
    sys.exit(127)
"""
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
    artifacts_root: Path | None = None
    """The local artifact store; defaults to ``artifacts`` next to ``workspace_root``."""
    git_cache_root: Path | None = None
    """Bare mirrors of git projects; defaults to ``git`` next to ``workspace_root``."""
    secrets_file: Path | None = None
    """A JSON or YAML mapping of secret name to value, readable only by the worker."""
    secret_env_prefix: str = SECRET_ENV_PREFIX
    """Worker environment variables ``{prefix}{NAME}`` are secrets too (and win)."""

    @property
    def data_dir(self) -> Path:
        return self.workspace_root.parent


@dataclass(frozen=True)
class RunFile:
    """What prep tells the steps of a run, kept in the workspace (0600)."""

    project: str = "project"
    """The dbt project, relative to the workspace."""
    redact: tuple[str, ...] = ()

    @classmethod
    def read(cls, workspace: Path) -> RunFile:
        path = workspace / RUN_FILE
        if not path.exists():  # prepared by a release before this file existed
            return cls()
        data = json.loads(path.read_text())
        return cls(project=data["project"], redact=tuple(data["redact"]))

    def write(self, workspace: Path) -> None:
        _write_private(
            workspace / RUN_FILE, json.dumps({"project": self.project, "redact": self.redact})
        )


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

    def __init__(
        self,
        settings: LocalExecutorSettings,
        *,
        artifacts: ArtifactStore | None = None,
        secrets: SecretResolver | None = None,
    ) -> None:
        self._settings = settings
        self._dbt = find_dbt(settings.dbt_executable)
        data_dir = settings.data_dir
        self.artifacts: ArtifactStore = artifacts or LocalArtifactStore(
            settings.artifacts_root or data_dir / "artifacts"
        )
        self._secrets = secrets or worker_secrets(settings.secrets_file, settings.secret_env_prefix)
        # git needs the worker's environment (proxy, SSH agent), minus its secrets.
        git_env = {
            k: v for k, v in os.environ.items() if not k.startswith(settings.secret_env_prefix)
        }
        self._git = GitMirrors(settings.git_cache_root or data_dir / "git", environ=git_env)

    def workspace(self, account_id: str, run_id: str) -> Path:
        return self._settings.workspace_root / account_id / run_id

    # ------------------------------------------------------------------ prepare

    async def prepare(self, request: PrepareInput) -> PreparedRun:
        try:
            prepared = await asyncio.to_thread(self._prepare_sync, request)
            if request.retry_of_run_id:
                await self._restore_run_results(request, Path(prepared.workspace))
        except BaseException:
            # The run workflow cleans up only prepared runs: a failed prep must not leave
            # a rendered profile (resolved secrets) behind.
            workspace = self.workspace(request.account_id, request.run_id)
            await asyncio.to_thread(shutil.rmtree, workspace, ignore_errors=True)
            raise
        return prepared

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
        try:
            # First: an unknown secret fails the prep before any clone or copy.
            config = resolve_config(
                env.profile, {**env.env_vars, **request.env_vars}, self._secrets
            )
        except SecretSourceError as err:
            raise prep_failed(str(err), retryable=True) from None
        except SecretError as err:
            raise prep_failed(str(err), retryable=False) from None
        workspace = self.workspace(request.account_id, request.run_id)
        if workspace.exists():
            shutil.rmtree(workspace)  # a retried prep starts clean: idempotent
        workspace.mkdir(parents=True)
        git_sha = None
        if env.git_url:
            git_sha = self._git.checkout(
                env.git_url, workspace / "repo", sha=request.git_sha, branch=request.git_branch
            )
            project = workspace / "repo" / env.subdirectory
            if not (project / "dbt_project.yml").is_file():
                where = env.subdirectory or "the repository root"
                raise prep_failed(
                    f"no dbt_project.yml in {where} at commit {git_sha}", retryable=False
                )
        else:
            project = _copy_project(env, workspace / "project")
        profile_name = _profile_name(project)
        output: dict[str, object] = {**config.profile, "threads": request.threads}
        _ensure_duckdb_dir(output)
        if request.schema_override:
            output["schema"] = request.schema_override
        profiles = {
            profile_name: {"target": request.target_name, "outputs": {request.target_name: output}}
        }
        profiles_dir = workspace / "profiles"
        profiles_dir.mkdir(parents=True, exist_ok=True)
        _write_private(profiles_dir / "profiles.yml", yaml.safe_dump(profiles))
        _write_private(workspace / ENV_FILE, json.dumps(config.env))
        RunFile(str(project.relative_to(workspace)), tuple(config.secret_values)).write(workspace)
        (workspace / "logs").mkdir(exist_ok=True)
        (workspace / "target").mkdir(exist_ok=True)
        return PreparedRun(workspace=str(workspace), dbt_version=installed, git_sha=git_sha)

    async def _restore_run_results(self, request: PrepareInput, workspace: Path) -> None:
        """Rerun from failure: the failed run's last run_results.json, for ``dbt retry``."""
        failed = request.retry_of_run_id or ""
        try:
            stored = await self.artifacts.list_run(request.account_id, failed)
            steps = [a.step for a in stored if a.name == RUN_RESULTS]
            if not steps:
                raise ArtifactNotFoundError(RUN_RESULTS)
            data = await self.artifacts.get_file(
                StepKey(request.account_id, failed, max(steps)), RUN_RESULTS
            )
        except (ArtifactNotFoundError, ValueError):
            raise prep_failed(
                f"run {failed} has no {RUN_RESULTS} in the artifact store: nothing to retry from",
                retryable=False,
            ) from None
        await asyncio.to_thread((workspace / "target" / RUN_RESULTS).write_bytes, data)

    # ------------------------------------------------------------------ steps

    async def run_step(self, request: StepInput, progress: Progress) -> StepOutcome:
        workspace = Path(request.workspace)
        key = StepKey(request.account_id, request.run_id, request.index)
        run = RunFile.read(workspace)
        argv = self._argv(request.argv)
        env = self._env(workspace)
        target = workspace / "target"
        before = _stamps(target)
        step_log = await self.artifacts.open_log(key)
        try:
            exit_code = await self._run_process(
                request,
                argv,
                cwd=workspace / run.project,
                env=env,
                step_log=step_log,
                redactor=Redactor(run.redact),
                progress=progress,
            )
        finally:
            await step_log.aclose()
        artifacts = await self._store_step_artifacts(key, target, before)
        if exit_code != 0:
            raise step_failed(
                f"{' '.join(request.argv[:3])} exited with code {exit_code}", exit_code
            )
        return StepOutcome(exit_code=exit_code, log_key=key.log_key, artifacts=artifacts)

    async def _run_process(
        self,
        request: StepInput,
        argv: list[str],
        *,
        cwd: Path,
        env: dict[str, str],
        step_log: LogWriter,
        redactor: Redactor,
        progress: Progress,
    ) -> int:
        try:
            _check_executable(argv[0])
            proc = await asyncio.create_subprocess_exec(
                *_dying_with_worker(argv),
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except (OSError, ValueError, TypeError) as err:
            # The incident of August 2023: a process that cannot start fails this run only,
            # with the reason, instead of leaving it queued forever.
            message = f"could not start {' '.join(request.argv)}: {err}"
            await step_log.write(redactor.redact(f"runslot: {message}\n".encode()))
            raise step_start_failed(message) from err
        assert proc.stdout is not None
        memory_watch = asyncio.create_task(self._watch_memory(proc.pid, request.memory_limit_mb))
        reader = asyncio.create_task(stream_log(proc.stdout, step_log, redactor, progress))
        deadline = request.timeout_seconds
        try:
            done, _ = await asyncio.wait(
                {reader, memory_watch}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED
            )
            if memory_watch in done and memory_watch.result():
                await _kill_group(proc)
                await step_log.write(f"runslot: {MEMORY_LIMIT_MESSAGE}\n".encode())
                raise memory_limit_exceeded()
            if not done:
                await _kill_group(proc)
                await step_log.write(f"runslot: step timed out after {deadline:.0f}s\n".encode())
                raise step_failed(f"step timed out after {deadline:.0f}s", None)
            if (error := reader.exception()) is not None:
                await _kill_group(proc)
                raise step_failed(f"the step's output could not be stored: {error}", None)
            return await proc.wait()
        finally:
            memory_watch.cancel()
            if proc.returncode is None:
                await _kill_group(proc)  # cancelled, or our own error: never leave dbt behind
            reader.cancel()
            await asyncio.wait({reader})  # the log is closed only after its last write

    async def _store_step_artifacts(
        self, key: StepKey, target: Path, before: dict[str, tuple[int, int, int]]
    ) -> list[str]:
        """Put the artifacts this step wrote under the step's key: a later step's cannot
        overwrite them, and a file left by an earlier step is not taken for this one's."""
        after = await asyncio.to_thread(_stamps, target)
        names = [
            name for name in ARTIFACT_FILES if name in after and after[name] != before.get(name)
        ]
        stored = []
        for name in names:
            try:
                await self.artifacts.put_file(key, name, target / name)
            except OSError as err:
                # dbt's work is done: a lost artifact is reported, it does not fail the step.
                log.warning("artifact %s of %s not stored: %s", name, key.prefix, err)
                continue
            stored.append(name)
        return stored

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
                "DBT_TARGET_PATH": str(workspace / "target"),
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
        """Artifacts are stored step by step as the run goes: this lists what the run has."""
        stored = await self.artifacts.list_run(request.account_id, request.run_id)
        return ArtifactsResult(files=[artifact.path for artifact in stored])

    async def cleanup(self, request: CleanupInput) -> None:
        workspace = Path(request.workspace)
        root = self._settings.workspace_root

        def clean() -> None:
            if not workspace.resolve().is_relative_to(root.resolve()):
                log.warning("not removing %s: outside the workspace root %s", workspace, root)
                return
            # Everything a run keeps is in the artifact store by now, and the workspace
            # holds resolved secrets (profiles, env file): none of it is left behind.
            shutil.rmtree(workspace, ignore_errors=True)

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
        workspace = Path(prepared.workspace)
        macros = workspace / RunFile.read(workspace).project / "macros"
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


def _stamps(target: Path) -> dict[str, tuple[int, int, int]]:
    """Modification stamps of the artifacts in ``target``, to tell which files a step wrote."""
    stamps = {}
    for name in ARTIFACT_FILES:
        with contextlib.suppress(FileNotFoundError):
            stat = (target / name).stat()
            stamps[name] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    return stamps


def _check_executable(path: str) -> None:
    """Raise what ``exec`` would for a missing or non-executable dbt: with the death-signal
    wrapper in front of it, exec happens in the child, too late for a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    if not os.access(path, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)


def _dying_with_worker(argv: list[str]) -> list[str]:
    """``argv`` behind the death-signal wrapper (``DIE_WITH_WORKER``), on Linux only.

    The signal follows the *thread* that forked: asyncio forks from the event loop's thread,
    which lives as long as the worker. (``preexec_fn`` could set it without the wrapper's
    ~20 ms, but is unsafe in a process with threads, as every worker is.)
    """
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-S", "-c", DIE_WITH_WORKER, str(os.getpid()), *argv]


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
