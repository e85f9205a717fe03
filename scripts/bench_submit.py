"""How cheap a submission is: a bounded load on the gateway alone (no worker consumes the queue).

Starts the API on a free loopback port with its own Redis key prefix and queue, sends a fixed
number of valid submissions from a fixed number of concurrent clients, then stops and cleans up.
Prints throughput and latency percentiles; writes JSON.

    python -m scripts.bench_submit [--requests 2000] [--clients 50] [--workers 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis

from scripts.stack import ROOT, Stack, free_port

SPEC = {
    "name": "load",
    "candidates": [
        {"label": "a", "model": "smollm2-135m-instruct"},
        {
            "label": "b",
            "model": "smollm2-135m-instruct",
            "generation": {"do_sample": True, "temperature": 0.7},
        },
    ],
    "dataset": {"rows": [{"input": f"Question {i}?", "reference": f"Answer {i}"} for i in range(16)]},
}


async def run_load(
    url: str, requests: int, clients: int, warmup: int
) -> tuple[list[float], list[int], float, list[float]]:
    """Returns the measured requests' latencies and statuses, their wall time, and the warm-up
    requests' latencies (sent first over the same connections, not counted)."""
    # aiohttp rather than httpx: on two cores httpx's own per-request cost capped the load
    # at ~170 requests/s even against /healthz, measuring the client instead of the gateway.
    import aiohttp

    body = json.dumps(SPEC)
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:

        async def phase(count: int) -> tuple[list[float], list[int], float]:
            latencies: list[float] = []
            statuses: list[int] = []
            remaining = iter(range(count))

            async def client() -> None:
                for _ in remaining:
                    started = time.perf_counter()
                    try:
                        async with session.post("/v1/comparisons", data=body, headers=headers) as response:
                            await response.read()
                            statuses.append(response.status)
                    except aiohttp.ClientError:
                        statuses.append(0)
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(clients)))
            return latencies, statuses, time.perf_counter() - started

        warm_latencies, _, _ = await phase(warmup)
        latencies, statuses, wall = await phase(requests)
    return latencies, statuses, wall, warm_latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--warmup", type=int, default=200, help="requests sent first and not counted")
    parser.add_argument("--access-log", action="store_true", help="keep uvicorn's per-request log line")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-submit.json")
    args = parser.parse_args()

    tag = f"bench-submit-{uuid.uuid4().hex[:8]}"
    stack = Stack(
        run_dir=Path(tempfile.mkdtemp(prefix="bench-submit-")),
        api_port=free_port(),
        mlflow_port=free_port(),
        queue_name=tag,
        key_prefix=tag,
    )
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    try:
        stack.start_api(workers=args.workers, extra_args=[] if args.access_log else ["--no-access-log"])
        httpx.post(f"{stack.api_url}/v1/comparisons", json=SPEC, timeout=30).raise_for_status()
        # A warm-up round opens the clients' connections and takes every API process through its
        # lazy set-up; it is reported apart, not counted in the figures below.
        latencies, statuses, wall, warm = asyncio.run(
            run_load(stack.api_url, args.requests, args.clients, args.warmup)
        )
        queued = client.llen(tag)
    finally:
        stack.stop()
        keys = list(client.scan_iter(f"{tag}:*"))
        if keys:
            client.delete(*keys)
        client.delete(tag)
    errors = sum(1 for s in statuses if s != 202)
    result = {
        "requests": args.requests,
        "clients": args.clients,
        "api_workers": args.workers,
        "wall_seconds": round(wall, 2),
        "submissions_per_second": round(args.requests / wall, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * percentile(latencies, 0.99), 1),
        "errors": errors,
        "warmup_requests": args.warmup,
        "warmup_p99_ms": round(1000 * percentile(warm, 0.99), 1) if warm else None,
        "queued_start_tasks": queued,
        "target": ">= 300 submissions/s, p99 < 200 ms, no errors",
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{args.requests} submissions from {args.clients} clients, {args.workers} API process(es)")
    print(f"throughput   {result['submissions_per_second']:8.1f} /s   (wall {wall:.2f} s)")
    print(f"latency      p50 {result['p50_ms']} ms   p99 {result['p99_ms']} ms")
    if warm:
        print(
            f"warm-up      {args.warmup} requests first, not counted (their p99 {result['warmup_p99_ms']} ms)"
        )
    expected = args.requests + args.warmup + 1
    print(f"errors       {errors}   start tasks on the queue: {queued} (expected {expected})")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
