"""The payload log's writer: a bounded queue emptied in batches by a task of its own, against an
in-memory sink that can fail, stall or hold a batch (asyncio, no Ray, no network)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import pytest

from serving_app.monitoring.records import PayloadRecord
from serving_app.monitoring.writer import Outcome, PayloadLog, WriterLimits, next_backoff

Step = Literal["ok", "fail", "stall", "named"]

# Tiny intervals and back-offs: every scenario ends well within a second.
FAST = WriterLimits(
    capacity=100,
    batch_records=10,
    flush_interval_s=0.02,
    write_timeout_s=0.05,
    attempts=3,
    backoff_initial_s=0.001,
    backoff_max_s=0.004,
)
NEVER = 30.0  # an interval no test waits out


def record(n: int) -> PayloadRecord:
    return PayloadRecord(
        request_id=f"r{n}",
        at=1_700_000_000.0,
        model="m",
        version="1",
        choice="default",
        route="/predict",
        status=200,
        error_code=None,
        latency_ms=1.0,
        model_input=None,
        rows=0,
        outputs=None,
    )


class NamedFailure(RuntimeError):
    error_name = "ReceiverAnswered503"  # a sink's error naming its cause (`CloudEventsSink`)


@dataclass
class FakeSink:
    """Answers each write as `plan` says, in order ("ok" once the plan is used up); `gate`, when set,
    holds every write until it opens."""

    plan: list[Step] = field(default_factory=list)
    gate: asyncio.Event | None = None
    log: PayloadLog | None = None
    calls: int = 0
    batches: list[list[str]] = field(default_factory=list)
    errors_seen: list[str | None] = field(default_factory=list)  # the log's last_error at each call
    closed: bool = False

    async def write(self, records: Sequence[PayloadRecord]) -> None:
        step = self.plan[self.calls] if self.calls < len(self.plan) else "ok"
        self.calls += 1
        if self.log is not None:
            self.errors_seen.append(self.log.last_error)
        if self.gate is not None:
            await self.gate.wait()
        if step == "stall":
            await asyncio.Event().wait()  # until the writer gives up on it
        if step == "fail":
            raise ConnectionError("sink down")
        if step == "named":
            raise NamedFailure("the receiver said no")
        self.batches.append([r.request_id for r in records])

    async def close(self) -> None:
        self.closed = True

    @property
    def written(self) -> list[str]:
        return [rid for batch in self.batches for rid in batch]


@dataclass
class Counts:
    """The `count` callback: what the deployment's counter would be told."""

    seen: collections.Counter[str] = field(default_factory=collections.Counter)

    def __call__(self, outcome: Outcome, records: int) -> None:
        assert records > 0
        self.seen[outcome] += records


def new_log(sink: FakeSink, limits: WriterLimits = FAST) -> tuple[PayloadLog, Counts]:
    counts = Counts()
    log = PayloadLog(sink, counts, limits)
    sink.log = log
    return log, counts


def assert_conserved(log: PayloadLog, counts: Counts, offered: int) -> None:
    totals = log.totals
    assert totals["logged"] + totals["dropped"] + totals["sink_error"] + log.queued == offered
    assert log.queued <= log.limits.capacity
    assert dict(counts.seen) == {k: v for k, v in totals.items() if v}


async def until(condition: Callable[[], bool], within: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def running(log: PayloadLog) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(log.run())
    try:
        yield task
    finally:
        log.stop()
        await asyncio.wait_for(task, 2.0)


# ------------------------------------------------------------------------------------------ pure


@pytest.mark.parametrize(
    ("previous", "expected"),
    [(None, 0.5), (0.5, 1.0), (1.0, 2.0), (16.0, 30.0), (30.0, 30.0), (100.0, 30.0)],
    ids=["first", "doubles", "doubles-again", "capped", "stays-capped", "above-cap"],
)
def test_next_backoff(previous: float | None, expected: float) -> None:
    assert next_backoff(previous, WriterLimits(backoff_initial_s=0.5, backoff_max_s=30.0)) == expected


@pytest.mark.parametrize(
    ("capacity", "offers", "accepted"),
    [(5, 3, 3), (5, 5, 5), (5, 8, 5), (1, 4, 1), (0, 3, 0)],
    ids=["under", "exactly-full", "over", "capacity-one", "capacity-zero"],
)
def test_offers_beyond_capacity_are_dropped_and_counted(capacity: int, offers: int, accepted: int) -> None:
    log, counts = new_log(FakeSink(), replace(FAST, capacity=capacity))
    answers = [log.offer(record(n)) for n in range(offers)]
    assert answers == [True] * accepted + [False] * (offers - accepted)
    assert log.queued == accepted
    assert log.totals["dropped"] == offers - accepted
    assert_conserved(log, counts, offers)


# -------------------------------------------------------------------------------------- batching


def test_a_full_batch_wakes_the_writer_before_the_interval() -> None:
    async def scenario() -> tuple[FakeSink, float]:
        sink = FakeSink()
        log, counts = new_log(sink, replace(FAST, batch_records=5, flush_interval_s=NEVER))
        loop = asyncio.get_running_loop()
        async with running(log):
            await asyncio.sleep(0)  # the writer is waiting
            started = loop.time()
            for n in range(5):
                log.offer(record(n))
            await until(lambda: len(sink.batches) == 1)
            elapsed = loop.time() - started
            assert_conserved(log, counts, 5)
        return sink, elapsed

    sink, elapsed = asyncio.run(scenario())
    assert sink.batches == [["r0", "r1", "r2", "r3", "r4"]]
    assert elapsed < 1.0


def test_a_part_batch_goes_when_the_interval_ends() -> None:
    interval = 0.1

    async def scenario() -> tuple[FakeSink, float, int]:
        sink = FakeSink()
        log, _ = new_log(sink, replace(FAST, batch_records=100, flush_interval_s=interval))
        loop = asyncio.get_running_loop()
        async with running(log):
            await asyncio.sleep(0)
            started = loop.time()
            for n in range(3):
                log.offer(record(n))
            for _ in range(10):
                await asyncio.sleep(0)
            early = sink.calls  # several loop turns later, the interval not over: nothing written
            await until(lambda: len(sink.batches) == 1)
            elapsed = loop.time() - started
        return sink, elapsed, early

    sink, elapsed, early = asyncio.run(scenario())
    assert early == 0
    assert sink.batches == [["r0", "r1", "r2"]]
    assert elapsed >= interval * 0.5


def test_what_is_queued_goes_in_batches_of_at_most_batch_records_in_order() -> None:
    async def scenario() -> FakeSink:
        sink = FakeSink()
        log, counts = new_log(sink, replace(FAST, batch_records=5, flush_interval_s=NEVER))
        for n in range(12):  # queued before the writer runs
            log.offer(record(n))
        async with running(log):
            await until(lambda: log.totals["logged"] == 12)
            assert_conserved(log, counts, 12)
        return sink

    sink = asyncio.run(scenario())
    assert [len(batch) for batch in sink.batches] == [5, 5, 2]
    assert sink.written == [f"r{n}" for n in range(12)]


# -------------------------------------------------------------------------------- failing sinks


@dataclass(frozen=True)
class FailureCase:
    plan: list[Step]
    outcome: Outcome  # what becomes of the first batch
    errors_seen: list[str | None]  # the log's last_error as each write began


FAILURE_CASES = {
    "fails-once": FailureCase(["fail", "ok"], "logged", [None, "ConnectionError"]),
    "fails-attempts-minus-one": FailureCase(
        ["fail", "fail", "ok"], "logged", [None, "ConnectionError", "ConnectionError"]
    ),
    "stalls-once": FailureCase(["stall", "ok"], "logged", [None, "TimeoutError"]),
    "fail-then-stall": FailureCase(
        ["fail", "stall", "ok"], "logged", [None, "ConnectionError", "TimeoutError"]
    ),
    "fails-attempts-times": FailureCase(
        ["fail", "fail", "fail"], "sink_error", [None, "ConnectionError", "ConnectionError"]
    ),
    "stalls-attempts-times": FailureCase(
        ["stall", "stall", "stall"], "sink_error", [None, "TimeoutError", "TimeoutError"]
    ),
}


@pytest.mark.parametrize("case", FAILURE_CASES.values(), ids=FAILURE_CASES.keys())
def test_a_failing_sink_is_retried_up_to_attempts_and_the_next_batch_still_goes(case: FailureCase) -> None:
    first = [f"r{n}" for n in range(4)]
    second = [f"r{n}" for n in range(4, 8)]

    async def scenario() -> tuple[FakeSink, PayloadLog, Counts, list[str | None]]:
        sink = FakeSink(plan=list(case.plan))
        log, counts = new_log(sink, replace(FAST, batch_records=4, flush_interval_s=NEVER))
        async with running(log):
            for n in range(4):
                log.offer(record(n))
            await until(lambda: log.queued == 0)
            after_first = [log.last_error]
            assert_conserved(log, counts, 4)
            for n in range(4, 8):
                log.offer(record(n))
            await until(lambda: log.totals["logged"] >= 4 and log.queued == 0)
            after_first.append(log.last_error)
            assert_conserved(log, counts, 8)
        return sink, log, counts, after_first

    sink, log, counts, last_errors = asyncio.run(scenario())
    assert sink.errors_seen[: len(case.plan)] == case.errors_seen
    assert sink.calls == len(case.plan) + 1  # the second batch in one write
    if case.outcome == "logged":
        assert sink.batches == [first, second]  # each record written once
        assert log.totals == {"logged": 8}
        assert last_errors == [None, None]  # cleared by the write that went through
    else:
        assert sink.batches == [second]
        assert log.totals == {"sink_error": 4, "logged": 4}
        # A given-up batch leaves its last error to see until a write goes through.
        assert last_errors[0] == {"fail": "ConnectionError", "stall": "TimeoutError"}[case.plan[-1]]
        assert last_errors[1] is None
    assert_conserved(log, counts, 8)


def test_the_bound_holds_while_a_batch_is_being_written() -> None:
    async def scenario() -> None:
        gate = asyncio.Event()
        sink = FakeSink(gate=gate)
        limits = replace(FAST, capacity=10, batch_records=4, flush_interval_s=NEVER, write_timeout_s=NEVER)
        log, counts = new_log(sink, limits)
        async with running(log):
            for n in range(4):
                log.offer(record(n))
            await until(lambda: sink.calls == 1)  # the batch is in the sink's hands, held
            assert log.queued == 4  # ... and still counted against the bound
            answers = [log.offer(record(n)) for n in range(4, 14)]
            assert answers == [True] * 6 + [False] * 4
            assert log.queued == 10
            assert_conserved(log, counts, 14)
            gate.set()
            await until(lambda: log.queued == 0)
            assert_conserved(log, counts, 14)
        assert sink.written == [f"r{n}" for n in range(10)]
        assert log.totals == {"logged": 10, "dropped": 4}

    asyncio.run(scenario())


def test_the_bound_holds_while_a_refused_batch_waits_for_its_retry() -> None:
    async def scenario() -> None:
        sink = FakeSink(plan=["fail"])
        limits = replace(
            FAST, capacity=10, batch_records=4, flush_interval_s=NEVER, backoff_initial_s=NEVER, attempts=5
        )
        log, counts = new_log(sink, limits)
        async with running(log):
            for n in range(4):
                log.offer(record(n))
            await until(lambda: sink.calls == 1 and log.last_error is not None)  # now backing off
            assert log.queued == 4
            answers = [log.offer(record(n)) for n in range(4, 14)]
            assert answers == [True] * 6 + [False] * 4
            assert_conserved(log, counts, 14)
        # Stopped during the back-off: the rest written at once, in order, nothing twice.
        assert sink.written == [f"r{n}" for n in range(10)]
        assert_conserved(log, counts, 14)
        assert log.queued == 0

    asyncio.run(scenario())


def test_a_sink_error_that_names_its_cause_is_reported_by_that_name() -> None:
    async def scenario() -> str | None:
        sink = FakeSink(plan=["named"])
        log, _ = new_log(sink, replace(FAST, batch_records=1, backoff_initial_s=NEVER))
        async with running(log):
            log.offer(record(0))
            await until(lambda: log.last_error is not None)
            return log.last_error

    assert asyncio.run(scenario()) == "ReceiverAnswered503"


# ----------------------------------------------------------------------------------------- stop


def test_stop_writes_what_is_queued_and_run_returns() -> None:
    async def scenario() -> tuple[FakeSink, float]:
        sink = FakeSink()
        log, counts = new_log(sink, replace(FAST, batch_records=100, flush_interval_s=NEVER))
        task = asyncio.create_task(log.run())
        await asyncio.sleep(0)
        for n in range(3):
            log.offer(record(n))
        loop = asyncio.get_running_loop()
        started = loop.time()
        log.stop()
        await asyncio.wait_for(task, 2.0)
        assert_conserved(log, counts, 3)
        assert log.queued == 0
        return sink, loop.time() - started

    sink, elapsed = asyncio.run(scenario())
    assert sink.batches == [["r0", "r1", "r2"]]
    assert elapsed < 1.0


def test_stop_before_run_still_writes_what_is_queued() -> None:
    async def scenario() -> FakeSink:
        sink = FakeSink()
        log, counts = new_log(sink, replace(FAST, flush_interval_s=NEVER))
        log.offer(record(0))
        log.stop()
        await asyncio.wait_for(log.run(), 2.0)
        assert_conserved(log, counts, 1)
        return sink

    assert asyncio.run(scenario()).batches == [["r0"]]


def test_stop_during_a_long_back_off_gives_the_batch_up_at_once() -> None:
    async def scenario() -> tuple[FakeSink, PayloadLog, float]:
        sink = FakeSink(plan=["fail"] * 10)
        limits = replace(FAST, batch_records=3, flush_interval_s=NEVER, backoff_initial_s=NEVER, attempts=5)
        log, counts = new_log(sink, limits)
        task = asyncio.create_task(log.run())
        for n in range(3):
            log.offer(record(n))
        await until(lambda: sink.calls == 1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        log.stop()
        await asyncio.wait_for(task, 2.0)
        assert_conserved(log, counts, 3)
        return sink, log, loop.time() - started

    sink, log, elapsed = asyncio.run(scenario())
    assert elapsed < 1.0  # not the 30 s back-off
    assert sink.calls == 2  # one more try once stopping, no retries after it
    assert log.totals == {"sink_error": 3}
    assert log.last_error == "ConnectionError"


# ------------------------------------------------------------------------------------ conservation


@pytest.mark.parametrize("seed", range(6))
def test_every_record_offered_is_logged_dropped_given_up_or_queued(seed: int) -> None:
    draw = random.Random(seed)
    plan: list[Step] = [draw.choice(["ok", "ok", "fail", "stall"]) for _ in range(200)]

    async def scenario() -> FakeSink:
        sink = FakeSink(plan=plan)
        limits = replace(
            FAST, capacity=25, batch_records=7, flush_interval_s=0.005, write_timeout_s=0.01, attempts=2
        )
        log, counts = new_log(sink, limits)
        offered = 0
        async with running(log):
            for _ in range(40):
                for _ in range(draw.randrange(0, 15)):
                    log.offer(record(offered))
                    offered += 1
                    assert_conserved(log, counts, offered)
                await asyncio.sleep(draw.choice([0, 0.001, 0.005]))
                assert_conserved(log, counts, offered)
        assert log.queued == 0
        assert_conserved(log, counts, offered)
        assert len(sink.written) == log.totals["logged"]
        assert len(set(sink.written)) == len(sink.written)  # nothing written twice
        return sink

    assert not asyncio.run(scenario()).closed  # closing the sink is the deployment's, not the writer's
