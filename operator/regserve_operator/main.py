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
import logging
from typing import Any

import kopf

from regserve_operator import metrics
from regserve_operator import spec as s
from regserve_operator.allocator import limit_arenas
from regserve_operator.builders import LABEL_MANAGED_BY, MANAGED_BY
from regserve_operator.finalizer import deleting
from regserve_operator.operator_state import State, build_state, forget, keep_finalizer
from regserve_operator.passes import run_forever
from regserve_operator.rbac import rule
from regserve_operator.registry import Registry
from regserve_operator.schedule import key_of
from regserve_operator.settings import Settings
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

# Objects per page of kopf's initial listing, and how long its per-object worker outlives an event.
LIST_CHUNK = 500
WORKER_IDLE_S = 0.5


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
