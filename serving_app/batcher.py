"""Concurrent requests' predicts in one model call, sent as soon as waiting longer cannot add to it.

A fixed batch timeout (`@serve.batch`) holds every batch for its whole wait unless it fills up: with 8
clients and batches of 32, each batch of 8 waited out the timeout, and batching at c=8 served 0.77x of
not batching. Here a batch also goes when every request the replica is answering is already in it:
the others are waiting for this answer, so nothing else can come. The wait still bounds the rest
(requests on their way through parsing, or waiting for a version to load).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Job = TypeVar("Job")


def batch_ready(queued: int, in_flight: int, max_size: int, waited_s: float, wait_s: float) -> bool:
    """Send now? Full; or every request being answered is queued here; or the oldest waited enough."""
    return queued >= max_size or queued >= in_flight or waited_s >= wait_s


@dataclass
class _Waiting(Generic[Job]):
    job: Job
    answer: asyncio.Future[Any]


class MicroBatcher(Generic[Job]):
    """One per replica, on the replica's loop. `predict_many(jobs)` answers a batch, one result (or
    error object) per job; `in_flight()` is how many requests the replica is answering; the replica calls
    `request_finished()` when that count drops."""

    def __init__(
        self,
        predict_many: Callable[[Sequence[Job]], Awaitable[Sequence[Any]]],
        *,
        max_size: int,
        wait_s: float,
        in_flight: Callable[[], int],
    ) -> None:
        self._predict_many = predict_many
        self.max_size = max_size
        self.wait_s = wait_s
        self._in_flight = in_flight
        self._queue: list[_Waiting[Job]] = []
        self._changed = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    def request_finished(self) -> None:
        """A request left the replica: the in-flight count the waiting batch compares with dropped."""
        if self._queue:
            self._changed.set()

    async def submit(self, job: Job) -> Any:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(job, loop.create_future())
        self._queue.append(waiting)
        self._changed.set()
        if self._sender is None or self._sender.done():
            # Its own empty context: the sender outlives the request that started it.
            self._sender = loop.create_task(self._send_batches(), context=contextvars.Context())
        return await waiting.answer

    async def _send_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            started = loop.time()
            while not batch_ready(
                len(self._queue), self._in_flight(), self.max_size, loop.time() - started, self.wait_s
            ):
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), self.wait_s - (loop.time() - started))
                except TimeoutError:
                    break
            batch, self._queue = self._queue[: self.max_size], self._queue[self.max_size :]
            batch = [w for w in batch if not w.answer.done()]  # callers that gave up are not predicted
            if batch:
                await self._send(batch)

    async def _send(self, batch: list[_Waiting[Job]]) -> None:
        try:
            results = await self._predict_many([w.job for w in batch])
        except Exception as error:  # every caller gets the failure; the sender lives on
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(error)
            return
        for waiting, result in zip(batch, results, strict=True):
            if not waiting.answer.done():
                waiting.answer.set_result(result)
