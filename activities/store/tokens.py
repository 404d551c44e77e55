"""API tokens: shown once, stored as a sha256 digest only."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from activities.store.errors import UnknownAccountError
from activities.store.schema import AccountRow, TokenRow

TOKEN_PREFIX = "rst_"  # noqa: S105 - a public marker that makes a leaked token greppable
TOUCH_INTERVAL = timedelta(minutes=1)
"""``last_used_at`` is refreshed at most this often, so authenticating is not a write per call."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def add_token(session: Session, account_id: str, name: str, *, now: datetime) -> str:
    """Store a new token's digest; returns the plaintext (its only appearance)."""
    if session.get(AccountRow, account_id) is None:
        raise UnknownAccountError(f"account {account_id!r} is not in the run store")
    # 32 random bytes: a digest without salt is enough, nothing here can be brute-forced.
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(
        TokenRow(account_id=account_id, name=name, token_hash=hash_token(token), created_at=now)
    )
    return token


def find_token(session: Session, token: str) -> tuple[int, str, datetime | None] | None:
    """(token id, account id, last used) of a token, or None."""
    found = session.execute(
        sa.select(TokenRow.id, TokenRow.account_id, TokenRow.last_used_at).where(
            TokenRow.token_hash == hash_token(token)
        )
    ).one_or_none()
    if found is None:
        return None
    token_id, account_id, last_used_at = found
    return token_id, account_id, last_used_at


def touch(session: Session, token_id: int, *, now: datetime) -> None:
    session.execute(sa.update(TokenRow).where(TokenRow.id == token_id).values(last_used_at=now))
