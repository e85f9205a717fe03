"""A webhook receiver for llm-compare: verifies each delivery's signature, handles each
``webhook-id`` once, and prints the verdict when a comparison finishes.

    export WEBHOOK_SECRET=$(curl -s http://127.0.0.1:8000/v1/webhooks/secret | jq -r .secret)
    python -m examples.webhook_receiver --port 9000

then submit a comparison with ``"callbacks": [{"url": "http://127.0.0.1:9000/hooks"}]`` to a
service whose ``WEBHOOK_ALLOWED_HOSTS`` lists ``127.0.0.1`` (with API keys on, send
``Authorization: Bearer <key>`` to read that key's secret: each key signs its own comparisons).

Verification needs only the standard library (``shared/webhook_signing.py``); any Standard
Webhooks library works too, e.g. ``standardwebhooks.Webhook(secret).verify(body, headers)``.
What a receiver must do, and this one does:

- verify the raw body against ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature``
  before trusting it (400 otherwise: the service retries, and a forged request gets nowhere);
- answer 2xx quickly, once it has the event: anything else, or no answer within the service's
  ``WEBHOOK_TIMEOUT_S``, is retried on the schedule;
- treat a ``webhook-id`` it has handled as done: delivery is at least once, so the same event can
  arrive again (after a timeout whose answer was lost, say). This one remembers the last 10,000.

During a secret rotation the service signs with both secrets; set ``WEBHOOK_SECRET`` to either
(or to both, space-separated).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from shared.webhook_signing import WebhookVerificationError, verify

MAX_BODY_BYTES = 1024 * 1024
REMEMBERED_IDS = 10_000


def describe(payload: Mapping[str, Any]) -> list[str]:
    """What a person wants to read about one event."""
    data = payload["data"]
    name = f"{data['name']} ({data['id']})"
    if payload["type"] == "comparison.started":
        return [f"{name} started with {len(data['candidates'])} candidates"]
    if payload["type"] == "candidate.finished":
        candidate = next(c for c in data["candidates"] if c["label"] == data["label"])
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in candidate["metrics"].items() if v is not None)
        detail = metrics or candidate.get("error")
        line = f"{name}: candidate {candidate['label']} {candidate['status']}"
        return [f"{line}: {detail}" if detail else line]
    lines = [f"{name} {data['status']}"]
    lines += [f"  {verdict['verdict']}" for verdict in data["verdicts"]]
    if not data["verdicts"] and data["status"] in ("succeeded", "partially_failed"):
        lines.append("  no significant difference on any metric")
    if data.get("error"):
        lines.append(f"  error: {data['error']}")
    lines.append(f"  {data['links']['page']}")
    return lines


class Receiver:
    """Verification and deduplication, apart from HTTP so that they can be tested directly."""

    def __init__(self, secrets: list[str], output: Callable[[str], None] | None = None):
        self.secrets = secrets
        self.output = output or (lambda line: print(line, flush=True))
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def handle(self, body: bytes, headers: Mapping[str, str]) -> int:
        """The status to answer: 204 for a verified event (new or already handled), 400 otherwise."""
        try:
            payload = verify(body, headers, self.secrets)
        except WebhookVerificationError as exc:
            self.output(f"refused a delivery: {exc}")
            return 400
        webhook_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
        with self._lock:
            if webhook_id in self._seen:
                return 204  # handled before: acknowledge again, do nothing
            self._seen[webhook_id] = None
            while len(self._seen) > REMEMBERED_IDS:
                self._seen.popitem(last=False)
        for line in describe(payload):
            self.output(line)
        return 204


def serve(receiver: Receiver, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY_BYTES:
                status = 413
            else:
                status = receiver.handle(self.rfile.read(length), dict(self.headers.items()))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    secrets = os.environ.get("WEBHOOK_SECRET", "").split()
    if not secrets:
        sys.exit("set WEBHOOK_SECRET (GET /v1/webhooks/secret) to verify deliveries")
    server = serve(Receiver(secrets), args.host, args.port)
    print(f"listening on http://{args.host}:{server.server_address[1]}/", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
