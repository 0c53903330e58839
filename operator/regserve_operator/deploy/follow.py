"""Waiting for a verdict: the store polled until the status says done or failed, or time runs out."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from regserve_operator.deploy.stores import ResourceStore, StoreError
from regserve_operator.deploy.verdict import Failed, Pending, Succeeded, Verdict, judge
from regserve_operator.spec import parse_status

POLL_S = 1.0


@dataclass(frozen=True)
class TimedOut:
    detail: str  # what it still waited for


def follow(
    store: ResourceStore,
    name: str,
    *,
    generation: int,
    timeout_s: float,
    expected_version: str | None = None,
    on_progress: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
) -> Succeeded | Failed | TimedOut:
    deadline = clock() + timeout_s
    last: Verdict = Pending("waiting for the operator")
    while True:
        found = store.get(name)
        if found is None:
            return Failed("Deleted", f"{name} was deleted while waiting")
        last = judge(generation, parse_status(found.get("status")), expected_version)
        if not isinstance(last, Pending):
            return last
        if on_progress is not None:
            on_progress(last.detail)
        if clock() >= deadline:
            return TimedOut(last.detail)
        pause(min(POLL_S, max(0.0, deadline - clock())))


def until_gone(
    store: ResourceStore,
    name: str,
    *,
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], None] = time.sleep,
) -> bool:
    """True once `name` no longer exists (finalizers done), False if it still does at the deadline."""
    deadline = clock() + timeout_s
    while True:
        try:
            if store.get(name) is None:
                return True
        except StoreError:
            if clock() >= deadline:
                raise
        if clock() >= deadline:
            return False
        pause(min(POLL_S, max(0.0, deadline - clock())))
