"""dbt Cloud's response envelope, and the errors every route may answer with.

Every JSON response is ``{"status": {...}, "data": ...}`` (plus ``"extra"`` on lists), errors
included: the clients call ``.json()`` on a 401 or a 404 as readily as on a 200. The handlers
installed here turn every way a request can fail (an ``ApiError`` from a route, Starlette's
404 and 405, a body that does not validate, a crash) into that envelope.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.routing import allowed_methods

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
"""Request bodies larger than this are refused (413) before anything parses them."""
_TOO_LARGE_MESSAGE = f"The request body is larger than {MAX_BODY_BYTES} bytes"

_DEFAULT_MESSAGES = {
    200: "Success!",
    201: "Success!",
    400: "The request was invalid. Please double check the provided data and try again.",
    401: "Invalid token.",
    403: "You do not have permission to perform this action.",
    404: "The requested resource was not found.",
    405: "Method not allowed.",
    409: "The request conflicts with the current state of the resource.",
    413: "The request body is too large.",
    500: "An unexpected error occurred.",
    503: "The service is unavailable; try again shortly.",
}


def status_block(
    code: int, user_message: str | None = None, developer_message: str = ""
) -> dict[str, Any]:
    return {
        "code": code,
        "is_success": 200 <= code < 300,
        "user_message": user_message or _DEFAULT_MESSAGES.get(code, ""),
        "developer_message": developer_message,
    }


def envelope(
    data: Any, *, code: int = 200, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"status": status_block(code), "data": data}
    if extra is not None:
        body["extra"] = dict(extra)
    return body


def ok(data: Any, *, code: int = 200, extra: Mapping[str, Any] | None = None) -> JSONResponse:
    """A success envelope; ``code`` is both the HTTP status and ``status.code``."""
    return JSONResponse(envelope(data, code=code, extra=extra), status_code=code)


def error_response(
    code: int,
    message: str | None = None,
    developer_message: str = "",
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = {"status": status_block(code, message, developer_message), "data": None}
    return JSONResponse(body, status_code=code, headers=dict(headers or {}))


class ApiError(Exception):
    """What a route raises to answer with an error envelope; the message says what to fix."""

    def __init__(self, code: int, message: str, developer_message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.developer_message = developer_message


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


class BodyTooLargeError(Exception):
    """A request body that streamed past ``MAX_BODY_BYTES`` (no usable Content-Length)."""


def validation_message(err: ValidationError | RequestValidationError, prefix: str = "") -> str:
    """Pydantic's errors as one line naming each field: ``execute_steps.0: a step must …``."""
    parts = []
    for item in err.errors()[:5]:
        loc = [str(p) for p in item.get("loc", ()) if p not in ("body", "query", "path")]
        where = ".".join([prefix, *loc] if prefix else loc)
        msg = str(item.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid input"


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.code, exc.message, exc.developer_message)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"No such endpoint: {request.method} {request.url.path}"
    elif exc.status_code == 405:
        # Starlette names the methods of the first route on the path only; GET and POST of
        # one path are two routes here.
        allowed = ", ".join(allowed_methods(request.url.path))
        message = f"Method {request.method} is not allowed here; use {allowed}"
        return error_response(405, message, headers={"Allow": allowed})
    else:
        message = str(exc.detail) if exc.detail else ""
    return error_response(exc.status_code, message, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, validation_message(exc))


async def _store_down(request: Request, exc: Exception) -> JSONResponse:
    log.warning("the run store failed during %s %s: %s", request.method, request.url.path, exc)
    return error_response(
        503, "The run store cannot be reached; try again shortly.", type(exc).__name__
    )


async def _too_large(request: Request, exc: Exception) -> JSONResponse:
    return error_response(413, _TOO_LARGE_MESSAGE)


def install_error_handlers(app: FastAPI) -> None:
    handlers: dict[type[Exception], Callable[[Request, Exception], Awaitable[JSONResponse]]] = {
        ApiError: _api_error,
        HTTPException: _http_error,
        RequestValidationError: _validation_error,
        BodyTooLargeError: _too_large,
        # The database behind the run store is down or restarting: retrying later can help.
        OperationalError: _store_down,
        InterfaceError: _store_down,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(BodyLimitMiddleware)


class _HttpMiddleware:
    """An ASGI middleware of HTTP requests (``http``); lifespan and websockets go straight on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class CatchAllMiddleware(_HttpMiddleware):
    """Any unhandled exception becomes a 500 envelope (logged with its traceback here),
    unless the response had already started, when all that is left is to re-raise."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as err:
            if started:
                raise
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            response = error_response(
                500, "An unexpected error occurred; the server log has the details.", repr(err)
            )
            await response(scope, receive, send)


class BodyLimitMiddleware(_HttpMiddleware):
    """Refuse bodies over ``MAX_BODY_BYTES``: at once from Content-Length, else while the
    body streams in (raising ``BodyTooLargeError``, which the handler turns into a 413)."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
                if length < 0 or length > MAX_BODY_BYTES:
                    message = _TOO_LARGE_MESSAGE if length > 0 else "Invalid Content-Length header"
                    code = 413 if length > 0 else 400
                    await error_response(code, message)(scope, receive, send)
                    return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > MAX_BODY_BYTES:
                    raise BodyTooLargeError
            return message

        await self.app(scope, limited_receive, send)
