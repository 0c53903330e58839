"""Reconcile loop without Kubernetes: statuses in memory, the same pass (`reconcile_pass`) and
scheduling as the operator.

For local mode (`regserve dev`): give it a Target (e.g. the Ray dashboard one) and the resources read
from files; it reconciles each when due (poll interval, backoff, rollout being judged, or a webhook
for its model) and reports Events through a callback.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime

from regserve_operator.allocator import TRIM_AFTER_RESOURCES, release_free_heap
from regserve_operator.builders import Owner
from regserve_operator.decide import Event
from regserve_operator.passes import InFlight
from regserve_operator.plan import Action
from regserve_operator.reconcile import Deps, reconcile_pass
from regserve_operator.schedule import Key, Scheduler
from regserve_operator.spec import RegisteredModelServingSpec, RegisteredModelServingStatus

log = logging.getLogger(__name__)

# How often a removal looks whether the resource's running reconcile has ended.
IN_FLIGHT_POLL_S = 0.05


@dataclass
class _Resource:
    """A resource between passes: its spec and status as JSON, parsed when it is due. Held as pydantic
    objects they cost ~18 KB each and, with the allocator's share, ~50 KB of RSS per resource: 580 MB
    at 10,000 resources."""

    owner: Owner
    spec_json: bytes
    status_json: bytes
    revision: int | None
    generation: int = 1

    @classmethod
    def of(
        cls, owner: Owner, spec: RegisteredModelServingSpec, status: RegisteredModelServingStatus
    ) -> _Resource:
        return cls(owner, spec.model_dump_json().encode(), status.model_dump_json().encode(), status.revision)

    def spec(self) -> RegisteredModelServingSpec:
        return RegisteredModelServingSpec.model_validate_json(self.spec_json)

    def status(self) -> RegisteredModelServingStatus:
        return RegisteredModelServingStatus.model_validate_json(self.status_json)

    def keep(self, status: RegisteredModelServingStatus) -> None:
        # Unchanged (decide bumps the revision only on a change): nothing to write.
        if status.revision != self.revision:
            self.status_json, self.revision = status.model_dump_json().encode(), status.revision


@dataclass(frozen=True)
class Reconciled:
    """What a pass did to one resource. Not the whole Outcome: a pass over 10,000 resources held every
    status and plan until it ended, and the allocator kept that peak (~18 KB of RSS per resource)."""

    key: Key
    action: Action | None  # the plan carried out, if any


class Driver:
    def __init__(
        self,
        deps: Deps,
        *,
        on_event: Callable[[Owner, Event], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        tick_seconds: float = 1.0,
        pass_deadline_s: float | None = None,
        workers: int = 4,
    ) -> None:
        """`pass_deadline_s`: resources are reconciled `workers` at a time and a pass waits for them at
        most this long, as the operator's loop does (`passes.run_pass`); None: one after the other,
        every due resource within the pass (what tests with a fake clock and the benchmarks step)."""
        self.deps = deps
        self.scheduler = Scheduler(clock=clock, keeps_statuses=False)
        self._resources: dict[Key, _Resource] = {}
        self._on_event = on_event
        self._now = now
        self._tick = tick_seconds
        self._lock = threading.Lock()
        self._deadline = pass_deadline_s
        self._pool = (
            ThreadPoolExecutor(workers, thread_name_prefix="dev-reconcile") if pass_deadline_s else None
        )
        self._in_flight = InFlight()

    def apply(
        self,
        owner: Owner,
        spec: RegisteredModelServingSpec,
        status: RegisteredModelServingStatus | None = None,
    ) -> None:
        """Add a resource, or change its spec (like `kubectl apply`). `status` seeds a new resource's
        status, as a restarted operator finds it on the API server."""
        key = (owner.namespace, owner.name)
        fresh = _Resource.of(owner, spec, status or RegisteredModelServingStatus())
        with self._lock:
            existing = self._resources.get(key)
            if existing is None:
                self._resources[key] = fresh
            elif existing.spec_json != fresh.spec_json:
                existing.spec_json, existing.generation = fresh.spec_json, existing.generation + 1
        self.scheduler.wake(key)

    def remove(self, owner: Owner, *, wait_s: float = 30.0) -> RegisteredModelServingStatus | None:
        """Forget a resource (like its deletion on the API server); its last status, None if unknown.

        A reconcile of it still running is waited for (at most `wait_s`), so that the caller's clean-up
        of what it applied is not followed by one last apply from that pass."""
        key = (owner.namespace, owner.name)
        with self._lock:
            gone = self._resources.pop(key, None)
        if gone is None:
            return None
        deadline = time.monotonic() + wait_s
        while key in self._in_flight and time.monotonic() < deadline:
            time.sleep(IN_FLIGHT_POLL_S)
        if key in self._in_flight:
            log.warning("%s/%s: removed with a reconcile still running", *key)
        # After the pass that was running: its `done()` would leave an entry behind.
        self.scheduler.forget(key)
        return gone.status()

    def generation(self, owner: Owner) -> int | None:
        with self._lock:
            found = self._resources.get((owner.namespace, owner.name))
            return None if found is None else found.generation

    def status(self, owner: Owner) -> RegisteredModelServingStatus:
        with self._lock:
            return self._resources[(owner.namespace, owner.name)].status()

    def model_changed(self, model_name: str) -> None:
        """Hook for a webhook receiver."""
        self.deps.registry.model_changed(model_name)
        self.scheduler.wake_model(model_name)

    def run_once(self) -> list[Reconciled]:
        with self._lock:
            resources = list(self._resources.items())
        # A promotion (webhook) must not wait behind thousands of resources whose poll fell due.
        resources.sort(key=lambda item: not self.scheduler.woken(item[0]))
        due = [(key, res) for key, res in resources if self.scheduler.due(key, res.generation)]
        if self._pool is None:
            done = [found for key, res in due if (found := self._reconcile(key, res)) is not None]
        else:
            done = self._run_bounded(self._pool, due)
        if len(done) >= TRIM_AFTER_RESOURCES:
            release_free_heap()
        return done

    def _run_bounded(self, pool: ThreadPoolExecutor, due: list[tuple[Key, _Resource]]) -> list[Reconciled]:
        """The due resources on `pool`, waited for until the pass's deadline; one still running goes on
        by itself (keeping its status when it ends) and is not started again meanwhile."""

        def one(key: Key, res: _Resource) -> Reconciled | None:
            try:
                return self._reconcile(key, res)
            finally:
                self._in_flight.release(key)

        started: dict[Future[Reconciled | None], Key] = {}
        for key, res in due:
            if self._in_flight.claim(key):
                started[pool.submit(one, key, res)] = key
        finished, late = wait(started, timeout=self._deadline)
        for future in late:
            if future.cancel():
                self._in_flight.release(started[future])
        order = {key: i for i, key in enumerate(started.values())}
        done = [reconciled for future in finished if (reconciled := future.result()) is not None]
        return sorted(done, key=lambda reconciled: order[reconciled.key])

    def _reconcile(self, key: Key, res: _Resource) -> Reconciled | None:
        with self._lock:
            if self._resources.get(key) is not res:
                return None  # removed since the pass began: nothing of it may be applied again
        outcome = reconcile_pass(
            self.scheduler,
            res.owner,
            res.generation,
            res.spec(),
            res.status(),
            self.deps,
            now=self._now(),
            tick_s=self._tick,
            post_event=functools.partial(self._post, res.owner),
        )
        if outcome is None:
            return None
        with self._lock:
            res.keep(outcome.status)
        action = outcome.plan.action if outcome.plan is not None else None
        return Reconciled(key, action)

    def _post(self, owner: Owner, event: Event) -> None:
        if self._on_event:
            self._on_event(owner, event)

    def run_forever(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.run_once()
                stop.wait(self._tick)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
