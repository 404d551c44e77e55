"""Signing: one server key, every webhook secret derived from it, none of them stored.

The server key is the secret ``RUNSLOT_SIGNING_KEY`` (``RUNSLOT_SECRET_RUNSLOT_SIGNING_KEY``
or the worker's secrets file, like any secret), else a random 32-byte file
``<data_dir>/signing.key`` created with mode 0600 on first use. Processes that must agree on
secrets (the telemetry workers that sign, the API that checks GitHub) share one of the two.

* an outgoing webhook subscription signs with ``HMAC-SHA256(key, "webhook:{id}")``;
* an account's GitHub webhook secret is ``HMAC-SHA256(key, "github:{account}")``.

The run store holds nothing secret, and replacing the server key replaces every secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import tempfile
from pathlib import Path

from activities.secrets import SecretResolver

log = logging.getLogger(__name__)

SIGNING_KEY_SECRET = "RUNSLOT_SIGNING_KEY"  # noqa: S105 - the secret's name, not its value
KEY_FILE = "signing.key"
KEY_BYTES = 32
MIN_SECRET_KEY_BYTES = 16
GITHUB_SIGNATURE_PREFIX = "sha256="


class SigningKeyError(Exception):
    """The server key is unusable (too short, or a key file of the wrong size)."""


def server_key(data_dir: Path, secrets: SecretResolver) -> bytes:
    """The server key: the ``RUNSLOT_SIGNING_KEY`` secret, else ``<data_dir>/signing.key``."""
    value = secrets.lookup(SIGNING_KEY_SECRET)
    if value is not None:
        key = value.encode()
        if len(key) < MIN_SECRET_KEY_BYTES:
            raise SigningKeyError(
                f"the secret {SIGNING_KEY_SECRET} must be at least {MIN_SECRET_KEY_BYTES} "
                "bytes long (for example 64 random hex characters)"
            )
        return key
    path = data_dir / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = _create_key_file(path)
    if len(key) != KEY_BYTES:
        raise SigningKeyError(f"{path} must hold exactly {KEY_BYTES} bytes, not {len(key)}")
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users: chmod 600 it", path)
    return key


def _create_key_file(path: Path) -> bytes:
    """Create the key file, or read the one a concurrent first use created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    key = os.urandom(KEY_BYTES)
    # Written whole to a private temporary file (mkstemp: mode 0600), then linked into place:
    # the API and a worker starting together never read a partial key, and one key wins.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".signing-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(key)
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return path.read_bytes()
    finally:
        os.unlink(tmp)
    log.info("created the signing key %s", path)
    return key


def _derive(key: bytes, purpose: str) -> str:
    return hmac.new(key, purpose.encode(), hashlib.sha256).hexdigest()


def webhook_secret(key: bytes, webhook_id: int) -> str:
    """The secret an outgoing webhook subscription's receiver checks signatures with."""
    return _derive(key, f"webhook:{webhook_id}")


def github_secret(key: bytes, account_id: str) -> str:
    """The secret to configure on the account's GitHub webhook."""
    return _derive(key, f"github:{account_id}")


def sign(secret: str, body: bytes) -> str:
    """Hex HMAC-SHA256 of ``body`` keyed by ``secret`` (dbt Cloud's ``Authorization`` header)."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_github(secret: str, body: bytes, header: str | None) -> bool:
    """Whether ``header`` (``X-Hub-Signature-256``) is ``sha256=<hex HMAC of body>``."""
    if not header:
        return False
    expected = GITHUB_SIGNATURE_PREFIX + sign(secret, body)
    return hmac.compare_digest(expected.encode(), header.strip().encode())
