"""Projects in git: a cached bare mirror per repository, one checkout per run.

The first prep of a repository clones it once with ``git clone --mirror``; later preps
``git fetch --prune`` it, and skip even that when the run asks for a commit the mirror
already has. A run's checkout is a local clone of the mirror (objects are hard-linked, so
it costs little and, unlike ``--shared``, a later ``fetch --prune`` and gc in the mirror
cannot pull objects out from under a running step) at the resolved commit.

Everything that touches a mirror holds its file lock, so concurrent preps of one
repository (threads or worker processes on the host) never interleave git commands on it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from workflows.errors import prep_failed

GIT_TIMEOUT_SECONDS = 600.0
LOCK_TIMEOUT_SECONDS = 900.0
LOCK_POLL_SECONDS = 0.1
_SHA = re.compile(r"^[0-9a-fA-F]{4,40}$")
_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def display_url(url: str) -> str:
    """The URL without credentials, fit for messages and logs."""
    return _CREDENTIALS.sub("***@", url)


class GitMirrors:
    """Bare mirrors of repositories under ``root``; checks out runs' commits from them."""

    def __init__(
        self,
        root: Path,
        *,
        timeout: float = GIT_TIMEOUT_SECONDS,
        lock_timeout: float = LOCK_TIMEOUT_SECONDS,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.root = root
        self._git_path = shutil.which("git")
        self._timeout = timeout
        self._lock_timeout = lock_timeout
        base = dict(os.environ if environ is None else environ)
        # A worker has nobody to type a password: fail at once instead of hanging.
        base.update({"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": ""})
        self._env = base

    def mirror_path(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode()).hexdigest()[:16]
        tail = re.sub(r"[^A-Za-z0-9_.-]", "_", url.rstrip("/").rsplit("/", 1)[-1])
        return self.root / f"{tail.removesuffix('.git')[:40]}-{digest}.git"

    def checkout(
        self, url: str, dest: Path, *, sha: str | None = None, branch: str | None = None
    ) -> str:
        """Materialise ``sha``, else ``branch``, else the default branch, at ``dest``.

        Returns the full commit sha. ``dest`` is replaced if it exists (a retried prep).
        """
        if sha is not None and not _SHA.match(sha):
            raise prep_failed(
                f"git sha {sha!r} is not a commit id (4 to 40 hex digits)", retryable=False
            )
        mirror = self.mirror_path(url)
        with self._locked(mirror):
            fetched = self._ensure_mirror(url, mirror)
            resolved = self._resolve(url, mirror, sha=sha, branch=branch, fetched=fetched)
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            # A local clone hard-links the mirror's objects: once it exists, it no longer
            # needs the mirror, so the checkout below runs outside the lock.
            self._git(["clone", "--quiet", "--no-checkout", "--", str(mirror), str(dest)], url)
        checkout = ["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach"]
        self._git([*checkout, resolved], url, cwd=dest)
        return resolved

    # ------------------------------------------------------------------ mirror

    def _ensure_mirror(self, url: str, mirror: Path) -> bool:
        """Create the mirror if it is missing. True if it was just cloned (so is fresh)."""
        if (mirror / "HEAD").exists():
            return False
        tmp = mirror.with_name(mirror.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)  # left by a prep that died mid-clone
        try:
            self._git(["clone", "--quiet", "--mirror", "--", url, str(tmp)], url)
            tmp.rename(mirror)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    def _fetch(self, url: str, mirror: Path) -> None:
        self._git(["fetch", "--quiet", "--prune", "origin"], url, cwd=mirror)

    def _resolve(
        self, url: str, mirror: Path, *, sha: str | None, branch: str | None, fetched: bool
    ) -> str:
        shown = display_url(url)
        if sha is not None:
            found = self._commit(mirror, sha)
            if found is None and not fetched:
                self._fetch(url, mirror)
                found = self._commit(mirror, sha)
            if found is None:
                raise prep_failed(f"commit {sha} not found in {shown}", retryable=False)
            return found
        if not fetched:
            self._fetch(url, mirror)
        if branch is None:
            if not fetched:
                self._follow_default_branch(url, mirror)
            head = self._output(["symbolic-ref", "--quiet", "HEAD"], url, cwd=mirror, check=False)
            branch = head.removeprefix("refs/heads/") if head else None
            if not branch:
                raise prep_failed(f"{shown} has no default branch", retryable=False)
        found = self._commit(mirror, f"refs/heads/{branch}")
        if found is None:
            raise prep_failed(f"branch {branch!r} not found in {shown}", retryable=False)
        return found

    def _follow_default_branch(self, url: str, mirror: Path) -> None:
        # A mirror's HEAD is set once, at clone time; the remote's default branch can change.
        out = self._output(["ls-remote", "--symref", "origin", "HEAD"], url, cwd=mirror)
        for line in out.splitlines():
            ref, _, name = line.partition("\t")
            if name == "HEAD" and ref.startswith("ref: refs/heads/"):
                self._git(["symbolic-ref", "HEAD", ref.removeprefix("ref: ")], url, cwd=mirror)

    def _commit(self, mirror: Path, rev: str) -> str | None:
        out = self._output(
            ["rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"],
            "",
            cwd=mirror,
            check=False,
        )
        return out or None

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _locked(self, mirror: Path) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        lock_path = mirror.with_name(mirror.name + ".lock")
        deadline = time.monotonic() + self._lock_timeout
        with lock_path.open("a") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise prep_failed(
                            f"timed out waiting for the git mirror lock {lock_path}",
                            retryable=True,
                        ) from None
                    time.sleep(LOCK_POLL_SECONDS)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _git(self, args: list[str], url: str, *, cwd: Path | None = None) -> None:
        self._output(args, url, cwd=cwd)

    def _output(
        self,
        args: list[str],
        url: str,
        *,
        cwd: Path | None = None,
        check: bool = True,
    ) -> str:
        if self._git_path is None:
            raise prep_failed("git is not installed on this worker", retryable=False)
        argv = [self._git_path, "-c", "protocol.ext.allow=never", *args]
        verb = next((arg for arg in args if arg[:1] != "-" and "=" not in arg), "command")
        try:
            done = subprocess.run(
                argv,
                cwd=cwd,
                env=self._env,
                capture_output=True,
                text=True,
                timeout=self._timeout,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise prep_failed(
                f"git {verb} of {display_url(url)} timed out after {self._timeout:.0f}s",
                retryable=True,
            ) from None
        except OSError as err:
            raise prep_failed(f"cannot run git: {err.strerror}", retryable=False) from None
        if check and done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            detail = display_url(lines[-1]) if lines else f"exit {done.returncode}"
            raise prep_failed(
                f"git {verb} of {display_url(url)} failed: {detail}",
                # Network and server trouble pass: worth the prep's few bounded retries.
                retryable=True,
            )
        return done.stdout.strip() if done.returncode == 0 else ""
