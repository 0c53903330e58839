"""Shadow traffic: comparing the candidate's answer with the stable one (pure), and running the
comparisons off the request path with a bound on the work in flight."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any

RELATIVE_TOLERANCE = 1e-6
# Shadow predictions in flight per replica; more are dropped (and counted), never queued.
MAX_IN_FLIGHT = 4


def answers_agree(stable: Any, candidate: Any, *, rel_tol: float = RELATIVE_TOLERANCE) -> bool:
    """Equal JSON, numbers within `rel_tol` of each other (relative; 0 equals only 0). Booleans are
    not numbers here: `true` never equals `1`."""
    if isinstance(stable, bool) or isinstance(candidate, bool):
        return type(stable) is type(candidate) and stable == candidate
    if isinstance(stable, int | float) and isinstance(candidate, int | float):
        return math.isclose(stable, candidate, rel_tol=rel_tol, abs_tol=0.0)
    if isinstance(stable, dict) and isinstance(candidate, dict):
        return stable.keys() == candidate.keys() and all(
            answers_agree(stable[key], candidate[key], rel_tol=rel_tol) for key in stable
        )
    if isinstance(stable, list | tuple) and isinstance(candidate, list | tuple):
        return len(stable) == len(candidate) and all(
            answers_agree(a, b, rel_tol=rel_tol) for a, b in zip(stable, candidate, strict=True)
        )
    return type(stable) is type(candidate) and stable == candidate


class ShadowRunner:
    """Fire-and-forget shadow work with at most `limit` tasks in flight."""

    def __init__(self, limit: int = MAX_IN_FLIGHT) -> None:
        self.limit = limit
        self._tasks: set[asyncio.Task[None]] = set()  # held so the loop does not drop them

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(self, work: Callable[[], Awaitable[None]]) -> bool:
        """Start `work` unless the bound is reached; False means dropped."""
        if len(self._tasks) >= self.limit:
            return False
        task = asyncio.ensure_future(work())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True
