"""One reconcile of one RegisteredModelServing: gather → decide → act.

- gather (`gather`): the Secret the resource names, the existing RayService, the selector's version,
  the facts of the versions the decision needs, and — while a rollout is judged — what the app reports
  (`probe.probe_app`). All I/O goes through the ports (`ports.Target`, `ports.RegistryPort`) and the probe.
- decide (`decide.decide`, pure): the new status, Events, the plan and when to look again. The rollout
  rules are in decide.py and rollout.py.
- act (`act`): carry out the plan. A write that conflicts (someone else wrote in between) discards
  the decision: nothing happened, so the next tick decides again from what is there then.

`reconcile_pass` is the whole pass both kopf (operator_state.py) and local mode (driver.py) run:
reconcile, post the Events, and schedule the next look with one back-off rule (`decide.next_delay`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from regserve_operator import conditions as c
from regserve_operator.builders import (
    BuildDefaults,
    Owner,
    monitoring_experiment,
    rayservice_name,
    route_prefix,
)
from regserve_operator.decide import (
    Event,
    FactsResult,
    Inputs,
    NeedFacts,
    Observation,
    Outcome,
    Unreadable,
    decide,
    iso,
    next_delay,
    wants_app_report,
    wants_rollout_report,
)
from regserve_operator.monitoring import MonitoringProbe
from regserve_operator.policy import OFF, Policy, violations
from regserve_operator.ports import (
    Credentials,
    CredentialsUnavailable,
    RegistryError,
    RegistryPort,
    Target,
    TargetConflict,
    VersionRunRef,
)
from regserve_operator.probe import Probe, RolloutProbe
from regserve_operator.schedule import Key, Scheduler
from regserve_operator.shared import Peer, peer_of
from regserve_operator.spec import RegisteredModelServingSpec, RegisteredModelServingStatus, status_to_wire
from regserve_operator.tags import tag_key

log = logging.getLogger(__name__)

# Facts a pass may need: the selector's version, the serving one it is gated against, the one carried,
# the candidate beside it.
MAX_FACT_READS = 5


@dataclass
class Deps:
    registry: RegistryPort
    target: Target
    defaults: BuildDefaults
    image_pins: Mapping[str, str] = field(default_factory=dict)
    settle_seconds: float = 10.0
    probe: Probe | None = None  # asks the app what it answers with (None: go by Ray's status alone)
    # asks the app how the candidate fares (None: a candidate never gets a verdict, so never promoted)
    rollout_probe: RolloutProbe | None = None
    policy: Policy = OFF  # the platform team's limits (settings); local mode has none
    # asks the app for its last completed monitoring window (None: spec.monitoring gets no figures)
    monitoring_probe: MonitoringProbe | None = None


def reconcile(
    owner: Owner,
    generation: int | None,
    spec: RegisteredModelServingSpec,
    status: RegisteredModelServingStatus,
    deps: Deps,
    now: datetime,
) -> Outcome:
    inputs = Inputs(
        owner,
        generation,
        spec,
        status,
        now,
        deps.defaults,
        deps.image_pins,
        deps.settle_seconds,
        judges_candidates=deps.rollout_probe is not None,
        policy=deps.policy,
    )
    observed, credentials = gather(owner, spec, status, deps)
    if isinstance(observed.resolved, str) and observed.credentials_problem is None:
        # Every decision with a resolved version reads its facts (cached after the first pass): read
        # them up front, so the steady-state pass decides once instead of twice.
        version = observed.resolved
        observed = observed.with_facts(version, read_facts(deps, spec, credentials, version))
    for _ in range(MAX_FACT_READS + 1):
        decision = decide(inputs, observed)
        if not isinstance(decision, NeedFacts):
            return act(decision, inputs, deps, credentials)
        observed = observed.with_facts(
            decision.version, read_facts(deps, spec, credentials, decision.version)
        )
    raise RuntimeError(f"{owner.namespace}/{owner.name}: the decision kept asking for facts")


def gather(
    owner: Owner, spec: RegisteredModelServingSpec, status: RegisteredModelServingStatus, deps: Deps
) -> tuple[Observation, Credentials]:
    name = rayservice_name(owner.name, spec)
    url = deps.target.url(owner.namespace, name, route_prefix(owner.name, spec.serving))
    credentials = Credentials()
    refused = violations(spec, None, deps.policy)
    if refused:
        # Checked before the Secret is read or the registry asked: a refused tracking URI never sees it.
        return Observation(url=url, refused=tuple(refused)), credentials
    ref = spec.registry.credentials_secret_ref
    if ref is not None:
        try:
            credentials = Credentials.from_mapping(deps.target.read_credentials(owner.namespace, ref.name))
        except CredentialsUnavailable as exc:
            return Observation(url=url, credentials_problem=str(exc)), credentials
    ignored = credentials.ignored_keys if ref is not None else None
    existing = deps.target.get(owner.namespace, name)
    peers: tuple[Peer, ...] = ()
    if spec.placement is not None:
        listed = deps.target.members(owner.namespace, spec.placement.cluster)
        peers = tuple(peer for peer in map(peer_of, listed) if peer is not None)
    resolved: str | RegistryError
    try:
        resolved = deps.registry.resolve(
            spec.registry.tracking_uri, credentials, spec.model, spec.registry.poll_interval_seconds
        )
    except RegistryError as exc:
        resolved = exc
    promoted = None
    if spec.serving.pinning == "Promoted":
        try:
            promoted = deps.registry.promoted(
                spec.registry.tracking_uri, credentials, spec.model.name, spec.registry.poll_interval_seconds
            )
        except RegistryError:
            promoted = None  # the policy the RayService carries stays (decide reads it from there)
    app = report = None
    if deps.probe is not None and wants_app_report(status, existing, owner.name):
        app = deps.probe(url)
    if deps.rollout_probe is not None and wants_rollout_report(status, existing, owner.name):
        report = deps.rollout_probe(url)
    window = None
    if deps.monitoring_probe is not None and spec.monitoring.enabled and _running(existing, owner.name):
        window = deps.monitoring_probe(url)
    observed = Observation(
        url=url,
        existing=existing,
        resolved=resolved,
        app=app,
        rollout=report,
        monitoring=window,
        peers=peers,
        promoted=promoted,
        ignored_credential_keys=ignored,
    )
    return observed, credentials


def read_facts(
    deps: Deps, spec: RegisteredModelServingSpec, credentials: Credentials, version: str
) -> FactsResult:
    try:
        return deps.registry.facts(spec.registry.tracking_uri, credentials, spec.model.name, version)
    except RegistryError as exc:
        return exc
    except Exception as exc:  # the registry answered, but with something that is no MLmodel
        return Unreadable(f"{type(exc).__name__}: {exc}")


def act(decision: Outcome, inputs: Inputs, deps: Deps, credentials: Credentials | None = None) -> Outcome:
    plan = decision.plan
    if plan is not None and plan.writes and plan.action != "conflict":
        try:
            deps.target.apply(plan)
        except TargetConflict as exc:
            # Someone else wrote in between: nothing failed, so look again at the next tick rather than
            # backing off as after an error.
            log.info("%s/%s: %s; deciding again", inputs.owner.namespace, inputs.owner.name, exc)
            return Outcome(status=inputs.status, in_flight=True)
    if decision.tag_writes:
        write_tags(decision, inputs, deps, credentials or Credentials())
    if decision.window_metrics:
        log_window_metrics(decision, inputs, deps, credentials or Credentials())
    return decision


def log_window_metrics(decision: Outcome, inputs: Inputs, deps: Deps, credentials: Credentials) -> None:
    """Each version's window figures on its MLflow run. Best effort: a tracking server that refuses or
    is away costs that window's points (logged as a warning), never the pass."""
    spec, owner = inputs.spec, inputs.owner
    for window in decision.window_metrics:
        run = VersionRunRef(
            experiment=monitoring_experiment(owner),
            model=spec.model.name,
            resource=f"{owner.namespace}/{owner.name}",
            version=window.version,
        )
        try:
            deps.registry.log_window_metrics(
                spec.registry.tracking_uri, credentials, run, window.metrics, window.timestamp_ms, window.step
            )
        except RegistryError as exc:
            log.warning("%s/%s: window metrics not logged: %s", owner.namespace, owner.name, exc)
            return


def _running(existing: dict[str, Any] | None, app: str) -> bool:
    return c.read_service_state(existing, app).running


def write_tags(decision: Outcome, inputs: Inputs, deps: Deps, credentials: Credentials) -> None:
    """Write the deployment state tags the decision planned. A registry that refuses (read-only
    credentials) or cannot be reached gets a condition and one warning; the tags it did not take stay
    out of `status.registryTags`, so a later pass writes them. A rollout never waits on them."""
    spec, owner, st = inputs.spec, inputs.owner, decision.status
    key = tag_key(owner.namespace, owner.name)
    written = dict(st.registry_tags or {})
    previous = dict(inputs.status.registry_tags or {})
    problem: str | None = None
    for write in decision.tag_writes:
        try:
            deps.registry.set_version_tag(
                spec.registry.tracking_uri, credentials, spec.model.name, write.version, key, write.value
            )
        except RegistryError as exc:
            problem = problem or str(exc)
            _undo(written, previous, write.version)
    st.registry_tags = written or None
    before = c.get_condition(inputs.status.conditions, c.REGISTRY_TAGS_WRITTEN)
    status: c.Status = "True" if problem is None else "False"
    reason = "Written" if problem is None else "WriteFailed"
    st.conditions = c.set_condition(
        st.conditions,
        c.REGISTRY_TAGS_WRITTEN,
        status,
        reason,
        problem or "",
        now=iso(inputs.now),
        generation=inputs.generation,
    )
    if problem is None:
        return
    if before is None or before.status != "False":
        decision.events.append(
            Event("Warning", "RegistryTagsNotWritten", f"deployment state tags not written: {problem}")
        )


def _undo(written: dict[str, str], previous: Mapping[str, str], version: str) -> None:
    """Back to what the registry holds for `version` (as far as we know) after a failed write."""
    if version in previous:
        written[version] = previous[version]
    else:
        written.pop(version, None)


def reconcile_pass(
    scheduler: Scheduler,
    owner: Owner,
    generation: int | None,
    spec: RegisteredModelServingSpec,
    status: RegisteredModelServingStatus,
    deps: Deps,
    *,
    now: datetime,
    tick_s: float,
    post_event: Callable[[Event], None],
) -> Outcome | None:
    """Reconcile, post the Events, schedule the next look. None when the reconcile raised: logged and
    retried with the error back-off, the status left as it was (one resource's failure never stops
    the others)."""
    key: Key = (owner.namespace, owner.name)
    scheduler.started(key, spec.model.name)
    try:
        outcome = reconcile(owner, generation, spec, status, deps, now)
    except Exception:
        log.exception("%s/%s: reconcile failed", owner.namespace, owner.name)
        outcome = None
    decided = outcome or Outcome(status=status, retry=True)
    for event in decided.events:
        log.info("%s/%s %s: %s", owner.namespace, owner.name, event.reason, event.message)
        post_event(event)
    failures = scheduler.failures(key) if decided.retry else 0
    scheduler.done(
        key,
        delay=next_delay(decided, spec.registry.poll_interval_seconds, failures, tick_s),
        model=spec.model.name,
        failed=decided.retry,
        generation=generation,
        status=lambda: status_to_wire(decided.status),
    )
    return outcome


__all__ = ["Deps", "act", "gather", "read_facts", "reconcile", "reconcile_pass", "write_tags"]
