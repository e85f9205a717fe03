"""What the default metric set costs next to generating the outputs it scores.

Generates N rows with SmolLM2-135M-Instruct (the demo prompts, cycled), then scores them with
the default metrics through mlflow.evaluate() as a worker does, with warm metric caches (the
embedding model stays loaded in a worker). Prints both times and the ratio; writes JSON.

    python -m scripts.bench_metrics [--rows 500] [--max-new-tokens 24] [--out bench-metrics.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-metrics.json")
    args = parser.parse_args()

    import mlflow
    from mlflow.tracking import MlflowClient

    from services.worker.evaluation import evaluate_outputs
    from services.worker.generation import generate_outputs, render_prompt
    from services.worker.metrics import build_metrics, cosine_similarities
    from services.worker.models import load_model
    from shared.metrics import DEFAULT_METRICS
    from shared.schemas import CandidateSpec
    from shared.settings import Settings

    spec = json.loads((ROOT / "demo" / "comparison.json").read_text())
    base_rows = spec["dataset"]["rows"]
    rows = [
        {**base_rows[i % len(base_rows)], "input": f"{base_rows[i % len(base_rows)]['input']} (#{i})"}
        for i in range(args.rows)
    ]
    candidate = CandidateSpec.model_validate(
        {**spec["candidates"][0], "generation": {"max_new_tokens": args.max_new_tokens}}
    )

    loaded = load_model(candidate.model, revision=None, settings=Settings())
    prompts = [render_prompt(candidate, loaded, row, chat=True) for row in rows]
    started = time.perf_counter()
    generated = generate_outputs(
        candidate=candidate, loaded=loaded, prompts=prompts, batch_size=args.batch_size
    )
    generation_s = time.perf_counter() - started
    tokens = sum(g.output_tokens or 0 for g in generated)

    # A worker keeps these loaded between comparisons: warm them outside the timed part.
    build_metrics(DEFAULT_METRICS)
    cosine_similarities(["warm up"], ["warm up"])

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        experiment_id = client.create_experiment("bench", artifact_location=f"{tmp}/artifacts")
        run_id = client.create_run(experiment_id).info.run_id
        started = time.perf_counter()
        evaluate_outputs(
            run_id=run_id,
            experiment_id=experiment_id,
            rows=rows,
            prompts=prompts,
            generated=generated,
            metric_names=DEFAULT_METRICS,
            model_type=None,
        )
        metrics_s = time.perf_counter() - started

    result = {
        "rows": args.rows,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "generated_tokens": tokens,
        "generation_seconds": round(generation_s, 2),
        "generation_tokens_per_second": round(tokens / generation_s, 1),
        "metrics": DEFAULT_METRICS,
        "metrics_seconds": round(metrics_s, 2),
        "metrics_share_of_generation": round(metrics_s / generation_s, 4),
        "target": "metrics_seconds < 10% of generation_seconds",
        "target_met": metrics_s < 0.10 * generation_s,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"rows                 {args.rows}  ({tokens} tokens generated, max {args.max_new_tokens} per row)")
    print(
        f"generation           {generation_s:8.1f} s   "
        f"({tokens / generation_s:.1f} tokens/s, batch {args.batch_size})"
    )
    print(f"default metrics      {metrics_s:8.1f} s   ({len(DEFAULT_METRICS)} metrics via mlflow.evaluate)")
    print(
        f"metrics / generation {100 * metrics_s / generation_s:8.1f} %   (target < 10%: "
        f"{'met' if result['target_met'] else 'NOT met'})"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
