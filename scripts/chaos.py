"""Faults on purpose, with figures: `make chaos` (or `python -m scripts.chaos [scenario ...]`).

Starts its own stack of real local processes on free loopback ports — Redis (its own
redis-server with append-only persistence, as compose runs it), an MLflow server, two Celery
workers on tiny random-weight models, the API with API keys on — then, one scenario at a time:

  kill9        SIGKILL the worker process running a candidate
  sigterm      SIGTERM the worker running a candidate (a redeploy), then start it again
  redis        restart Redis in the middle of a comparison
  mlflow       stop the MLflow server for 60 s in the middle of a comparison
  api          restart the API while clients submit
  hostile      every hostile request of tests/fixtures/hostile.py, /healthz probed meanwhile
  schemathesis property-based requests against /openapi.json, with an API key
  load         2,000 submissions from 50 clients over 3 keys (scripts.bench_submit --keys 3)

Prints a table and writes chaos.json. Every scenario stops by itself; traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
from mlflow.tracking import MlflowClient

from scripts.stack import ROOT, Stack, free_port, http_ok
from shared.apikeys import Quotas, Role, issue_key
from shared.client import ComparisonClient
from shared.store import ComparisonStore

SCENARIOS = ["kill9", "sigterm", "redis", "mlflow", "api", "hostile", "schemathesis", "load"]
MLFLOW_DOWN_S = 60
HOSTILE_ROUNDS = 5


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


class Chaos:
    def __init__(self, run_dir: Path):
        from tests.fixtures.tiny_models import build_all

        self.run_dir = run_dir
        self.models = build_all(run_dir / "models")
        tag = f"chaos-{uuid.uuid4().hex[:8]}"
        self.stack = Stack(
            run_dir=run_dir / "stack",
            # A port nothing answers on: the stack starts its own append-only redis-server there.
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            api_port=free_port(),
            mlflow_port=free_port(),
            workers=2,
            worker_concurrency=1,
            queue_name=tag,
            key_prefix=tag,
            extra_env={
                "AUTH_DISABLED": "false",
                "MODEL_ROOTS": str(run_dir / "models"),
                "TORCH_THREADS": "1",
                "GENERATION_BATCH_SIZE": "4",
            },
        )
        self.key = ""

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        self.stack.start()
        store = self.store()
        plenty = 1_000_000
        self.key = issue_key(
            store,
            name="chaos",
            role=Role.admin,
            quotas=Quotas(submissions_per_minute=plenty, max_running=plenty),
        )[1]

    def stop(self) -> None:
        self.stack.stop()

    def store(self) -> ComparisonStore:
        return ComparisonStore(
            redis.Redis.from_url(self.stack.redis_url, decode_responses=True), prefix=self.stack.key_prefix
        )

    def client(self) -> ComparisonClient:
        return ComparisonClient(self.stack.api_url, api_key=self.key, timeout=30)

    def spec(self, name: str, *, rows: int, new_tokens: int) -> dict[str, Any]:
        return {
            "name": name,
            "experiment": "chaos",
            "candidates": [
                {
                    "label": "a",
                    "model": str(self.models["causal"]),
                    "generation": {"max_new_tokens": new_tokens},
                },
                {
                    "label": "b",
                    "model": str(self.models["causal"]),
                    "generation": {"max_new_tokens": new_tokens, "do_sample": True, "seed": 3},
                },
            ],
            "dataset": {"rows": [{"input": f"Count the words in sentence number {i}."} for i in range(rows)]},
            "metrics": ["output_tokens", "output_words"],
            "cache": False,
        }

    def wait_mid_generation(
        self, client: ComparisonClient, cid: str, label: str, timeout: float = 180
    ) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            candidate = next(c for c in client.get(cid).candidates if c.label == label)
            done, total = candidate.progress.done, candidate.progress.total
            if candidate.status == "running" and 0 < done < total and candidate.worker:
                return candidate.model_dump(mode="json")
            time.sleep(0.05)
        raise TimeoutError(f"{label} of {cid} never seen mid-generation")

    def check_complete(self, client: ComparisonClient, cid: str, final: dict[str, Any]) -> dict[str, Any]:
        """Rows lost and duplicate MLflow runs of a finished comparison."""
        results = client.results(cid)
        rows = len(results.rows)
        lost = sum(
            1 for row in results.rows for out in row.outputs.values() if not isinstance(out.output, str)
        )
        mlflow = MlflowClient(self.stack.mlflow_url)
        experiment = mlflow.get_experiment_by_name("chaos")
        assert experiment is not None, "the comparison never reached MLflow"
        runs = mlflow.search_runs(
            [experiment.experiment_id], filter_string=f"tags.`llm_compare.comparison_id` = '{cid}'"
        )
        per_label: dict[str, int] = {}
        for run in runs:
            label = run.data.tags.get("llm_compare.candidate")
            if label:
                per_label[label] = per_label.get(label, 0) + 1
        statuses = {run.data.tags.get("llm_compare.candidate") or "parent": run.info.status for run in runs}
        return {
            "status": final["status"],
            "rows": rows,
            "rows_lost": lost,
            "duplicate_mlflow_runs": sum(n - 1 for n in per_label.values()),
            "mlflow_runs": statuses,
        }

    # ------------------------------------------------------------------ scenarios
    def _worker_of(self, child_pid: int) -> str:
        """The stack's worker whose process group holds this pool process."""
        group = os.getpgid(child_pid)
        return next(name for name, pid in self.stack.pids.items() if pid == group)

    def kill_worker(self, how: signal.Signals) -> dict[str, Any]:
        with self.client() as client:
            cid = client.submit(self.spec(f"chaos-{how.name.lower()}", rows=48, new_tokens=48)).id
            victim = self.wait_mid_generation(client, cid, "a")
            pid = int(victim["worker"].rsplit(":", 1)[1])
            name = self._worker_of(pid)
            killed_at = time.monotonic()
            if how is signal.SIGKILL:
                os.kill(pid, signal.SIGKILL)  # the pool process: its parent lives on
            else:
                os.killpg(self.stack.pids[name], signal.SIGTERM)  # the whole worker, as a redeploy does
            takeover = None
            restarted = False
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                state = client.get(cid)
                a = next(c for c in state.candidates if c.label == "a")
                if takeover is None and a.worker and a.worker != victim["worker"]:
                    takeover = time.monotonic() - killed_at
                if how is signal.SIGTERM and not restarted and self._exited(name):
                    # A redeploy brings the worker back.
                    self.stack.pids.pop(name, None)
                    self.stack.start_worker(int(name.removeprefix("worker")))
                    restarted = True
                if state.status.is_final:
                    break
                time.sleep(0.2)
            final = client.get(cid).model_dump(mode="json")
            report = self.check_complete(client, cid, final)
        if how is signal.SIGKILL:
            # Its pool process is replaced by the worker itself; nothing to restart.
            pass
        report["takeover_s"] = None if takeover is None else round(takeover, 1)
        report["finished_s"] = round(time.monotonic() - killed_at, 1)
        return report

    def _exited(self, name: str) -> bool:
        pid = self.stack.pids[name]
        with contextlib.suppress(ChildProcessError):  # reap it if it is our child (no zombie)
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        return False

    def restart_redis(self) -> dict[str, Any]:
        with self.client() as client:
            before = [client.submit(self.spec(f"chaos-redis-{i}", rows=8, new_tokens=8)).id for i in range(3)]
            cid = client.submit(self.spec("chaos-redis", rows=48, new_tokens=32)).id
            self.wait_mid_generation(client, cid, "a")
            pid = self.stack.pids["redis"]
            os.killpg(pid, signal.SIGTERM)  # a clean restart: Redis flushes its append-only file
            while not self._exited("redis"):
                time.sleep(0.05)
            down_at = time.monotonic()
            self.stack.pids.pop("redis")
            self.stack.start_redis()
            restart_s = time.monotonic() - down_at
            after = []
            for i in range(3):
                after.append(
                    self._submit_retrying(client, self.spec(f"chaos-redis-after-{i}", rows=8, new_tokens=8))
                )
            accepted = [*before, cid, *after]
            finals = {c: client.wait(c, timeout=600, poll_s=0.5).status.value for c in accepted}
            report = self.check_complete(client, cid, client.get(cid).model_dump(mode="json"))
        report.update(
            redis_down_s=round(restart_s, 1),
            accepted=len(accepted),
            accepted_lost=sum(1 for status in finals.values() if status is None),
            accepted_succeeded=sum(1 for status in finals.values() if status == "succeeded"),
        )
        return report

    def _submit_retrying(self, client: ComparisonClient, spec: dict[str, Any], patience: float = 60) -> str:
        deadline = time.monotonic() + patience
        while True:
            try:
                return client.submit(spec).id
            except Exception:  # noqa: BLE001 - a restart in progress; retry until patience runs out
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop_mlflow(self) -> dict[str, Any]:
        with self.client() as client:
            cid = client.submit(self.spec("chaos-mlflow", rows=48, new_tokens=32)).id
            self.wait_mid_generation(client, cid, "a")
            os.killpg(self.stack.pids.pop("mlflow"), signal.SIGTERM)
            while http_ok(f"{self.stack.mlflow_url}/health"):
                time.sleep(0.2)
            time.sleep(MLFLOW_DOWN_S)
            self.stack.start_mlflow()
            final = client.wait(cid, timeout=900, poll_s=1.0).model_dump(mode="json")
            report = self.check_complete(client, cid, final)
        # Everything reached MLflow: both candidates' tables and the summary on the parent run.
        mlflow = MlflowClient(self.stack.mlflow_url)
        parent = final["mlflow"]["parent_run_id"]
        artifacts = {a.path for a in mlflow.list_artifacts(parent)}
        tables = [
            "eval_results_table.json" in {a.path for a in mlflow.list_artifacts(c["mlflow_run_id"])}
            for c in final["candidates"]
        ]
        report.update(
            mlflow_down_s=MLFLOW_DOWN_S,
            parent_summary_logged="comparison_summary.json" in artifacts,
            candidate_tables_logged=all(tables),
        )
        return report

    def restart_api(self) -> dict[str, Any]:
        """Clients keep submitting while the API process is stopped and started again (a deploy).
        Every submission answered 202 must be stored and on its way: its start task on the queue
        or already run. A sample of them is followed to the end."""
        spec = self.spec("chaos-api", rows=2, new_tokens=4)
        accepted: list[str] = []
        refused: list[int] = []
        stop = threading.Event()

        def submitter() -> None:
            with self.client() as client:
                while not stop.is_set():
                    try:
                        response = client.http.post("/v1/comparisons", json=spec)
                    except httpx.TransportError:
                        refused.append(0)
                    else:
                        if response.status_code == 202:
                            accepted.append(response.json()["id"])
                        else:
                            refused.append(response.status_code)
                    time.sleep(0.1)

        threads = [threading.Thread(target=submitter) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(3)
        os.killpg(self.stack.pids.pop("api"), signal.SIGTERM)
        stopped_at = time.monotonic()
        self.stack.start_api()
        downtime = time.monotonic() - stopped_at
        time.sleep(3)
        stop.set()
        for thread in threads:
            thread.join()
        store = self.store()
        queued = "\n".join(str(m) for m in store.r.lrange(self.stack.queue_name, 0, -1))
        lost = []
        for cid in accepted:
            if not store.exists(cid):
                lost.append(cid)
            elif store.status(cid).value == "queued" and cid not in queued and not store.task_ids(cid):
                lost.append(cid)  # stored but its start task is nowhere
        sample = accepted[:: max(1, len(accepted) // 8)]
        with self.client() as client:
            finals = [client.wait(cid, timeout=900, poll_s=1.0).status.value for cid in sample]
        return {
            "accepted": len(accepted),
            "accepted_lost": len(lost),
            "followed_to_the_end": len(sample),
            "followed_succeeded": finals.count("succeeded"),
            "refused_while_restarting": len(refused),
            "api_restart_s": round(downtime, 1),
        }

    def hostile(self) -> dict[str, Any]:
        from shared.settings import Settings
        from tests.fixtures.hostile import CASES, Limits

        # The stack runs with the default limits, which is what the cases are sized by.
        limits = Limits.of(Settings())
        probes: list[float] = []
        stop = threading.Event()

        def probe() -> None:
            with httpx.Client(base_url=self.stack.api_url, timeout=30) as http:
                while not stop.is_set():
                    started = time.perf_counter()
                    http.get("/healthz")
                    probes.append(time.perf_counter() - started)
                    time.sleep(0.02)

        prober = threading.Thread(target=probe)
        prober.start()
        outcomes = []
        with httpx.Client(
            base_url=self.stack.api_url, timeout=60, headers={"Authorization": f"Bearer {self.key}"}
        ) as http:
            # Several rounds, so /healthz is probed often enough for a p99 to mean something.
            for _ in range(HOSTILE_ROUNDS):
                for case in CASES:
                    started = time.perf_counter()
                    try:
                        status = case.build(limits).send(http).status_code
                    except httpx.HTTPError:
                        status = 0
                    outcomes.append((case.name, status, time.perf_counter() - started))
        stop.set()
        prober.join()
        return {
            "cases": len(CASES),
            "requests": len(outcomes),
            "answered_4xx": sum(1 for _, status, _ in outcomes if 400 <= status < 500),
            "server_errors": sorted({name for name, status, _ in outcomes if status >= 500 or status == 0}),
            "slowest_case_s": round(max(t for _, _, t in outcomes), 2),
            "healthz_probes": len(probes),
            "healthz_p99_ms": round(1000 * percentile(probes, 0.99), 1),
            "healthz_max_ms": round(1000 * max(probes), 1),
        }

    def schemathesis(self) -> dict[str, Any]:
        # Ids for the path parameters: one finished comparison, so the operations on a comparison
        # reach their logic instead of stopping at 404.
        with self.client() as client:
            cid = client.submit(self.spec("chaos-schemathesis", rows=4, new_tokens=4)).id
            client.wait(cid, timeout=300, poll_s=0.5)
        config = self.run_dir / "schemathesis.toml"
        config.write_text(f'[parameters]\n"path.comparison_id" = "{cid}"\n')
        report = self.run_dir / "schemathesis.json"
        command = [
            str(Path(sys.executable).parent / "schemathesis"),
            "--config-file",
            str(config),
            "run",
            f"{self.stack.api_url}/openapi.json",
            "--checks",
            "all",
            # Schema-valid is not always valid here: catalog names, unique labels and metric needs
            # are checked by the service beyond what JSON Schema can say (each a 422 naming the field).
            "--exclude-checks",
            "positive_data_acceptance",
            "-H",
            f"Authorization: Bearer {self.key}",
            "--max-examples",
            "50",
            "--seed",
            "1",
            "--report",
            "json",
            "--report-json-path",
            str(report),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        (self.run_dir / "schemathesis.log").write_text(done.stdout + done.stderr)
        return summarise_schemathesis(done.stdout, report, done.returncode)

    def load(self) -> dict[str, Any]:
        out = self.run_dir / "bench-submit.json"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.bench_submit",
                "--keys",
                "3",
                "--workers",
                "2",
                "--out",
                str(out),
            ],
            cwd=ROOT,
            check=True,
            timeout=900,
            env={**os.environ, "REDIS_URL": self.stack.redis_url},
        )
        data = json.loads(out.read_text())
        return {
            k: data[k] for k in ("submissions_per_second", "p99_ms", "errors", "accepted", "lost", "keys")
        }


def summarise_schemathesis(stdout: str, report: Path, returncode: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"exit_code": returncode}
    for line in stdout.splitlines():
        line = line.strip()
        if line.endswith("generated") or " generated," in line:
            summary["test_cases"] = line
        if line.startswith("❌ ST") or line.startswith("✅"):
            summary.setdefault("lines", []).append(line)
    if report.exists():
        summary["report"] = str(report)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO", help=f"any of {', '.join(SCENARIOS)} (default: all)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "chaos.json")
    args = parser.parse_args()
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario {unknown}: choose from {', '.join(SCENARIOS)}")
    # A SIGTERM (timeout, CI cancelling) still stops the stack in the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    chaos = Chaos(Path(tempfile.mkdtemp(prefix="chaos-")))
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "kill9": lambda: chaos.kill_worker(signal.SIGKILL),
        "sigterm": lambda: chaos.kill_worker(signal.SIGTERM),
        "redis": chaos.restart_redis,
        "mlflow": chaos.stop_mlflow,
        "api": chaos.restart_api,
        "hostile": chaos.hostile,
        "schemathesis": chaos.schemathesis,
        "load": chaos.load,
    }
    results: dict[str, Any] = {}
    print(f"Starting the stack (logs in {chaos.stack.run_dir})…", flush=True)
    chaos.start()
    try:
        for name in args.scenarios or SCENARIOS:
            started = time.monotonic()
            print(f"\n== {name}", flush=True)
            try:
                results[name] = runs[name]()
            except Exception as exc:  # noqa: BLE001 - one scenario's failure is a figure too
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            results[name]["scenario_s"] = round(time.monotonic() - started, 1)
            print(json.dumps(results[name], indent=2), flush=True)
    finally:
        chaos.stop()
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.out}")
    failed = [name for name, result in results.items() if "error" in result]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
