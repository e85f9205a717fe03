"""How numbers read on the pages and in the terminal (shared/display.py)."""

from __future__ import annotations

import pytest

from shared.display import readable_number


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "–"),
        (0.0, "0"),
        (0.25, "0.25"),
        (0.123456, "0.123"),
        (-1.75, "-1.75"),
        (53.333, "53.3"),
        (160.94, "160.9"),
        (12345.6, "12,346"),
        (0.0004, "4.00e-04"),
    ],
)
def test_three_significant_digits_without_exponents_for_everyday_magnitudes(value, shown):
    assert readable_number(value) == shown


def test_the_terminal_marks_a_missing_value_with_its_own_dash():
    assert readable_number(None, missing="—") == "—"
