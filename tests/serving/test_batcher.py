"""The batcher: when a batch goes (pure, table-driven) and what callers get back (asyncio, no Ray)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from serving_app.batcher import MicroBatcher, batch_ready


@pytest.mark.parametrize(
    ("queued", "in_flight", "max_size", "waited_s", "wait_s", "ready"),
    [
        (32, 40, 32, 0.0, 0.005, True),  # full
        (8, 8, 32, 0.0, 0.005, True),  # every request answered is waiting here: nothing else can come
        (8, 9, 32, 0.0, 0.005, False),  # one more is on its way
        (8, 9, 32, 0.005, 0.005, True),  # ... but the wait is over
        (1, 1, 32, 0.0, 0.005, True),
        (1, 3, 32, 0.0, 0.0, True),  # no wait configured
        (3, 1, 32, 0.0, 0.005, True),  # in-flight count already dropped (requests finished)
    ],
)
def test_batch_ready(
    queued: int, in_flight: int, max_size: int, waited_s: float, wait_s: float, ready: bool
) -> None:
    assert batch_ready(queued, in_flight, max_size, waited_s, wait_s) is ready


class Recorder:
    def __init__(self, fail_on: object | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.fail_on = fail_on

    async def predict_many(self, jobs: Sequence[Any]) -> list[Any]:
        self.batches.append(list(jobs))
        if self.fail_on in jobs:
            raise RuntimeError("model broke")
        return [f"answer-{job}" for job in jobs]


def test_concurrent_callers_share_one_call_without_waiting_out_the_timeout() -> None:
    async def scenario() -> tuple[list[Any], list[list[Any]], float]:
        recorder = Recorder()
        batcher = MicroBatcher(recorder.predict_many, max_size=32, wait_s=10.0, in_flight=lambda: 8)
        loop = asyncio.get_running_loop()
        started = loop.time()
        answers = await asyncio.gather(*(batcher.submit(n) for n in range(8)))
        return answers, recorder.batches, loop.time() - started

    answers, batches, elapsed = asyncio.run(scenario())
    assert answers == [f"answer-{n}" for n in range(8)]
    assert batches == [list(range(8))]
    assert elapsed < 5.0  # went when all 8 in flight were queued, not after the 10 s wait


def test_batches_are_capped_and_the_rest_follow_as_requests_finish() -> None:
    async def scenario() -> tuple[list[list[Any]], float]:
        recorder = Recorder()
        in_flight = [7]
        batcher = MicroBatcher(recorder.predict_many, max_size=3, wait_s=10.0, in_flight=lambda: in_flight[0])

        async def request(n: int) -> Any:
            try:
                return await batcher.submit(n)
            finally:  # as the replica's request handler does
                in_flight[0] -= 1
                batcher.request_finished()

        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(request(n) for n in range(7)))
        return recorder.batches, loop.time() - started

    batches, elapsed = asyncio.run(scenario())
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(j for b in batches for j in b) == list(range(7))
    assert elapsed < 5.0  # the last one went when the others had finished, not after the wait


def test_a_request_on_its_way_is_waited_for_up_to_the_timeout() -> None:
    async def scenario() -> tuple[list[list[Any]], float]:
        recorder = Recorder()
        batcher = MicroBatcher(recorder.predict_many, max_size=32, wait_s=0.2, in_flight=lambda: 3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(batcher.submit("a"), batcher.submit("b"))  # the third never comes
        return recorder.batches, loop.time() - started

    batches, elapsed = asyncio.run(scenario())
    assert batches == [["a", "b"]]
    assert elapsed >= 0.2


def test_a_failing_call_fails_its_callers_and_the_batcher_goes_on() -> None:
    async def scenario() -> tuple[list[Any], Any]:
        recorder = Recorder(fail_on="bad")
        batcher = MicroBatcher(recorder.predict_many, max_size=32, wait_s=0.05, in_flight=lambda: 2)
        first = await asyncio.gather(batcher.submit("bad"), batcher.submit("ok"), return_exceptions=True)
        later = await batcher.submit("after")
        return first, later

    first, later = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in first)
    assert later == "answer-after"


def test_a_caller_that_gave_up_is_not_predicted() -> None:
    async def scenario() -> list[list[Any]]:
        recorder = Recorder()
        batcher = MicroBatcher(recorder.predict_many, max_size=32, wait_s=0.2, in_flight=lambda: 3)
        gone = asyncio.ensure_future(batcher.submit("gone"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(batcher.submit("a"), batcher.submit("b"))
        return recorder.batches

    assert asyncio.run(scenario()) == [["a", "b"]]
