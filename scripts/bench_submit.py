"""How cheap a submission is: a bounded load on the gateway alone (no worker consumes the queue).

Starts the API on a free loopback port with its own Redis key prefix and queue, sends a fixed
number of valid submissions from a fixed number of concurrent clients, then stops and cleans up.
Prints throughput and latency percentiles; writes JSON.

    python -m scripts.bench_submit [--requests 2000] [--clients 50] [--workers 1]
    python -m scripts.bench_submit --keys 3     # auth on: clients spread over 3 API keys, the
                                                # first one limited to --limited-rate a minute
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
from shared.apikeys import Quotas, Role, issue_key
from shared.store import ComparisonStore

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
    url: str, requests: int, clients: int, warmup: int, keys: list[str] | None = None
) -> tuple[list[float], list[int], float, list[float], list[tuple[int, int, str | None]]]:
    """Returns the measured requests' latencies and statuses, their wall time, the warm-up
    requests' latencies (sent first over the same connections, not counted), and per measured
    request (key index, status, comparison id) when ``keys`` are given: client i uses key
    i mod len(keys)."""
    # aiohttp rather than httpx: on two cores httpx's own per-request cost capped the load
    # at ~170 requests/s even against /healthz, measuring the client instead of the gateway.
    import aiohttp

    body = json.dumps(SPEC)
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:

        async def phase(
            count: int,
        ) -> tuple[list[float], list[int], float, list[tuple[int, int, str | None]]]:
            latencies: list[float] = []
            statuses: list[int] = []
            outcomes: list[tuple[int, int, str | None]] = []
            remaining = iter(range(count))

            async def client(index: int) -> None:
                key_index = index % len(keys) if keys else 0
                sent = {**headers, "Authorization": f"Bearer {keys[key_index]}"} if keys else headers
                for _ in remaining:
                    started = time.perf_counter()
                    created = None
                    try:
                        async with session.post("/v1/comparisons", data=body, headers=sent) as response:
                            payload = await response.read()
                            statuses.append(response.status)
                            if response.status == 202:
                                created = json.loads(payload)["id"]
                            outcomes.append((key_index, response.status, created))
                    except aiohttp.ClientError:
                        statuses.append(0)
                        outcomes.append((key_index, 0, None))
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(clients)))
            return latencies, statuses, time.perf_counter() - started, outcomes

        warm_latencies, _, _, _ = await phase(warmup)
        latencies, statuses, wall, outcomes = await phase(requests)
    return latencies, statuses, wall, warm_latencies, outcomes


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
    parser.add_argument("--keys", type=int, default=0, help="auth on, with this many API keys (0: auth off)")
    parser.add_argument(
        "--limited-rate", type=int, default=120, help="submissions a minute allowed to the first key"
    )
    args = parser.parse_args()

    tag = f"bench-submit-{uuid.uuid4().hex[:8]}"
    stack = Stack(
        run_dir=Path(tempfile.mkdtemp(prefix="bench-submit-")),
        api_port=free_port(),
        mlflow_port=free_port(),
        queue_name=tag,
        key_prefix=tag,
        extra_env={"AUTH_DISABLED": "false"} if args.keys else {},
    )
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    keys: list[str] = []
    if args.keys:
        store = ComparisonStore(client, prefix=tag)
        plenty = 1_000_000  # nothing queued here ever runs: only the first key's rate is the limit
        for index in range(args.keys):
            rate = args.limited_rate if index == 0 else plenty
            keys.append(
                issue_key(
                    store,
                    name=f"team-{index}",
                    role=Role.submitter,
                    quotas=Quotas(submissions_per_minute=rate, max_running=plenty),
                )[1]
            )
    try:
        stack.start_api(workers=args.workers, extra_args=[] if args.access_log else ["--no-access-log"])
        headers = {"Authorization": f"Bearer {keys[-1]}"} if keys else None
        httpx.post(
            f"{stack.api_url}/v1/comparisons", json=SPEC, timeout=30, headers=headers
        ).raise_for_status()
        # A warm-up round opens the clients' connections and takes every API process through its
        # lazy set-up; it is reported apart, not counted in the figures below.
        latencies, statuses, wall, warm, outcomes = asyncio.run(
            run_load(stack.api_url, args.requests, args.clients, args.warmup, keys or None)
        )
        queued = client.llen(tag)
        accepted = [cid for _, status, cid in outcomes if status == 202 and cid]
        pipe = client.pipeline(transaction=False)
        for cid in accepted:
            pipe.exists(f"{tag}:cmp:{cid}")
        stored = sum(pipe.execute())
        messages = "\n".join(str(m) for m in client.lrange(tag, 0, -1))
        on_queue = sum(1 for cid in accepted if cid in messages)
    finally:
        stack.stop()
        leftovers = list(client.scan_iter(f"{tag}:*"))
        if leftovers:
            client.delete(*leftovers)
        client.delete(tag)
    limited = 429 if keys else None
    errors = sum(1 for s in statuses if s not in (202, limited))
    per_key = {
        f"team-{index}": {
            "accepted": sum(1 for k, s, _ in outcomes if k == index and s == 202),
            "rate_limited": sum(1 for k, s, _ in outcomes if k == index and s == 429),
        }
        for index in range(len(keys))
    }
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
        "accepted": len(accepted),
        "accepted_stored": stored,
        "accepted_on_queue": on_queue,
        "lost": len(accepted) - min(stored, on_queue),
        "keys": per_key,
        "target": ">= 300 submissions/s, p99 < 200 ms, no errors, 0 lost",
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{args.requests} submissions from {args.clients} clients, {args.workers} API process(es)")
    print(f"throughput   {result['submissions_per_second']:8.1f} /s   (wall {wall:.2f} s)")
    print(f"latency      p50 {result['p50_ms']} ms   p99 {result['p99_ms']} ms")
    if warm:
        print(
            f"warm-up      {args.warmup} requests first, not counted (their p99 {result['warmup_p99_ms']} ms)"
        )
    print(f"errors       {errors} (any status but 202{' and 429' if keys else ''})")
    print(
        f"accepted     {len(accepted)}: {stored} stored, {on_queue} with their start task on the queue, "
        f"{result['lost']} lost"
    )
    for name, counts in per_key.items():
        limit = f"{args.limited_rate}/min" if name == "team-0" else "unlimited"
        accepted_n, limited_n = counts["accepted"], counts["rate_limited"]
        print(f"  {name:8s} ({limit:>10s})  accepted {accepted_n:5d}  rate-limited {limited_n:5d}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
