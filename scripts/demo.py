"""The bundled demo: start what is not running, submit demo/comparison.json over HTTP, show
progress, then print the side-by-side table, each candidate's metrics and the MLflow UI URL.

    python -m scripts.demo [--spec demo/comparison.json] [--api http://127.0.0.1:8000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from scripts.stack import ROOT, Stack, http_ok
from shared.client import ComparisonClient
from shared.schemas import ComparisonRead


def ensure_stack(api_url: str, run_dir: Path) -> None:
    if http_ok(f"{api_url}/healthz"):
        print(f"Using the API already running at {api_url}")
        return
    print("Starting the local stack (Redis if needed, MLflow on SQLite, API, one worker)...", flush=True)
    stack = Stack(run_dir=run_dir, redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    stack.start()
    print(f"  API {stack.api_url}   MLflow {stack.mlflow_url}   logs {run_dir}/*.log")


def progress_line(state: dict[str, Any]) -> str:
    parts = []
    for c in state["candidates"]:
        p = c["progress"]
        parts.append(f"{c['label']}: {c['status']} {p['done']}/{p['total']}")
    return f"[{state['status']}] " + " | ".join(parts)


def _cell(text: str | None, width: int) -> list[str]:
    return textwrap.wrap(text or "—", width) or [""]


def print_table(results: dict[str, Any]) -> None:
    labels = results["candidates"]
    columns = shutil.get_terminal_size((160, 40)).columns
    width = max(18, (columns - 4 - 3 * (len(labels) + 2)) // (len(labels) + 2))
    headers = ["input", "reference", *labels]
    rule = "+" + "+".join("-" * (width + 2) for _ in headers) + "+"
    print(rule)
    print("|" + "|".join(f" {h[:width]:<{width}} " for h in headers) + "|")
    print(rule.replace("-", "="))
    for row in results["rows"]:
        cells = [_cell(row["input"], width), _cell(row["reference"], width)]
        for label in labels:
            out = row["outputs"][label]
            text = out["output"]
            # Mark rows where the answer holds the reference (or matches it exactly).
            hit = out["scores"].get("contains_reference", out["scores"].get("exact_match"))
            if hit is not None:
                text = f"{text}  [{'✓' if hit else '✗'}]"
            cells.append(_cell(text, width))
        for i in range(max(len(c) for c in cells)):
            print("|" + "|".join(f" {(c[i] if i < len(c) else ''):<{width}} " for c in cells) + "|")
        print(rule)


def metric_cell(value: float, agg: dict[str, Any]) -> str:
    """``mean [95% interval]``; a binary metric (Wilson interval) as rows scoring 1 of n."""
    n = int(agg.get("n") or 0)
    if n <= 1 or "ci_low" not in agg:
        return f"{value:.3g}"
    interval = f"[{agg['ci_low']:.3g}, {agg['ci_high']:.3g}]"
    if agg.get("ci_method") == "wilson":
        return f"{round(agg['mean'] * n)}/{n} = {agg['mean']:.3g} {interval}"
    return f"{agg['mean']:.3g} {interval}"


def print_metrics(state: dict[str, Any]) -> None:
    """One line per metric, a column per candidate: mean [95% interval]."""
    labels = [c["label"] for c in state["candidates"]]
    names = list(dict.fromkeys(m for c in state["candidates"] for m in c["metrics"]))
    width = 30
    print(f"{'metric':<22}" + "".join(f" {label[:width]:>{width}}" for label in labels))
    for name in names:
        cells = []
        for c in state["candidates"]:
            if name not in c["metrics"]:
                cells.append(f" {'—':>{width}}")
            else:
                agg = c.get("aggregates", {}).get(name, {})
                cells.append(" " + metric_cell(c["metrics"][name], agg).rjust(width))
        print(f"{name:<22}" + "".join(cells))
    print(
        "Mean [95% interval]: Wilson score interval for 0/1 metrics (rows scoring 1 of n), "
        "else a seeded percentile bootstrap of the mean (2,000 resamples)."
    )
    for c in state["candidates"]:
        if c.get("error"):
            print(f"  {c['label']} failed: {c['error']}")
    pairs = state.get("pairwise", [])
    decided = [p for p in pairs if p["better"]]
    print()
    if decided:
        print("Paired verdicts (95% paired-bootstrap interval, permutation p-value):")
        for pair in decided:
            print(f"  {pair['verdict']}")
    else:
        print("No metric separates the candidates beyond noise on these rows (paired tests, 5% level).")
    # The test could not judge these at all, as opposed to finding no clear difference.
    unjudged = [p for p in pairs if p.get("note")]
    if unjudged:
        print("Not judged:")
        for pair in unjudged:
            print(f"  {pair['verdict']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", type=Path, default=ROOT / "demo" / "comparison.json")
    parser.add_argument("--api", default=os.environ.get("API_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--run-dir", type=Path, default=ROOT / ".run")
    args = parser.parse_args()

    started = time.monotonic()
    ensure_stack(args.api, args.run_dir)
    client = ComparisonClient(args.api)
    spec = json.loads(args.spec.read_text())
    created = client.submit(spec).model_dump(mode="json")
    print(
        f"Submitted comparison {created['id']} ({len(spec['candidates'])} candidates × "
        f"{len(spec['dataset']['rows'])} prompts) → {args.api}/v1/comparisons/{created['id']}"
    )
    last = ""

    def show(state: ComparisonRead) -> None:
        nonlocal last
        line = progress_line(state.model_dump(mode="json"))
        if line != last:
            print(f"  {time.monotonic() - started:6.1f}s  {line}", flush=True)
            last = line

    final = client.wait(created["id"], on_update=show).model_dump(mode="json")
    results = client.results(created["id"]).model_dump(mode="json")
    print()
    print_table(results)
    print()
    print_metrics(final)
    print()
    print(f"Status: {final['status']}   wall time: {time.monotonic() - started:.1f}s")
    print(f"Web page:  {args.api}/ui/comparisons/{created['id']}   (vote blind: …/arena)")
    print(f"MLflow UI: {final['mlflow']['url']}")
    print(f"CSV: {args.api}/v1/comparisons/{created['id']}/results?format=csv")
    print("The stack keeps running for you to explore; stop it with: make stop")
    return 0 if final["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
