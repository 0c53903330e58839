"""A replica's payload log: a bounded queue filled on the request path and emptied in batches, by size
and by time, by a task of its own. A sink that is down, slow or refusing is retried with back-off;
meanwhile the queue stays bounded (what does not fit is dropped and counted), so no answer ever waits
for the sink and memory does not grow."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from serving_app.monitoring.records import PayloadRecord

logger = logging.getLogger("ray.serve")

Outcome = Literal["logged", "dropped", "sink_error"]


class PayloadSink(Protocol):
    async def write(self, records: Sequence[PayloadRecord]) -> None:
        """Write one batch; raise when it was not written."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class WriterLimits:
    capacity: int = 10_000  # records queued per replica, a batch being retried included
    batch_records: int = 1_000
    flush_interval_s: float = 5.0
    write_timeout_s: float = 60.0
    attempts: int = 5  # a batch the sink refused this many times is given up (counted sink_error)
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    final_drain_s: float = 10.0  # what stopping may spend writing what is left
    settle_interval_s: float = 0.25


def next_backoff(previous: float | None, limits: WriterLimits) -> float:
    if previous is None:
        return limits.backoff_initial_s
    return min(previous * 2, limits.backoff_max_s)


class PayloadLog:
    def __init__(
        self,
        sink: PayloadSink,
        count: Callable[[Outcome, int], None],
        limits: WriterLimits | None = None,
        settle: Callable[[PayloadRecord], PayloadRecord] | None = None,
    ) -> None:
        self.sink = sink
        self.limits = limits or WriterLimits()
        self._count = count
        # Records as offered, and as settled (`settle`: a DataFrame input kept as its arrays).
        self._fresh: collections.deque[PayloadRecord] = collections.deque()
        self._queue: collections.deque[PayloadRecord] = collections.deque()
        self._settle_record = settle or (lambda record: record)
        self._writing = 0  # records of the batch being written: still within the bound
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self.totals: collections.Counter[str] = collections.Counter()
        # The sink's last failure, as a type name (no message; a sink's error may name its cause's type).
        self.last_error: str | None = None

    @property
    def queued(self) -> int:
        return len(self._fresh) + len(self._queue) + self._writing

    def offer(self, record: PayloadRecord) -> bool:
        """Queue a record; False (and counted) when the queue is full. Never blocks."""
        if self.queued >= self.limits.capacity:
            self._counted("dropped", 1)
            return False
        self._fresh.append(record)
        if len(self._fresh) + len(self._queue) >= self.limits.batch_records:
            self._wake.set()
        return True

    async def run(self) -> None:
        """The writer task: runs until `stop()`, then writes what is queued once more. Between writes
        it settles new records every `settle_interval_s` (off the request path)."""
        loop = asyncio.get_running_loop()
        written_at = loop.time()
        while not self._stopping.is_set():
            wait = min(self.limits.settle_interval_s, self.limits.flush_interval_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._settle()
            due = loop.time() - written_at >= self.limits.flush_interval_s
            if self._wake.is_set() or due:
                self._wake.clear()
                await self.drain()
                written_at = loop.time()
        # Once more on the way out, within a bound: a replica's shutdown must not wait on a hung sink.
        try:
            await asyncio.wait_for(self.drain(retry=False), self.limits.final_drain_s)
        except TimeoutError:
            self._counted("sink_error", self.queued)
            self._fresh.clear()
            self._queue.clear()
            self._writing = 0

    def _settle(self) -> None:
        while self._fresh:
            self._queue.append(self._settle_record(self._fresh.popleft()))

    async def drain(self, *, retry: bool = True) -> None:
        """Write everything queued now, in batches; a failing sink is retried with back-off."""
        attempt, backoff = 0, None
        self._settle()
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self.limits.batch_records, len(self._queue)))]
            self._writing = len(batch)
            try:
                await asyncio.wait_for(self.sink.write(batch), self.limits.write_timeout_s)
            except Exception as error:
                self._writing = 0
                attempt += 1
                self.last_error = str(getattr(error, "error_name", "")) or type(error).__name__
                if not retry or attempt >= self.limits.attempts:
                    logger.warning(
                        "payload sink failed %d time(s) (%s): %d record(s) given up",
                        attempt,
                        self.last_error,
                        len(batch),
                    )
                    self._counted("sink_error", len(batch))
                    attempt, backoff = 0, None
                    continue
                self._queue.extendleft(
                    reversed(batch)
                )  # first in the queue again, still counted in its bound
                backoff = next_backoff(backoff, self.limits)
                if await self._stopped_within(backoff):
                    retry = False
                continue
            self._writing = 0
            attempt, backoff = 0, None
            self.last_error = None
            self._counted("logged", len(batch))
            self._settle()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    def _counted(self, outcome: Outcome, records: int) -> None:
        self.totals[outcome] += records
        self._count(outcome, records)
