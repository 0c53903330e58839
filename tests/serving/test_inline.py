"""Where a version's model calls run: on the loop while its calls are fast, in a thread otherwise."""

from __future__ import annotations

import pytest

from serving_app.inline import INLINE_BELOW_MS, PredictTime, averaged, runs_inline


@pytest.mark.parametrize(
    ("average_ms", "inline"),
    [
        (None, False),  # never measured: its first call may be slow
        (0.0, True),
        (0.3, True),
        (INLINE_BELOW_MS - 0.01, True),
        (INLINE_BELOW_MS, False),
        (50.0, False),
    ],
)
def test_runs_inline(average_ms: float | None, inline: bool) -> None:
    assert runs_inline(average_ms) is inline


@pytest.mark.parametrize(
    ("previous", "newest", "expected"),
    [
        (None, 0.4, 0.4),
        (0.4, 0.4, 0.4),
        (0.4, 50.0, 0.4 + 0.3 * 49.6),
        (10.0, 0.0, 7.0),
    ],
)
def test_averaged(previous: float | None, newest: float, expected: float) -> None:
    assert averaged(previous, newest) == pytest.approx(expected)


def test_one_slow_call_sends_the_next_calls_to_the_thread_until_fast_ones_bring_it_back() -> None:
    time = PredictTime()
    places = []
    for elapsed in [0.3, 0.3, 20.0, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]:
        places.append(time.inline)
        time.record(elapsed)
    assert places[:3] == [False, True, True]
    assert places[3] is False  # right after the slow call
    assert places[-1] is True  # back within a dozen fast calls
    assert places.index(True, 3) <= 14
