"""Who is calling: an API token authenticates as one account.

dbt Cloud accepts ``Authorization: Token <t>`` (dbt-cloud-cli) and ``Authorization: Bearer
<t>`` (dbt-jobs-as-code) alike. A missing or unknown token is a 401; an account in the path
that is not the token's is a 404, so a token never learns which other accounts exist.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import Depends, Request

from api.context import ApiContext, get_context
from api.envelope import ApiError

SCHEMES = ("token", "bearer")


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Token|Bearer <t>`` header, or None."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() not in SCHEMES or not token:
        return None
    return token


async def token_account(request: Request, ctx: Annotated[ApiContext, Depends(get_context)]) -> str:
    """The account the request's token belongs to (401 without a valid token)."""
    token = bearer_token(request)
    if token is None:
        raise ApiError(
            401,
            "Authentication required: send 'Authorization: Token <api token>' "
            "(or 'Bearer <api token>')",
        )
    account = await asyncio.to_thread(ctx.store.account_for_token, token)
    if account is None:
        raise ApiError(401, "Invalid token: no account has this API token")
    return account


async def path_account(
    account_id: str, authenticated: Annotated[str, Depends(token_account)]
) -> str:
    """The path's ``{account_id}``, which must be the token's account (404 otherwise)."""
    if account_id != authenticated:
        raise ApiError(404, f"Account {account_id} not found")
    return authenticated


Account = Annotated[str, Depends(path_account)]
"""A route parameter: the authenticated account named by the path."""

Context = Annotated[ApiContext, Depends(get_context)]
