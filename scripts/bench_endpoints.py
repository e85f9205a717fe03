"""Throughput of endpoint candidates: rows per second that I/O workers get out of an endpoint
whose every request takes a fixed time, next to what its concurrency limit allows
(``limit / latency``), with one I/O worker and with two.

    python -m scripts.bench_endpoints [--rows 640] [--candidates 4] [--latency 0.3] [--limit 16]

A loopback OpenAI-compatible server (tests/fixtures/openai_server.py) answers each request after
``--latency`` seconds and counts the most requests it ever had in flight. Real I/O worker
processes (``celery -A services.worker.io_app worker --pool threads``) generate ``--candidates``
endpoint candidates of one comparison, every one on that endpoint (response cache off); the
figure is rows over the time from queueing the candidates to the last one's rows being stored.
Only the generation step runs: no model worker, no MLflow. Talks to 127.0.0.1 only; writes
``bench-endpoints.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from celery import Celery

from scripts.stack import ROOT, Stack, redis_for_tests
from shared.celery_config import celery_config
from shared.schemas import ComparisonCreate
from shared.settings import Settings
from shared.store import ComparisonStore
from shared.tasks import GENERATE_REMOTE, queue_for
from tests.fixtures.openai_server import OpenAIServer, endpoint_entry


def run_once(
    *,
    io_workers: int,
    redis_url: str,
    server: OpenAIServer,
    endpoints_file: Path,
    rows: int,
    candidates: int,
    latency_s: float,
    run_dir: Path,
    timeout_s: float = 600,
) -> dict[str, Any]:
    prefix = f"bench-endpoints-{uuid.uuid4().hex[:8]}"
    stack = Stack(
        run_dir=run_dir / prefix,
        redis_url=redis_url,
        workers=0,
        io_workers=io_workers,
        # Every candidate's task runs at once, whichever worker takes it.
        io_worker_concurrency=candidates,
        queue_name=prefix,
        key_prefix=prefix,
        extra_env={"ENDPOINTS_FILE": str(endpoints_file)},
    )
    settings = Settings(
        redis_url=redis_url, key_prefix=prefix, queue_name=prefix, endpoints_file=endpoints_file
    )
    store = ComparisonStore.from_url(redis_url, prefix=prefix, ttl_s=3600)
    app = Celery("bench-endpoints")
    app.conf.update(celery_config(settings))
    per_candidate = rows // candidates
    labels = [f"c{i}" for i in range(candidates)]
    spec = ComparisonCreate.model_validate(
        {
            "candidates": [
                # Different seeds: the same prompts, yet none answered from another's cache.
                {"label": label, "model": "endpoint:bench/bench-model", "generation": {"seed": i}}
                for i, label in enumerate(labels)
            ],
            "dataset": {
                "rows": [{"input": f"Question {i}: what is {i} plus {i}?"} for i in range(per_candidate)]
            },
            "cache": False,
        }
    )
    try:
        for index in range(io_workers):
            stack.start_io_worker(index)
        stack.wait_workers()
        server.reset()
        server.latency_s = latency_s
        comparison_id = uuid.uuid4().hex
        store.create(comparison_id=comparison_id, spec=spec, experiment="bench", metrics=["output_words"])
        started = time.monotonic()
        for label in labels:
            app.send_task(
                GENERATE_REMOTE,
                kwargs={"comparison_id": comparison_id, "label": label},
                queue=queue_for(GENERATE_REMOTE, settings),
            )
        pending = set(labels)
        finished: dict[str, float] = {}
        deadline = started + timeout_s
        while pending and time.monotonic() < deadline:
            for label in sorted(pending):
                if store.has_remote_generation(comparison_id, label):
                    finished[label] = time.monotonic() - started
                    pending.discard(label)
            time.sleep(0.02)
        if pending:
            raise TimeoutError(f"candidates {sorted(pending)} not generated within {timeout_s:.0f} s")
        elapsed = max(finished.values())
        records = [store.remote_generation(comparison_id, label) or {} for label in labels]
        failed = sum(int(r.get("rows_failed") or 0) for r in records)
        total = per_candidate * candidates
        return {
            "io_workers": io_workers,
            "rows": total,
            "rows_failed": failed,
            "seconds": round(elapsed, 2),
            "rows_per_second": round(total / elapsed, 1),
            "requests": len(server.requests),
            "server_max_in_flight": server.max_in_flight,
            "per_candidate_seconds": {k: round(v, 2) for k, v in sorted(finished.items())},
        }
    finally:
        stack.stop()
        app.close()
        with contextlib.suppress(Exception):
            keys = list(store.r.scan_iter(f"{prefix}:*"))
            if keys:
                store.r.delete(*keys)
            store.r.delete(prefix, f"{prefix}.io")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=640, help="rows over all candidates")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.3, help="seconds the server takes per request")
    parser.add_argument("--limit", type=int, default=16, help="the endpoint's max_concurrency")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="I/O worker counts to measure")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-endpoints.json")
    args = parser.parse_args()
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    ideal = args.limit / args.latency
    results = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-endpoints-") as tmp,
        redis_for_tests(redis_url, Path(tmp) / "redis") as url,
        OpenAIServer(served_model="bench-model-v1", latency_s=args.latency) as server,
    ):
        endpoints_file = Path(tmp) / "endpoints.json"
        endpoints_file.write_text(
            json.dumps([endpoint_entry(server, "bench", max_concurrency=args.limit, timeout_s=30)])
        )
        for workers in args.workers:
            result = run_once(
                io_workers=workers,
                redis_url=url,
                server=server,
                endpoints_file=endpoints_file,
                rows=args.rows,
                candidates=args.candidates,
                latency_s=args.latency,
                run_dir=Path(tmp),
            )
            result["of_ideal"] = round(result["rows_per_second"] / ideal, 3)
            results.append(result)
            print(
                f"{workers} I/O worker(s): {result['rows']} rows in {result['seconds']:.2f} s = "
                f"{result['rows_per_second']:.1f} rows/s ({result['of_ideal']:.0%} of limit/latency = "
                f"{ideal:.1f}); server peak in flight {result['server_max_in_flight']} (limit {args.limit}); "
                f"{result['rows_failed']} rows failed"
            )
    report = {
        "latency_s": args.latency,
        "limit": args.limit,
        "ideal_rows_per_second": round(ideal, 1),
        "candidates": args.candidates,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
