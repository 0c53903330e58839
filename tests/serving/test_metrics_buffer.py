"""The request path's metric records: held until the loop turns, counters summed per tag set."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from serving_app.metrics import BufferedCounter, BufferedHistogram, RecordBuffer


@dataclass
class Recorded:
    """A metric that keeps what it was given (the part Ray's metric plays)."""

    records: list[tuple[float, dict[str, str] | None]] = field(default_factory=list)
    fail: bool = False

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        if self.fail:
            raise ValueError("tag value must be a str")
        self.records.append((value, tags))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.records.append((value, tags))


def test_records_wait_for_the_loop_to_turn_and_counts_are_summed() -> None:
    buffer = RecordBuffer()
    requests, other, latency = Recorded(), Recorded(), Recorded()
    counter, other_counter = BufferedCounter(requests, buffer), BufferedCounter(other, buffer)
    histogram = BufferedHistogram(latency, buffer)

    async def answer() -> list[Any]:
        counter.inc(tags={"route": "serve", "status": "200"})
        counter.inc(tags={"route": "serve", "status": "200"})
        counter.inc(2, tags={"route": "serve", "status": "422"})
        other_counter.inc(tags={"route": "serve", "status": "200"})
        histogram.observe(1.5, tags={"route": "serve"})
        histogram.observe(2.5, tags={"route": "serve"})
        held = [list(requests.records), list(latency.records)]
        await asyncio.sleep(0)  # the loop turns: the buffer is written
        return held

    held = asyncio.run(answer())
    assert held == [[], []]
    assert sorted(requests.records, key=lambda r: r[0]) == [
        (2.0, {"route": "serve", "status": "200"}),
        (2.0, {"route": "serve", "status": "422"}),
    ]
    assert other.records == [(1.0, {"route": "serve", "status": "200"})]
    assert latency.records == [(1.5, {"route": "serve"}), (2.5, {"route": "serve"})]


def test_off_the_loop_a_record_is_written_at_once() -> None:
    buffer = RecordBuffer()
    requests = Recorded()
    BufferedCounter(requests, buffer).inc(tags={"route": "serve"})
    assert requests.records == [(1.0, {"route": "serve"})]


def test_a_failing_metric_loses_its_records_not_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    buffer = RecordBuffer()
    broken, latency = Recorded(fail=True), Recorded()

    async def answer() -> None:
        BufferedCounter(broken, buffer).inc(tags={"route": "serve"})
        await asyncio.sleep(0)
        BufferedHistogram(latency, buffer).observe(3.0)  # a later turn records again
        await asyncio.sleep(0)

    asyncio.run(answer())
    assert "dropped a metric record" in caplog.text
    assert latency.records == [(3.0, {})]
