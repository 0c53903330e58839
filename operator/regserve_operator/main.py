"""kopf registration. Handlers are thin: they mark resources due and delegate to
`reconcile.reconcile_pass`, the same pass local mode runs. Operator-wide state (settings read at
startup, the ports, the scheduler) lives in kopf's memo, set by the startup handler.

- create/resume/update: mark the resource due (the next tick reconciles it).
- delete: forget it; the RayService goes with it through its owner reference (no finalizer).
- timer (every second): when due, one reconcile pass; status written through kopf's `patch`, Events
  through `kopf.event`.
- RayService events (ours, by label): mark the owner due, so rollouts are judged as soon as KubeRay
  reports.
- webhook deliveries: mark resources serving the named model due and refresh the registry snapshot.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from regserve_operator import metrics, probe
from regserve_operator import spec as s
from regserve_operator.builders import LABEL_MANAGED_BY, MANAGED_BY, BuildDefaults, Owner
from regserve_operator.conditions import READY, set_condition
from regserve_operator.decide import Outcome, iso
from regserve_operator.rbac import rule
from regserve_operator.reconcile import Deps, reconcile_pass
from regserve_operator.registry import Registry
from regserve_operator.schedule import Key, Scheduler
from regserve_operator.settings import Settings
from regserve_operator.webhook import Receiver, Verdict, start_receiver

log = logging.getLogger(__name__)

rule(
    __name__, [s.GROUP], [s.PLURAL], ["get", "list", "watch", "patch"], "kopf watches and annotates resources"
)
rule(__name__, [s.GROUP], [f"{s.PLURAL}/status"], ["get", "patch"], "status written through kopf's patch")
rule(__name__, ["ray.io"], ["rayservices"], ["list", "watch"], "wake owners when KubeRay reports status")
rule(__name__, ["", "events.k8s.io"], ["events"], ["create", "patch"], "Events on transitions")
rule(__name__, [""], ["namespaces"], ["list", "watch"], "kopf observes namespaces even for --namespace NAME")
rule(
    __name__,
    ["apiextensions.k8s.io"],
    ["customresourcedefinitions"],
    ["list", "watch"],
    "kopf follows CRD changes at startup",
)

# The timer only asks the scheduler whether a resource is due (no I/O), so its period is fixed here;
# `Settings.tick_seconds` is how soon a resource is looked at again while a rollout is judged.
TIMER_INTERVAL_S = 1.0


class State:
    """What the handlers share; built at startup and kept in kopf's memo."""

    def __init__(self, settings: Settings, deps: Deps) -> None:
        self.settings = settings
        self.deps = deps
        self.scheduler = Scheduler()
        self.receiver_runner: Any = None

    def model_changed(self, model_name: str) -> None:
        self.deps.registry.model_changed(model_name)
        self.scheduler.wake_model(model_name)


def _state(memo: Any) -> State:
    state = getattr(memo, "state", None)
    if not isinstance(state, State):
        raise kopf.TemporaryError("operator not started yet", delay=1)
    return state


def build_state(settings: Settings, target: Any = None) -> State:
    if target is None:
        from regserve_operator.targets.kube import KubeTarget

        target = KubeTarget(_api_client())
    deps = Deps(
        registry=Registry(on_poll=metrics.record_poll, facts_cache_size=settings.facts_cache_size),
        target=target,
        defaults=BuildDefaults(image=settings.image, ray_version=settings.ray_version),
        image_pins=settings.image_pins,
        settle_seconds=settings.settle_seconds,
        probe=probe.probe_app if settings.probes_serving else None,
        rollout_probe=probe.probe_rollout if settings.probes_serving else None,
    )
    return State(settings, deps)


def _api_client() -> Any:
    """An ApiClient of its own (no global config): in-cluster, else $KUBECONFIG read now.

    The kubernetes package reads $KUBECONFIG once at import, so it is passed explicitly here."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # Same order as our own client: in-cluster, else $KUBECONFIG (read at login, not at import).
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


class QuietTicks(logging.Filter):
    """Drops kopf's "Timer 'tick' succeeded." line: one per resource per tick (every second) says
    nothing the metrics don't, and would bury the lines that do."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Timer 'tick' succeeded."


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.INFO
    objects_log = logging.getLogger("kopf.objects")
    if not any(isinstance(f, QuietTicks) for f in objects_log.filters):
        objects_log.addFilter(QuietTicks())
    settings.persistence.finalizer = f"{s.GROUP}/finalizer"
    # Handler progress in annotations only: status belongs to the resource's own fields.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=s.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=s.GROUP)
    current = Settings()
    state = build_state(current)
    memo.state = state
    metrics.serve(current.metrics_port)
    secret = current.webhook_secret.get_secret_value() if current.webhook_secret else ""
    if current.webhook_port and secret:
        receiver = Receiver(secret, on_model_changed=state.model_changed, on_verdict=_count_delivery)
        state.receiver_runner = await start_receiver(receiver, current.webhook_host, current.webhook_port)
        log.info("webhook receiver on %s:%s/webhook", current.webhook_host, current.webhook_port)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    state = getattr(memo, "state", None)
    if isinstance(state, State) and state.receiver_runner is not None:
        await state.receiver_runner.cleanup()
    if isinstance(state, State) and isinstance(state.deps.registry, Registry):
        state.deps.registry.close()


def _count_delivery(verdict: Verdict) -> None:
    metrics.WEBHOOK_DELIVERIES.labels("accepted" if verdict.ok else "refused").inc()


# Distinct ids: kopf keys handler progress by id.
@kopf.on.resume(s.GROUP, s.VERSION, s.PLURAL, id="wake-on-resume")
@kopf.on.create(s.GROUP, s.VERSION, s.PLURAL, id="wake-on-create")
@kopf.on.update(s.GROUP, s.VERSION, s.PLURAL, field="spec", id="wake-on-update")
def wake(*, namespace: str | None, name: str, memo: kopf.Memo, **_: Any) -> None:
    _state(memo).scheduler.wake((namespace or "", name))


@kopf.on.delete(s.GROUP, s.VERSION, s.PLURAL, optional=True)
def forget(*, namespace: str | None, name: str, spec: kopf.Spec, memo: kopf.Memo, **_: Any) -> None:
    state = _state(memo)
    state.scheduler.forget((namespace or "", name))
    metrics.forget_rollout(namespace or "", name)
    cluster = (spec.get("placement") or {}).get("cluster")
    if cluster:
        # The other members drop its application at their next pass: make that now, not a poll later.
        shared = state.deps.target.get(namespace or "", cluster) or {}
        for ref in (shared.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("kind") == s.KIND and ref.get("name") not in (None, name):
                state.scheduler.wake((namespace or "", ref["name"]))


@kopf.on.event("ray.io", "v1", "rayservices", labels={LABEL_MANAGED_BY: MANAGED_BY})
def rayservice_changed(*, namespace: str | None, meta: kopf.Meta, memo: kopf.Memo, **_: Any) -> None:
    """KubeRay reported on a RayService: wake its owners (every member of a shared one)."""
    state = getattr(memo, "state", None)
    if not isinstance(state, State):
        return
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == s.KIND and ref.get("name"):
            state.scheduler.wake((namespace or "", ref["name"]))


@kopf.timer(s.GROUP, s.VERSION, s.PLURAL, interval=TIMER_INTERVAL_S)
def tick(
    *,
    namespace: str | None,
    name: str,
    uid: str,
    body: kopf.Body,
    meta: kopf.Meta,
    patch: kopf.Patch,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    state = _state(memo)
    key: Key = (namespace or "", name)
    generation = meta.get("generation")
    if not state.scheduler.due(key, generation):
        return
    handle(state, key, uid, generation, body, patch)


def handle(
    state: State,
    key: Key,
    uid: str,
    generation: int | None,
    body: Any,
    patch: Any,
    now: datetime | None = None,
) -> None:
    namespace, name = key
    raw_status = state.scheduler.latest_status(key, copy.deepcopy(dict(body.get("status") or {})))
    now = now or datetime.now(UTC)
    try:
        spec = s.parse_spec(copy.deepcopy(dict(body["spec"])))
    except ValidationError as exc:
        _invalid_spec(state, key, generation, body, patch, raw_status, exc, now)
        return
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
        post_event=lambda event: kopf.event(
            body, type=event.type, reason=event.reason, message=event.message
        ),
    )
    if outcome is None:
        metrics.RECONCILES.labels("error").inc()
        return
    _write_status(patch, raw_status, s.status_to_wire(outcome.status))
    _record(outcome)
    metrics.record_rollout(namespace, name, outcome.status.rollout_phase, outcome.status.rollout_weight)


def _write_status(patch: Any, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Merge-patch semantics: fields we cleared must be sent as null, or the old value stays."""
    ours = {f.alias or n for n, f in s.RegisteredModelServingStatus.model_fields.items()}
    for field_name, value in new.items():
        if old.get(field_name) != value:
            patch.status[field_name] = value
    for field_name in old:
        if field_name in ours and field_name not in new:
            patch.status[field_name] = None


def _invalid_spec(
    state: State,
    key: Key,
    generation: int | None,
    body: Any,
    patch: Any,
    raw_status: dict[str, Any],
    exc: ValidationError,
    now: datetime,
) -> None:
    message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())[:1024]
    status = s.parse_status(raw_status)
    was = next((c for c in status.conditions or [] if c.type == READY), None)
    status.conditions = set_condition(
        status.conditions, READY, "False", "InvalidSpec", message, now=iso(now), generation=generation
    )
    status.revision = (status.revision or 0) + 1
    wire = s.status_to_wire(status)
    _write_status(patch, raw_status, wire)
    if was is None or was.reason != "InvalidSpec":
        kopf.event(body, type="Warning", reason="InvalidSpec", message=message)
    state.scheduler.done(key, delay=300, model="", failed=False, generation=generation, status=lambda: wire)


def _record(outcome: Outcome) -> None:
    metrics.RECONCILES.labels("retry" if outcome.retry else "ok").inc()
    for result in outcome.results:
        metrics.ROLLOUTS.labels(result).inc()
    if outcome.promotion_latency_s is not None:
        metrics.PROMOTION_LATENCY.observe(outcome.promotion_latency_s)


def run(namespaces: list[str], all_namespaces: bool, standalone: bool) -> int:
    """`regserve run`: the operator in the foreground until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not namespaces and not all_namespaces:
        raise SystemExit("pass --namespace NS (repeatable) or --all-namespaces")
    asyncio.run(
        kopf.operator(
            standalone=standalone,
            clusterwide=all_namespaces,
            namespaces=namespaces,
        )
    )
    return 0
