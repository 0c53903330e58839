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
from dataclasses import dataclass
from datetime import UTC, datetime

from regserve_operator.allocator import release_free_heap
from regserve_operator.builders import Owner
from regserve_operator.decide import Event
from regserve_operator.plan import Action
from regserve_operator.reconcile import Deps, reconcile_pass
from regserve_operator.schedule import Key, Scheduler
from regserve_operator.spec import RegisteredModelServingSpec, RegisteredModelServingStatus

log = logging.getLogger(__name__)

# A pass that reconciled this many resources gives the heap it freed back (allocator.py); smaller
# passes free too little to be worth the call.
TRIM_AFTER_RESOURCES = 1000


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
    ) -> None:
        self.deps = deps
        self.scheduler = Scheduler(clock=clock, keeps_statuses=False)
        self._resources: dict[Key, _Resource] = {}
        self._on_event = on_event
        self._now = now
        self._tick = tick_seconds
        self._lock = threading.Lock()

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
        done = []
        for key, res in resources:
            if not self.scheduler.due(key, res.generation):
                continue
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
                continue
            with self._lock:
                res.keep(outcome.status)
            action = outcome.plan.action if outcome.plan is not None else None
            done.append(Reconciled(key, action))
        if len(done) >= TRIM_AFTER_RESOURCES:
            release_free_heap()
        return done

    def _post(self, owner: Owner, event: Event) -> None:
        if self._on_event:
            self._on_event(owner, event)

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.run_once()
            stop.wait(self._tick)
