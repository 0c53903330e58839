"""kopf registration. kopf watches; one loop reconciles (`passes.py`). Handlers are thin: they keep the
watch's latest copy of each resource and mark resources due; the loop hands each due one to
`reconcile.reconcile_pass`, the same pass local mode runs. Operator-wide state (settings read at
startup, the ports, the scheduler, the loop) lives in kopf's memo, set by the startup handler.

- resource events: keep the copy; a new resource or a changed spec is due at once; a deleted one is
  forgotten (its RayService goes with it through its owner reference: no finalizer), and the other
  members of a shared cluster are woken to drop its application.
- the loop (every `tick_seconds`): reconcile the resources that are due; status as a merge patch of
  the status subresource, Events posted on transitions (`reports.py`).
- RayService events (ours, by label): wake their owners, so rollouts are judged as soon as KubeRay
  reports.
- webhook deliveries: mark resources serving the named model due and refresh the registry snapshot.

No change-detecting handler (create/update/resume/delete) is registered, so kopf writes nothing to the
resources themselves: no finalizers of its own, no progress or diff-base annotations. The one finalizer
a resource carries is ours (`finalizer.py`): added by the watch handler once tags are written to MLflow,
and on deletion removed after the tags are (bounded in time), with a JSON patch of its own.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from regserve_operator import metrics, probe
from regserve_operator import spec as s
from regserve_operator.allocator import limit_arenas, release_free_heap
from regserve_operator.builders import LABEL_MANAGED_BY, MANAGED_BY, BuildDefaults, Owner
from regserve_operator.conditions import READY, printable, set_condition
from regserve_operator.decide import Event, Outcome, iso
from regserve_operator.driver import TRIM_AFTER_RESOURCES
from regserve_operator.finalizer import (
    KubeFinalizers,
    add_patch,
    deleting,
    finalizer_step,
    remove_patch,
    remove_tags,
)
from regserve_operator.passes import InFlight, Seen, StatusWrites, Watched, run_forever, run_pass
from regserve_operator.rbac import rule
from regserve_operator.reconcile import Deps, reconcile_pass
from regserve_operator.registry import Registry
from regserve_operator.schedule import Key, Scheduler, key_of
from regserve_operator.settings import Settings
from regserve_operator.targets.kube_cache import RayServiceCache
from regserve_operator.webhook import Receiver, Verdict, start_receiver

log = logging.getLogger(__name__)

rule(__name__, [s.GROUP], [s.PLURAL], ["list", "watch"], "kopf watches the resources")
rule(__name__, ["ray.io"], ["rayservices"], ["list", "watch"], "wake owners when KubeRay reports status")
rule(__name__, [""], ["namespaces"], ["list", "watch"], "kopf observes namespaces even for --namespace NAME")
rule(
    __name__,
    ["apiextensions.k8s.io"],
    ["customresourcedefinitions"],
    ["list", "watch"],
    "kopf follows CRD changes at startup",
)

# glibc malloc arenas for the whole process (allocator.py): the threads mostly wait on I/O, and an arena
# each kept its own peak.
OPERATOR_ARENAS = 2

# Deletions whose registry tags are being removed at once.
FINALIZER_WORKERS = 2

# Objects per page of kopf's initial listing, and how long its per-object worker outlives an event.
LIST_CHUNK = 500
WORKER_IDLE_S = 0.5

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


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    # Same order as our own client: in-cluster, else $KUBECONFIG (read at login, not at import).
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Nothing of kopf's own is written to the resources (no change-detecting handlers). Its per-object
    # log says "Handler 'watched' succeeded." for every watch event (every status write, every
    # KubeRay report); what happened to a resource is in the loop's own log lines.
    settings.posting.enabled = False
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # kopf parses the initial listing whole unless told a chunk size, and each object's worker keeps
    # its last event for `idle_timeout` after handling it: at startup with 10,000 resources, every
    # body at once. The heap that peak needs stays mapped after it (the few objects that outlive it
    # are spread through it), so the peak is what the operator keeps.
    settings.watching.chunk_size = LIST_CHUNK
    settings.queueing.idle_timeout = WORKER_IDLE_S
    current = Settings()
    state = build_state(current)
    memo.state = state
    state.loop_task = asyncio.create_task(run_forever(state.run_pass, current.tick_seconds))
    metrics.serve(current.metrics_port)
    secret = current.webhook_secret.get_secret_value() if current.webhook_secret else ""
    if current.webhook_port and secret:
        receiver = Receiver(secret, on_model_changed=state.model_changed, on_verdict=_count_delivery)
        state.receiver_runner = await start_receiver(receiver, current.webhook_host, current.webhook_port)
        log.info("webhook receiver on %s:%s/webhook", current.webhook_host, current.webhook_port)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    state = getattr(memo, "state", None)
    if isinstance(state, State) and state.loop_task is not None:
        state.loop_task.cancel()
        await asyncio.gather(state.loop_task, return_exceptions=True)
        state.pool.shutdown(wait=False, cancel_futures=True)
        state.finalizing.shutdown(wait=False, cancel_futures=True)
    if isinstance(state, State) and state.receiver_runner is not None:
        await state.receiver_runner.cleanup()
    if isinstance(state, State) and isinstance(state.deps.registry, Registry):
        state.deps.registry.close()


def _count_delivery(verdict: Verdict) -> None:
    metrics.WEBHOOK_DELIVERIES.labels("accepted" if verdict.ok else "refused").inc()


@kopf.on.event(s.GROUP, s.VERSION, s.PLURAL)
async def watched(*, type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Every watch event: keep the copy the loop reconciles from (async: no thread hop per event)."""
    state = getattr(memo, "state", None)
    if not isinstance(state, State):
        return
    key = key_of(body)
    if type == "DELETED" or deleting(body):
        # Being deleted: no pass may run on it any more (one would write its tags again).
        await asyncio.to_thread(forget, state, key, body)
    elif state.watched.saw(body):
        state.scheduler.wake(key)
    if type != "DELETED" and state.finalizers is not None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(state.finalizing, keep_finalizer, state, state.finalizers, body)


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
    cluster = ((body.get("spec") or {}).get("placement") or {}).get("cluster")
    if cluster:
        # The other members drop its application at their next pass: make that now, not a poll later.
        shared = state.deps.target.get(namespace, cluster) or {}
        for ref in (shared.get("metadata") or {}).get("ownerReferences") or []:
            if ref.get("kind") == s.KIND and ref.get("name") not in (None, name):
                state.scheduler.wake((namespace, ref["name"]))


@kopf.on.event("ray.io", "v1", "rayservices", labels={LABEL_MANAGED_BY: MANAGED_BY})
async def rayservice_changed(
    *, type: str | None, body: kopf.Body, namespace: str | None, meta: kopf.Meta, memo: kopf.Memo, **_: Any
) -> None:
    """KubeRay (or anyone) changed a RayService of ours: keep the copy passes read, and wake its owners
    (every member of a shared one)."""
    state = getattr(memo, "state", None)
    if not isinstance(state, State):
        return
    if state.rayservices is not None:
        if type == "DELETED":
            state.rayservices.gone(key_of(body))
        else:
            state.rayservices.saw(body)
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == s.KIND and ref.get("name"):
            state.scheduler.wake((namespace or "", ref["name"]))


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


def run(namespaces: list[str], all_namespaces: bool, standalone: bool) -> int:
    """`regserve run`: the operator in the foreground until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not namespaces and not all_namespaces:
        raise SystemExit("pass --namespace NS (repeatable) or --all-namespaces")
    limit_arenas(OPERATOR_ARENAS)  # before kopf and the loop start their threads
    asyncio.run(
        kopf.operator(
            standalone=standalone,
            clusterwide=all_namespaces,
            namespaces=namespaces,
        )
    )
    return 0
