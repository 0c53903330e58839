"""The operator's one reconcile loop over the resources kopf's watch delivered.

A kopf timer per resource would hand every resource to a worker thread every tick, due or not: at
10,000 resources that is 10,000 hand-offs a second to find the few that are due. Instead the watch
keeps a compact copy of each resource here (`Watched`), and one loop asks the scheduler which are due
and reconciles only those, a few at a time (`run_pass`). Status goes out as a merge patch; a write
the API server refused is kept and sent again before that resource's next pass (`StatusWrites`).

A pass waits for its resources up to a deadline, not for the slowest: a resource whose registry is
slow keeps running on its worker (its registry calls are bounded in time), is not handed out again
until it ends, and writes its status when it does (`InFlight`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from regserve_operator.schedule import Key, Scheduler, key_of

log = logging.getLogger(__name__)

# How long a resource whose pass raised outside the reconcile (a bug, not a registry or API error,
# which the reconcile backs off from itself) waits before it is tried again.
UNEXPECTED_FAILURE_DELAY_S = 30.0
# How often a pass waiting on its resources looks whether others fell due meanwhile.
PASS_CHECK_S = 0.05


@dataclass(frozen=True)
class Seen:
    """A resource as the watch last delivered it: the fields a pass and an Event need, as JSON."""

    uid: str
    generation: int | None
    body_json: bytes

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.body_json)
        return body


class Watched:
    """The latest copy of every resource the watch has seen."""

    def __init__(self) -> None:
        self._copies: dict[Key, Seen] = {}
        self._lock = threading.Lock()

    def saw(self, body: Mapping[str, Any]) -> bool:
        """Keep the newest copy; True when the resource is new or its spec changed (worth a pass now)."""
        meta = body.get("metadata") or {}
        kept = {
            "apiVersion": body.get("apiVersion"),
            "kind": body.get("kind"),
            "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "generation")},
            "spec": body.get("spec") or {},
            "status": body.get("status") or {},
        }
        fresh = Seen(meta.get("uid") or "", meta.get("generation"), json.dumps(kept).encode())
        key = key_of(body)
        with self._lock:
            before = self._copies.get(key)
            self._copies[key] = fresh
        return before is None or before.generation != fresh.generation or before.uid != fresh.uid

    def gone(self, key: Key) -> None:
        with self._lock:
            self._copies.pop(key, None)

    def get(self, key: Key) -> Seen | None:
        with self._lock:
            return self._copies.get(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._copies)

    def due(self, scheduler: Scheduler) -> list[tuple[Key, Seen]]:
        """The resources due now, woken ones (new, changed, promoted) before those whose poll fell due."""
        with self._lock:
            copies = list(self._copies.items())
        due = [(key, seen) for key, seen in copies if scheduler.due(key, seen.generation)]
        due.sort(key=lambda item: not scheduler.woken(item[0]))
        return due


class WriteGone(Exception):
    """The resource a status write was for no longer exists."""


StatusWrite = Callable[[Key, dict[str, Any]], None]  # raises WriteGone, or anything else to retry


class StatusWrites:
    """Status merge patches to the API server. A refused write is merged with the next one and sent
    again before the resource's next pass, so a field a pass changed is never left unwritten."""

    def __init__(self, write: StatusWrite) -> None:
        self._write = write
        self._pending: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def send(self, key: Key, status_patch: dict[str, Any]) -> bool:
        with self._lock:
            merged = {**self._pending.pop(key, {}), **status_patch}
        if not merged:
            return True
        try:
            self._write(key, merged)
        except WriteGone:
            return True
        except Exception as exc:  # any refusal: the API server is down, slow, or restarting
            log.warning("%s/%s: status write failed, kept for the next pass: %s", *key, exc)
            with self._lock:
                self._pending[key] = merged
            return False
        return True

    def flush(self, key: Key) -> bool:
        """Send what is pending for this resource; False when it is still refused."""
        return self.send(key, {})

    def forget(self, key: Key) -> None:
        with self._lock:
            self._pending.pop(key, None)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)


# One pass over one resource: (key, seen) -> the status merge patch to write (empty: nothing changed).
Reconcile = Callable[[Key, Seen], dict[str, Any]]


class InFlight:
    """Resources whose reconcile is running, across passes: one that outlived its pass's deadline is
    not handed out again until it ends."""

    def __init__(self) -> None:
        self._keys: set[Key] = set()
        self._lock = threading.Lock()

    def claim(self, key: Key) -> bool:
        with self._lock:
            if key in self._keys:
                return False
            self._keys.add(key)
            return True

    def release(self, key: Key) -> None:
        with self._lock:
            self._keys.discard(key)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._keys

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)


def run_pass(
    watched: Watched,
    scheduler: Scheduler,
    reconcile: Reconcile,
    writes: StatusWrites,
    pool: ThreadPoolExecutor,
    *,
    in_flight: InFlight | None = None,
    deadline_s: float | None = None,
) -> list[Key]:
    """Reconcile every resource that is due and not still running from an earlier pass, `pool`'s size
    at a time; returns the keys reconciled within `deadline_s` (None: waits for all). A resource
    still running then goes on by itself and writes its status when it ends; one not started yet is
    left for the next pass (it is still due)."""
    running = in_flight if in_flight is not None else InFlight()

    def one(key: Key, seen: Seen) -> Key | None:
        try:
            if not writes.flush(key):
                return None  # its last status is still unwritten: deciding again on top of it waits
            try:
                status_patch = reconcile(key, seen)
            except Exception:
                log.exception("%s/%s: pass failed", *key)
                scheduler.postpone(key, UNEXPECTED_FAILURE_DELAY_S, seen.generation)
                return None
            writes.send(key, status_patch)
            return key
        finally:
            running.release(key)

    began = time.monotonic()
    started: dict[Future[Key | None], Key] = {}
    for key, seen in watched.due(scheduler):
        if running.claim(key):
            started[pool.submit(one, key, seen)] = key
    if deadline_s is None:
        finished, late = wait(started)
    else:
        finished, late = _wait_for_pass(started, deadline_s, lambda: _others_due(watched, scheduler, running))
    for future in late:
        if future.cancel():  # never began: due again at the next pass
            running.release(started[future])
        elif not future.done() and deadline_s is not None and time.monotonic() - began >= deadline_s:
            log.info("%s/%s: still reconciling after the pass's %ss deadline", *started[future], deadline_s)
    order = {key: i for i, key in enumerate(started.values())}
    done = [reconciled for future in finished if (reconciled := future.result()) is not None]
    return sorted(done, key=order.__getitem__)


def _wait_for_pass(
    started: Mapping[Future[Key | None], Key], deadline_s: float, others_due: Callable[[], bool]
) -> tuple[set[Future[Key | None]], set[Future[Key | None]]]:
    """Wait for the pass's resources until they are done or the deadline passes, and no longer once
    every one left is running (none queued for a worker) while another resource is due: a promotion
    woken meanwhile must not wait out the deadline of a resource stuck on a slow registry."""
    finished: set[Future[Key | None]] = set()
    pending = set(started)
    ends = time.monotonic() + deadline_s
    while pending and (left := ends - time.monotonic()) > 0:
        done, pending = wait(pending, timeout=min(PASS_CHECK_S, left), return_when=FIRST_COMPLETED)
        finished |= done
        if pending and all(future.running() for future in pending) and others_due():
            break
    return finished, pending


def _others_due(watched: Watched, scheduler: Scheduler, running: InFlight) -> bool:
    return any(key not in running for key, _ in watched.due(scheduler))


async def run_forever(run: Callable[[], object], tick_seconds: float) -> None:
    """`run` (a blocking pass) off the event loop, then again a tick after it started; until cancelled."""
    while True:
        started = time.monotonic()
        try:
            await asyncio.to_thread(run)
        except Exception:
            log.exception("reconcile loop: pass failed")
        await asyncio.sleep(max(0.0, tick_seconds - (time.monotonic() - started)))
