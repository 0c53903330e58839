"""Which resources are due for a reconcile, and the last status each one wrote. Thread-safe, no I/O.

The loop (`passes.py`) asks about every resource every `tick_seconds`; asking is free, and only a due
resource is reconciled: its poll interval passed, a webhook named its model, its RayService changed,
its spec changed, or a backoff after an error expired. A wake while the resource's reconcile still
runs (a pass does not wait for stragglers) keeps it due after that reconcile ends (`started`).

The status memo exists because a pass can run before the watch stream delivers the status the
previous pass wrote; a stale status would repeat a transition (and its Event). Each write carries a
`revision`; the newer of memo and body wins, and a memo the body has caught up with is dropped. Only a
status newer than the body the pass started from is kept, and as JSON: a steady pass changes nothing,
and a wire status kept for each of 10,000 resources would take ~60 MB of the operator's memory.
Local mode keeps the statuses itself and turns the memo off (`keeps_statuses=False`).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, str]  # (namespace, name)


def key_of(body: Mapping[str, Any]) -> Key:
    meta = body.get("metadata") or {}
    return (meta.get("namespace") or "", meta.get("name") or "")


@dataclass
class _Entry:
    next_at: float = 0.0
    model: str | None = None
    failures: int = 0
    memo: tuple[int, bytes] | None = None  # (revision, the status as JSON)
    generation: int | None = None
    body_revision: int = 0  # of the status the last pass started from
    running: bool = False  # a reconcile began (`started`) and has not ended yet
    woken_while_running: bool = False  # something happened after that reconcile read the world


@dataclass
class Scheduler:
    clock: Callable[[], float] = time.monotonic
    keeps_statuses: bool = True
    _entries: dict[Key, _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def due(self, key: Key, generation: int | None = None) -> bool:
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            if generation is not None and generation != entry.generation:
                return True
            return self.clock() >= entry.next_at

    def done(
        self,
        key: Key,
        *,
        delay: float,
        model: str,
        failed: bool,
        generation: int | None,
        status: Callable[[], dict[str, Any]],
    ) -> int:
        """Record a finished reconcile; returns the consecutive failure count (for backoff)."""
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            entry.failures = entry.failures + 1 if failed else 0
            entry.next_at = self._next_at(entry, delay)
            entry.model = model
            entry.generation = generation
            entry.memo = None
            if self.keeps_statuses:
                wire = status()
                revision = wire.get("revision") or 0
                if revision > entry.body_revision:
                    entry.memo = (revision, json.dumps(wire, separators=(",", ":")).encode())
            return entry.failures

    def started(self, key: Key, model: str | None = None) -> None:
        """A reconcile of `key` (following `model`) begins reading the world: a wake from now on may
        concern something it does not see, so the poll time it sets when done must not overwrite it."""
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            entry.running, entry.woken_while_running = True, False
            if model is not None:
                entry.model = model  # a webhook for it finds a first reconcile still running too

    def _next_at(self, entry: _Entry, delay: float) -> float:
        """When a reconcile that just ended is due again; clears its `started` mark (lock held)."""
        woken = entry.running and entry.woken_while_running
        entry.running = entry.woken_while_running = False
        return 0.0 if woken else self.clock() + delay

    def woken(self, key: Key) -> bool:
        """Due because something happened (new, spec changed, webhook, RayService event), not because
        its poll interval passed: worth going first in a sequential pass."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is None or entry.next_at == 0.0

    def failures(self, key: Key) -> int:
        with self._lock:
            entry = self._entries.get(key)
            return entry.failures + 1 if entry else 1

    def wake(self, key: Key) -> None:
        with self._lock:
            _wake(self._entries.setdefault(key, _Entry()))

    def wake_model(self, model: str) -> list[Key]:
        with self._lock:
            keys = [key for key, entry in self._entries.items() if entry.model == model]
            for key in keys:
                _wake(self._entries[key])
            return keys

    def postpone(self, key: Key, delay: float, generation: int | None) -> None:
        """Not due for `delay` unless woken or its spec changes from `generation`."""
        with self._lock:
            entry = self._entries.setdefault(key, _Entry())
            entry.next_at, entry.generation = self._next_at(entry, delay), generation

    def forget(self, key: Key) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def latest_status(self, key: Key, from_body: dict[str, Any]) -> dict[str, Any]:
        body_revision = from_body.get("revision") or 0
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return from_body
            memo = entry.memo
            if memo is not None and memo[0] > body_revision:
                newer: dict[str, Any] = json.loads(memo[1])
                entry.body_revision = body_revision
                return newer
            entry.memo = None
            entry.body_revision = body_revision
        return from_body


def _wake(entry: _Entry) -> None:
    entry.next_at = 0.0
    entry.woken_while_running = entry.running
