"""The server key and the secrets derived from it: nothing secret is stored but one key."""

from __future__ import annotations

import hashlib
import hmac
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from activities.secrets import EnvSecrets
from activities.signing import (
    KEY_FILE,
    SigningKeyError,
    github_secret,
    server_key,
    sign,
    verify_github,
    webhook_secret,
)

NO_SECRETS = EnvSecrets(environ={})


def test_the_key_file_is_created_once_private_and_reused(tmp_path: Path) -> None:
    key = server_key(tmp_path / "data", NO_SECRETS)
    path = tmp_path / "data" / KEY_FILE
    assert len(key) == 32 and path.read_bytes() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert server_key(tmp_path / "data", NO_SECRETS) == key
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE], "no temporary file left"


def test_processes_creating_the_key_together_agree_on_one(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(lambda _: server_key(tmp_path, NO_SECRETS), range(16)))
    assert keys == {(tmp_path / KEY_FILE).read_bytes()}


def test_the_signing_key_secret_wins_over_the_file_and_must_be_long_enough(
    tmp_path: Path,
) -> None:
    secrets = EnvSecrets(environ={"RUNSLOT_SECRET_RUNSLOT_SIGNING_KEY": "k" * 40})
    assert server_key(tmp_path, secrets) == b"k" * 40
    assert not (tmp_path / KEY_FILE).exists()
    with pytest.raises(SigningKeyError, match="at least 16 bytes"):
        server_key(tmp_path, EnvSecrets(environ={"RUNSLOT_SECRET_RUNSLOT_SIGNING_KEY": "short"}))
    (tmp_path / KEY_FILE).write_bytes(b"truncated")
    with pytest.raises(SigningKeyError, match="exactly 32 bytes"):
        server_key(tmp_path, NO_SECRETS)


def test_secrets_differ_per_subscription_and_account_and_sign_like_dbt_cloud() -> None:
    key = bytes(32)
    secrets = {webhook_secret(key, 1), webhook_secret(key, 2), github_secret(key, "1")}
    assert len(secrets) == 3
    assert webhook_secret(key, 1) != webhook_secret(bytes([1]) * 32, 1)
    # dbt Cloud's documented check: hmac.new(secret.encode(), body, sha256).hexdigest()
    secret, body = webhook_secret(key, 1), b'{"eventType":"job.run.started"}'
    assert sign(secret, body) == hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def test_a_github_signature_is_checked_on_the_exact_body() -> None:
    secret, body = github_secret(bytes(32), "acme"), b'{"action":"opened"}'
    good = "sha256=" + sign(secret, body)
    assert verify_github(secret, body, good)
    assert not verify_github(secret, body + b" ", good)
    for bad in (None, "", sign(secret, body), "sha1=" + sign(secret, body), good[:-1], "sha256=é"):
        assert not verify_github(secret, body, bad)
