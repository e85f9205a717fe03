"""A small HTTP client for the llm-compare API, for scripts and other services.

client = ComparisonClient("http://127.0.0.1:8000")
created = client.submit(spec)
final = client.wait(created["id"], on_update=print)
table = client.results(created["id"])
"""

from __future__ import annotations

import time
from collections.abc import Callable
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


class ComparisonClient:
    def __init__(self, base_url: str, *, timeout: float = 30.0):
        self.http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            raise ApiError(response)
        return response

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._check(self.http.post("/v1/comparisons", json=spec)).json()

    def submit_file(self, spec: dict[str, Any], filename: str, content: bytes) -> dict[str, Any]:
        import json

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
