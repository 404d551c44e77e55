"""Run the real dbt Cloud client tools (``dbt-cloud-cli``, ``dbt-jobs-as-code``) against
Runslot's API, as a user would: subprocesses from their own venv, configured only through
the environment variables their docs name.

The clients live in ``.venv-clients`` (``scripts/client-venv``), never in ``.venv``: their pins
would fight the project's, and importing them in-process would test a library call, not the
tool. They run with ``asyncio`` subprocesses because the API under test may serve from the
test's own event loop (in-process workers, an in-process server): a blocking
``subprocess.run`` there would deadlock the client against the server it is waiting for.

dbt-cloud-cli hard-codes ``https://`` with no switch to turn verification off, so the API's
HTTPS listener uses a throwaway certificate from :func:`make_cert` and the clients trust it
through ``REQUESTS_CA_BUNDLE`` and ``SSL_CERT_FILE``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT_VENV_SCRIPT = ROOT / "scripts" / "client-venv"

VENV_TIMEOUT = 900.0
"""A fresh venv takes about 15 s here (PyPI downloads included); this bounds a stuck index."""
CLIENT_TIMEOUT = 120.0
"""One client command that makes a handful of HTTP calls; a run with ``--wait`` passes more."""


class ApiServer(Protocol):
    """What the ``api_server`` fixture yields: Runslot's API on 127.0.0.1, seeded with one
    account, project and environment whose runs really execute ``sample/jaffle``."""

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``: the plain HTTP listener."""
        ...

    @property
    def https_url(self) -> str:
        """``https://127.0.0.1:PORT2``: the same API over TLS with :func:`make_cert`'s pair."""
        ...

    @property
    def account_id(self) -> str:
        """The account's id as the URL spells it: digits, e.g. ``"1"``."""
        ...

    @property
    def token(self) -> str: ...

    @property
    def project_id(self) -> int: ...

    @property
    def environment_id(self) -> int: ...

    @property
    def cert_path(self) -> Path:
        """The certificate served on ``https_url``; the clients trust it as their CA bundle."""
        ...


@dataclass(frozen=True)
class ClientResult:
    """How one client command ended, with all it printed (for the assertion message too)."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        """stdout parsed as JSON; a failure message shows the whole result, not just the
        decode error, because the interesting part is usually on stderr."""
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"stdout is not JSON ({exc})\n{self}") from exc

    def __str__(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\n"
            f"exit code {self.returncode}\n"
            f"--- stdout\n{_tail(self.stdout)}\n"
            f"--- stderr\n{_tail(self.stderr)}"
        )


def _tail(text: str, lines: int = 80) -> str:
    kept = text.splitlines()[-lines:]
    return "\n".join(kept)


# --------------------------------------------------------------------------- the venv


async def ensure_client_venv(timeout: float = VENV_TIMEOUT) -> Path:
    """The clients' venv, created or refreshed by ``scripts/client-venv``.

    Never skips: a venv that cannot be built (no Python 3.11/3.12, PyPI unreachable, a pin
    that no longer installs) fails the test with the script's output as the reason.
    """
    bash = shutil.which("bash")
    if bash is None:
        pytest.fail("bash not found: scripts/client-venv needs it", pytrace=False)
    argv = (bash, str(CLIENT_VENV_SCRIPT))
    result = await run_process(argv, env=dict(os.environ), cwd=ROOT, timeout=timeout)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        pytest.fail(f"scripts/client-venv could not build the client venv\n{result}", pytrace=False)
    venv = Path(lines[-1])
    for tool in ("dbt-cloud", "dbt-jobs-as-code"):
        if not (venv / "bin" / tool).exists():
            pytest.fail(f"{tool} missing from {venv}\n{result}", pytrace=False)
    return venv


# --------------------------------------------------------------------------- TLS


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate and its key, in ``directory``, for 127.0.0.1.

    The SAN names ``IP:127.0.0.1`` and ``DNS:localhost``: clients check the SAN, not the CN.
    The certificate is its own CA (``CA:TRUE`` with ``keyCertSign``) so that a client can
    trust it as its whole CA bundle, and it carries the key usages that strict X.509
    verification (Python 3.13's default) insists on. Made with the ``openssl`` CLI, so the
    harness needs no Python package for it.

    Returns:
        ``(cert_path, key_path)``, both PEM; the key is unencrypted.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl not found: it makes the test certificate", pytrace=False)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    argv = [
        openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7",
        "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
        "-addext", "extendedKeyUsage=serverAuth",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        pytest.fail(f"openssl could not make the test certificate:\n{done.stderr}", pytrace=False)
    return cert, key


# --------------------------------------------------------------------------- processes


async def run_process(
    argv: tuple[str, ...], *, env: Mapping[str, str], cwd: Path, timeout: float
) -> ClientResult:
    """Run ``argv`` to completion without blocking the event loop; on timeout kill it and
    fail the test with what it had printed so far."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
    )
    assert proc.stdout is not None and proc.stderr is not None
    # Read into our own buffers so that a timeout still shows the partial output.
    out: list[bytes] = []
    err: list[bytes] = []
    readers = asyncio.gather(_drain(proc.stdout, out), _drain(proc.stderr, err))
    try:
        async with asyncio.timeout(timeout):
            await readers
            returncode = await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        partial = ClientResult(argv, -9, _decode(out), _decode(err))
        pytest.fail(f"timed out after {timeout:.0f} s and was killed\n{partial}", pytrace=False)
    return ClientResult(argv, returncode, _decode(out), _decode(err))


async def _drain(stream: asyncio.StreamReader, sink: list[bytes]) -> None:
    while chunk := await stream.read(65536):
        sink.append(chunk)


def _decode(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode("utf-8", errors="replace")


def client_base_env(venv: Path, home: Path) -> dict[str, str]:
    """A small, explicit environment for a client process.

    Built from scratch rather than copied from the test process: CI and developer shells set
    ``REQUESTS_CA_BUNDLE``, ``SSL_CERT_DIR``, proxies or ``DBT_*`` variables that would
    silently change which server and which CA a client uses.
    """
    return {
        "PATH": os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", os.defpath)]),
        "HOME": os.environ.get("HOME", str(home)),
        "TMPDIR": os.environ.get("TMPDIR", "/tmp"),
        # dbt-jobs-as-code logs emoji; never let a C locale turn that into a crash.
        "LANG": "C.UTF-8",
        "PYTHONUTF8": "1",
        "PYTHONIOENCODING": "utf-8",
        # requests would send 127.0.0.1 traffic to a proxy named in the environment.
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        # rich and loguru: plain text in failure messages.
        "NO_COLOR": "1",
        "TERM": "dumb",
        "COLUMNS": "200",
    }


def _trust(env: dict[str, str], cert_path: Path) -> dict[str, str]:
    # requests reads REQUESTS_CA_BUNDLE; aiohttp and the ssl module's defaults read SSL_CERT_FILE.
    return {**env, "REQUESTS_CA_BUNDLE": str(cert_path), "SSL_CERT_FILE": str(cert_path)}


class _Tool:
    """One client executable from the venv with its environment; calling it runs a command."""

    def __init__(self, venv: Path, name: str, workdir: Path, env: dict[str, str]) -> None:
        self.program = str(venv / "bin" / name)
        self.workdir = workdir
        self.env = env

    async def __call__(
        self, *args: str, timeout: float = CLIENT_TIMEOUT, env: Mapping[str, str] | None = None
    ) -> ClientResult:
        """Run the tool with ``args``; ``env`` overrides variables (a wrong token, say)."""
        argv = (self.program, *args)
        merged = {**self.env, **(env or {})}
        return await run_process(argv, env=merged, cwd=self.workdir, timeout=timeout)


class DbtCloudCli(_Tool):
    """``dbt-cloud`` (dbt-cloud-cli) pointed at the API's HTTPS listener.

    The tool reads ``DBT_CLOUD_HOST`` (host:port, it adds ``https://`` itself),
    ``DBT_CLOUD_API_TOKEN`` and ``DBT_CLOUD_ACCOUNT_ID``.
    """

    def __init__(self, venv: Path, server: ApiServer, workdir: Path) -> None:
        env = _trust(client_base_env(venv, workdir), Path(server.cert_path))
        env |= {
            "DBT_CLOUD_HOST": urlsplit(server.https_url).netloc,
            "DBT_CLOUD_API_TOKEN": server.token,
            "DBT_CLOUD_ACCOUNT_ID": str(server.account_id),
            "LOG_LEVEL": "INFO",
        }
        super().__init__(venv, "dbt-cloud", workdir, env)


class JobsAsCode(_Tool):
    """``dbt-jobs-as-code`` pointed at the API, over plain HTTP unless ``https`` is set.

    The tool reads ``DBT_API_KEY`` and ``DBT_BASE_URL`` (scheme, host and port); it is the one
    client that needs no TLS. The account comes from the YAML or ``--account-id``.
    """

    def __init__(
        self, venv: Path, server: ApiServer, workdir: Path, *, https: bool = False
    ) -> None:
        env = _trust(client_base_env(venv, workdir), Path(server.cert_path))
        env |= {
            "DBT_API_KEY": server.token,
            "DBT_BASE_URL": server.https_url if https else server.base_url,
        }
        super().__init__(venv, "dbt-jobs-as-code", workdir, env)
