"""Projects in git: cached mirrors, checkouts at the run's commit, clear errors.

A real repository is built in tmp_path (the sample project under ``analytics/``, commits on
``main`` and on ``feature``) and served as a local path, which git treats like a remote.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import ValidationError
from temporalio.exceptions import ApplicationError

from activities.git import GitMirrors, display_url
from activities.local import LocalExecutor, LocalExecutorSettings, RunFile
from workflows.models import Environment, PrepareInput

SAMPLE = Path(__file__).resolve().parent.parent / "sample" / "jaffle"
GIT = shutil.which("git") or "git"
IDENTITY = ["-c", "user.name=Runslot Tests", "-c", "user.email=tests@runslot.invalid"]


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [GIT, *IDENTITY, *args], cwd=cwd, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


@dataclass
class Origin:
    path: Path
    first: str
    main: str
    feature: str

    def commit(self, name: str, text: str) -> str:
        (self.path / name).write_text(text)
        git(self.path, "add", name)
        git(self.path, "commit", "--quiet", "-m", f"add {name}")
        return git(self.path, "rev-parse", "HEAD")


@pytest.fixture
def origin(tmp_path: Path) -> Origin:
    path = tmp_path / "origin"
    path.mkdir()
    git(path, "init", "--quiet", "--initial-branch=main")
    shutil.copytree(SAMPLE, path / "analytics", ignore=shutil.ignore_patterns("target", "logs"))
    git(path, "add", ".")
    git(path, "commit", "--quiet", "-m", "the sample project")
    first = git(path, "rev-parse", "HEAD")
    repo = Origin(path, first, "", "")
    git(path, "checkout", "--quiet", "-b", "feature")
    repo.feature = repo.commit("FEATURE.md", "only on feature\n")
    git(path, "checkout", "--quiet", "main")
    repo.main = repo.commit("MAIN.md", "only on main\n")
    return repo


@pytest.fixture
def mirrors(tmp_path: Path) -> GitMirrors:
    return GitMirrors(tmp_path / "git", timeout=60, lock_timeout=60)


def test_the_default_branch_is_checked_out_when_the_run_names_no_commit(
    origin: Origin, mirrors: GitMirrors, tmp_path: Path
) -> None:
    sha = mirrors.checkout(str(origin.path), tmp_path / "run")
    assert sha == origin.main
    assert git(tmp_path / "run", "rev-parse", "HEAD") == origin.main
    assert (tmp_path / "run" / "MAIN.md").exists()
    assert (tmp_path / "run" / "analytics" / "dbt_project.yml").exists()


def test_a_branch_is_checked_out_at_its_head(
    origin: Origin, mirrors: GitMirrors, tmp_path: Path
) -> None:
    assert mirrors.checkout(str(origin.path), tmp_path / "run", branch="feature") == origin.feature
    assert (tmp_path / "run" / "FEATURE.md").exists()
    assert not (tmp_path / "run" / "MAIN.md").exists()


def test_a_short_sha_wins_over_a_branch_and_resolves_to_the_full_commit(
    origin: Origin, mirrors: GitMirrors, tmp_path: Path
) -> None:
    sha = mirrors.checkout(
        str(origin.path), tmp_path / "run", sha=origin.first[:8], branch="feature"
    )
    assert sha == origin.first
    assert not (tmp_path / "run" / "FEATURE.md").exists()


def test_a_pull_request_commit_on_no_branch_can_be_checked_out(
    origin: Origin, mirrors: GitMirrors, tmp_path: Path
) -> None:
    # CI runs build a pull request's head, which hosts keep under refs/pull/*, not a branch.
    git(origin.path, "checkout", "--quiet", "--detach", origin.first)
    pr_head = origin.commit("PR.md", "only in the pull request\n")
    git(origin.path, "update-ref", "refs/pull/7/head", pr_head)
    git(origin.path, "checkout", "--quiet", "main")
    assert mirrors.checkout(str(origin.path), tmp_path / "run", sha=pr_head) == pr_head
    assert (tmp_path / "run" / "PR.md").exists()


def test_a_change_of_the_remotes_default_branch_is_followed(
    origin: Origin, mirrors: GitMirrors, tmp_path: Path
) -> None:
    assert mirrors.checkout(str(origin.path), tmp_path / "run1") == origin.main
    git(origin.path, "symbolic-ref", "HEAD", "refs/heads/feature")
    assert mirrors.checkout(str(origin.path), tmp_path / "run2") == origin.feature


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ({"sha": "deadbeefdeadbeef"}, "commit deadbeefdeadbeef not found in"),
        ({"branch": "no-such-branch"}, "branch 'no-such-branch' not found in"),
        ({"sha": "not-hex"}, "git sha 'not-hex' is not a commit id"),
    ],
    ids=["sha", "branch", "malformed-sha"],
)
def test_an_unknown_commit_or_branch_is_a_non_retryable_error_naming_it(
    origin: Origin, mirrors: GitMirrors, tmp_path: Path, ref: dict[str, str], message: str
) -> None:
    with pytest.raises(ApplicationError, match=message) as info:
        mirrors.checkout(str(origin.path), tmp_path / "run", **ref)
    assert info.value.non_retryable


def test_the_mirror_is_cloned_once_then_fetched_for_new_commits(
    origin: Origin, mirrors: GitMirrors, tmp_path: Path
) -> None:
    mirrors.checkout(str(origin.path), tmp_path / "run1")
    mirror = mirrors.mirror_path(str(origin.path))
    (mirror / "runslot-marker").write_text("the same mirror")
    newer = origin.commit("NEWER.md", "pushed after the first run\n")
    assert mirrors.checkout(str(origin.path), tmp_path / "run2") == newer
    assert (mirror / "runslot-marker").exists(), "fetched, not cloned again"
    assert (tmp_path / "run2" / "NEWER.md").exists()


def test_a_commit_the_mirror_has_needs_no_fetch(
    origin: Origin, mirrors: GitMirrors, tmp_path: Path
) -> None:
    mirrors.checkout(str(origin.path), tmp_path / "run1")
    gone = origin.path.rename(tmp_path / "unreachable")
    assert mirrors.checkout(str(origin.path), tmp_path / "run2", sha=origin.feature)
    with pytest.raises(ApplicationError, match=r"git fetch of .* failed") as info:
        mirrors.checkout(str(origin.path), tmp_path / "run3", branch="main")
    assert not info.value.non_retryable, "an unreachable remote is worth a retry"
    assert gone.exists()


def test_concurrent_preps_of_one_repository_share_one_sound_mirror(
    origin: Origin, mirrors: GitMirrors, tmp_path: Path
) -> None:
    refs = [{}, {"branch": "feature"}, {"sha": origin.first}, {"branch": "main"}] * 2
    with ThreadPoolExecutor(max_workers=len(refs)) as pool:
        shas = list(
            pool.map(
                lambda item: mirrors.checkout(
                    str(origin.path), tmp_path / f"run{item[0]}", **item[1]
                ),
                enumerate(refs),
            )
        )
    expected = [origin.main, origin.feature, origin.first, origin.main] * 2
    assert shas == expected
    mirror = mirrors.mirror_path(str(origin.path))
    git(mirror, "fsck", "--no-progress")
    assert [p.name for p in mirrors.root.iterdir() if p.suffix == ".git"] == [mirror.name]


def test_credentials_never_appear_in_git_errors(mirrors: GitMirrors, tmp_path: Path) -> None:
    assert display_url("https://user:tok3n@example.com/r.git") == "https://***@example.com/r.git"
    url = "http://runslot:tok3n-value@127.0.0.1:9/repo.git"  # port 9: refused at once
    with pytest.raises(ApplicationError) as info:
        mirrors.checkout(url, tmp_path / "run")
    assert "tok3n-value" not in info.value.message
    assert "http://***@127.0.0.1:9/repo.git" in info.value.message


# --------------------------------------------------------------------------- prep


def _prepare(origin: Origin, tmp_path: Path, subdirectory: str, **ref: str) -> PrepareInput:
    return PrepareInput(
        account_id="acme",
        job_id="j",
        run_id="r1",
        environment=Environment(
            git_url=str(origin.path),
            subdirectory=subdirectory,
            profile={"type": "duckdb", "path": str(tmp_path / "wh.duckdb")},
        ),
        target_name="default",
        threads=1,
        **ref,
    )


async def test_a_git_project_is_prepared_at_the_resolved_commit(
    origin: Origin, tmp_path: Path
) -> None:
    executor = LocalExecutor(LocalExecutorSettings(workspace_root=tmp_path / "data" / "ws"))
    prepared = await executor.prepare(_prepare(origin, tmp_path, "analytics", git_branch="feature"))
    assert prepared.git_sha == origin.feature
    workspace = Path(prepared.workspace)
    assert RunFile.read(workspace).project == "repo/analytics"
    assert (workspace / "repo" / "analytics" / "dbt_project.yml").exists()
    assert (workspace / "profiles" / "profiles.yml").exists()
    assert (tmp_path / "data" / "git").is_dir(), "mirrors live in the executor's data dir"


async def test_a_subdirectory_without_a_dbt_project_is_a_clear_prep_error(
    origin: Origin, tmp_path: Path
) -> None:
    executor = LocalExecutor(LocalExecutorSettings(workspace_root=tmp_path / "ws"))
    message = r"no dbt_project\.yml in the repository root"
    with pytest.raises(ApplicationError, match=message) as info:
        await executor.prepare(_prepare(origin, tmp_path, ""))
    assert info.value.non_retryable
    assert origin.main in info.value.message


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "set project_dir .* or git_url"),
        ({"project_dir": "/p", "git_url": "https://x/r.git"}, "not both"),
        ({"git_url": "--upload-pack=evil"}, "must be a repository URL or path"),
    ],
    ids=["neither", "both", "option"],
)
def test_an_environment_names_exactly_one_project_source(
    fields: dict[str, str], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Environment.model_validate(fields)
