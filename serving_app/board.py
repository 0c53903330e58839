"""The rollout board: one small named Ray actor per Ray cluster holding each replica's latest counters
snapshot per application, so `GET /rollout` (answered by whichever replica the proxy picks) sums
every replica of its application.

Replicas push snapshots in the background (`BoardClient.run`), never per request. A replica starts
pushing when it is given a candidate (or asked for `/rollout`) and keeps pushing from then on, so an
application that never rolls anything out costs the cluster nothing, and one board serves every
application of a shared cluster. The actor is created by the first replica that needs it
(`get_if_exists`: concurrent creations meet on one actor), detached so that it outlives that replica,
and restarted by Ray if its process dies; every live replica's next push (full cumulative snapshots)
restores the figures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import ray

from serving_app.counters import ReplicaCounters, ReplicaSnapshot, RolloutKey, rollout_report

logger = logging.getLogger("ray.serve")

PUSH_INTERVAL_S = 0.5  # a changed snapshot is pushed within this
KEEPALIVE_S = 2.0  # an unchanged one this often, so the board can tell live replicas from gone ones
STALE_AFTER_S = 6.0  # snapshots older than this are of replicas that are gone
CALL_TIMEOUT_S = 5.0
# Next to Serve's own actors.
BOARD_NAMESPACE = "serve"
BOARD_NAME = "regserve-rollout-board"


RETRY_AFTER_S = 10.0
WINDOWS_KEPT = 2  # per replica: the newest monitoring window and the one before it


class BoardUnavailable(RuntimeError):
    pass


def _get_or_create_board() -> Any:
    # Detached: the board outlives the replica that happened to create it (a scale-down or another
    # application's deletion would otherwise take every application's figures with it).
    actor = ray.remote(num_cpus=0, max_restarts=-1)(RolloutBoard)
    return actor.options(
        name=BOARD_NAME, namespace=BOARD_NAMESPACE, get_if_exists=True, lifetime="detached"
    ).remote()


class RolloutBoard:
    """The actor's body (plain class: tested without Ray)."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S) -> None:
        self._stale_after_s = stale_after_s
        self._snapshots: dict[str, dict[str, tuple[float, ReplicaSnapshot]]] = {}
        self._windows: dict[str, dict[str, list[tuple[float, dict[str, Any]]]]] = {}

    def push(self, app: str, snapshot: ReplicaSnapshot) -> None:
        self._snapshots.setdefault(app, {})[snapshot.replica] = (time.monotonic(), snapshot)

    def forget(self, app: str, replica: str) -> None:
        self._snapshots.get(app, {}).pop(replica, None)

    def snapshots(self, app: str) -> list[ReplicaSnapshot]:
        cutoff = time.monotonic() - self._stale_after_s
        replicas = self._snapshots.get(app, {})
        for replica in [r for r, (at, _) in replicas.items() if at < cutoff]:
            del replicas[replica]
        if not replicas:
            self._snapshots.pop(app, None)
        return [snapshot for _, snapshot in replicas.values()]

    def report(self, app: str) -> dict[str, Any]:
        return rollout_report(self.snapshots(app))

    def push_window(self, app: str, replica: str, wire: dict[str, Any]) -> None:
        """A replica's completed monitoring window (`serving_app.monitoring.window`). Its previous one
        is kept too: until every replica has pushed the newest, readers are answered the one before."""
        pushed = self._windows.setdefault(app, {}).setdefault(replica, [])
        others = [(at, kept) for at, kept in pushed if kept["window"] != wire["window"]]  # a retried push
        pushed[:] = [*others[-(WINDOWS_KEPT - 1) :], (time.monotonic(), {**wire, "replica": replica})]

    def windows(self, app: str) -> list[dict[str, Any]]:
        # A window is pushed once when it completes: kept for two windows' time, then it is old news.
        kept = self._windows.get(app, {})
        now = time.monotonic()
        for replica, pushed in list(kept.items()):
            pushed[:] = [(at, wire) for at, wire in pushed if now - at <= 2 * wire["window_s"] + 10]
            if not pushed:
                del kept[replica]
        if not kept:
            self._windows.pop(app, None)
        return [wire for pushed in kept.values() for _, wire in pushed]


class BoardClient:
    """A replica's side: pushes its counters and reads its application's summed report."""

    def __init__(self, app_name: str, counters: ReplicaCounters) -> None:
        self.app = app_name
        self.counters = counters
        self._handle: Any = None
        self._retry_at = 0.0  # no new lookup before this (monotonic) after a failed one
        self._engaged = False  # pushing: a rollout reached this replica, or /rollout was asked here
        self._pushed_changes = -1
        self._pushed_at = 0.0

    async def _board(self) -> Any:
        if self._handle is None:
            if time.monotonic() < self._retry_at:
                raise BoardUnavailable("the rollout board was unreachable moments ago")
            # Looking a named actor up is a synchronous call to the GCS: off the event loop, which
            # answers requests and must not stall while the head is away.
            self._handle = await asyncio.wait_for(asyncio.to_thread(_get_or_create_board), CALL_TIMEOUT_S)
        return self._handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            board = await self._board()
            return await asyncio.wait_for(getattr(board, method).remote(*args), CALL_TIMEOUT_S)
        except BoardUnavailable:
            raise
        except Exception:
            self._handle = None  # the board went away, or the call failed: look it up (or create) again
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            raise

    async def push(self) -> None:
        self._engaged = self._engaged or self.counters.key != RolloutKey()
        if not self._engaged:
            return
        changes = self.counters.changes
        await self._call("push", self.app, self.counters.snapshot())
        self._pushed_changes, self._pushed_at = changes, time.monotonic()

    async def push_window(self, wire: dict[str, Any]) -> None:
        await self._call("push_window", self.app, self.counters.replica, wire)

    async def windows(self) -> list[dict[str, Any]]:
        return list(await self._call("windows", self.app))

    async def report(self) -> dict[str, Any]:
        self._engaged = True
        await self.push()  # this replica's latest figures, then everyone's
        return dict(await self._call("report", self.app))

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
