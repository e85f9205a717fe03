from __future__ import annotations

from shared.results import side_by_side


def test_side_by_side_keeps_extra_columns_and_marks_missing_outputs():
    rows = [{"input": "q0", "reference": "r0", "topic": "t"}, {"input": "q1"}]
    outputs = {
        "a": [{"output": "o0", "scores": {"exact_match": 1.0}}, {"output": "o1", "scores": {}}],
        "b": None,
    }
    table = side_by_side(rows, ["a", "b"], outputs)
    assert table[0] == {
        "index": 0,
        "input": "q0",
        "reference": "r0",
        "topic": "t",
        "outputs": {
            "a": {"output": "o0", "scores": {"exact_match": 1.0}, "error": None},
            "b": {"output": None, "scores": {}, "error": None},
        },
    }
    assert table[1]["reference"] is None and table[1]["outputs"]["a"]["output"] == "o1"


def test_a_failed_endpoint_row_keeps_its_reason():
    outputs = {"a": [{"output": None, "scores": {"exact_match": None}, "error": "HTTP 500: overloaded"}]}
    table = side_by_side([{"input": "q0"}], ["a"], outputs)
    assert table[0]["outputs"]["a"] == {
        "output": None,
        "scores": {"exact_match": None},
        "error": "HTTP 500: overloaded",
    }
