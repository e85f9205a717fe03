"""How long ``GET /v1/comparisons/{id}/votes`` takes on a busy arena: 8 candidates, 5,000 votes,
a judge verdict for every row and pair, two metrics, against the local Redis.

Writes the comparison under a key prefix of its own, calls the route in process (FastAPI's
TestClient: routing, Redis reads, the 1,000-resample bootstrap, agreement and JSON encoding),
then deletes the keys. Prints the median and 95th percentile of the wall time, and the median
CPU time, which other load on the machine inflates less.

    python -m scripts.bench_votes [--candidates 8] [--votes 5000] [--rows 500] [--repeat 30]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid

from fastapi.testclient import TestClient

from services.api.main import create_app
from shared.ranking import arena_ranking
from shared.schemas import CandidateState, ComparisonCreate, ComparisonStatus
from shared.settings import Settings
from shared.store import ComparisonStore, utcnow


def write_arena(store: ComparisonStore, *, candidates: int, rows: int, votes: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    labels = [f"model-{i}" for i in range(candidates)]
    comparison_id = uuid.uuid4().hex
    spec = ComparisonCreate.model_validate(
        {
            "name": "bench-votes",
            "candidates": [{"label": label, "model": "m"} for label in labels],
            "dataset": {
                "rows": [{"input": f"Question {r}?", "reference": f"Answer {r}"} for r in range(rows)]
            },
        }
    )
    store.create(
        comparison_id=comparison_id, spec=spec, experiment="bench", metrics=["exact_match", "output_words"]
    )
    store.transition(comparison_id, ComparisonStatus.running, allowed_from=[ComparisonStatus.queued])
    for label in labels:
        store.save_outputs(
            comparison_id,
            label,
            [
                {
                    "output": f"{label} says {r}",
                    "scores": {
                        "exact_match": float(rng.random() < 0.5),
                        "output_words": float(rng.randint(1, 9)),
                    },
                }
                for r in range(rows)
            ],
        )
        store.transition_candidate(
            comparison_id, label, CandidateState.succeeded, allowed_from=[CandidateState.queued]
        )
    judge_rows = [
        {"row": r, "a": a, "b": b, "winner": rng.choice([a, b, "tie"])}
        for i, a in enumerate(labels)
        for b in labels[i + 1 :]
        for r in range(rows)
    ]
    store.set_fields(
        comparison_id, judge_ranking=json.dumps({"judge": "bench", "ranking": [], "rows": judge_rows})
    )
    store.transition(comparison_id, ComparisonStatus.succeeded, allowed_from=[ComparisonStatus.running])
    pipe = store.r.pipeline(transaction=False)
    for _ in range(votes):
        a, b = rng.sample(labels, 2)
        vote = {
            "id": uuid.uuid4().hex,
            "row": rng.randrange(rows),
            "a": a,
            "b": b,
            "winner": rng.choice(["a", "b", "a", "b", "tie", "both_bad"]),
            "voter": f"voter-{rng.randrange(40)}",
            "matchup": None,
            "created_at": utcnow(),
        }
        pipe.rpush(store._key(comparison_id, "votes"), json.dumps(vote))
    pipe.execute()
    return comparison_id


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--votes", type=int, default=5000)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    prefix = f"bench-votes-{uuid.uuid4().hex[:8]}"
    settings = Settings(key_prefix=prefix, queue_name=prefix)
    store = ComparisonStore.from_url(settings.redis_url, prefix=prefix, ttl_s=3600)
    try:
        comparison_id = write_arena(store, candidates=args.candidates, rows=args.rows, votes=args.votes)
        with TestClient(create_app(settings)) as client:
            url = f"/v1/comparisons/{comparison_id}/votes"
            assert client.get(url).status_code == 200  # warm up
            timings, cpu = [], []
            for _ in range(args.repeat):
                started, started_cpu = time.perf_counter(), time.process_time()
                response = client.get(url)
                timings.append((time.perf_counter() - started) * 1000)
                cpu.append((time.process_time() - started_cpu) * 1000)
                assert response.status_code == 200
        votes = [(v["a"], v["b"], v["winner"]) for v in store.votes(comparison_id)]
        labels = [f"model-{i}" for i in range(args.candidates)]
        fits = []
        for _ in range(min(args.repeat, 10)):
            started = time.perf_counter()
            arena_ranking(labels, votes)
            fits.append((time.perf_counter() - started) * 1000)
    finally:
        keys = list(store.r.scan_iter(f"{prefix}:*"))
        if keys:
            store.r.delete(*keys)
    timings.sort()
    p95 = timings[min(len(timings) - 1, int(0.95 * len(timings)))]
    print(
        f"GET /votes, {args.candidates} candidates, {args.votes} votes, {args.rows} rows: "
        f"median {statistics.median(timings):.1f} ms, p95 {p95:.1f} ms, "
        f"CPU time median {statistics.median(cpu):.1f} ms "
        f"(ranking with bootstrap alone: median {statistics.median(fits):.1f} ms)"
    )


if __name__ == "__main__":
    main()
