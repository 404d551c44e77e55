"""Query parameters the way dbt Cloud clients send them.

``limit``/``offset`` paging (default 100, at most 100), ``__in`` filters as JSON-array strings
(``status__in=[10, 20]``), ``order_by`` with an optional ``-``, and ``include_related`` in any
of its three encodings: repeated keys, comma-separated, or a JSON array (``""`` means none).
A value that does not parse is a 400 naming the parameter, never a silently ignored filter.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import QueryParams
from starlette.requests import Request

from api.envelope import bad_request

DEFAULT_LIMIT = 100
MAX_LIMIT = 100
MAX_OFFSET = 2**31 - 1
"""Beyond any row count, and within what the databases take (a larger one overflows)."""


@dataclass(frozen=True)
class Paging:
    limit: int
    offset: int


def paging(query: QueryParams) -> Paging:
    limit = _int_param(query, "limit", DEFAULT_LIMIT)
    offset = _int_param(query, "offset", 0)
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(f"limit must be between 1 and {MAX_LIMIT}, got {limit}")
    if not 0 <= offset <= MAX_OFFSET:
        raise bad_request(f"offset must be between 0 and {MAX_OFFSET}, got {offset}")
    return Paging(limit=limit, offset=offset)


def _int_param(query: QueryParams, name: str, default: int) -> int:
    value = int_filter(query, name)
    return default if value is None else value


def int_filter(query: QueryParams, name: str) -> int | None:
    """A single-valued integer filter (``project_id=1``); absent or empty: None."""
    raw = query.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise bad_request(f"{name} must be an integer, got {raw!r}") from None


def in_filter(query: QueryParams, name: str) -> list[int] | None:
    """An ``__in`` filter: a JSON array of integers (``[1,2]``, ``[1, 2]``); a bare
    comma-separated list is accepted too."""
    raw = query.get(name)
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    try:
        if text.startswith("["):
            values = json.loads(text)
        else:
            values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise bad_request(
            f"{name} must be a JSON array of integers, like [1, 2]; got {raw!r}"
        ) from None
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise bad_request(f"{name} must be a JSON array of integers, like [1, 2]; got {raw!r}")
    return values


def wanted(single: int | None, many: list[int] | None) -> set[int] | None:
    """The values a ``x`` / ``x__in`` pair allows (both given: both must hold); None: any."""
    allowed: set[int] | None = None
    if single is not None:
        allowed = {single}
    if many is not None:
        allowed = set(many) if allowed is None else allowed & set(many)
    return allowed


def include_related(query: QueryParams) -> set[str]:
    """The ``include_related`` tokens, whatever the encoding; unknown tokens are harmless."""
    tokens: set[str] = set()
    for raw in query.getlist("include_related"):
        text = raw.strip()
        if not text:
            continue
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError:
                raise bad_request(
                    f"include_related must be names, comma-separated or a JSON array; got {raw!r}"
                ) from None
            items = parsed if isinstance(parsed, list) else [parsed]
            tokens.update(str(item).strip().lower() for item in items)
        else:
            tokens.update(part.strip().lower() for part in text.split(","))
    tokens.discard("")
    return tokens


def order_by(query: QueryParams, allowed: Collection[str], default: str) -> str:
    raw = (query.get("order_by") or "").strip() or default
    if raw.removeprefix("-") not in allowed:
        raise bad_request(
            f"cannot order by {raw!r}; use one of {', '.join(sorted(allowed))} "
            "(a '-' prefix reverses the order)"
        )
    return raw


def list_extra(
    filters: Mapping[str, Any], order: str, page: Paging, count: int, total: int
) -> dict[str, Any]:
    """``extra`` of a list response: the filters echoed (``limit`` and ``offset`` as ints,
    which two clients index without a default), the order, and the page's counts."""
    echoed = {name: value for name, value in filters.items() if value is not None}
    echoed["limit"] = page.limit
    echoed["offset"] = page.offset
    return {
        "filters": echoed,
        "order_by": order,
        "pagination": {"count": count, "total_count": total},
    }


async def json_object(request: Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object body (400 if it is not one; ``optional``: empty is ``{}``)."""
    raw = await request.body()
    if not raw.strip():
        if optional:
            return {}
        raise bad_request("The request body is empty: send a JSON object")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_request(f"The request body is not valid JSON: {err}") from None
    if data is None and optional:
        return {}
    if not isinstance(data, dict):
        raise bad_request(f"The request body must be a JSON object, not {type(data).__name__}")
    return data
