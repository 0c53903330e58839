"""The application's rollout board: a small named Ray actor that holds each replica's latest counters
snapshot, so `GET /rollout` (answered by whichever replica the proxy picks) sums every replica.

Replicas push snapshots in the background (`BoardClient.run`), never per request. The actor is created
by the first replica that needs it (`get_if_exists`, so concurrent creations meet on one actor) and is
owned by it: it goes away with the application; if its owner goes first, the next push creates it
again and every live replica's next push (full cumulative snapshots) restores the figures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from serving_app.counters import ReplicaCounters, ReplicaSnapshot, rollout_report

logger = logging.getLogger("ray.serve")

PUSH_INTERVAL_S = 0.5  # a changed snapshot is pushed within this
KEEPALIVE_S = 2.0  # an unchanged one this often, so the board can tell live replicas from gone ones
STALE_AFTER_S = 6.0  # snapshots older than this are of replicas that are gone
CALL_TIMEOUT_S = 5.0
# Next to Serve's own actors; the name carries the application's.
BOARD_NAMESPACE = "serve"


def board_name(app_name: str) -> str:
    return f"regserve-rollout-board:{app_name}"


class RolloutBoard:
    """The actor's body (plain class: tested without Ray)."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S) -> None:
        self._stale_after_s = stale_after_s
        self._snapshots: dict[str, tuple[float, ReplicaSnapshot]] = {}

    def push(self, snapshot: ReplicaSnapshot) -> None:
        self._snapshots[snapshot.replica] = (time.monotonic(), snapshot)

    def forget(self, replica: str) -> None:
        self._snapshots.pop(replica, None)

    def snapshots(self) -> list[ReplicaSnapshot]:
        cutoff = time.monotonic() - self._stale_after_s
        for replica in [r for r, (at, _) in self._snapshots.items() if at < cutoff]:
            del self._snapshots[replica]
        return [snapshot for _, snapshot in self._snapshots.values()]

    def report(self) -> dict[str, Any]:
        return rollout_report(self.snapshots())


class BoardClient:
    """A replica's side: pushes its counters and reads the summed report."""

    def __init__(self, app_name: str, counters: ReplicaCounters) -> None:
        self.name = board_name(app_name)
        self.counters = counters
        self._handle: Any = None
        self._pushed_changes = -1
        self._pushed_at = 0.0

    def _board(self) -> Any:
        if self._handle is None:
            actor = ray.remote(num_cpus=0, max_restarts=0)(RolloutBoard)
            self._handle = actor.options(
                name=self.name, namespace=BOARD_NAMESPACE, get_if_exists=True, lifetime=None
            ).remote()
        return self._handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(getattr(self._board(), method).remote(*args), CALL_TIMEOUT_S)
        except Exception:
            self._handle = None  # the owner went away, or the call failed: look it up (or create) again
            raise

    async def push(self) -> None:
        changes = self.counters.changes
        await self._call("push", self.counters.snapshot())
        self._pushed_changes, self._pushed_at = changes, time.monotonic()

    async def report(self) -> dict[str, Any]:
        await self.push()  # this replica's latest figures, then everyone's
        return dict(await self._call("report"))

    async def run(self) -> None:
        """Push when the counters moved (at most every PUSH_INTERVAL_S), else every KEEPALIVE_S."""
        while True:
            await asyncio.sleep(PUSH_INTERVAL_S)
            moved = self.counters.changes != self._pushed_changes
            if moved or time.monotonic() - self._pushed_at >= KEEPALIVE_S:
                try:
                    await self.push()
                except Exception as error:  # the board is best effort: serving never depends on it
                    logger.warning("rollout board push failed: %s", error)

    async def forget(self) -> None:
        await self._call("forget", self.counters.replica)
