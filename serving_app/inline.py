"""Whether a version predicts on the replica's event loop or in a worker thread.

A worker thread costs two thread wake-ups per model call, which on a light model is more than the
predict itself, and buys nothing there: a small predict holds the GIL for most of its run. A model
whose calls take long must not hold up the loop (other requests, health checks), so it keeps the
thread. Each version's recent predict time decides, measured on every call wherever it ran.
"""

from __future__ import annotations

from dataclasses import dataclass

# Calls under this, on average, run inline: the loop waits no longer than it does for one request's
# own parsing and encoding of a large body.
INLINE_BELOW_MS = 1.0
# Weight of the newest call in the running average: a slow call moves it at once (the next calls go
# to the thread), a run of fast ones brings it back within a few calls.
NEWEST_WEIGHT = 0.3


def runs_inline(average_ms: float | None) -> bool:
    """Unmeasured versions take the thread: their first call may be a slow one (lazy set-up)."""
    return average_ms is not None and average_ms < INLINE_BELOW_MS


def averaged(previous_ms: float | None, newest_ms: float) -> float:
    if previous_ms is None:
        return newest_ms
    return previous_ms + NEWEST_WEIGHT * (newest_ms - previous_ms)


@dataclass
class PredictTime:
    """One version's running average predict time."""

    average_ms: float | None = None

    @property
    def inline(self) -> bool:
        return runs_inline(self.average_ms)

    def record(self, elapsed_ms: float) -> None:
        self.average_ms = averaged(self.average_ms, elapsed_ms)
