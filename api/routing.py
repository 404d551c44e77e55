"""Routes served with and without their trailing slash, never redirected (a client whose
POST is redirected may repeat it as a GET)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from starlette.routing import compile_path

_METHODS: dict[str, tuple[re.Pattern[str], set[str]]] = {}
"""Every path registered through ``route``, with its methods: a 405 names them all."""


def route(router: APIRouter, path: str, *methods: str) -> Callable[[Any], Any]:
    """Register the decorated endpoint at ``path`` (written with its trailing slash) and at
    ``path`` without it."""
    bare = path.rstrip("/") or "/"

    def register(endpoint: Any) -> Any:
        for form in dict.fromkeys((path, bare)):
            router.add_api_route(form, endpoint, methods=list(methods), include_in_schema=False)
            regex = _METHODS.setdefault(form, (compile_path(form)[0], set()))
            regex[1].update(methods)
        return endpoint

    return register


def allowed_methods(path: str) -> list[str]:
    """The methods the routes matching ``path`` answer."""
    found: set[str] = set()
    for regex, methods in _METHODS.values():
        if regex.match(path):
            found |= methods
    return sorted(found)
