"""Every registry metric runs with the network disabled: hub offline and sockets to anything but
loopback refused, so a download attempt fails loudly instead of passing on a connected machine."""

from __future__ import annotations

import ipaddress
import socket

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from services.worker import metrics as worker_metrics
from services.worker import text_metrics
from services.worker.evaluation import evaluate_outputs
from services.worker.generation import Generated
from shared.metrics import METRICS

# A judge is a model or an endpoint of the operator's choosing; every other metric must be offline.
NON_JUDGE = [name for name, info in METRICS.items() if not info.needs_judge]


class NetworkRefused(OSError):
    pass


def _is_loopback(address: object) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if not isinstance(host, str):
        return True  # AF_UNIX paths
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture
def no_network(monkeypatch):
    real_connect = socket.socket.connect

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise NetworkRefused(f"network disabled in this test: connect to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Start from cold caches so that loading the embedding model and the syllable data happens
    # under the guard.
    worker_metrics.embedding_model.cache_clear()
    worker_metrics._rouge_scorer.cache_clear()
    text_metrics.prepare_cmudict.cache_clear()


def test_the_guard_refuses_outside_addresses(no_network):
    with pytest.raises(NetworkRefused), socket.create_connection(("203.0.113.1", 443), timeout=1):
        pass


def test_every_metric_runs_offline(no_network, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("offline", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment_id).info.run_id
    rows = [
        {"input": "What is the capital of France?", "reference": "Paris"},
        {"input": "Reply in JSON with the answer.", "reference": '{"answer": 4}'},
        {"input": "Name a colour.", "reference": "Blue"},
    ]
    # As an endpoint row carries them: prompt tokens, time to first token and cost too.
    generated = [
        Generated("The capital of France is Paris.", 8, 0.4, input_tokens=12, ttft_s=0.1, cost=0.0003),
        Generated('{"answer": 4}', 6, 0.3, input_tokens=14, ttft_s=0.08, cost=0.0002),
        Generated("I'm sorry, I can't help with that.", 10, 0.5, input_tokens=9, ttft_s=0.12, cost=0.0004),
    ]
    try:
        scored = evaluate_outputs(
            run_id=run_id,
            experiment_id=experiment_id,
            rows=rows,
            prompts=[r["input"] for r in rows],
            generated=generated,
            metric_names=NON_JUDGE,
            model_type="question-answering",
            options={"regex": r"Paris"},
        )
    finally:
        mlflow.set_tracking_uri(None)
    assert set(scored["metrics"]) == set(NON_JUDGE)
    rows_scores = scored["row_scores"]
    assert [s["contains_reference"] for s in rows_scores] == [1.0, 1.0, 0.0]
    assert [s["json_valid"] for s in rows_scores] == [None, 1.0, None]
    assert [s["refusal"] for s in rows_scores] == [0.0, 0.0, 1.0]
    assert [s["regex_match"] for s in rows_scores] == [1.0, 0.0, 0.0]
    assert rows_scores[0]["semantic_similarity"] > 0.5
    assert rows_scores[1]["bleu"] == pytest.approx(100.0)
    assert [s["input_tokens"] for s in rows_scores] == [12.0, 14.0, 9.0]
    assert [s["cost"] for s in rows_scores] == pytest.approx([0.0003, 0.0002, 0.0004])
    assert all(isinstance(s["flesch_kincaid_grade"], float) for s in rows_scores)
    # MLflow's own question-answering defaults that need downloads were skipped, not fatal.
    assert "toxicity" in scored["skipped_builtins"]
