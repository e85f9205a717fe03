"""`make bench-endpoints` at a small scale: two real I/O worker processes share one endpoint's
concurrency limit (the loopback server never sees more requests at once than the limit), and
throughput stays under what the limit allows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.bench_endpoints import run_once
from tests.fixtures.openai_server import OpenAIServer, endpoint_entry

pytestmark = pytest.mark.integration


def test_two_io_workers_share_the_endpoints_limit(redis_url: str, tmp_path: Path) -> None:
    latency, limit = 0.1, 3
    with OpenAIServer(served_model="bench-test") as server:
        endpoints = tmp_path / "endpoints.json"
        endpoints.write_text(json.dumps([endpoint_entry(server, "bench", max_concurrency=limit)]))
        result = run_once(
            io_workers=2,
            redis_url=redis_url,
            server=server,
            endpoints_file=endpoints,
            rows=48,
            candidates=4,
            latency_s=latency,
            run_dir=tmp_path,
            timeout_s=120,
        )
    assert result["rows"] == 48 and result["rows_failed"] == 0
    assert result["requests"] == 48
    assert server.max_in_flight == result["server_max_in_flight"] == limit
    # 48 requests of 0.1 s, 3 at a time, cannot take less than 1.6 s.
    assert result["seconds"] >= 48 / limit * latency
    assert result["rows_per_second"] <= limit / latency
