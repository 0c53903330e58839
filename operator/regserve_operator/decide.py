"""The decision of one reconcile pass, pure: from what was gathered to the new status, the Events, the
plan for the RayService and when to look again. No I/O, no clock: `Inputs.now` is the time.

Rollout rules (the version under judgement is `status.rolloutVersion`; judging itself is in rollout.py):
- The version the selector resolves to is *gated* against the version that serves (serving_app's
  `compare_signatures`). Incompatible → held: `status.rejected` (reason Incompatible), condition
  SignatureCompatible=False with the differences, one Event; the serving version keeps serving; not
  tried again until the selector resolves to another version (or `rollout.allowIncompatibleVersion`
  names it). A version whose MLmodel cannot be read is held the same way (reason Unreadable).
- A rollout that succeeds makes its version `lastGoodVersion`. One that fails is rolled back to
  `lastGoodVersion` and recorded with its typed cause and attempt count (reason RolledBack); not
  retried while the selector still points at it, except when the cause is RegistryUnavailable (the
  version is not at fault): retried after a back-off that doubles with each attempt.
- Superseded rollouts: when the selector moves while a rollout is judged, a version that already
  serves and answers healthy is kept (it succeeds, and the new candidate is gated against it); one
  that has failed or is still loading is dropped for the last good version.
- `spec.paused` starts no rollout. Events and conditions' transition times mark transitions, never
  repeated polls; one Event per reason per pass.

A pass may need the facts of a version the gathering did not read: `decide` then answers `NeedFacts`
and the caller reads them and decides again (versions are immutable, so facts are cached).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from regserve_operator import conditions as c
from regserve_operator import monitoring as m
from regserve_operator import progressive as p
from regserve_operator import rollout as r
from regserve_operator import tags as t
from regserve_operator.builders import (
    BuildDefaults,
    Owner,
    build_rayservice,
    rayservice_name,
    serving_version_of,
    user_config_of,
)
from regserve_operator.pinning import PinningInputs, pinning_config
from regserve_operator.plan import Plan, make_plan
from regserve_operator.policy import OFF, Policy, Violation, effective_resources, violations
from regserve_operator.policy import message as policy_message
from regserve_operator.ports import ModelFacts, RegistryError, RegistryUnreachable
from regserve_operator.probe import AppReport, RolloutReport, RolloutUnsupported
from regserve_operator.requirements import check_requirements
from regserve_operator.shared import Peer, Refused, has_application
from regserve_operator.shared import compose as compose_shared
from regserve_operator.sizing import size_replica
from regserve_operator.spec import (
    Figures,
    HistoryEntry,
    RegisteredModelServingSpec,
    RegisteredModelServingStatus,
    Rollout,
    ShadowStatus,
    StageRecord,
    VersionRecord,
)
from serving_app.compat import compare_signatures

log = logging.getLogger(__name__)

HISTORY_LENGTH = 10
# Ready reasons this pass set for what stopped it before the RayService: Ray's state does not replace them.
NOT_MIRRORED = ("Conflict", "CredentialsUnavailable", "ClusterConflict", "DoesNotFit", "PolicyViolation")
POLICY_VIOLATION = "PolicyViolation"
MAX_STAGE_RECORDS = 16  # canary steps are at most 10, plus the smoke test, a shadow and the switch


@dataclass(frozen=True)
class Unreadable:
    """The registry answered for a version, but with something that is no MLmodel."""

    error: str


FactsResult = ModelFacts | RegistryError | Unreadable


@dataclass(frozen=True)
class Observation:
    """Everything gathered for one pass."""

    url: str
    credentials_problem: str | None = None  # the named Secret could not be read: nothing else was asked
    # The named Secret's keys the operator does not use (None: no Secret named).
    ignored_credential_keys: tuple[str, ...] | None = None
    existing: dict[str, Any] | None = None  # the RayService as the target returned it
    resolved: str | RegistryError | None = None  # the selector's version, or why it is unknown
    facts: Mapping[str, FactsResult] = field(default_factory=dict)
    app: AppReport | None = None  # what the app reported (asked only while a rollout is judged)
    # The app's /rollout (asked only while a candidate is on).
    rollout: RolloutReport | RolloutUnsupported | None = None
    monitoring: m.WindowReport | None = None  # the app's last completed window (spec.monitoring on)
    # The resources sharing the cluster this one names (`spec.placement`), itself among them.
    peers: tuple[Peer, ...] = ()
    # Versions an alias or stage of the model points to (read for `serving.pinning: Promoted` only;
    # None: not read, or the registry could not answer).
    promoted: frozenset[str] | None = None
    # What the spec asks for beyond the cluster's policy: nothing else was read (a refused tracking URI
    # is never contacted).
    refused: tuple[Violation, ...] = ()

    def with_facts(self, version: str, result: FactsResult) -> Observation:
        return replace(self, facts={**self.facts, version: result})


@dataclass(frozen=True)
class Inputs:
    owner: Owner
    generation: int | None
    spec: RegisteredModelServingSpec
    status: RegisteredModelServingStatus
    now: datetime
    defaults: BuildDefaults
    image_pins: Mapping[str, str] = field(default_factory=dict)
    settle_seconds: float = 10.0
    # The app's /rollout can be asked (REGSERVE_PROBE_SERVING): without it no candidate could ever get a
    # verdict, so the smoke test, canary and shadow are skipped (with a warning) rather than timing out.
    judges_candidates: bool = True
    policy: Policy = OFF


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


RolloutResult = Literal["started", "succeeded", "rolled_back", "held"]


@dataclass
class Outcome:
    """The decision: the status to write, Events to post, the plan to carry out, when to look again."""

    status: RegisteredModelServingStatus
    events: list[Event] = field(default_factory=list)
    retry: bool = False  # an error: look again after the error back-off
    in_flight: bool = False  # a rollout is being judged: look again at the next tick
    plan: Plan | None = None
    results: list[RolloutResult] = field(default_factory=list)
    promotion_latency_s: float | None = None
    requeue_after_s: float | None = None  # a retry is due then (e.g. after a registry outage)
    # Deployment state tags to write to the registry (`status.registryTags` already holds the result).
    tag_writes: list[t.TagWrite] = field(default_factory=list)
    window_metrics: list[m.WindowMetrics] = field(default_factory=list)  # for the versions' MLflow runs


@dataclass(frozen=True)
class NeedFacts:
    """The decision needs the facts of `version`; read them and decide again."""

    version: str


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str | None) -> datetime | None:
    if not text:
        return None
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def decide(inputs: Inputs, observed: Observation) -> Outcome | NeedFacts:
    try:
        return _decide(_Draft(inputs, observed))
    except _Missing as missing:
        return NeedFacts(missing.version)


def wants_app_report(status: RegisteredModelServingStatus, existing: dict[str, Any] | None, app: str) -> bool:
    """Ask the app only while a rollout is judged and Ray runs the application."""
    return bool(status.rollout_version) and c.read_service_state(existing, app).running


def wants_rollout_report(
    status: RegisteredModelServingStatus, existing: dict[str, Any] | None, app: str
) -> bool:
    """Ask the app's /rollout only while a candidate is smoke-tested, canaried or shadowed."""
    return in_candidate_phase(status) and c.read_service_state(existing, app).running


def in_candidate_phase(status: RegisteredModelServingStatus) -> bool:
    return bool(status.rollout_version) and status.rollout_phase in p.CANDIDATE_PHASES


# ----------------------------------------------------------------------------------------- the draft


class _Missing(Exception):
    def __init__(self, version: str) -> None:
        super().__init__(version)
        self.version = version


class _Draft:
    """The status being decided, with the Events and results that go with it."""

    def __init__(self, inputs: Inputs, observed: Observation) -> None:
        self.inputs, self.observed = inputs, observed
        self.spec, self.now = inputs.spec, inputs.now
        self.st = inputs.status.model_copy(deep=True)
        self.out = Outcome(status=self.st)
        # Transitions are judged against the status the pass started from, so a condition set twice
        # in one pass (e.g. resolved, then its version missing) is one transition, not two.
        self.initial = {cond.type: cond.status for cond in inputs.status.conditions or []}

    def cond(self, type_: str, status: c.Status, reason: str, message: str = "") -> bool:
        """Set a condition; True when its status differs from the pass's start (worth an Event)."""
        self.st.conditions = c.set_condition(
            self.st.conditions,
            type_,
            status,
            reason,
            message,
            now=iso(self.now),
            generation=self.inputs.generation,
        )
        return self.initial.get(type_) != status

    def event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        if any(e.reason == reason for e in self.out.events):
            return
        self.out.events.append(Event(type_, reason, c.printable(message)))

    def history(
        self, version: str, outcome: Literal["Serving", "Held", "RolledBack", "Superseded"], msg: str
    ) -> None:
        entries = list(self.st.history or [])
        entries.append(HistoryEntry(version=version, outcome=outcome, at=iso(self.now), message=msg[:512]))
        self.st.history = entries[-HISTORY_LENGTH:]

    def facts(self, version: str) -> FactsResult:
        try:
            return self.observed.facts[version]
        except KeyError:
            raise _Missing(version) from None

    def usable_facts(self, version: str) -> ModelFacts | None:
        """Facts of a version the pass must have (the serving or carried one); None, reported as a
        registry problem and retried, when the registry could not give them."""
        facts = self.facts(version)
        if isinstance(facts, ModelFacts):
            return facts
        error = facts if isinstance(facts, RegistryError) else RegistryError(facts.error)
        self.registry_error(error, f"reading version {version}")
        return None

    def registry_error(self, exc: RegistryError, what: str) -> None:
        if isinstance(exc, RegistryUnreachable):
            if self.cond(c.REGISTRY_REACHABLE, "False", "Unreachable", str(exc)):
                self.event("Warning", "RegistryUnreachable", f"{what}: {exc}")
        else:
            self.cond(c.REGISTRY_REACHABLE, "True", "Reachable")
            if self.cond(c.SELECTOR_RESOLVED, "False", "NotFound", str(exc)):
                self.event("Warning", "SelectorUnresolved", f"{what}: {exc}")
        self.out.retry = True

    def clear_rollout(self) -> None:
        st = self.st
        st.rollout_version = st.rollout_started_at = None
        st.rollout_attempt = None
        # The stages' figures stay as the record of the last rollout; the generation never goes back.
        st.rollout_phase = st.rollout_step = st.rollout_weight = st.rollout_stage_started_at = None

    def start_rollout(self, version: str, attempt: int) -> None:
        self.st.rollout_version, self.st.rollout_started_at = version, iso(self.now)
        self.st.rollout_attempt = attempt
        self.st.rollout_stages = None
        self.out.in_flight = True

    def enter_stage(self, stage: p.Stage) -> None:
        """Move the rollout to `stage`: a new generation, so the app's counters start from zero."""
        st = self.st
        st.rollout_phase, st.rollout_step = stage.phase, stage.step
        st.rollout_weight = p.weight(self.spec.rollout, stage)
        st.rollout_stage_started_at = iso(self.now)
        st.rollout_generation = (st.rollout_generation or 0) + 1
        if stage.phase == "Switching":
            st.rollout_started_at = iso(self.now)  # the switch is judged (and timed) from here
        record = StageRecord(
            phase=stage.phase,
            weight=st.rollout_weight,
            generation=st.rollout_generation,
            started_at=iso(self.now),
        )
        st.rollout_stages = [*(st.rollout_stages or []), record][-MAX_STAGE_RECORDS:]
        self.out.in_flight = True


# -------------------------------------------------------------------------------------- the decision


def _decide(d: _Draft) -> Outcome:
    st, observed = d.st, d.observed
    st.selector = d.spec.model.selector_text()
    st.ray_service_name = rayservice_name(d.inputs.owner.name, d.spec)
    st.url = observed.url
    if observed.credentials_problem is not None:
        if d.cond(c.READY, "False", "CredentialsUnavailable", observed.credentials_problem):
            d.event("Warning", "CredentialsUnavailable", observed.credentials_problem)
        d.out.retry = True
        return _finish(d, None)
    if observed.refused:
        _refuse(d, list(observed.refused))
        return _finish(d, None)
    _check_credential_keys(d, observed.ignored_credential_keys)
    svc = c.read_service_state(observed.existing, d.inputs.owner.name)
    carried = serving_version_of(observed.existing, d.inputs.owner.name) if observed.existing else None
    resolved = _take_resolution(d)
    check = _rollout_check(d, svc, carried)
    if check is not None and in_candidate_phase(d.st):
        _judge_stage(d, check.version)
    elif check is not None:
        _judge(d, check)
    want = _choose(d, resolved, carried, _rollout_check(d, svc, carried))
    if want is not None:
        _build(d, want)
    return _finish(d, svc)


def _take_resolution(d: _Draft) -> str | None:
    resolved = d.observed.resolved
    if isinstance(resolved, RegistryError):
        d.registry_error(resolved, f"resolving {d.spec.model.name} {d.st.selector}")
        return None
    if resolved is None:
        return None
    d.cond(c.REGISTRY_REACHABLE, "True", "Reachable")
    if d.initial.get(c.REGISTRY_REACHABLE) == "False":
        d.event("Normal", "RegistryReachable", "registry reachable again")
    d.cond(c.SELECTOR_RESOLVED, "True", "Resolved", f"{d.st.selector} → version {resolved}")
    d.st.resolved_version = resolved
    return resolved


def _rollout_check(d: _Draft, svc: c.ServiceState, carried: str | None) -> r.RolloutCheck | None:
    version = d.st.rollout_version
    if not version:
        return None
    return r.RolloutCheck(
        version=version,
        started=parse_iso(d.st.rollout_started_at) or d.now,
        carried=carried,
        service=svc,
        app=d.observed.app,
        settle_s=d.inputs.settle_seconds,
        deadline_s=d.spec.rollout.deadline_seconds,
    )


def _judge(d: _Draft, check: r.RolloutCheck) -> None:
    verdict = r.judge(check, d.now)
    if isinstance(verdict, r.Succeeded):
        _succeed(d, check.version, verdict.elapsed_s, "rollout succeeded")
    elif isinstance(verdict, r.Failed):
        _roll_back(d, check.version, verdict)
    else:
        d.out.in_flight = True


def _judge_stage(d: _Draft, version: str) -> None:
    """A candidate being smoke-tested, canaried or shadowed: judged on the app's figures of this
    stage's generation. A registry outage freezes it (no verdict on missing facts); a selector that no
    longer resolves (the candidate or its alias deleted) rolls it back."""
    st, resolved = d.st, d.observed.resolved
    d.out.in_flight = True
    # A registry outage freezes the rollout where it is: no promotion on missing facts. A failing
    # candidate is still rolled back (as when paused): the stable version must not share its errors.
    frozen = d.spec.paused or isinstance(resolved, RegistryUnreachable)
    if isinstance(resolved, RegistryError) and not isinstance(resolved, RegistryUnreachable):
        _roll_back(d, version, r.Failed("CandidateDeleted", f"the selector no longer resolves: {resolved}"))
        return
    stage = p.Stage(st.rollout_phase or "SmokeTest", st.rollout_step)
    if isinstance(d.observed.rollout, RolloutUnsupported):
        _skip_unjudged_stage(d, version, stage, frozen)
        return
    started = parse_iso(st.rollout_stage_started_at) or d.now
    check = p.StageCheck(
        stage=stage,
        candidate=version,
        stable=st.last_good_version,
        generation=st.rollout_generation or 0,
        elapsed_s=(d.now - started).total_seconds(),
        deadline_s=d.spec.rollout.deadline_seconds,
        report=d.observed.rollout,
    )
    verdict = p.judge_stage(d.spec.rollout, check)
    _record_figures(d, check, verdict, frozen)
    if isinstance(verdict, p.Pass) and not frozen:
        _advance(d, version, p.next_stage(_rollout_of(d, version), stage), verdict.message)
    elif isinstance(verdict, p.Held):
        _hold_smoke_failed(d, version, verdict.message)
    elif isinstance(verdict, p.Fail):
        _roll_back(d, version, r.Failed(verdict.cause, verdict.message))
    elif isinstance(verdict, p.Report):
        _report_shadow(d, version, verdict.message)


def _rollout_of(d: _Draft, version: str) -> Rollout:
    """How `version` rolls out. One let through `allowIncompatibleVersion` gets no canary or shadow:
    unpinned requests are checked against the stable signature, which its own does not match."""
    rollout = d.spec.rollout
    if rollout.allow_incompatible_version == version and rollout.strategy != "Immediate":
        return rollout.model_copy(update={"strategy": "Immediate"})
    return rollout


def _skip_unjudged_stage(d: _Draft, version: str, stage: p.Stage, frozen: bool) -> None:
    """An app that answers but has no /rollout (an older serving image) can never judge a candidate:
    switch as an Immediate rollout would, once the app itself answered in this pass (a 404 while it
    does not could be the route not being up yet)."""
    if d.observed.app is None or frozen:
        return
    d.event(
        "Warning",
        "RolloutUnjudged",
        f"version {version}: the serving app has no /rollout (an image older than the operator), so its "
        f"{stage.phase} stage is skipped",
    )
    _advance(d, version, p.Stage("Switching"), "")


def _record_figures(d: _Draft, check: p.StageCheck, verdict: p.StageVerdict, frozen: bool) -> None:
    """The current stage's figures as last reported, and its verdict, in status."""
    stages = d.st.rollout_stages or []
    if not stages or stages[-1].generation != check.generation:
        return
    record, report = stages[-1], check.report
    if report is not None and report.generation == check.generation and report.candidate == check.candidate:
        stable, candidate, shadow = (
            report.figures(check.stable),
            report.figures(check.candidate),
            report.shadow,
        )
        record.stable = Figures(requests=stable.requests, errors=stable.errors, p95_ms=stable.p95_ms)
        record.candidate = Figures(
            requests=candidate.requests, errors=candidate.errors, p95_ms=candidate.p95_ms
        )
        if check.stage.phase == "Shadow":
            record.shadow = ShadowStatus(
                compared=shadow.compared,
                disagreements=shadow.disagreements,
                errors=shadow.errors,
                p95_ms=shadow.p95_ms,
            )
    if isinstance(verdict, p.Pass) and not frozen:
        record.verdict = "Passed"
    elif isinstance(verdict, p.Fail | p.Held):
        record.verdict = "Failed"
    elif isinstance(verdict, p.Report):
        record.verdict = "Reported"
    record.message = verdict.message[:512]


def _advance(d: _Draft, version: str, stage: p.Stage, figures: str) -> None:
    d.enter_stage(stage)
    _announce(d, version, stage, figures)


def _announce(d: _Draft, version: str, stage: p.Stage, why: str = "") -> None:
    """One Event per phase change (a canary step is one)."""
    weight = d.st.rollout_weight or 0
    after = f" ({why})" if why else ""
    if stage.phase == "SmokeTest":
        d.event("Normal", "SmokeTest", f"version {version}: smoke test on every replica, no traffic yet")
    elif stage.phase == "Canary":
        steps = len(d.spec.rollout.canary.steps)
        d.event(
            "Normal",
            "CanaryStep",
            f"version {version} answers {weight}% of unpinned requests "
            f"(step {(stage.step or 0) + 1} of {steps}){after}",
        )
    elif stage.phase == "Shadow":
        d.event("Normal", "Shadow", f"version {version} shadows {weight}% of unpinned requests{after}")
    else:
        d.event("Normal", "Switching", f"version {version} becomes the default{after}")


def _hold_smoke_failed(d: _Draft, version: str, message: str) -> None:
    d.st.rejected = VersionRecord(
        version=version, reason="SmokeTestFailed", message=message[:1024], at=iso(d.now)
    )
    d.clear_rollout()
    d.history(version, "Held", message)
    good = d.st.last_good_version
    d.event("Warning", "SmokeTestFailed", f"version {version} held back, {good} keeps serving: {message}")
    d.out.results.append("held")


def _report_shadow(d: _Draft, version: str, figures: str) -> None:
    """Shadow without a threshold: the figures are the outcome; the default stays and the candidate
    is dropped (not shadowed forever). Tried again when the spec stops asking for a report only."""
    message = f"shadowed, not promoted (shadow.maxDisagreementRate unset): {figures}"
    d.st.rejected = VersionRecord(
        version=version, reason="ShadowReported", message=message[:1024], at=iso(d.now)
    )
    d.clear_rollout()
    d.history(version, "Held", message)
    d.event("Normal", "ShadowReported", f"version {version} {message}")
    d.out.results.append("held")


def _report_only(spec: RegisteredModelServingSpec) -> bool:
    return spec.rollout.strategy == "Shadow" and spec.rollout.shadow.max_disagreement_rate is None


def _succeed(d: _Draft, version: str, elapsed_s: float, how: str) -> None:
    st = d.st
    previous = st.last_good_version
    st.last_good_version = version
    d.clear_rollout()
    d.history(version, "Serving", how)
    if previous and previous != version:
        d.history(previous, "Superseded", f"replaced by {version}")
    d.event("Normal", "RolloutSucceeded", f"version {version} is serving")
    d.out.results.append("succeeded")
    d.out.promotion_latency_s = elapsed_s


def _roll_back(d: _Draft, version: str, failed: r.Failed) -> None:
    st = d.st
    attempts = st.rollout_attempt or 1
    message = failed.message
    if failed.cause in r.RETRIED_CAUSES:
        # The version is not at fault: the old default keeps serving, and it is tried again later.
        message = f"{message}; retried in {r.retry_backoff_s(attempts):.0f}s"
    st.rejected = VersionRecord(
        version=version,
        reason="RolledBack",
        cause=failed.cause,
        attempts=attempts,
        message=message[:1024],
        at=iso(d.now),
    )
    d.clear_rollout()
    d.history(version, "RolledBack", message)
    good = st.last_good_version
    restored = f"; restored version {good}" if good else "; no earlier version to restore"
    d.event("Warning", "RolledBack", f"version {version} failed: {message}{restored}")
    d.out.results.append("rolled_back")


def _supersede(
    d: _Draft, resolved: str | None, carried: str | None, check: r.RolloutCheck | None
) -> str | None:
    """The selector moved during a rollout. Returns the version the RayService counts as carrying."""
    if check is None or resolved is None or resolved == check.version or d.spec.paused:
        return carried
    if r.answers_healthy(check, d.now):
        elapsed = (d.now - check.started).total_seconds()
        _succeed(d, check.version, elapsed, f"answering when the selector moved to {resolved}")
        return carried
    d.history(check.version, "Superseded", f"selector moved to {resolved} during its rollout")
    d.clear_rollout()
    return d.st.last_good_version or carried


def _choose(d: _Draft, resolved: str | None, carried: str | None, check: r.RolloutCheck | None) -> str | None:
    """The version the RayService should carry after this pass (None: leave everything as it is)."""
    st, spec = d.st, d.spec
    rejected = st.rejected
    if rejected and resolved and rejected.version != resolved:
        st.rejected = None  # the selector moved on: the record has done its job
        d.cond(
            c.SIGNATURE_COMPATIBLE,
            "True",
            "SelectorMoved",
            f"selector no longer points at {rejected.version}",
        )
    carried = _supersede(d, resolved, carried, check)
    # While a candidate is smoke-tested, canaried or shadowed the stable version stays the default.
    rolling = None if in_candidate_phase(st) else st.rollout_version
    current = rolling or st.last_good_version or carried
    if st.rollout_version or resolved is None or resolved == current:
        if (
            resolved is not None
            and resolved == current
            and not c.get_condition(st.conditions, c.SIGNATURE_COMPATIBLE)
        ):
            d.cond(c.SIGNATURE_COMPATIBLE, "True", "Serving", f"version {resolved} is the serving version")
        return current
    if spec.paused:
        return current
    attempt = _attempt(d, resolved)
    if attempt is None:
        return current
    return _gate(d, resolved, current, attempt)


def _attempt(d: _Draft, resolved: str) -> int | None:
    """Which attempt a rollout of `resolved` would be; None when it must not be tried now."""
    st = d.st
    rejected = st.rejected
    allowed = d.spec.rollout.allow_incompatible_version == resolved
    if rejected is None or rejected.version != resolved or allowed:
        return 1
    if rejected.reason == "ShadowReported" and not _report_only(d.spec):
        st.rejected = None  # the spec now asks for more than a report: shadow (or roll out) again
        return 1
    wait = r.retry_wait_s(rejected, d.now, parse_iso(rejected.at))
    if wait is None:
        return None  # held or rolled back: not retried until the selector moves
    if wait > 0:
        d.out.requeue_after_s = wait
        return None
    st.rejected = None  # rolled back only because the registry was unavailable: try again
    return (rejected.attempts or 1) + 1


def _gate(d: _Draft, resolved: str, current: str | None, attempt: int) -> str | None:
    """Gate `resolved` against the serving version; start its rollout when it passes."""
    st = d.st
    candidate = d.facts(resolved)
    if isinstance(candidate, RegistryError):
        d.registry_error(candidate, f"reading version {resolved}")
        return current
    if isinstance(candidate, Unreadable):
        _hold_unreadable(d, resolved, current, candidate)
        return current
    baseline = d.usable_facts(current) if current else None
    if current and baseline is None:
        return current
    allowed = d.spec.rollout.allow_incompatible_version == resolved
    diffs = [
        str(x) for x in compare_signatures(baseline.signature if baseline else None, candidate.signature)
    ]
    if diffs and not allowed:
        _hold_incompatible(d, resolved, current, diffs)
        return current
    if diffs:
        d.cond(c.SIGNATURE_COMPATIBLE, "True", "AllowedIncompatible", "; ".join(diffs))
    else:
        d.cond(
            c.SIGNATURE_COMPATIBLE, "True", "Compatible", f"version {resolved} matches {current or 'nothing'}"
        )
    if st.rejected and st.rejected.version == resolved:
        st.rejected = None  # explicitly allowed
    d.start_rollout(resolved, attempt)
    stage = p.first_stage(
        _rollout_of(d, resolved), has_stable=current is not None and d.inputs.judges_candidates
    )
    if (
        current is not None
        and not d.inputs.judges_candidates
        and p.first_stage(d.spec.rollout, True) != stage
    ):
        d.event(
            "Warning",
            "RolloutUnjudged",
            f"version {resolved}: the app cannot be asked (REGSERVE_PROBE_SERVING off), so its smoke test "
            f"and {d.spec.rollout.strategy} stages are skipped",
        )
    d.enter_stage(stage)
    d.event(
        "Normal",
        "RolloutStarted",
        f"rolling out version {resolved}" + (f" (was {current})" if current else ""),
    )
    if stage.phase != "Switching":
        _announce(d, resolved, stage)
    d.out.results.append("started")
    return resolved if stage.phase == "Switching" else current


# Differences kept in status: a registry can answer signatures of any width, and a status past the API
# server's size limit would be refused at every pass.
MAX_DIFFERENCES = 20


def _hold_incompatible(d: _Draft, version: str, current: str | None, diffs: list[str]) -> None:
    if len(diffs) > MAX_DIFFERENCES:
        diffs = [*diffs[:MAX_DIFFERENCES], f"... and {len(diffs) - MAX_DIFFERENCES} more"]
    diffs = [c.printable(diff, 256) for diff in diffs]
    d.st.rejected = VersionRecord(
        version=version,
        reason="Incompatible",
        message=f"signature incompatible with serving version {current}",
        differences=diffs,
        at=iso(d.now),
    )
    text = "; ".join(diffs)
    d.cond(c.SIGNATURE_COMPATIBLE, "False", "Incompatible", f"version {version} vs serving {current}: {text}")
    d.history(version, "Held", text)
    d.event(
        "Warning", "SignatureIncompatible", f"version {version} held back, {current} keeps serving: {text}"
    )
    d.out.results.append("held")


def _hold_unreadable(d: _Draft, version: str, current: str | None, unreadable: Unreadable) -> None:
    """Hold a version whose MLmodel cannot be read: its signature cannot be gated, nor can it load."""
    reason = f"version {version}: its MLmodel cannot be read ({unreadable.error})"[:1024]
    d.st.rejected = VersionRecord(version=version, reason="Unreadable", message=reason, at=iso(d.now))
    d.cond(c.SIGNATURE_COMPATIBLE, "False", "Unreadable", reason)
    d.history(version, "Held", reason)
    keeps = f", {current} keeps serving" if current else ""
    d.event("Warning", "VersionUnreadable", f"version {version} held back{keeps}: {reason}")
    d.out.results.append("held")


def _build(d: _Draft, version: str) -> None:
    """The RayService carrying `version`, the plan to get there, and the status that follows it."""
    st, spec = d.st, d.spec
    facts = d.usable_facts(version)
    if facts is None:
        return
    size = size_replica(
        model_size_bytes=_sized_for(facts.model_size_bytes, _candidate_size(d)),
        flavors=facts.flavors,
        serving=spec.serving,
        resources=effective_resources(spec.resources, d.inputs.policy),
        previous=st.sizing,
        holds_candidate=_holds_candidates(d),
    )
    refused = violations(spec, size, d.inputs.policy)
    if refused:
        _refuse(d, refused)  # an existing RayService keeps serving what it served
        return
    desired = build_rayservice(
        d.inputs.owner, spec, version, size, d.inputs.defaults, _candidate(d), _pinning(d, version)
    )
    if spec.placement is not None:
        composed = compose_shared(
            d.inputs.owner, spec, size, desired, d.observed.existing, d.observed.peers, d.inputs.defaults
        )
        if isinstance(composed, Refused):
            if d.cond(c.READY, "False", composed.reason, composed.message):
                d.event("Warning", composed.reason, composed.message)
            d.out.retry = True  # a spec change wakes it at once; a member leaving, at the back-off
            return
        desired = composed
    plan = make_plan(desired, d.observed.existing)
    d.out.plan = plan
    if plan.action == "conflict":
        if d.cond(c.READY, "False", "Conflict", plan.message):
            d.event("Warning", "Conflict", plan.message)
        d.out.retry = True
        return
    joins = spec.placement is not None and not has_application(d.observed.existing, d.inputs.owner.name)
    if plan.action == "create" or (joins and plan.writes):
        verb = "created" if plan.action == "create" else "joined"
        d.event("Normal", "Created", f"RayService {plan.name} {verb} serving version {version}")
        if not st.rollout_version and st.last_good_version != version:
            d.start_rollout(version, 1)  # the first version is judged like any rollout
    elif plan.writes and "rayClusterConfig" in plan.changes:
        d.event(
            "Normal", "ClusterUpdated", f"RayService {plan.name} cluster changed: {', '.join(plan.changes)}"
        )
    st.serving_version = version
    st.model_size_bytes = facts.model_size_bytes
    st.sizing = size.to_status()
    _check_requirements(d, version, facts)


def _refuse(d: _Draft, found: list[Violation]) -> None:
    """Ready=False with the fields the policy refuses; nothing is planned. One Event when the refusal
    starts or names other fields. A spec change wakes the resource at once; a policy change restarts
    the operator, which reconciles everything."""
    text = policy_message(found)
    before = c.get_condition(d.inputs.status.conditions, c.READY)
    d.cond(c.READY, "False", POLICY_VIOLATION, text)
    if before is None or before.reason != POLICY_VIOLATION or before.message != text:
        d.event("Warning", POLICY_VIOLATION, text)
    d.out.retry = True


def _candidate(d: _Draft) -> dict[str, Any] | None:
    """`user_config.candidate` for the stage the rollout is in (None: no candidate)."""
    st = d.st
    mode = p.candidate_mode(st.rollout_phase) if st.rollout_version else None
    if mode is None:
        return None
    return {
        "version": st.rollout_version,
        "mode": mode,
        "percent": st.rollout_weight or 0,
        "generation": st.rollout_generation or 0,
    }


def _pinning(d: _Draft, version: str) -> dict[str, Any] | None:
    """`user_config.pinning` with the status as this pass leaves it (a version just rolled back is
    refused in the same write that rolls it back)."""
    existing = d.observed.existing
    carried = user_config_of(existing, d.inputs.owner.name).get("pinning") if existing else None
    previous = carried.get("allowed") if isinstance(carried, dict) else None
    return pinning_config(
        PinningInputs(
            mode=d.spec.serving.pinning,
            status=d.st,
            serving_version=version,
            promoted=d.observed.promoted,
            previous_allowed=tuple(str(v) for v in previous) if isinstance(previous, list) else (),
        )
    )


def _candidate_size(d: _Draft) -> int | None:
    """A candidate is loaded beside the stable version: replicas are sized for the bigger of the two."""
    version = d.st.rollout_version if in_candidate_phase(d.st) else None
    facts = d.facts(version) if version else None
    return facts.model_size_bytes if isinstance(facts, ModelFacts) else None


def _holds_candidates(d: _Draft) -> bool:
    """Rollouts of this resource load a candidate beside the versions a replica caches."""
    first = p.first_stage(d.spec.rollout, has_stable=True)
    return d.inputs.judges_candidates and first.phase != "Switching"


def _sized_for(stable: int | None, candidate: int | None) -> int | None:
    if candidate is None:
        return stable
    return candidate if stable is None else max(stable, candidate)


# Names shown of a Secret's ignored keys (Kubernetes bounds each to 253 characters of [-._a-zA-Z0-9]).
MAX_IGNORED_KEYS_SHOWN = 10


def _check_credential_keys(d: _Draft, ignored: tuple[str, ...] | None) -> None:
    """A Secret key the operator's registry reads never use is left out of them (`serving_app.child_env`):
    say so once, rather than let a key that was meant to work do nothing silently."""
    if ignored is None:
        return
    if not ignored:
        d.cond(c.CREDENTIALS_ACCEPTED, "True", "AllKeysUsed", "")
        return
    more = " ..." if len(ignored) > MAX_IGNORED_KEYS_SHOWN else ""
    shown = ", ".join(ignored[:MAX_IGNORED_KEYS_SHOWN]) + more
    message = (
        f"keys not used by the operator's registry reads: {shown}. Only the MLflow client's and the "
        "artifact stores' credential names are (SECURITY.md); the Ray pods still get every key"
    )
    if d.cond(c.CREDENTIALS_ACCEPTED, "False", "KeysIgnored", message):
        d.event("Warning", "CredentialKeysIgnored", message)


def _check_requirements(d: _Draft, version: str, facts: ModelFacts) -> None:
    pins = d.inputs.image_pins
    if not pins:
        return
    check = check_requirements(facts.requirements, pins)
    if check.ok:
        d.cond(c.REQUIREMENTS_MATCH, "True", "Match", "")
    elif d.cond(c.REQUIREMENTS_MATCH, "False", "Mismatch", "; ".join(check.mismatches)):
        d.event("Warning", "RequirementsMismatch", f"version {version}: " + "; ".join(check.mismatches))


def _finish(d: _Draft, svc: c.ServiceState | None) -> Outcome:
    st = d.st
    if svc is not None:
        _mirror(d, svc)
        # Ready mirrors what was seen before this pass's write: after a write, and while the app is
        # still deploying shortly after Ready changed, look again soon instead of at the next poll.
        # Bounded by the rollout deadline, so an app stuck deploying does not keep us polling fast.
        wrote = d.out.plan is not None and d.out.plan.writes
        deploying = svc.exists and not svc.running and not svc.failed
        if wrote or (deploying and _recently_changed(d, c.READY)):
            d.out.in_flight = True
    if st.rollout_version:
        d.cond(c.ROLLOUT_IN_PROGRESS, "True", "RollingOut", _progress_text(d))
    elif svc is not None and svc.upgrading:
        # KubeRay is bringing up a new cluster (a shape change): mirrored from the RayService.
        d.cond(c.ROLLOUT_IN_PROGRESS, "True", "NewCluster", "KubeRay is preparing a new RayCluster")
    else:
        d.cond(c.ROLLOUT_IN_PROGRESS, "False", "Idle", "")
    _monitor(d)
    _plan_tags(d)
    st.observed_generation = d.inputs.generation
    if st != d.inputs.status:
        # Only a status that changed is written: a steady pass at every poll interval writes nothing
        # (10,000 resources at 30 s would otherwise be 333 status writes a second).
        st.revision = (st.revision or 0) + 1
    return d.out


def _monitor(d: _Draft) -> None:
    """A new window's figures in status, the InputDrift condition (one Event when it turns True), and
    the metrics act logs to each version's MLflow run."""
    monitoring = d.spec.monitoring
    if not monitoring.enabled:
        d.st.monitoring = None
        return
    judged = tuple(v for v in (d.st.serving_version, d.st.rollout_version) if v)
    judgement = m.judge(monitoring, d.st.monitoring, d.observed.monitoring, judged)
    if judgement is None:
        return
    d.st.monitoring = judgement.status
    d.out.window_metrics = list(judgement.metrics)
    condition = judgement.condition
    if condition is not None:
        turned = d.cond(m.INPUT_DRIFT, condition.status, condition.reason, condition.message)
        if turned and condition.status == "True":
            d.event("Warning", "InputDrift", condition.message)
    logged = judgement.payloads
    if logged is not None:
        turned = d.cond(m.PAYLOADS_LOGGED, logged.status, logged.reason, logged.message)
        if turned and logged.status == "False":
            d.event("Warning", "PayloadsNotLogged", logged.message)


def _plan_tags(d: _Draft) -> None:
    """The registry's deployment state tags follow the decided status (written by act)."""
    if d.observed.credentials_problem is not None or d.observed.refused:
        return
    desired = t.desired_tags(d.st, d.st.url)
    d.out.tag_writes = t.tag_writes(d.st.registry_tags or {}, desired)
    d.st.registry_tags = desired or None


def _progress_text(d: _Draft) -> str:
    st = d.st
    text = f"version {st.rollout_version}"
    if st.rollout_phase in p.CANDIDATE_PHASES:
        text += f": {st.rollout_phase} at {st.rollout_weight or 0}%"
        if d.spec.paused:
            text += " (paused)"
    return text


def _recently_changed(d: _Draft, condition_type: str) -> bool:
    condition = c.get_condition(d.st.conditions, condition_type)
    changed = parse_iso(condition.last_transition_time) if condition else None
    return changed is not None and (d.now - changed).total_seconds() < d.spec.rollout.deadline_seconds


def _mirror(d: _Draft, svc: c.ServiceState) -> None:
    current = c.get_condition(d.st.conditions, c.READY)
    if current is not None and current.reason in NOT_MIRRORED and d.out.retry:
        return
    if not svc.exists:
        if d.spec.paused:
            d.cond(c.READY, "False", "Paused", "paused before anything was deployed")
        else:
            d.cond(c.READY, "False", "Creating", "RayService not created yet")
    elif svc.running:
        d.cond(c.READY, "True", "Serving", f"version {d.st.serving_version} serving")
    elif svc.failed:
        d.cond(c.READY, "False", "ApplicationFailed", svc.message or str(svc.app_status))
    else:
        state = svc.app_status or "unknown"
        d.cond(
            c.READY, "False", "Deploying", f"application {state}{' (new cluster)' if svc.upgrading else ''}"
        )


def next_delay(outcome: Outcome, poll_interval_s: float, failures: int, tick_s: float = 2.0) -> float:
    """The one rule for when to look again: the tick while a rollout is judged, the error back-off
    (doubling from 2 s, capped at 5 min) after errors, else the poll interval; never later than a
    scheduled retry."""
    if outcome.retry:
        delay = float(min(300.0, max(tick_s, 2.0 * 2 ** max(0, failures - 1))))
    elif outcome.in_flight:
        delay = tick_s
    else:
        delay = float(poll_interval_s)
    if outcome.requeue_after_s is not None:
        delay = min(delay, max(tick_s, outcome.requeue_after_s))
    return delay
