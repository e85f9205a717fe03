"""`make bench`: one comparison, run several ways on this machine, with a table and a JSON file.

The work: 2 candidates (SmolLM2-135M-Instruct greedy, and sampled at temperature 0.7) x 64 prompts
(demo/bench-prompts.jsonl) x up to 64 new tokens, with the service's default metrics.

  a  notebook   one mlflow.pyfunc model per candidate wrapping a transformers pipeline, row by
                row, one mlflow.evaluate() per model, one after the other (scripts/bench_notebook.py)
  b0 first run  once: the service on a "fresh host", a new worker with an empty model cache
                directory, so the GGUF file is de-quantised during the run
  b  cold       the service end to end (HTTP submit -> all results), one freshly started worker
                (the de-quantised weights already on disk)
  c  warm       the same comparison again: model already loaded, response cache off
  d  cached     again with the response cache on
  e  lm-eval    EleutherAI lm-evaluation-harness, `lm_eval --model hf`, batch size 32, a local task
                over the same rendered prompts, one process per candidate (whole process timed)

Last, once, the warm run with CPU_DTYPE=bfloat16 (not the default), for CPUs with AMX.

It also measures the machine's ceiling (fp32 matmul FLOP/s and copy bandwidth), the worker's
peak RSS and the time from submit until a warm, idle worker starts generating.

    python -m scripts.bench [--repeat 3] [--skip notebook,first-run,lm-eval,bf16] [--out bench.json]

With --repeat N, b/c/d/e and the latency probe run N times (a fresh worker and an empty response
cache each time) and the table shows medians; the notebook way runs once (--notebook-repeat).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from scripts.stack import ROOT, VENV_BIN, Stack, free_port
from shared.client import FINAL_STATUSES, ComparisonClient

MODEL = "smollm2-135m-instruct"
PROMPTS_FILE = ROOT / "demo" / "bench-prompts.jsonl"
TEMPLATE = "{input} Explain your answer in a paragraph of three or four sentences."
MAX_NEW_TOKENS = 64
LM_EVAL_BATCH = 32
CANDIDATES: list[dict[str, Any]] = [
    {
        "label": "greedy",
        "model": MODEL,
        "prompt_template": TEMPLATE,
        "generation": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": False},
    },
    {
        "label": "sampled-t0.7",
        "model": MODEL,
        "prompt_template": TEMPLATE,
        "generation": {
            "max_new_tokens": MAX_NEW_TOKENS,
            "do_sample": True,
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": 7,
        },
    },
]


def log(message: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {message}", flush=True)


def load_rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in PROMPTS_FILE.read_text().splitlines() if line.strip()]


def comparison_spec(rows: list[dict[str, Any]], *, name: str, cache: bool) -> dict[str, Any]:
    return {
        "name": name,
        "experiment": "llm-compare-bench",
        "model_type": "question-answering",
        "candidates": CANDIDATES,
        "dataset": {"rows": rows},
        "cache": cache,
    }


def default_metrics() -> list[str]:
    from shared.metrics import DEFAULT_METRICS

    return list(DEFAULT_METRICS)


# ------------------------------------------------------------------------------- the machine
def measure_machine() -> dict[str, float]:
    """fp32 matmul FLOP/s and memory copy bandwidth, with torch's default thread count."""
    import torch

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps = 20
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    flops = 2 * n**3 * reps / (time.perf_counter() - started)

    src = torch.ones(64 * 1024 * 1024)  # 256 MiB, far above any cache
    dst = torch.empty_like(src)
    dst.copy_(src)
    reps = 10
    started = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    # A copy reads and writes every byte once.
    bandwidth = 2 * src.numel() * src.element_size() * reps / (time.perf_counter() - started)
    return {
        "torch_threads": torch.get_num_threads(),
        "matmul_gflops": round(flops / 1e9, 1),
        "copy_bandwidth_gbs": round(bandwidth / 1e9, 2),
    }


def ceiling(machine: dict[str, float], model: dict[str, Any], batch: int) -> dict[str, float]:
    """Tokens/s a decoder could reach at this batch size: each step reads every weight once and
    does 2 FLOPs per parameter per row, whichever of the two takes longer."""
    flops_per_token = 2 * model["parameters"]
    compute_s = batch * flops_per_token / (machine["matmul_gflops"] * 1e9)
    memory_s = model["weight_bytes"] / (machine["copy_bandwidth_gbs"] * 1e9)
    return {
        "batch": batch,
        "gflop_per_token": round(flops_per_token / 1e9, 3),
        "compute_bound_tokens_per_s": round(machine["matmul_gflops"] * 1e9 / flops_per_token, 1),
        "tokens_per_s_at_batch": round(batch / max(compute_s, memory_s), 1),
    }


# ------------------------------------------------------------------------------ a: notebook
def python() -> str:
    venv = VENV_BIN / "python"
    return str(venv) if venv.exists() else sys.executable


def run_json(args: list[str], *, env: dict[str, str] | None = None, log_file: Path) -> dict[str, Any]:
    with log_file.open("ab") as err:
        done = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])}... failed with {done.returncode}; see {log_file}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def count_tokens(model_dir: str, texts: list[str]) -> int:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


def notebook_way(
    *, prompts: list[str], rows: list[dict[str, Any]], tracking_uri: str, model_dir: str, work: Path
) -> dict[str, Any]:
    spec = {
        "experiment": "llm-compare-bench-notebook",
        "metrics": default_metrics(),
        "prompts": prompts,
        "references": [row["reference"] for row in rows],
        "candidates": [{"label": c["label"], "generation": c["generation"]} for c in CANDIDATES],
    }
    spec_file = work / "notebook-spec.json"
    spec_file.write_text(json.dumps(spec))
    started = time.perf_counter()
    result = run_json(
        [
            python(),
            "-m",
            "scripts.bench_notebook",
            "run",
            "--spec",
            str(spec_file),
            "--tracking-uri",
            tracking_uri,
            "--model-dir",
            model_dir,
        ],
        log_file=work / "notebook.log",
    )
    result["process_seconds"] = round(time.perf_counter() - started, 2)
    return result


# ------------------------------------------------------------------------------- b, c, d: service
def wait_quietly(client: ComparisonClient, comparison_id: str, timeout: float = 3600) -> dict[str, Any]:
    """Poll often for the first seconds, then twice a second: each poll costs the gateway and
    this process CPU that the worker's generation would otherwise have on a 2-core machine."""
    started = time.monotonic()
    while True:
        state = client.get(comparison_id).model_dump(mode="json")
        if state["status"] in FINAL_STATUSES:
            return state
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            raise TimeoutError(f"comparison {comparison_id} still {state['status']} after {timeout:.0f}s")
        time.sleep(0.02 if elapsed < 3 else 0.5)


def service_run(client: ComparisonClient, spec: dict[str, Any], mlflow_uri: str) -> dict[str, Any]:
    submitted = datetime.now(UTC)
    comparison_id = client.submit(spec).id
    state = wait_quietly(client, comparison_id)
    fetch_started = time.perf_counter()
    results = client.results(comparison_id).model_dump(mode="json")
    fetch_seconds = time.perf_counter() - fetch_started
    # From the submit call to the comparison's end as the server stamped it (same host clock, so
    # the polling interval adds nothing), plus reading the results back.
    finished = datetime.fromisoformat(state["finished_at"])
    seconds = (finished - submitted).total_seconds() + fetch_seconds
    if state["status"] != "succeeded":
        raise RuntimeError(f"comparison {comparison_id} ended {state['status']}: {state.get('error')}")
    tokens = sum(
        int(row["outputs"][label]["scores"].get("output_tokens") or 0)
        for row in results["rows"]
        for label in results["candidates"]
    )
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(mlflow_uri)
    per_candidate = []
    for cand in state["candidates"]:
        metrics = mlflow.get_run(cand["mlflow_run_id"]).data.metrics
        per_candidate.append(
            {
                "label": cand["label"],
                "load_seconds": round(metrics.get("load_seconds", 0.0), 2),
                "generation_seconds": round(metrics.get("generation_seconds", 0.0), 2),
                "generation_tokens_per_second": round(metrics.get("generation_tokens_per_second", 0.0), 1),
                "cache_hits": cand["progress"]["cache_hits"],
            }
        )
    generation_s = sum(c["generation_seconds"] for c in per_candidate)
    # Every row was generated (no response-cache hit), so the output tokens are what was generated.
    all_generated = all(c["cache_hits"] == 0 for c in per_candidate) and generation_s > 0
    return {
        "comparison_id": comparison_id,
        "seconds": round(seconds, 2),
        "output_tokens": tokens,
        "generation_seconds": round(generation_s, 2),
        "generation_tokens_per_second": round(tokens / generation_s, 1) if all_generated else None,
        "candidates": per_candidate,
    }


def submit_to_generation_latency(
    client: ComparisonClient, rows: list[dict[str, Any]], probes: int
) -> list[float]:
    """Seconds from the gateway accepting a comparison until its first candidate's first batch
    goes to the model, on a warm and idle worker (each probe waits for the previous one)."""
    small = [{**c, "generation": {**c["generation"], "max_new_tokens": 4}} for c in CANDIDATES]
    latencies = []
    for i in range(probes):
        spec = {**comparison_spec(rows[:2], name=f"latency-probe-{i}", cache=False), "candidates": small}
        comparison_id = client.submit(spec).id
        state = wait_quietly(client, comparison_id, timeout=300)
        created = datetime.fromisoformat(state["created_at"])
        starts = [
            datetime.fromisoformat(c["generation_started_at"])
            for c in state["candidates"]
            if c.get("generation_started_at")
        ]
        if not starts:
            raise RuntimeError(f"latency probe {comparison_id} never generated: {state['status']}")
        latencies.append((min(starts) - created).total_seconds())
    return latencies


def worker_peak_rss(root_pid: int) -> dict[str, int]:
    """Peak resident memory (VmHWM) of the worker's main process and of its pool children."""

    def hwm(pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    children_file = Path(f"/proc/{root_pid}/task/{root_pid}/children")
    children = [int(p) for p in children_file.read_text().split()] if children_file.exists() else []
    return {"main": hwm(root_pid), "pool_child_max": max((hwm(p) for p in children), default=0)}


def clear_response_cache(redis_url: str, prefix: str) -> int:
    from shared.store import ComparisonStore

    store = ComparisonStore.from_url(redis_url, prefix=prefix)
    keys = list(store.response_cache_keys())
    if keys:
        store.r.delete(*keys)
    return len(keys)


def restart_worker(stack: Stack) -> int:
    stack.stop(["worker0"])
    stack.log_path("worker0").unlink(missing_ok=True)
    proc = stack.start_worker(0)
    stack.wait_workers(timeout=120)
    return proc.pid


# --------------------------------------------------------------------------------- e: lm-eval
LM_EVAL_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{reference}}}}"
generation_kwargs:
{generation}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def lm_eval_generation_yaml(generation: dict[str, Any]) -> str:
    lines = ['  until: ["<|im_end|>"]', f"  max_gen_toks: {generation['max_new_tokens']}"]
    lines.append(f"  do_sample: {str(generation['do_sample']).lower()}")
    if generation["do_sample"]:
        lines += [f"  temperature: {generation['temperature']}", f"  top_p: {generation['top_p']}"]
    return "\n".join(lines)


def lm_eval_run(
    *,
    lm_eval: str,
    model_dir: str,
    prompts: list[str],
    rows: list[dict[str, Any]],
    work: Path,
) -> dict[str, Any]:
    tasks = work / "lm-eval-tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    data = tasks / "bench.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": p, "reference": r["reference"]}) + "\n"
            for p, r in zip(prompts, rows, strict=True)
        )
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    per_candidate = []
    total_seconds = 0.0
    texts: list[str] = []
    for candidate in CANDIDATES:
        name = "llmc_bench_" + candidate["label"].replace("-", "_").replace(".", "_")
        (tasks / f"{name}.yaml").write_text(
            LM_EVAL_TASK.format(
                name=name, data=data, generation=lm_eval_generation_yaml(candidate["generation"])
            )
        )
        output = work / f"lm-eval-out-{name}"
        args = [
            lm_eval,
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model_dir},dtype=float32",
            "--tasks",
            name,
            "--include_path",
            str(tasks),
            "--batch_size",
            str(LM_EVAL_BATCH),
            "--device",
            "cpu",
            "--seed",
            str(candidate["generation"].get("seed", 0)),
            "--output_path",
            str(output),
            "--log_samples",
        ]
        started = time.perf_counter()
        with (work / "lm-eval.log").open("ab") as out:
            done = subprocess.run(args, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"lm_eval failed with {done.returncode}; see {work / 'lm-eval.log'}")
        samples = sorted(output.rglob(f"samples_{name}_*.jsonl"))
        outputs = [json.loads(line)["resps"][0][0] for line in samples[-1].read_text().splitlines()]
        texts += outputs
        total_seconds += seconds
        per_candidate.append(
            {"label": candidate["label"], "seconds": round(seconds, 2), "rows": len(outputs)}
        )
    return {
        "seconds": round(total_seconds, 2),
        "output_tokens": count_tokens(model_dir, texts),
        "candidates": per_candidate,
    }


# ------------------------------------------------------------------------------------ report
def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(runs: dict[str, list[dict[str, Any]]], key: str = "seconds") -> dict[str, float | None]:
    return {
        mode: median([r[key] for r in results if r.get(key) is not None]) for mode, results in runs.items()
    }


def verdicts(report: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    s = report["median_seconds"]
    out: list[tuple[str, str, bool | None]] = []

    def ratio(x: str, y: str) -> float | None:
        return s[x] / s[y] if s.get(x) and s.get(y) else None

    def check(label: str, value: float | None, target: float, fmt: str, higher: bool = True) -> None:
        if value is None:
            out.append((label, "not measured", None))
            return
        out.append((label, fmt.format(value), value >= target if higher else value < target))

    check("(b) >= 5x faster than (a)", ratio("a_notebook", "b_cold"), 5, "a/b = {:.1f}x")
    check("(c) no slower than (e)", ratio("e_lm_eval", "c_warm"), 1.0, "e/c = {:.2f}x")
    check("(c) >= 1.3x faster than (b)", ratio("b_cold", "c_warm"), 1.3, "b/c = {:.2f}x")
    check("  ... than (b0), first run on a host", ratio("b0_first_run", "c_warm"), 1.3, "b0/c = {:.2f}x")
    check("(d) >= 20x faster than (c)", ratio("c_warm", "d_cached"), 20, "c/d = {:.1f}x")
    check(">= 200 generated tokens/s", report.get("generation_tokens_per_second"), 200, "{:.0f} tokens/s")
    rss = report.get("worker_peak_rss_bytes")
    check("worker peak RSS < 1.5 GB", rss / 1e9 if rss else None, 1.5, "{:.2f} GB", higher=False)
    check(
        "submit -> generation start < 0.5 s",
        report.get("submit_to_generation_median_s"),
        0.5,
        "{:.3f} s (median)",
        higher=False,
    )
    return out


def print_table(report: dict[str, Any]) -> None:
    runs = report["runs"]
    names = {
        "a_notebook": "a  notebook (pyfunc pipeline, row by row)",
        "b0_first_run": "b0 service, fresh host (GGUF de-quantised)",
        "b_cold": "b  service, cold worker",
        "c_warm": "c  service, warm, response cache off",
        "d_cached": "d  service, response cache on",
        "e_lm_eval": f"e  lm-evaluation-harness (batch {LM_EVAL_BATCH})",
        "c_bf16": "c  again with CPU_DTYPE=bfloat16 (not default)",
    }
    print()
    print(
        f"{'mode':<46} {'runs':>4} {'wall s (median)':>16} {'all runs':>24} "
        f"{'out tokens':>11} {'tok/s wall':>11}"
    )
    for mode, label in names.items():
        results = runs.get(mode) or []
        if not results:
            print(f"{label:<46} {'—':>4}")
            continue
        walls = [r["seconds"] for r in results]
        tokens = results[-1].get("output_tokens") or results[-1].get("generated_tokens") or 0
        wall = statistics.median(walls)
        per_s = f"{tokens / wall:.0f}" if mode != "d_cached" and wall else "—"
        print(
            f"{label:<46} {len(results):>4} {wall:>16.2f} {', '.join(f'{w:.1f}' for w in walls):>24} "
            f"{tokens:>11} {per_s:>11}"
        )
    machine, ceil = report["machine"], report["ceiling"]
    print()
    print(
        f"machine: {machine['matmul_gflops']} GFLOP/s fp32 matmul, "
        f"{machine['copy_bandwidth_gbs']} GB/s copy, {machine['torch_threads']} torch threads; "
        f"model {report['model']['parameters'] / 1e6:.1f} M params, "
        f"{report['model']['weight_bytes'] / 1e6:.0f} MB fp32"
    )
    print(
        f"ceiling: {ceil['compute_bound_tokens_per_s']} tokens/s compute-bound, "
        f"{ceil['tokens_per_s_at_batch']} tokens/s at batch {ceil['batch']} "
        "(memory or compute, whichever binds)"
    )
    rate = report.get("generation_tokens_per_second")
    if rate:
        print(
            f"generation (c, median): {rate:.0f} tokens/s = "
            f"{rate / ceil['tokens_per_s_at_batch']:.0%} of the batch-{ceil['batch']} ceiling, "
            f"{rate / ceil['compute_bound_tokens_per_s']:.0%} of the compute ceiling"
        )
    bf16 = runs.get("c_bf16") or []
    if bf16:
        print(
            f"with CPU_DTYPE=bfloat16: {bf16[-1]['generation_tokens_per_second']} tokens/s, "
            f"worker peak RSS {bf16[-1]['worker_peak_rss_after'] / 1e9:.2f} GB (a fresh worker)"
        )
    print()
    for label, value, ok in verdicts(report):
        mark = "—" if ok is None else ("met" if ok else "NOT met")
        print(f"  {label:<40} {value:<24} {mark}")


# -------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs of b, c, d, e and the latency probe")
    parser.add_argument("--notebook-repeat", type=int, default=1)
    parser.add_argument("--skip", default="", help="comma-separated: notebook, first-run, lm-eval, bf16")
    parser.add_argument("--latency-probes", type=int, default=7)
    parser.add_argument("--lm-eval", default=str(ROOT / ".venv-lmeval" / "bin" / "lm_eval"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench.json")
    args = parser.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if "lm-eval" not in skip and not Path(args.lm_eval).exists():
        raise SystemExit(
            f"{args.lm_eval} not found: run `make bench` (it installs .venv-lmeval), or --skip lm-eval"
        )

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = load_rows()
    tag = uuid.uuid4().hex[:8]
    work = ROOT / ".run" / f"bench-{tag}"
    work.mkdir(parents=True, exist_ok=True)
    log(
        f"work: {len(CANDIDATES)} candidates x {len(rows)} prompts x {MAX_NEW_TOKENS} new tokens; "
        f"logs in {work}"
    )

    log("preparing the model (the GGUF file is de-quantised once per host) ...")
    model = run_json(
        [
            python(),
            "-m",
            "scripts.bench_notebook",
            "prepare",
            "--candidate",
            json.dumps(CANDIDATES[0]),
            "--rows",
            str(PROMPTS_FILE),
        ],
        log_file=work / "prepare.log",
    )
    # Every candidate shares the template, so these are the prompts each of them sees.
    prompts = model.pop("prompts")
    machine = measure_machine()
    from services.worker.generation import rows_per_batch
    from shared.settings import Settings

    settings = Settings()
    # The batch the worker will use: GENERATION_BATCH_SIZE, capped by the attention-cache budget.
    batch = rows_per_batch(
        rows=len(rows),
        batch_size=settings.generation_batch_size,
        longest_tokens=model["longest_prompt_tokens"] + 1 + MAX_NEW_TOKENS,
        bytes_per_token=model["kv_cache_bytes_per_token"],
        budget_bytes=settings.kv_cache_budget_bytes,
    )
    log(f"machine: {machine}")

    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    stack = Stack(
        run_dir=work,
        redis_url=redis_url,
        api_port=free_port(),
        mlflow_port=free_port(),
        workers=1,
        queue_name=f"bench-{tag}",
        key_prefix=f"bench-{tag}",
    )
    modes = ("a_notebook", "b0_first_run", "b_cold", "c_warm", "d_cached", "e_lm_eval", "c_bf16")
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    latencies: list[float] = []
    rss: list[dict[str, int]] = []
    report: dict[str, Any] = {}
    try:
        log("starting MLflow server, API and one worker ...")
        stack.start()
        client = ComparisonClient(stack.api_url, timeout=60)
        if "notebook" not in skip:
            for i in range(args.notebook_repeat):
                log(
                    f"(a) notebook way, run {i + 1}/{args.notebook_repeat} "
                    "(row by row: this is the slow one) ..."
                )
                runs["a_notebook"].append(
                    notebook_way(
                        prompts=prompts,
                        rows=rows,
                        tracking_uri=stack.mlflow_url,
                        model_dir=model["model_dir"],
                        work=work,
                    )
                )
                log(f"    {runs['a_notebook'][-1]['seconds']} s")
        if "first-run" not in skip:
            # Once: a worker whose model cache directory is empty, as on a host that has never
            # loaded this GGUF file (the de-quantised copy is written during this run).
            clear_response_cache(redis_url, stack.key_prefix)
            with tempfile.TemporaryDirectory(dir=work) as empty_cache:
                stack.extra_env["MODEL_CACHE_DIR"] = empty_cache
                worker_pid = restart_worker(stack)
                log("(b0) the service on a fresh host: new worker, empty model cache directory ...")
                result = service_run(
                    client, comparison_spec(rows, name="bench-first-run", cache=True), stack.mlflow_url
                )
                runs["b0_first_run"].append(result)
                log(f"    {result['seconds']} s (load {result['candidates'][0]['load_seconds']} s)")
                del stack.extra_env["MODEL_CACHE_DIR"]
        for i in range(args.repeat):
            cleared = clear_response_cache(redis_url, stack.key_prefix)
            worker_pid = restart_worker(stack) if i or runs["b0_first_run"] else stack.pids["worker0"]
            log(f"round {i + 1}/{args.repeat}: fresh worker {worker_pid}, {cleared} cached responses cleared")
            for mode, cache in (("b_cold", True), ("c_warm", False), ("d_cached", True)):
                result = service_run(
                    client, comparison_spec(rows, name=f"bench-{mode}-{i}", cache=cache), stack.mlflow_url
                )
                result["worker_peak_rss_after"] = worker_peak_rss(worker_pid)["pool_child_max"]
                runs[mode].append(result)
                log(
                    f"    ({mode[0]}) {mode}: {result['seconds']} s, generation "
                    f"{result['generation_tokens_per_second']} tokens/s, worker peak RSS so far "
                    f"{result['worker_peak_rss_after'] / 1e9:.2f} GB"
                )
            probe = submit_to_generation_latency(client, rows, args.latency_probes)
            latencies += probe
            log(f"    submit -> generation start: median {statistics.median(probe):.3f} s of {len(probe)}")
            rss.append(worker_peak_rss(worker_pid))
            log(f"    worker peak RSS: {rss[-1]}")
            if "lm-eval" not in skip:
                result = lm_eval_run(
                    lm_eval=args.lm_eval, model_dir=model["model_dir"], prompts=prompts, rows=rows, work=work
                )
                runs["e_lm_eval"].append(result)
                log(f"    (e) lm-eval: {result['seconds']} s")
        if "bf16" not in skip:
            # Not the default: CPU_DTYPE=bfloat16, which trades fp32's exactness for speed on CPUs
            # with AMX / AVX-512 BF16. One cold run to load, then the measured warm run.
            stack.extra_env["CPU_DTYPE"] = "bfloat16"
            worker_pid = restart_worker(stack)
            log("(c-bf16) the warm run again with CPU_DTYPE=bfloat16 ...")
            service_run(client, comparison_spec(rows, name="bench-bf16-load", cache=False), stack.mlflow_url)
            result = service_run(
                client, comparison_spec(rows, name="bench-bf16", cache=False), stack.mlflow_url
            )
            result["worker_peak_rss_after"] = worker_peak_rss(worker_pid)["pool_child_max"]
            runs["c_bf16"].append(result)
            log(
                f"    {result['seconds']} s, generation {result['generation_tokens_per_second']} tokens/s, "
                f"worker peak RSS {result['worker_peak_rss_after'] / 1e9:.2f} GB"
            )
            del stack.extra_env["CPU_DTYPE"]
        client.close()
    finally:
        stack.stop()

    ceil = ceiling(machine, model, batch)
    report = {
        "work": {
            "candidates": CANDIDATES,
            "prompts": len(rows),
            "prompts_file": str(PROMPTS_FILE.relative_to(ROOT)),
            "metrics": default_metrics(),
        },
        "machine": machine,
        "model": model,
        "ceiling": ceil,
        "runs": runs,
        "median_seconds": summarize(runs),
        "generation_tokens_per_second": median(
            [r["generation_tokens_per_second"] for r in runs["c_warm"] if r["generation_tokens_per_second"]]
        ),
        "submit_to_generation_s": [round(v, 4) for v in latencies],
        "submit_to_generation_median_s": median(latencies),
        "worker_peak_rss": rss,
        "worker_peak_rss_bytes": max((r["pool_child_max"] for r in rss), default=None),
    }
    report["targets"] = [{"target": t, "value": v, "met": ok} for t, v, ok in verdicts(report)]
    args.out.write_text(json.dumps(report, indent=2))
    print_table(report)
    print(f"\nwritten to {args.out}")
    shutil.rmtree(work / "mlflow", ignore_errors=True)


if __name__ == "__main__":
    main()
