"""The operator's state (built at startup, kept in kopf's memo) and what its loop does to one resource:
parse the watched copy, run `reconcile.reconcile_pass`, turn the outcome into a status merge patch.
`main.py` registers kopf's handlers over it; nothing here knows kopf."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from regserve_operator import metrics, monitoring, probe
from regserve_operator import spec as s
from regserve_operator.allocator import TRIM_AFTER_RESOURCES, release_free_heap
from regserve_operator.builders import BuildDefaults, Owner
from regserve_operator.conditions import READY, printable, set_condition
from regserve_operator.decide import Event, Outcome, iso
from regserve_operator.finalizer import (
    KubeFinalizers,
    add_patch,
    finalizer_step,
    remove_patch,
    remove_tags,
)
from regserve_operator.passes import InFlight, Seen, StatusWrites, Watched, run_pass
from regserve_operator.reconcile import Deps, reconcile_pass
from regserve_operator.registry import Registry
from regserve_operator.schedule import Key, Scheduler
from regserve_operator.settings import Settings
from regserve_operator.targets.kube_cache import RayServiceCache

log = logging.getLogger(__name__)

# Deletions whose registry tags are being removed at once.
FINALIZER_WORKERS = 2


PostEvent = Callable[[Mapping[str, Any], Event], None]


class State:
    """What the handlers and the loop share; built at startup and kept in kopf's memo."""

    def __init__(
        self,
        settings: Settings,
        deps: Deps,
        *,
        post_event: PostEvent,
        writes: StatusWrites | None = None,
        rayservices: RayServiceCache | None = None,
        finalizers: KubeFinalizers | None = None,
    ) -> None:
        self.settings = settings
        self.finalizers = finalizers
        self.deps = deps
        self.scheduler = Scheduler()
        self.watched = Watched()
        self.post_event = post_event
        self.writes = writes
        self.rayservices = rayservices
        self.pool = ThreadPoolExecutor(settings.reconcile_workers, thread_name_prefix="reconcile")
        # Finalizers wait on registries (up to finalizer.BUDGET_S each): on threads of their own, so a
        # mass deletion on a slow registry never takes the threads the reconcile loop's passes run on.
        self.finalizing = ThreadPoolExecutor(FINALIZER_WORKERS, thread_name_prefix="finalize")
        self.in_flight = InFlight()
        self.loop_task: asyncio.Task[None] | None = None
        self.receiver_runner: Any = None
        self._reconciled_since_trim = 0

    def run_pass(self) -> list[Key]:
        if self.writes is None:
            raise RuntimeError("State built without a status writer cannot run the loop")
        done = run_pass(
            self.watched,
            self.scheduler,
            self.reconcile,
            self.writes,
            self.pool,
            in_flight=self.in_flight,
            deadline_s=self.settings.pass_deadline_seconds,
        )
        # Resources fall due spread over the poll interval, so count across passes (driver.py trims
        # after one big pass; here a pass at 10,000 resources polled every 30 s holds ~330).
        self._reconciled_since_trim += len(done)
        if self._reconciled_since_trim >= TRIM_AFTER_RESOURCES:
            self._reconciled_since_trim = 0
            release_free_heap()
        return done

    def reconcile(self, key: Key, seen: Seen) -> dict[str, Any]:
        return handle(self, key, seen.uid, seen.generation, seen.body())

    def model_changed(self, model_name: str) -> None:
        self.deps.registry.model_changed(model_name)
        self.scheduler.wake_model(model_name)


def build_state(settings: Settings) -> State:
    from regserve_operator.reports import KubeReports
    from regserve_operator.targets.kube import KubeTarget

    api_client = _api_client()
    reports = KubeReports(api_client)
    rayservices = RayServiceCache()
    target = KubeTarget(api_client, cache=rayservices)
    deps = Deps(
        registry=Registry(
            on_poll=metrics.record_poll,
            facts_cache_size=settings.facts_cache_size,
            poll_wait_s=settings.pass_deadline_seconds,
            reads_outside_proxy=settings.policy().allows_reads_outside_proxy,
        ),
        target=target,
        defaults=BuildDefaults(image=settings.image, ray_version=settings.ray_version),
        image_pins=settings.image_pins,
        settle_seconds=settings.settle_seconds,
        probe=probe.probe_app if settings.probes_serving else None,
        rollout_probe=probe.probe_rollout if settings.probes_serving else None,
        monitoring_probe=monitoring.probe_monitoring if settings.probes_serving else None,
        policy=settings.policy(),
    )
    return State(
        settings,
        deps,
        post_event=reports.post_event,
        writes=StatusWrites(reports.write_status),
        rayservices=rayservices,
        finalizers=KubeFinalizers(api_client),
    )


def _api_client() -> Any:
    """An ApiClient of its own (no global config): in-cluster, else $KUBECONFIG read now.

    The kubernetes package reads $KUBECONFIG once at import, so it is passed explicitly here."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))


def keep_finalizer(state: State, finalizers: KubeFinalizers, body: Mapping[str, Any]) -> None:
    """Add the registry-tags finalizer once tags are written; on deletion remove the tags, then it."""
    step = finalizer_step(body)
    meta = body.get("metadata") or {}
    if step == "add":
        finalizers.patch(meta, add_patch(meta))
    elif step == "finalize":
        removal = remove_tags(body, state.deps.registry, state.deps.target, policy=state.deps.policy)
        if removal.kept:
            message = printable(
                f"MLflow tags on versions {', '.join(removal.kept)} were left in place: {removal.problem}"
            )
            log.warning("%s/%s: %s", meta.get("namespace"), meta.get("name"), message)
            state.post_event(body, Event("Warning", "RegistryTagsNotRemoved", message))
        finalizers.patch(meta, remove_patch(meta))


def forget(state: State, key: Key, body: Mapping[str, Any]) -> None:
    namespace, name = key
    state.watched.gone(key)
    state.scheduler.forget(key)
    if state.writes is not None:
        state.writes.forget(key)
    metrics.forget_rollout(namespace, name)
    metrics.record_monitoring(namespace, name, None)
    cluster = ((body.get("spec") or {}).get("placement") or {}).get("cluster")
    if cluster:
        # The other members drop its application at their next pass: make that now, not a poll later.
        shared = state.deps.target.get(namespace, cluster) or {}
        for ref in (shared.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("kind") == s.KIND and ref.get("name") not in (None, name):
                state.scheduler.wake((namespace, ref["name"]))


def handle(
    state: State,
    key: Key,
    uid: str,
    generation: int | None,
    body: Any,
    now: datetime | None = None,
) -> dict[str, Any]:
    """One resource's pass; returns its status merge patch (empty when nothing changed)."""
    namespace, name = key
    raw_status = state.scheduler.latest_status(key, copy.deepcopy(dict(body.get("status") or {})))
    now = now or datetime.now(UTC)
    try:
        spec = s.parse_spec(copy.deepcopy(dict(body["spec"])))
    except ValidationError as exc:
        return _invalid_spec(state, key, generation, body, raw_status, exc, now)
    status = s.parse_status(raw_status)
    outcome = reconcile_pass(
        state.scheduler,
        Owner(name, namespace, uid),
        generation,
        spec,
        status,
        state.deps,
        now=now,
        tick_s=state.settings.tick_seconds,
        post_event=lambda event: state.post_event(body, event),
    )
    if outcome is None:
        metrics.RECONCILES.labels("error").inc()
        return {}
    _record(outcome)
    metrics.record_rollout(namespace, name, outcome.status.rollout_phase, outcome.status.rollout_weight)
    metrics.record_monitoring(namespace, name, outcome.status.monitoring)
    return status_patch(raw_status, s.status_to_wire(outcome.status))


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Merge-patch semantics: fields we cleared must be sent as null, or the old value stays."""
    ours = {f.alias or n for n, f in s.RegisteredModelServingStatus.model_fields.items()}
    changed = {name: value for name, value in new.items() if old.get(name) != value}
    cleared = {name: None for name in old if name in ours and name not in new}
    return {**changed, **cleared}


def _invalid_spec(
    state: State,
    key: Key,
    generation: int | None,
    body: Any,
    raw_status: dict[str, Any],
    exc: ValidationError,
    now: datetime,
) -> dict[str, Any]:
    message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())[:1024]
    status = s.parse_status(raw_status)
    was = next((c for c in status.conditions or [] if c.type == READY), None)
    status.conditions = set_condition(
        status.conditions, READY, "False", "InvalidSpec", message, now=iso(now), generation=generation
    )
    status.revision = (status.revision or 0) + 1
    wire = s.status_to_wire(status)
    if was is None or was.reason != "InvalidSpec":
        state.post_event(body, Event("Warning", "InvalidSpec", message))
    state.scheduler.done(key, delay=300, model="", failed=False, generation=generation, status=lambda: wire)
    return status_patch(raw_status, wire)


def _record(outcome: Outcome) -> None:
    metrics.RECONCILES.labels("retry" if outcome.retry else "ok").inc()
    for result in outcome.results:
        metrics.ROLLOUTS.labels(result).inc()
    if outcome.promotion_latency_s is not None:
        metrics.PROMOTION_LATENCY.observe(outcome.promotion_latency_s)
