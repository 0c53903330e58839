"""One reconcile of one RegisteredModelServing: resolve → gate → size → build → plan → apply → status.

`reconcile()` is the whole decision; it talks to the world only through the `Target` (where the
RayService lives) and the `Registry` ports, and returns the new status plus the Events to post.
kopf handlers (main.py) and local mode both call it.

Rollout rules:
- The version the selector resolves to is *gated* against the version serving now with
  serving_app's `compare_signatures`. Incompatible → held: recorded in `status.rejected`, condition
  SignatureCompatible=False with the differences, one Event; the old version keeps serving; not
  tried again until the selector resolves to another version (or `spec.rollout.allowIncompatibleVersion`
  names it).
- A rollout is judged from the RayService's status: RUNNING (after `settle_seconds`) → the version
  becomes `lastGoodVersion`; DEPLOY_FAILED/UNHEALTHY, or not RUNNING within `rollout.deadlineSeconds`
  → rolled back to `lastGoodVersion`, recorded in `status.rejected`, not retried while the selector
  still points at it.
- Events and conditions' transition times mark transitions, never repeated polls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from regserve_operator import conditions as c
from regserve_operator.builders import (
    BuildDefaults,
    Owner,
    build_rayservice,
    rayservice_name,
    route_prefix,
    serving_version_of,
)
from regserve_operator.plan import Plan, make_plan
from regserve_operator.ports import (
    Credentials,
    CredentialsUnavailable,
    ModelFacts,
    RegistryError,
    RegistryPort,
    RegistryUnreachable,
    Target,
    TargetConflict,
)
from regserve_operator.registry import check_requirements
from regserve_operator.sizing import size_replica
from regserve_operator.spec import (
    HistoryEntry,
    RegisteredModelServingSpec,
    RegisteredModelServingStatus,
    VersionRecord,
)
from serving_app.compat import compare_signatures

log = logging.getLogger(__name__)

HISTORY_LENGTH = 10


@dataclass
class Deps:
    registry: RegistryPort
    target: Target
    defaults: BuildDefaults
    image_pins: Mapping[str, str] = field(default_factory=dict)
    settle_seconds: float = 10.0
    # Asks the app at a URL which default it answers with (None: cannot ask); see `probe.py`.
    answering_default: Callable[[str], str | None] | None = None


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


RolloutResult = Literal["started", "succeeded", "rolled_back", "held"]


@dataclass
class Outcome:
    status: RegisteredModelServingStatus
    events: list[Event] = field(default_factory=list)
    retry: bool = False  # an error the caller should retry with backoff
    in_flight: bool = False  # a rollout is being judged: look again soon
    plan: Plan | None = None
    results: list[RolloutResult] = field(default_factory=list)
    promotion_latency_s: float | None = None
    requeue_after_s: float | None = None  # a retry is scheduled for then (e.g. after a registry outage)


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


# --------------------------------------------------------------------------------------- reconcile


class _Run:
    """Mutable state of one reconcile pass (keeps `reconcile` readable)."""

    def __init__(
        self,
        owner: Owner,
        generation: int | None,
        spec: RegisteredModelServingSpec,
        status: RegisteredModelServingStatus,
        deps: Deps,
        now: datetime,
    ) -> None:
        self.owner, self.generation, self.spec, self.deps, self.now = owner, generation, spec, deps, now
        self.st = status.model_copy(deep=True)
        self.out = Outcome(status=self.st)
        self.creds = Credentials()
        # Transitions are judged against the status this pass started from, so a condition set twice
        # in one pass (e.g. resolved, then its version missing) is one transition, not two.
        self.initial = {cond.type: cond.status for cond in status.conditions or []}

    # -- helpers

    def cond(self, type_: str, status: c.Status, reason: str, message: str = "") -> bool:
        """Set a condition; True when its status differs from the pass's start (worth an Event)."""
        self.st.conditions = c.set_condition(
            self.st.conditions, type_, status, reason, message, now=iso(self.now), generation=self.generation
        )
        return self.initial.get(type_) != status

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        if any(e.reason == reason for e in self.out.events):
            return  # one Event per reason per pass
        self.out.events.append(Event(type_, reason, message))
        log.info("%s/%s %s: %s", self.owner.namespace, self.owner.name, reason, message)

    def history(
        self, version: str, outcome: Literal["Serving", "Held", "RolledBack", "Superseded"], msg: str
    ) -> None:
        entries = list(self.st.history or [])
        entries.append(HistoryEntry(version=version, outcome=outcome, at=iso(self.now), message=msg[:512]))
        self.st.history = entries[-HISTORY_LENGTH:]

    def facts(self, version: str) -> ModelFacts:
        return self.deps.registry.facts(
            self.spec.registry.tracking_uri, self.creds, self.spec.model.name, version
        )

    def registry_error(self, exc: RegistryError, what: str) -> None:
        if isinstance(exc, RegistryUnreachable):
            if self.cond(c.REGISTRY_REACHABLE, "False", "Unreachable", str(exc)):
                self.event("Warning", "RegistryUnreachable", f"{what}: {exc}")
        else:
            self.cond(c.REGISTRY_REACHABLE, "True", "Reachable")
            if self.cond(c.SELECTOR_RESOLVED, "False", "NotFound", str(exc)):
                self.event("Warning", "SelectorUnresolved", f"{what}: {exc}")
        self.out.retry = True


def reconcile(
    owner: Owner,
    generation: int | None,
    spec: RegisteredModelServingSpec,
    status: RegisteredModelServingStatus,
    deps: Deps,
    now: datetime,
) -> Outcome:
    run = _Run(owner, generation, spec, status, deps, now)
    st = run.st
    name = rayservice_name(owner.name)
    st.selector = spec.model.selector_text()
    st.ray_service_name = name
    st.url = deps.target.url(owner.namespace, name, route_prefix(owner.name, spec.serving))

    ref = spec.registry.credentials_secret_ref
    if ref is not None:
        try:
            run.creds = Credentials.from_mapping(deps.target.read_credentials(owner.namespace, ref.name))
        except CredentialsUnavailable as exc:
            if run.cond(c.READY, "False", "CredentialsUnavailable", str(exc)):
                run.event("Warning", "CredentialsUnavailable", str(exc))
            run.out.retry = True
            return _finish(run, None)

    existing = deps.target.get(owner.namespace, name)
    svc = c.read_service_state(existing, owner.name)
    carried = serving_version_of(existing) if existing else None

    resolved: str | None = None
    try:
        resolved = deps.registry.resolve(
            spec.registry.tracking_uri, run.creds, spec.model, spec.registry.poll_interval_seconds
        )
    except RegistryError as exc:
        run.registry_error(exc, f"resolving {spec.model.name} {st.selector}")
    else:
        run.cond(c.REGISTRY_REACHABLE, "True", "Reachable")
        if run.initial.get(c.REGISTRY_REACHABLE) == "False":
            run.event("Normal", "RegistryReachable", "registry reachable again")
        run.cond(c.SELECTOR_RESOLVED, "True", "Resolved", f"{st.selector} → version {resolved}")
        st.resolved_version = resolved

    _judge_rollout(run, svc, carried)
    want = _choose_version(run, resolved, carried)
    if want is None:
        return _finish(run, svc)
    _apply(run, want, existing)
    return _finish(run, svc)


def _answering_default(run: _Run) -> str | None:
    probe = run.deps.answering_default
    if probe is None or not run.st.url:
        return None
    return probe(run.st.url)


def _judge_rollout(run: _Run, svc: c.ServiceState, carried: str | None) -> None:
    """Decide an in-flight rollout from the RayService's status: succeeded, failed, or still going."""
    st = run.st
    version = st.rollout_version
    if not version:
        return
    if carried != version:
        # The RayService does not carry it (deleted, or not written yet): it is re-applied below.
        run.out.in_flight = True
        return
    started = _parse_iso(st.rollout_started_at) or run.now
    elapsed = (run.now - started).total_seconds()
    deadline = run.spec.rollout.deadline_seconds
    failure = ""
    # Right after the patch the status may still describe the previous config: judge after settling.
    settled = elapsed >= run.deps.settle_seconds
    answering = _answering_default(run) if svc.running and settled else None
    if svc.failed and settled:
        failure = f"application {svc.app_status}: {svc.message}".strip()
    elif answering is not None and answering != version:
        # Serve applied the config, but the app's switch to the new default failed (or is still
        # loading): the old default answers. Not a success; past the deadline, a failure.
        if elapsed > deadline:
            failure = (
                f"the application still answers with version {answering} after {deadline}s: "
                f"its switch to {version} failed (see the replica's log)"
            )
    elif svc.running and settled:
        previous = st.last_good_version
        st.last_good_version = version
        st.rollout_version = st.rollout_started_at = None
        run.history(version, "Serving", "rollout succeeded")
        if previous and previous != version:
            run.history(previous, "Superseded", f"replaced by {version}")
        run.event("Normal", "RolloutSucceeded", f"version {version} is serving")
        run.out.results.append("succeeded")
        run.out.promotion_latency_s = elapsed
        return
    elif elapsed > deadline:
        failure = f"not RUNNING within {deadline}s (application status {svc.app_status or 'unknown'})"
    if not failure:
        run.out.in_flight = True
        return
    good = st.last_good_version
    transient = c.REGISTRY_UNAVAILABLE in failure
    if transient:
        # The version is not at fault: the serving side could not reach the registry to load it.
        # Roll back like any failure (the old default keeps serving), but try again after a backoff.
        retry_s = _transient_backoff(st.history, version)
        failure = f"{failure}; retried in {retry_s:.0f}s"
    st.rejected = VersionRecord(version=version, reason="RolledBack", message=failure[:1024], at=iso(run.now))
    st.rollout_version = st.rollout_started_at = None
    run.history(version, "RolledBack", failure)
    restored = f"; restored version {good}" if good else "; no earlier version to restore"
    run.event("Warning", "RolledBack", f"version {version} failed: {failure}{restored}")
    run.out.results.append("rolled_back")


def _choose_version(run: _Run, resolved: str | None, carried: str | None) -> str | None:
    """The version the RayService should carry after this pass (None: leave everything as it is)."""
    st, spec = run.st, run.spec
    rejected = st.rejected
    if rejected and resolved and rejected.version != resolved:
        st.rejected = None  # the selector moved on: the record has done its job
        run.cond(
            c.SIGNATURE_COMPATIBLE,
            "True",
            "SelectorMoved",
            f"selector no longer points at {rejected.version}",
        )
    if st.rollout_version and resolved and resolved != st.rollout_version and not spec.paused:
        # The selector moved during a rollout: the newer intent wins, judged against the last good version.
        run.history(st.rollout_version, "Superseded", f"selector moved to {resolved} during its rollout")
        st.rollout_version = st.rollout_started_at = None
        if st.last_good_version:
            carried = st.last_good_version
    # A rolled-back version leaves `last_good_version` as the target.
    current = st.rollout_version or st.last_good_version or carried
    if st.rollout_version or resolved is None or resolved == current:
        if (
            resolved is not None
            and resolved == current
            and not c.get_condition(st.conditions, c.SIGNATURE_COMPATIBLE)
        ):
            run.cond(c.SIGNATURE_COMPATIBLE, "True", "Serving", f"version {resolved} is the serving version")
        return current
    if spec.paused:
        return current
    allowed = spec.rollout.allow_incompatible_version == resolved
    if st.rejected and st.rejected.version == resolved and not allowed:
        wait = _transient_wait(run, st.rejected)
        if wait is None:
            return current  # held or rolled back: not retried until the selector moves
        if wait > 0:
            run.out.requeue_after_s = wait
            return current
        st.rejected = None  # rolled back only because the registry was unreachable: try again
    try:
        candidate = run.facts(resolved)
    except RegistryError as exc:
        run.registry_error(exc, f"reading version {resolved}")
        return current
    except Exception as exc:  # the registry answered, but with something that is no MLmodel
        _hold_unreadable(run, resolved, current, exc)
        return current
    try:
        baseline = run.facts(current) if current else None
    except RegistryError as exc:
        run.registry_error(exc, f"reading version {current}")
        return current
    diffs = compare_signatures(baseline.signature if baseline else None, candidate.signature)
    if diffs and not allowed:
        text = [str(d) for d in diffs]
        st.rejected = VersionRecord(
            version=resolved,
            reason="Incompatible",
            message=f"signature incompatible with serving version {current}",
            differences=text,
            at=iso(run.now),
        )
        run.cond(
            c.SIGNATURE_COMPATIBLE,
            "False",
            "Incompatible",
            f"version {resolved} vs serving {current}: " + "; ".join(text),
        )
        run.history(resolved, "Held", "; ".join(text))
        run.event(
            "Warning",
            "SignatureIncompatible",
            f"version {resolved} held back, {current} keeps serving: " + "; ".join(text),
        )
        run.out.results.append("held")
        return current
    if diffs:
        run.cond(c.SIGNATURE_COMPATIBLE, "True", "AllowedIncompatible", "; ".join(str(d) for d in diffs))
    else:
        run.cond(
            c.SIGNATURE_COMPATIBLE, "True", "Compatible", f"version {resolved} matches {current or 'nothing'}"
        )
    if st.rejected and st.rejected.version == resolved:
        st.rejected = None  # explicitly allowed
    st.rollout_version, st.rollout_started_at = resolved, iso(run.now)
    run.event(
        "Normal",
        "RolloutStarted",
        f"rolling out version {resolved}" + (f" (was {current})" if current else ""),
    )
    run.out.results.append("started")
    run.out.in_flight = True
    return resolved


def _hold_unreadable(run: _Run, version: str, current: str | None, exc: Exception) -> None:
    """Hold a version whose MLmodel cannot be read: its signature cannot be gated, nor can it load."""
    reason = f"version {version}: its MLmodel cannot be read ({type(exc).__name__}: {exc})"[:1024]
    log.warning("%s/%s %s", run.owner.namespace, run.owner.name, reason)
    run.st.rejected = VersionRecord(version=version, reason="Unreadable", message=reason, at=iso(run.now))
    run.cond(c.SIGNATURE_COMPATIBLE, "False", "Unreadable", reason)
    run.history(version, "Held", reason)
    keeps = f", {current} keeps serving" if current else ""
    run.event("Warning", "VersionUnreadable", f"version {version} held back{keeps}: {reason}")
    run.out.results.append("held")


TRANSIENT_BACKOFF_BASE_S = 5.0
TRANSIENT_BACKOFF_MAX_S = 120.0


def _transient_backoff(history: list[HistoryEntry] | None, version: str) -> float:
    """Delay before retrying `version` after its n-th consecutive registry-outage rollback (n counts
    this one): doubling from the base, capped, so a long outage costs a load attempt every 2 minutes."""
    failures = 1
    for entry in reversed(history or []):
        if (
            entry.version != version
            or entry.outcome != "RolledBack"
            or c.REGISTRY_UNAVAILABLE not in entry.message
        ):
            break
        failures += 1
    return min(TRANSIENT_BACKOFF_MAX_S, TRANSIENT_BACKOFF_BASE_S * 2 ** (failures - 1))


def _transient_wait(run: _Run, rejected: VersionRecord) -> float | None:
    """None: a verdict on the version (not retried). Else the seconds left before it is retried."""
    if rejected.reason != "RolledBack" or c.REGISTRY_UNAVAILABLE not in rejected.message:
        return None
    history = list(run.st.history or [])
    # The newest history entry is the rollback being waited out: the backoff is the one it announced.
    delay = _transient_backoff(history[:-1], rejected.version)
    at = _parse_iso(rejected.at) or run.now
    return max(0.0, delay - (run.now - at).total_seconds())


def _apply(run: _Run, version: str, existing: dict[str, Any] | None) -> None:
    st, spec = run.st, run.spec
    try:
        facts = run.facts(version)
    except RegistryError as exc:
        run.registry_error(exc, f"reading version {version}")
        return
    size = size_replica(
        model_size_bytes=facts.model_size_bytes,
        flavors=facts.flavors,
        serving=spec.serving,
        resources=spec.resources,
        previous=st.sizing,
    )
    desired = build_rayservice(run.owner, spec, version, size, run.deps.defaults)
    plan = make_plan(desired, existing)
    run.out.plan = plan
    if plan.action == "conflict":
        if run.cond(c.READY, "False", "Conflict", plan.message):
            run.event("Warning", "Conflict", plan.message)
        run.out.retry = True
        return
    if plan.writes:
        try:
            run.deps.target.apply(plan)
        except TargetConflict as exc:
            # Someone else wrote in between: nothing failed, so look again at the next tick
            # rather than backing off as after an error.
            log.info("%s/%s: %s; retrying", run.owner.namespace, run.owner.name, exc)
            run.out.in_flight = True
            return
        if plan.action == "create":
            run.event("Normal", "Created", f"RayService {plan.name} created serving version {version}")
            if not st.rollout_version and st.last_good_version != version:
                # The first version is judged like any rollout.
                st.rollout_version, st.rollout_started_at = version, iso(run.now)
                run.out.in_flight = True
        elif "rayClusterConfig" in plan.changes:
            run.event(
                "Normal",
                "ClusterUpdated",
                f"RayService {plan.name} cluster changed: {', '.join(plan.changes)}",
            )
    st.serving_version = version
    st.model_size_bytes = facts.model_size_bytes
    st.sizing = size.to_status()
    pins = run.deps.image_pins
    if pins:
        check = check_requirements(facts.requirements, pins)
        if check.ok:
            run.cond(c.REQUIREMENTS_MATCH, "True", "Match", "")
        elif run.cond(c.REQUIREMENTS_MATCH, "False", "Mismatch", "; ".join(check.mismatches)):
            run.event("Warning", "RequirementsMismatch", f"version {version}: " + "; ".join(check.mismatches))


def _finish(run: _Run, svc: c.ServiceState | None) -> Outcome:
    st = run.st
    if svc is not None:
        _mirror(run, svc)
        # Ready mirrors what was seen before this pass's write: after a write, and while the app is
        # still deploying shortly after Ready changed, look again soon instead of at the next poll.
        # Bounded by the rollout deadline, so an app stuck deploying does not keep us polling fast.
        wrote = run.out.plan is not None and run.out.plan.writes
        deploying = svc.exists and not svc.running and not svc.failed
        if wrote or (deploying and _recently_changed(run, c.READY)):
            run.out.in_flight = True
    if st.rollout_version:
        run.cond(c.ROLLOUT_IN_PROGRESS, "True", "RollingOut", f"version {st.rollout_version}")
    elif svc is not None and svc.upgrading:
        # KubeRay is bringing up a new cluster (a shape change): mirrored from the RayService.
        run.cond(c.ROLLOUT_IN_PROGRESS, "True", "NewCluster", "KubeRay is preparing a new RayCluster")
    else:
        run.cond(c.ROLLOUT_IN_PROGRESS, "False", "Idle", "")
    st.observed_generation = run.generation
    st.revision = (st.revision or 0) + 1
    return run.out


def _recently_changed(run: _Run, condition_type: str) -> bool:
    condition = c.get_condition(run.st.conditions, condition_type)
    changed = _parse_iso(condition.last_transition_time) if condition else None
    return changed is not None and (run.now - changed).total_seconds() < run.spec.rollout.deadline_seconds


def _mirror(run: _Run, svc: c.ServiceState) -> None:
    current = c.get_condition(run.st.conditions, c.READY)
    if current is not None and current.reason in ("Conflict", "CredentialsUnavailable") and run.out.retry:
        return
    if not svc.exists:
        if run.spec.paused:
            run.cond(c.READY, "False", "Paused", "paused before anything was deployed")
        else:
            run.cond(c.READY, "False", "Creating", "RayService not created yet")
    elif svc.running:
        run.cond(c.READY, "True", "Serving", f"version {run.st.serving_version} serving")
    elif svc.failed:
        run.cond(c.READY, "False", "ApplicationFailed", svc.message or str(svc.app_status))
    else:
        state = svc.app_status or "unknown"
        run.cond(
            c.READY, "False", "Deploying", f"application {state}{' (new cluster)' if svc.upgrading else ''}"
        )


def next_delay(outcome: Outcome, poll_interval_s: float, failures: int, tick_s: float = 2.0) -> float:
    """When to look again: soon while a rollout is judged, with backoff after errors, else at the poll."""
    if outcome.retry:
        delay = float(min(300.0, max(tick_s, 2.0 * 2 ** max(0, failures - 1))))
    elif outcome.in_flight:
        delay = tick_s
    else:
        delay = float(poll_interval_s)
    if outcome.requeue_after_s is not None:
        delay = min(delay, max(tick_s, outcome.requeue_after_s))
    return delay


__all__ = [
    "CredentialsUnavailable",
    "Deps",
    "Event",
    "Outcome",
    "Target",
    "TargetConflict",
    "next_delay",
    "reconcile",
]
