"""When an HTTP request is tried again (shared/backoff.py): the one rule the client, the judge
and the endpoint requests follow."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from shared.backoff import backoff_seconds, parse_retry_after, retry_wait

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("2", 2.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),  # not RFC 9110, but some servers send it
        ("-5", 0.0),  # a negative wait means now
        ("Thu, 01 Jan 2026 00:00:30 GMT", 30.0),
        ("Wed, 31 Dec 2025 23:00:00 GMT", 0.0),  # a date in the past means now
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_is_read_as_seconds_or_as_a_date(header, seconds):
    assert parse_retry_after(header, now=NOW) == seconds


def test_back_off_doubles_with_jitter_up_to_the_cap():
    random.seed(0)
    for attempt in range(6):
        ceiling = min(8.0, 2.0**attempt)
        waits = [backoff_seconds(attempt, base_s=1.0, max_s=8.0) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert len(set(waits)) == 200  # jittered: callers refused together spread out


def test_the_wait_before_a_retry_honours_retry_after_up_to_the_cap():
    random.seed(1)
    assert 0.5 <= retry_wait(0, None, base_s=1.0, max_s=8.0) <= 1.0  # the back-off alone
    assert retry_wait(0, 5.0, base_s=1.0, max_s=8.0) == 5.0  # the server's longer wait
    assert 4.0 <= retry_wait(3, 0.1, base_s=1.0, max_s=8.0) <= 8.0  # the back-off when longer
    assert retry_wait(0, 8.5, base_s=1.0, max_s=8.0) is None  # longer than the cap: give up
