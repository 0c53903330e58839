"""Where a request that loaded a version spent its time, for the `Server-Timing` response header.

A request pinned to a version the replica has not loaded waits for the compatibility gate, the
download, the eviction of the least recently used version and the load; the header names each step
(`gate;dur=36.5, download;dur=61.0, load;dur=18.2, pinned;dur=84.1, predict;dur=2.5, total;dur=127.0`),
so a client or a browser's developer tools see why that answer was slow. Requests for the default
version carry no timer; their steps are a context-variable lookup and a shared no-op.

The steps run in the request's own task, in tasks it starts and in threads it hands work to
(`asyncio.to_thread` copies the context): one `StepTimer` in a context variable collects them all.
Callers use the functions, never the variable: Ray pickles the deployment class by value, and a
context variable it referenced directly could not be pickled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass
class StepTimer:
    steps: list[tuple[str, float]] = field(default_factory=list)  # (name, milliseconds), as finished

    def header(self) -> str:
        return ", ".join(f"{name};dur={ms:.1f}" for name, ms in self.steps)


# The request's timer; None (the default) for requests that never leave the hot path.
request_timer: ContextVar[StepTimer | None] = ContextVar("regserve_request_timer", default=None)


def stop_timing() -> None:
    """This request is not timed (yet): what an earlier request in the same context set is dropped."""
    request_timer.set(None)


def current_timer() -> StepTimer | None:
    return request_timer.get()


def start_timing() -> StepTimer:
    """Time this request's steps from here on (the timer the request already has, if any)."""
    timer = request_timer.get()
    if timer is None:
        timer = StepTimer()
        request_timer.set(timer)
    return timer


# What an untimed request's steps enter: one shared no-op, so the hot path builds no generator.
_UNTIMED: AbstractContextManager[None] = nullcontext()


def step(name: str) -> AbstractContextManager[None]:
    """Record `name`'s duration on the request's timer; a no-op when the request is not timed."""
    timer = request_timer.get()
    return _UNTIMED if timer is None else _timed(timer, name)


@contextmanager
def _timed(timer: StepTimer, name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timer.steps.append((name, (time.perf_counter() - started) * 1000))


def parse_header(header: str) -> dict[str, float]:
    """A `Server-Timing` header's steps, name to milliseconds (for clients and benchmarks)."""
    steps = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if name and duration:
            steps[name] = float(duration)
    return steps
