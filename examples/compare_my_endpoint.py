"""A service compares the model it answers with against a candidate, through the Python client.

    make dev                                          # the local stack: API on :8000, a worker
    python -m examples.compare_my_endpoint            # submit, wait, print the verdict

``--mine`` is the model the service uses: a model on a remote endpoint the operator declared in
ENDPOINTS_FILE (``endpoint:<endpoint>/<model-id>``, listed by ``GET /v1/models``), or any model
a candidate can name. It defaults to the catalog's SmolLM2, greedy, against the same model
sampling (``--candidate``), so the script runs on a bare ``make dev``. The API's address and key
come from LLM_COMPARE_URL and LLM_COMPARE_KEY, as for the ``llm-compare`` command.

With ``--webhook PORT``, the service does not wait on the API: it asks to be called back on
http://localhost:PORT/ when the comparison is finished, checks the delivery's signature with
``verify_webhook`` and this key's secret (``GET /v1/webhooks/secret``), and prints the verdict
from the delivery. The operator must allow the receiver's host: ``WEBHOOK_ALLOWED_HOSTS=localhost``.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread
from typing import Any

from shared.client import ComparisonClient, WebhookVerificationError, verify_webhook
from shared.schemas import ComparisonRead, ComparisonStatus

# A handful of questions with one right answer: enough for a first look, not for a decision.
ROWS = [
    {"input": "What is the capital of France?", "reference": "Paris"},
    {"input": "What is the capital of Japan?", "reference": "Tokyo"},
    {"input": "How many legs does a spider have?", "reference": "8"},
    {"input": "What colour is the sky on a clear day?", "reference": "blue"},
    {"input": "What is 12 divided by 4?", "reference": "3"},
    {"input": "Which planet is the largest?", "reference": "Jupiter"},
]


def comparison_spec(mine: str, candidate: str) -> dict[str, Any]:
    prompt = "Answer with a single word or number, nothing else."
    generation = {"max_new_tokens": 16}
    return {
        "name": "my-endpoint-vs-candidate",
        "experiment": "service-checks",
        "model_type": "question-answering",
        "candidates": [
            {"label": "mine", "model": mine, "system_prompt": prompt, "generation": generation},
            {
                "label": "candidate",
                "model": candidate,
                "system_prompt": prompt,
                # Sampling, so that the default run compares two different things.
                "generation": {**generation, "do_sample": True, "temperature": 0.9, "seed": 1},
            },
        ],
        "dataset": {"rows": ROWS},
        "metrics": ["exact_match", "contains_reference", "output_tokens"],
    }


def print_verdict(name: str, metrics: dict[str, dict[str, Any]], verdicts: list[str]) -> None:
    print(f"\n{name}")
    for label, values in metrics.items():
        shown = ", ".join(f"{k}={v:.3g}" for k, v in values.items() if isinstance(v, int | float))
        print(f"  {label:<10} {shown}")
    print("Verdict:")
    for line in verdicts or ["no significant difference on any metric (more rows would tell more)"]:
        print(f"  {line}")


def receive_finished(port: int, secret: str) -> tuple[ThreadingHTTPServer, queue.Queue[dict[str, Any]]]:
    """A receiver on localhost:PORT that keeps the body of each authentic comparison.finished."""
    finished: queue.Queue[dict[str, Any]] = queue.Queue()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                # The raw bytes as received: the signature covers them, not re-encoded JSON.
                event = verify_webhook(body, dict(self.headers), secret)
            except WebhookVerificationError as exc:
                print(f"refused a delivery: {exc}", file=sys.stderr)
                self.send_response(401)
                self.end_headers()
                return
            self.send_response(204)
            self.end_headers()
            if event["type"] == "comparison.finished":
                finished.put(event["data"])

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("localhost", port), Receiver)
    Thread(target=server.serve_forever, daemon=True).start()
    return server, finished


def progress_printer() -> Callable[[ComparisonRead], None]:
    """An ``on_update`` that prints rows done per candidate whenever they move."""
    last = ""

    def show(state: ComparisonRead) -> None:
        nonlocal last
        line = "  " + "   ".join(f"{c.label} {c.progress.done}/{c.progress.total}" for c in state.candidates)
        if line != last:
            print(line, flush=True)
            last = line

    return show


def wait_for_verdict(client: ComparisonClient, spec: dict[str, Any], timeout: float) -> bool:
    created = client.submit(spec)
    print(f"Submitted {created.id}; waiting for it to end.")
    final = client.wait(created.id, timeout=timeout, on_update=progress_printer())
    metrics = {c.label: c.metrics for c in final.candidates}
    print_verdict(
        f"{final.name}: {final.status.value}", metrics, [p.verdict for p in final.pairwise if p.better]
    )
    return final.status is ComparisonStatus.succeeded


def call_back_with_verdict(client: ComparisonClient, spec: dict[str, Any], port: int, timeout: float) -> bool:
    server, finished = receive_finished(port, client.webhook_secret().secret)
    callback = {"url": f"http://localhost:{port}/", "events": ["comparison.finished"]}
    try:
        created = client.submit({**spec, "callbacks": [callback]})
        print(f"Submitted {created.id}; listening on {callback['url']} for its verdict.")
        data = finished.get(timeout=timeout)
    except queue.Empty:
        print(f"No verified callback within {timeout:g} s; client.deliveries({created.id!r}) says why")
        return False
    finally:
        server.shutdown()
    metrics = {c["label"]: c["metrics"] for c in data["candidates"]}
    print_verdict(f"{data['name']}: {data['status']}", metrics, [v["verdict"] for v in data["verdicts"]])
    return bool(data["status"] == "succeeded")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mine", default="smollm2-135m-instruct", help="the model the service uses")
    parser.add_argument("--candidate", default="smollm2-135m-instruct", help="the model to compare it with")
    parser.add_argument("--webhook", type=int, metavar="PORT", help="be called back instead of waiting")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the verdict")
    args = parser.parse_args()

    url = os.environ.get("LLM_COMPARE_URL", "http://127.0.0.1:8000")
    spec = comparison_spec(args.mine, args.candidate)
    with ComparisonClient(url, api_key=os.environ.get("LLM_COMPARE_KEY")) as client:
        if args.webhook is None:
            succeeded = wait_for_verdict(client, spec, args.timeout)
        else:
            succeeded = call_back_with_verdict(client, spec, args.webhook, args.timeout)
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
