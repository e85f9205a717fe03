"""The benchmark's own arithmetic and the lm-evaluation-harness task it writes (no timing here:
`make bench` prints the figures)."""

from __future__ import annotations

import yaml

from scripts.bench import CANDIDATES, LM_EVAL_TASK, ceiling, lm_eval_generation_yaml, verdicts


def test_ceiling_takes_whichever_of_compute_and_memory_binds():
    machine = {"matmul_gflops": 400.0, "copy_bandwidth_gbs": 20.0}
    model = {"parameters": 100_000_000, "weight_bytes": 400_000_000}
    one = ceiling(machine, model, batch=1)
    # One row: a step reads 400 MB at 20 GB/s (20 ms) but computes 0.2 GFLOP (0.5 ms).
    assert one["tokens_per_s_at_batch"] == 50.0
    assert one["compute_bound_tokens_per_s"] == 2000.0
    big = ceiling(machine, model, batch=64)
    # 64 rows: 12.8 GFLOP take 32 ms, more than the 20 ms of reading the weights.
    assert big["tokens_per_s_at_batch"] == 2000.0
    assert big["gflop_per_token"] == 0.2


def test_verdicts_compare_the_medians_with_each_target():
    report = {
        "median_seconds": {
            "a_notebook": 600.0,
            "b0_first_run": 60.0,
            "b_cold": 40.0,
            "c_warm": 35.0,
            "d_cached": 1.0,
            "e_lm_eval": 30.0,
        },
        "generation_tokens_per_second": 210.0,
        "worker_peak_rss_bytes": 1.6e9,
        "submit_to_generation_median_s": 0.08,
    }
    found = {label: (value, met) for label, value, met in verdicts(report)}
    assert found["(b) >= 5x faster than (a)"] == ("a/b = 15.0x", True)
    assert found["(c) no slower than (e)"] == ("e/c = 0.86x", False)
    assert found["(c) >= 1.3x faster than (b)"] == ("b/c = 1.14x", False)
    assert found["(d) >= 20x faster than (c)"] == ("c/d = 35.0x", True)
    assert found[">= 200 generated tokens/s"] == ("210 tokens/s", True)
    assert found["worker peak RSS < 1.5 GB"] == ("1.60 GB", False)
    assert found["submit -> generation start < 0.5 s"][1] is True


def test_a_missing_mode_is_reported_as_not_measured():
    report = {"median_seconds": {"b_cold": 40.0, "c_warm": 35.0}}
    found = {label: (value, met) for label, value, met in verdicts(report)}
    assert found["(b) >= 5x faster than (a)"] == ("not measured", None)
    assert found["(c) >= 1.3x faster than (b)"][1] is False


def test_lm_eval_tasks_carry_each_candidates_generation_settings(tmp_path):
    greedy, sampled = CANDIDATES
    for candidate in (greedy, sampled):
        text = LM_EVAL_TASK.format(
            name="t", data=tmp_path / "d.jsonl", generation=lm_eval_generation_yaml(candidate["generation"])
        )
        task = yaml.safe_load(text)
        assert task["output_type"] == "generate_until"
        assert task["doc_to_text"] == "{{prompt}}"
        assert task["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "d.jsonl")
        kwargs = task["generation_kwargs"]
        assert kwargs["max_gen_toks"] == candidate["generation"]["max_new_tokens"] == 64
        assert kwargs["do_sample"] is candidate["generation"]["do_sample"]
    assert (
        "temperature"
        not in yaml.safe_load(
            LM_EVAL_TASK.format(name="t", data="d", generation=lm_eval_generation_yaml(greedy["generation"]))
        )["generation_kwargs"]
    )
    sampled_kwargs = yaml.safe_load(
        LM_EVAL_TASK.format(name="t", data="d", generation=lm_eval_generation_yaml(sampled["generation"]))
    )["generation_kwargs"]
    assert sampled_kwargs["temperature"] == 0.7 and sampled_kwargs["top_p"] == 0.9
