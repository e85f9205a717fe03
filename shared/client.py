"""A small HTTP client for the llm-compare API, for scripts, other services and the
``llm-compare`` command.

client = ComparisonClient("http://127.0.0.1:8000")
created = client.submit(spec)
final = client.wait(created["id"], on_update=print)
table = client.results(created["id"])

for event, data in client.events(created["id"]):  # Server-Sent Events, as the state changes
    ...
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx

FINAL_STATUSES = {"succeeded", "partially_failed", "failed", "cancelled"}


class ApiError(RuntimeError):
    def __init__(self, response: httpx.Response):
        self.status_code = response.status_code
        try:
            self.body: Any = response.json()
        except ValueError:
            self.body = response.text
        message = self.body.get("message") if isinstance(self.body, dict) else self.body
        super().__init__(f"HTTP {response.status_code}: {message}")


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(event, data) for each event in a Server-Sent Events stream, given its lines without line
    endings. Comments (the server's ``: keep-alive``) and events without data are skipped; ``id``
    and ``retry`` are ignored, since callers fall back to polling instead of reconnecting."""
    event = ""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event or "message", "\n".join(data)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)


class ComparisonClient:
    def __init__(self, base_url: str, *, timeout: float = 30.0, api_key: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def __enter__(self) -> ComparisonClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise ApiError(response)
        return response

    def submit(self, spec: dict[str, Any], *, idempotency_key: str | None = None) -> dict[str, Any]:
        """Queue a comparison. With ``idempotency_key``, sending the same spec again (say after a
        timeout) returns the first comparison instead of queueing a second."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._check(self.http.post("/v1/comparisons", json=spec, headers=headers)).json()

    def submit_file(self, spec: dict[str, Any], filename: str, content: bytes) -> dict[str, Any]:
        files = {"file": (filename, content)}
        return self._check(
            self.http.post("/v1/comparisons", data={"spec": json.dumps(spec)}, files=files)
        ).json()

    def get(self, comparison_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/comparisons/{comparison_id}")).json()

    def results(self, comparison_id: str) -> dict[str, Any]:
        return self._check(self.http.get(f"/v1/comparisons/{comparison_id}/results")).json()

    def results_csv(self, comparison_id: str) -> str:
        return self._check(
            self.http.get(f"/v1/comparisons/{comparison_id}/results", params={"format": "csv"})
        ).text

    def cancel(self, comparison_id: str) -> dict[str, Any]:
        return self._check(self.http.post(f"/v1/comparisons/{comparison_id}/cancel")).json()

    def events(self, comparison_id: str, *, read_timeout: float = 60.0) -> Iterator[tuple[str, str]]:
        """The comparison's Server-Sent Events as (event, data): ``comparison`` with the full state
        JSON on connect and on every change, then ``end`` with the final state, after which the
        server closes the stream. The server sends a comment at least every 15 s, so a read that
        waits ``read_timeout`` seconds means the stream is dead (``httpx.ReadTimeout``)."""
        with self.http.stream(
            "GET",
            f"/v1/comparisons/{comparison_id}/events",
            headers={"Accept": "text/event-stream"},
            timeout=httpx.Timeout(self.timeout, read=read_timeout),
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError(response)
            yield from parse_sse(response.iter_lines())

    def models(self) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/models")).json()

    def metrics(self) -> list[dict[str, Any]]:
        return self._check(self.http.get("/v1/metrics")).json()

    def list(self, *, status: str | None = None, limit: int = 20, offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if status:
            params["status"] = status
        return self._check(self.http.get("/v1/comparisons", params=params)).json()

    def wait(
        self,
        comparison_id: str,
        *,
        timeout: float = 1800,
        poll_s: float = 1.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.get(comparison_id)
            if on_update is not None:
                on_update(state)
            if state["status"] in FINAL_STATUSES:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"comparison {comparison_id} still {state['status']} after {timeout:.0f}s")
            time.sleep(poll_s)

    def close(self) -> None:
        self.http.close()
