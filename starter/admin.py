"""Admin writes to the run store that the CLI and ``runslot dev``'s demo share.

Accounts and tokens are created here, on the store itself, never through the API: the API
authenticates with tokens, so it cannot be what makes the first one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from activities.store import RunStore
from workflows.models import AccountSettings


def save_account(store: RunStore, settings: AccountSettings, name: str | None = None) -> None:
    """Upsert an account's limits, and its display name when given."""
    store.upsert_account(settings, name=name)


def write_private_file(path: Path, content: str) -> None:
    """Write ``content`` readable by its owner only (0600), whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600, so the secret is never readable by others, even briefly.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(content)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
