"""A small client of Runslot's dbt Cloud-compatible REST API, for the CLI and the demo.

Synchronous (``httpx.Client``): the CLI makes one call at a time, and async callers (the
demo seeding in ``runslot dev``) run it in a thread. Envelope-aware: every answer is
``{"status": {..., "is_success"}, "data": ...}``; a failure raises ``ApiError`` whose message
is the API's own ``status.user_message``, one line a person can act on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import httpx

DEFAULT_API_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_SECONDS = 30.0
PAGE_SIZE = 100
"""dbt Cloud's maximum ``limit``."""

JsonObject = dict[str, Any]


class ApiError(Exception):
    """The API refused a call or could not be reached; ``str()`` is one line for people."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Page:
    """One page of a list endpoint: its items and ``extra.pagination.total_count``."""

    items: list[JsonObject]
    total_count: int
    extra: JsonObject = field(default_factory=dict)


class RunslotApi:
    """The calls Runslot's CLI makes, on one account, with one token."""

    def __init__(
        self,
        base_url: str,
        token: str,
        account_id: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        transport: httpx.BaseTransport | None = None,
        verify: bool | str = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.account_id = account_id
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Token {token}", "Accept": "application/json"},
            timeout=timeout,
            transport=transport,
            verify=verify,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ paths

    @property
    def v2(self) -> str:
        return f"/api/v2/accounts/{self.account_id}"

    @property
    def v3(self) -> str:
        return f"/api/v3/accounts/{self.account_id}"

    # ------------------------------------------------------------------ account

    def account(self) -> JsonObject:
        return self._object("GET", f"{self.v2}/")

    # ------------------------------------------------------------------ environments

    def put_environment(
        self, project_id: int, name: str, definition: Mapping[str, Any]
    ) -> JsonObject:
        """Create or replace the environment ``name`` (Runslot's v3 extension)."""
        body = {"name": name, "runslot": dict(definition)}
        return self._object("POST", f"{self.v3}/projects/{project_id}/environments/", json=body)

    def list_environments(self, project_id: int) -> list[JsonObject]:
        return self._list_data("GET", f"{self.v3}/projects/{project_id}/environments/")

    # ------------------------------------------------------------------ jobs

    def list_jobs(self, *, limit: int = PAGE_SIZE, offset: int = 0) -> Page:
        return self._page(f"{self.v2}/jobs/", {"limit": limit, "offset": offset, "order_by": "id"})

    def all_jobs(self) -> list[JsonObject]:
        return list(self._all(f"{self.v2}/jobs/", {"order_by": "id"}))

    def get_job(self, job_id: int) -> JsonObject:
        return self._object("GET", f"{self.v2}/jobs/{job_id}/")

    def create_job(self, body: Mapping[str, Any]) -> JsonObject:
        return self._object("POST", f"{self.v2}/jobs/", json=dict(body))

    def update_job(self, job_id: int, body: Mapping[str, Any]) -> JsonObject:
        return self._object("POST", f"{self.v2}/jobs/{job_id}/", json=dict(body))

    def trigger_run(self, job_id: int, cause: str, **options: Any) -> JsonObject:
        body = {"cause": cause, **options}
        return self._object("POST", f"{self.v2}/jobs/{job_id}/run/", json=body)

    def rerun(self, job_id: int, cause: str | None = None) -> JsonObject:
        """dbt Cloud's rerun: the job's newest run again, from failure if it failed."""
        body = {"cause": cause} if cause else {}
        return self._object("POST", f"{self.v2}/jobs/{job_id}/rerun/", json=body)

    # ------------------------------------------------------------------ runs

    def list_runs(
        self,
        *,
        job_id: int | None = None,
        status: int | None = None,
        limit: int = 20,
        offset: int = 0,
        order_by: str = "-id",
    ) -> Page:
        params: dict[str, Any] = {"limit": limit, "offset": offset, "order_by": order_by}
        if job_id is not None:
            params["job_definition_id"] = job_id
        if status is not None:
            params["status"] = status
        return self._page(f"{self.v2}/runs/", params)

    def get_run(
        self, run_id: int, *, steps: bool = True, related: tuple[str, ...] = ()
    ) -> JsonObject:
        """A run; with ``steps``, its ``run_steps`` and their logs (the last MiB of each)."""
        include = [*(["run_steps"] if steps else []), *related]
        params = {"include_related": json.dumps(include)} if include else None
        return self._object("GET", f"{self.v2}/runs/{run_id}/", params=params)

    def cancel_run(self, run_id: int) -> JsonObject:
        return self._object("POST", f"{self.v2}/runs/{run_id}/cancel/", json={})

    def list_artifacts(self, run_id: int) -> list[Any]:
        return self._list_data("GET", f"{self.v2}/runs/{run_id}/artifacts/")

    # ------------------------------------------------------------------ transport

    def _all(self, path: str, params: Mapping[str, Any]) -> Iterator[JsonObject]:
        offset = 0
        while True:
            page = self._page(path, {**params, "limit": PAGE_SIZE, "offset": offset})
            yield from page.items
            offset += len(page.items)
            if not page.items or offset >= page.total_count:
                return

    def _page(self, path: str, params: Mapping[str, Any]) -> Page:
        envelope = self._call("GET", path, params=params)
        items = envelope.get("data")
        if not isinstance(items, list):
            raise ApiError(f"GET {path}: the API answered a list call without a list")
        extra = envelope.get("extra") or {}
        total = (extra.get("pagination") or {}).get("total_count", len(items))
        return Page(items=items, total_count=int(total), extra=extra)

    def _object(self, method: str, path: str, **kwargs: Any) -> JsonObject:
        data = self._call(method, path, **kwargs).get("data")
        if not isinstance(data, dict):
            raise ApiError(f"{method} {path}: the API answered without an object")
        return data

    def _list_data(self, method: str, path: str, **kwargs: Any) -> list[Any]:
        data = self._call(method, path, **kwargs).get("data")
        if not isinstance(data, list):
            raise ApiError(f"{method} {path}: the API answered without a list")
        return data

    def _call(self, method: str, path: str, **kwargs: Any) -> JsonObject:
        url = f"{self.base_url}{path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise ApiError(
                f"cannot reach the API at {self.base_url}: is `runslot dev` (or `runslot api`) "
                "running? (--api-url, RUNSLOT_API_URL)"
            ) from None
        except httpx.TimeoutException:
            raise ApiError(f"{method} {url} timed out") from None
        except httpx.HTTPError as error:
            raise ApiError(f"{method} {url} failed: {error}") from None
        return _envelope(method, url, response)


def _envelope(method: str, url: str, response: httpx.Response) -> JsonObject:
    """The response's envelope, or ``ApiError`` with the API's own message."""
    try:
        body = response.json()
    except ValueError:
        body = None
    status = body.get("status") if isinstance(body, dict) else None
    ok = response.is_success and (not isinstance(status, dict) or status.get("is_success", True))
    if ok and isinstance(body, dict):
        return body
    code = response.status_code
    message = ""
    if isinstance(status, dict):
        message = str(status.get("user_message") or status.get("developer_message") or "")
    if not message:
        message = response.reason_phrase or "no message"
    if code == httpx.codes.UNAUTHORIZED:
        raise ApiError(
            f"the API refused the token ({code}: {message}); check --token / RUNSLOT_API_TOKEN",
            status_code=code,
        )
    if code == httpx.codes.FORBIDDEN:
        raise ApiError(
            f"the token may not use this account ({code}: {message}); check --account / "
            "RUNSLOT_ACCOUNT",
            status_code=code,
        )
    if ok:  # 2xx but not an envelope
        raise ApiError(f"{method} {url}: the answer is not a JSON envelope", status_code=code)
    raise ApiError(f"{_one_line(message)} (HTTP {code})", status_code=code)


def _one_line(text: str) -> str:
    return " ".join(text.split())
