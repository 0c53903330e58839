"""The reconcile decision for smoke test, canary and shadow, table-driven: the status before and what
was gathered → the RayService's user_config (default and candidate), the status and the Events.

Version 1 serves; version 2 is the candidate (compatible); 3 is incompatible; 4 is another compatible
version the selector may move to. The app's `/rollout` report is typed (probe.RolloutReport).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from regserve_operator import conditions as c
from regserve_operator.builders import build_rayservice, candidate_of, serving_version_of
from regserve_operator.decide import Inputs, Observation, Outcome, decide, iso, wants_rollout_report
from regserve_operator.pinning import PinningInputs, pinning_config
from regserve_operator.ports import NotFound, RegistryUnreachable
from regserve_operator.probe import (
    AppReport,
    RolloutReport,
    RolloutUnsupported,
    ShadowFigures,
    SmokeReport,
    VersionFigures,
)
from regserve_operator.sizing import size_replica
from regserve_operator.spec import RegisteredModelServingStatus, StageRecord, VersionRecord

from .helpers import DEFAULTS, OWNER, make_spec
from .test_decide import FACTS, NOW, URL

CANARY = {"strategy": "Canary", "canary": {"steps": [10, 50], "stepSeconds": 60, "minRequests": 20}}
SHADOW_GATED = {"strategy": "Shadow", "shadow": {"durationSeconds": 30, "maxDisagreementRate": 0.05}}
SHADOW_REPORT = {"strategy": "Shadow", "shadow": {"durationSeconds": 30}}
WEIGHTS = {("SmokeTest", None): 0, ("Canary", 0): 10, ("Canary", 1): 50, ("Shadow", None): 100}
MODES = {"SmokeTest": "smoke", "Canary": "canary", "Shadow": "shadow"}


def _status(
    phase: str | None = None,
    step: int | None = None,
    *,
    gen: int = 5,
    ago_s: float = 30,
    rollout: str | None = "2",
    rejected: VersionRecord | None = None,
) -> RegisteredModelServingStatus:
    if phase is None:
        return RegisteredModelServingStatus(
            last_good_version="1", serving_version="1", rejected=rejected, rollout_generation=gen
        )
    started = iso(NOW - timedelta(seconds=ago_s))
    weight = WEIGHTS.get((phase, step), 100)
    return RegisteredModelServingStatus(
        last_good_version="1",
        serving_version="1" if phase != "Switching" else rollout,
        rollout_version=rollout,
        rollout_started_at=iso(NOW - timedelta(seconds=300)),
        rollout_attempt=1,
        rollout_phase=phase,  # type: ignore[arg-type]
        rollout_step=step,
        rollout_weight=weight,
        rollout_stage_started_at=started,
        rollout_generation=gen,
        rollout_stages=[StageRecord(phase=phase, weight=weight, generation=gen, started_at=started)],  # type: ignore[arg-type]
        rejected=rejected,
    )


def _candidate(status: RegisteredModelServingStatus) -> dict[str, Any] | None:
    mode = MODES.get(status.rollout_phase or "")
    if mode is None or not status.rollout_version:
        return None
    return {
        "version": status.rollout_version,
        "mode": mode,
        "percent": status.rollout_weight,
        "generation": status.rollout_generation,
    }


def _rayservice(status: RegisteredModelServingStatus, spec: dict[str, Any]) -> dict[str, Any]:
    """The RayService as the previous pass wrote it for `status`, RUNNING."""
    made = make_spec(rollout=spec)
    size = size_replica(
        model_size_bytes=10 * 1024**2,
        flavors=(),
        serving=made.serving,
        resources=made.resources,
        previous=None,
    )
    default = status.rollout_version if status.rollout_phase == "Switching" else status.last_good_version
    # As the previous pass wrote it: a held version was refused to pins in the same write.
    pinning = pinning_config(PinningInputs("Compatible", status, default or "1", None))
    obj = build_rayservice(OWNER, made, default or "1", size, DEFAULTS, _candidate(status), pinning)
    obj["metadata"]["resourceVersion"] = "7"
    obj["status"] = {
        "conditions": [{"type": "Ready", "status": "True"}],
        "activeServiceStatus": {"applicationStatuses": {OWNER.name: {"status": "RUNNING", "message": ""}}},
    }
    return obj


def _report(
    *,
    gen: int = 5,
    candidate: str = "2",
    smoke: str = "passed",
    stable: tuple[int, int, float | None] = (200, 0, 10.0),
    cand: tuple[int, int, float | None] = (0, 0, None),
    shadow: tuple[int, int, int] = (0, 0, 0),
    message: str | None = None,
) -> RolloutReport:
    return RolloutReport(
        generation=gen,
        candidate=candidate,
        mode="canary",
        percent=10,
        replicas=2,
        smoke=SmokeReport(
            smoke,  # type: ignore[arg-type]
            replicas_passed=2 if smoke == "passed" else 0,
            replicas_failed=2 if smoke == "failed" else 0,
            code="prediction_failed" if smoke == "failed" else None,
            message=message,
        ),
        versions={"1": VersionFigures(*stable), candidate: VersionFigures(*cand)},
        shadow=ShadowFigures(shadow[0], shadow[1], shadow[2], 4.0),
    )


@dataclass
class Case:
    name: str
    status: RegisteredModelServingStatus
    resolved: Any
    report: RolloutReport | RolloutUnsupported | None = None
    spec: dict[str, Any] = field(default_factory=lambda: dict(CANARY))
    app: AppReport | None = None
    existing: dict[str, Any] | str | None = "as written"
    # expected
    carries: str = "1"  # the default version in the desired RayService
    candidate: tuple[str, str, int, int] | None = None  # (version, mode, percent, generation)
    results: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    phase: str | None = "unchanged"
    rejected: tuple[str, str, str | None] | None = None
    retry: bool = False
    writes: bool | None = None
    says: str = ""  # a fragment of the last stage record's message, or of the rejected record's
    smoke_code: str | None = None  # the app's smoke.code in the report (replaces the report's own)


PASSING_STEP = _report(cand=(25, 0, 12.0))

GATE_AND_SMOKE = [
    Case(
        "gate passed: smoke test first, the stable version stays the default",
        _status(),
        "2",
        carries="1",
        candidate=("2", "smoke", 0, 6),
        results=["started"],
        events=["RolloutStarted", "SmokeTest"],
        phase="SmokeTest",
    ),
    Case(
        "an incompatible version let through by allowIncompatibleVersion: smoke test, then no canary",
        _status("SmokeTest", rollout="3"),
        "3",
        _report(candidate="3"),
        spec={**CANARY, "allowIncompatibleVersion": "3"},
        carries="3",
        events=["Switching"],
        phase="Switching",
    ),
    Case(
        "an incompatible version never reaches the smoke test",
        _status(),
        "3",
        results=["held"],
        events=["SignatureIncompatible"],
        phase=None,
        rejected=("3", "Incompatible", None),
    ),
    Case(
        "no smoke test: the canary's first step at once",
        _status(),
        "2",
        spec={**CANARY, "smokeTest": False},
        candidate=("2", "canary", 10, 6),
        results=["started"],
        events=["RolloutStarted", "CanaryStep"],
        phase="Canary",
    ),
    Case(
        "first version of a resource: nothing to compare with, straight to the switch",
        RegisteredModelServingStatus(),
        "1",
        existing=None,
        results=["started"],
        events=["RolloutStarted", "Created"],
        phase="Switching",
    ),
    Case(
        "smoke test pending: wait, nothing rewritten",
        _status("SmokeTest"),
        "2",
        _report(smoke="pending"),
        candidate=("2", "smoke", 0, 5),
        phase="SmokeTest",
        writes=False,
    ),
    Case(
        "smoke test passed: the canary's first step, a new generation",
        _status("SmokeTest"),
        "2",
        _report(),
        candidate=("2", "canary", 10, 6),
        events=["CanaryStep"],
        phase="Canary",
        writes=True,
    ),
    Case(
        "smoke test failed: held with the app's error, the candidate removed, one Event",
        _status("SmokeTest"),
        "2",
        _report(smoke="failed", message="ValueError: cannot translate"),
        results=["held"],
        events=["SmokeTestFailed"],
        phase=None,
        rejected=("2", "SmokeTestFailed", None),
        says="ValueError: cannot translate",
    ),
    Case(
        "smoke test cut by a registry outage: rolled back with its cause, retried after a back-off",
        _status("SmokeTest"),
        "2",
        _report(smoke="failed"),
        results=["rolled_back"],
        events=["RolledBack"],
        phase=None,
        rejected=("2", "RolledBack", "RegistryUnavailable"),
        says="retried in 5s",
        smoke_code="registry_unavailable",
    ),
    Case(
        "an app without /rollout (an older image): the stage is skipped with a warning, then the switch",
        _status("SmokeTest"),
        "2",
        RolloutUnsupported(),
        app=AppReport("1"),
        carries="2",
        events=["RolloutUnjudged", "Switching"],
        phase="Switching",
    ),
    Case(
        "/rollout 404 while the app itself did not answer: wait, nothing rewritten",
        _status("SmokeTest"),
        "2",
        RolloutUnsupported(),
        candidate=("2", "smoke", 0, 5),
        phase="SmokeTest",
        writes=False,
    ),
    Case(
        "a version held by its smoke test is not tried again while the selector points at it",
        _status(rejected=VersionRecord(version="2", reason="SmokeTestFailed", at=iso(NOW))),
        "2",
        phase=None,
        rejected=("2", "SmokeTestFailed", None),
        writes=False,
    ),
    Case(
        "smoke report of an older generation: its verdict is not this one's",
        _status("SmokeTest"),
        "2",
        _report(gen=4, smoke="failed"),
        candidate=("2", "smoke", 0, 5),
        phase="SmokeTest",
    ),
]

CANARY_STEPS = [
    Case(
        "step passed (stepSeconds and minRequests): the next step",
        _status("Canary", 0, ago_s=61),
        "2",
        PASSING_STEP,
        candidate=("2", "canary", 50, 6),
        events=["CanaryStep"],
        phase="Canary",
        writes=True,
    ),
    Case(
        "last step passed: the default moves to the candidate",
        _status("Canary", 1, ago_s=61),
        "2",
        PASSING_STEP,
        carries="2",
        events=["Switching"],
        phase="Switching",
    ),
    Case(
        "step's time not over: wait, figures in status",
        _status("Canary", 0, ago_s=30),
        "2",
        PASSING_STEP,
        candidate=("2", "canary", 10, 5),
        phase="Canary",
        writes=False,
        says="candidate 0/25 errors",
    ),
    Case(
        "too few candidate requests: wait past stepSeconds",
        _status("Canary", 0, ago_s=120),
        "2",
        _report(cand=(19, 0, 9.0)),
        candidate=("2", "canary", 10, 5),
        phase="Canary",
        says="19 of 20 candidate requests",
    ),
    Case(
        "5xx share over maxErrorRate: rolled back within the step, with the figures",
        _status("Canary", 0, ago_s=10),
        "2",
        _report(cand=(25, 2, 9.0)),
        results=["rolled_back"],
        events=["RolledBack"],
        phase=None,
        rejected=("2", "RolledBack", "CanaryFailed"),
        says="candidate 2/25 errors (8.0%)",
    ),
    Case(
        "p95 over maxLatencyRatio x the stable p95: rolled back",
        _status("Canary", 1, ago_s=61),
        "2",
        _report(cand=(25, 0, 21.0)),
        results=["rolled_back"],
        events=["RolledBack"],
        phase=None,
        rejected=("2", "RolledBack", "CanaryFailed"),
        says="p95 latency 21.0 ms over 2x",
    ),
    Case(
        "no report (the app cannot be asked): wait, never promote",
        _status("Canary", 1, ago_s=120),
        "2",
        None,
        candidate=("2", "canary", 50, 5),
        phase="Canary",
    ),
    Case(
        "no report of this step's generation past the deadline: rolled back (Timeout)",
        _status("Canary", 0, ago_s=700),
        "2",
        _report(gen=4, cand=(100, 0, 5.0)),
        results=["rolled_back"],
        events=["RolledBack"],
        phase=None,
        rejected=("2", "RolledBack", "Timeout"),
    ),
    Case(
        "operator restarted mid-step: resumes from status, nothing rewritten",
        _status("Canary", 1, ago_s=20),
        "2",
        _report(cand=(5, 0, 9.0)),
        candidate=("2", "canary", 50, 5),
        phase="Canary",
        writes=False,
    ),
    Case(
        "paused: a passed step does not advance, the weight stays",
        _status("Canary", 0, ago_s=61),
        "2",
        PASSING_STEP,
        spec=CANARY,
        candidate=("2", "canary", 10, 5),
        phase="Canary",
        writes=False,
    ),
    Case(
        "registry outage mid-canary: frozen, no promotion on missing facts",
        _status("Canary", 1, ago_s=61),
        RegistryUnreachable("connection refused"),
        PASSING_STEP,
        candidate=("2", "canary", 50, 5),
        events=["RegistryUnreachable"],
        phase="Canary",
        retry=True,
        writes=False,
    ),
    Case(
        "registry outage mid-canary with a failing candidate: still rolled back",
        _status("Canary", 0, ago_s=30),
        RegistryUnreachable("connection refused"),
        _report(cand=(25, 10, 12.0)),
        results=["rolled_back"],
        events=["RegistryUnreachable", "RolledBack"],
        phase=None,
        rejected=("2", "RolledBack", "CanaryFailed"),
        retry=True,
    ),
    Case(
        "candidate deleted mid-canary (the selector no longer resolves): rolled back",
        _status("Canary", 0, ago_s=10),
        NotFound("alias champion not found"),
        PASSING_STEP,
        results=["rolled_back"],
        events=["SelectorUnresolved", "RolledBack"],
        phase=None,
        rejected=("2", "RolledBack", "CandidateDeleted"),
        retry=True,
    ),
    Case(
        "selector moves mid-canary: the candidate dropped, the new one smoke-tested",
        _status("Canary", 0, ago_s=10),
        "4",
        PASSING_STEP,
        candidate=("4", "smoke", 0, 6),
        results=["started"],
        events=["RolloutStarted", "SmokeTest"],
        phase="SmokeTest",
    ),
    Case(
        "the switch after the canary is judged as any switch",
        _status("Switching"),
        "2",
        None,
        app=AppReport("2"),
        carries="2",
        results=["succeeded"],
        events=["RolloutSucceeded"],
        phase=None,
    ),
]

SHADOW = [
    Case(
        "smoke test passed: shadow at its percent",
        _status("SmokeTest"),
        "2",
        _report(),
        spec=SHADOW_GATED,
        candidate=("2", "shadow", 100, 6),
        events=["Shadow"],
        phase="Shadow",
    ),
    Case(
        "shadow within maxDisagreementRate after durationSeconds: promoted",
        _status("Shadow", ago_s=31),
        "2",
        _report(shadow=(100, 2, 0)),
        spec=SHADOW_GATED,
        carries="2",
        events=["Switching"],
        phase="Switching",
    ),
    Case(
        "shadow over maxDisagreementRate: rolled back",
        _status("Shadow", ago_s=31),
        "2",
        _report(shadow=(100, 30, 0)),
        spec=SHADOW_GATED,
        results=["rolled_back"],
        events=["RolledBack"],
        phase=None,
        rejected=("2", "RolledBack", "ShadowDisagreement"),
        says="30 disagreements",
    ),
    Case(
        "shadow without a rate: reported, the default stays, the candidate dropped",
        _status("Shadow", ago_s=31),
        "2",
        _report(shadow=(100, 30, 0)),
        spec=SHADOW_REPORT,
        results=["held"],
        events=["ShadowReported"],
        phase=None,
        rejected=("2", "ShadowReported", None),
        says="30 disagreements",
    ),
    Case(
        "a reported version is not shadowed again while the spec asks for a report only",
        _status(rejected=VersionRecord(version="2", reason="ShadowReported", at=iso(NOW))),
        "2",
        spec=SHADOW_REPORT,
        phase=None,
        rejected=("2", "ShadowReported", None),
    ),
    Case(
        "a reported version is rolled out once the spec sets a rate",
        _status(rejected=VersionRecord(version="2", reason="ShadowReported", at=iso(NOW))),
        "2",
        spec=SHADOW_GATED,
        candidate=("2", "smoke", 0, 6),
        results=["started"],
        events=["RolloutStarted", "SmokeTest"],
        phase="SmokeTest",
    ),
]

CASES = GATE_AND_SMOKE + CANARY_STEPS + SHADOW


def _decide(case: Case) -> Outcome:
    paused = case.name.startswith("paused")
    spec = make_spec(rollout=case.spec, paused=paused)
    existing = _rayservice(case.status, case.spec) if case.existing == "as written" else case.existing
    assert not isinstance(existing, str)
    inputs = Inputs(OWNER, 1, spec, case.status, NOW, DEFAULTS, settle_seconds=5)
    report = case.report
    if report is not None and case.smoke_code is not None:
        report = dataclasses.replace(report, smoke=dataclasses.replace(report.smoke, code=case.smoke_code))
    observed = Observation(
        url=URL, existing=existing, resolved=case.resolved, facts=FACTS, app=case.app, rollout=report
    )
    outcome = decide(inputs, observed)
    assert isinstance(outcome, Outcome), outcome
    return outcome


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_decide_rollouts(case: Case) -> None:
    outcome = _decide(case)
    st = outcome.status
    assert outcome.plan is not None
    desired = outcome.plan.desired
    assert serving_version_of(desired) == case.carries, "default version"
    candidate = candidate_of(desired)
    got = (
        (candidate["version"], candidate["mode"], candidate["percent"], candidate["generation"])
        if candidate
        else None
    )
    assert got == case.candidate, "candidate"
    assert outcome.results == case.results, "results"
    assert [e.reason for e in outcome.events] == case.events, "events"
    if case.phase != "unchanged":
        assert st.rollout_phase == case.phase, "phase"
    rejected = (st.rejected.version, st.rejected.reason, st.rejected.cause) if st.rejected else None
    assert rejected == case.rejected, "rejected"
    assert outcome.retry == case.retry, "retry"
    if case.writes is not None:
        assert outcome.plan.writes == case.writes, "writes"
    if case.says:
        texts = [st.rollout_stages[-1].message] if st.rollout_stages else []
        texts += [st.rejected.message] if st.rejected else []
        assert any(case.says in text for text in texts), texts
    if st.rollout_phase in ("SmokeTest", "Canary", "Shadow"):
        assert outcome.in_flight, "a candidate is looked at every tick"
        progress = c.get_condition(st.conditions, c.ROLLOUT_IN_PROGRESS)
        assert progress is not None and f"{st.rollout_phase} at {st.rollout_weight}%" in progress.message


def test_figures_of_a_failed_step_stay_in_status() -> None:
    (case,) = [c for c in CANARY_STEPS if c.name.startswith("5xx share")]
    record = _decide(case).status.rollout_stages[-1]  # type: ignore[index]
    assert (record.phase, record.weight, record.generation, record.verdict) == ("Canary", 10, 5, "Failed")
    assert record.candidate is not None and (record.candidate.requests, record.candidate.errors) == (25, 2)
    assert record.stable is not None and record.stable.p95_ms == 10.0


def test_each_stage_keeps_its_record() -> None:
    (case,) = [c for c in CANARY_STEPS if c.name.startswith("step passed")]
    stages = _decide(case).status.rollout_stages or []
    assert [(s.phase, s.weight, s.generation, s.verdict) for s in stages] == [
        ("Canary", 10, 5, "Passed"),
        ("Canary", 50, 6, "Running"),
    ]
    assert stages[0].candidate is not None and stages[0].candidate.requests == 25


def test_the_rollout_report_is_asked_only_while_a_candidate_is_on() -> None:
    running = _rayservice(_status("Canary", 0), CANARY)
    assert wants_rollout_report(_status("Canary", 0), running, OWNER.name)
    assert wants_rollout_report(_status("SmokeTest"), running, OWNER.name)
    assert not wants_rollout_report(_status("Switching"), running, OWNER.name)
    assert not wants_rollout_report(_status(), running, OWNER.name)
    assert not wants_rollout_report(_status("Canary", 0), None, OWNER.name)


def test_without_the_app_probe_candidate_stages_are_skipped_with_a_warning() -> None:
    inputs = Inputs(OWNER, 1, make_spec(rollout=CANARY), _status(), NOW, DEFAULTS, judges_candidates=False)
    observed = Observation(url=URL, existing=_rayservice(_status(), CANARY), resolved="2", facts=FACTS)
    outcome = decide(inputs, observed)
    assert isinstance(outcome, Outcome) and outcome.plan is not None
    assert serving_version_of(outcome.plan.desired) == "2" and candidate_of(outcome.plan.desired) is None
    assert [e.reason for e in outcome.events] == ["RolloutUnjudged", "RolloutStarted"]
    assert outcome.status.rollout_phase == "Switching"
