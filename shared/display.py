"""Numbers as people read them, one rule for the web pages and the terminal."""

from __future__ import annotations


def readable_number(value: float | None, *, missing: str = "–") -> str:
    """3 significant digits, thousands grouped, no exponent for everyday magnitudes."""
    if value is None:
        return missing
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 0.001:
        return f"{value:.3g}" if magnitude < 100 else f"{value:.1f}"
    return f"{value:.2e}"
