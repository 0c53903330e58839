"""The rollout's stages and the verdicts on the app's figures, table-driven (progressive.py), and the
typed parse of the app's `/rollout` report (probe.py)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from regserve_operator import progressive as p
from regserve_operator.probe import (
    RolloutReport,
    ShadowFigures,
    SmokeReport,
    VersionFigures,
    parse_rollout,
)
from regserve_operator.spec import Rollout


def _rollout(**fields: Any) -> Rollout:
    return Rollout.model_validate(fields)


CANARY = _rollout(strategy="Canary", canary={"steps": [10, 50], "stepSeconds": 60, "minRequests": 20})


@dataclass
class StageCase:
    name: str
    rollout: Rollout
    stage: p.Stage
    want: p.Stage
    weight: int


STAGES = [
    StageCase("smoke then first canary step", CANARY, p.Stage("SmokeTest"), p.Stage("Canary", 0), 0),
    StageCase("canary step 0 then step 1", CANARY, p.Stage("Canary", 0), p.Stage("Canary", 1), 10),
    StageCase("last canary step then switching", CANARY, p.Stage("Canary", 1), p.Stage("Switching"), 50),
    StageCase(
        "smoke then shadow",
        _rollout(strategy="Shadow", shadow={"percent": 30}),
        p.Stage("SmokeTest"),
        p.Stage("Shadow"),
        0,
    ),
    StageCase(
        "shadow mirrors its percent, then switching",
        _rollout(strategy="Shadow", shadow={"percent": 30}),
        p.Stage("Shadow"),
        p.Stage("Switching"),
        30,
    ),
    StageCase("immediate: smoke then switching", _rollout(), p.Stage("SmokeTest"), p.Stage("Switching"), 0),
]


@pytest.mark.parametrize("case", STAGES, ids=[c.name for c in STAGES])
def test_next_stage_and_weight(case: StageCase) -> None:
    assert p.next_stage(case.rollout, case.stage) == case.want
    assert p.weight(case.rollout, case.stage) == case.weight


@pytest.mark.parametrize(
    ("name", "rollout", "has_stable", "want"),
    [
        ("first version: nothing to compare with", CANARY, False, p.Stage("Switching")),
        ("smoke test first", CANARY, True, p.Stage("SmokeTest")),
        (
            "no smoke test: canary at once",
            _rollout(strategy="Canary", smokeTest=False),
            True,
            p.Stage("Canary", 0),
        ),
        (
            "no smoke test: shadow at once",
            _rollout(strategy="Shadow", smokeTest=False),
            True,
            p.Stage("Shadow"),
        ),
        ("immediate without smoke test", _rollout(smokeTest=False), True, p.Stage("Switching")),
    ],
)
def test_first_stage(name: str, rollout: Rollout, has_stable: bool, want: p.Stage) -> None:
    assert p.first_stage(rollout, has_stable) == want


def test_candidate_modes() -> None:
    assert [p.candidate_mode(x) for x in ("SmokeTest", "Canary", "Shadow", "Switching", None)] == [
        "smoke",
        "canary",
        "shadow",
        None,
        None,
    ]


def _report(
    *,
    generation: int = 7,
    candidate: str = "3",
    smoke: str = "passed",
    stable: VersionFigures | None = None,
    cand: VersionFigures | None = None,
    shadow: ShadowFigures | None = None,
    message: str | None = None,
) -> RolloutReport:
    return RolloutReport(
        generation=generation,
        candidate=candidate,
        mode="canary",
        percent=10,
        replicas=2,
        smoke=SmokeReport(
            smoke,  # type: ignore[arg-type]
            replicas_passed=2 if smoke == "passed" else 1,
            replicas_failed=1 if smoke == "failed" else 0,
            code="prediction_failed" if smoke == "failed" else None,
            message=message,
        ),
        versions={"2": stable or VersionFigures(), "3": cand or VersionFigures()},
        shadow=shadow or ShadowFigures(),
    )


GOOD_STABLE = VersionFigures(requests=200, errors=0, p95_ms=10.0)


@dataclass
class VerdictCase:
    name: str
    stage: p.Stage
    report: RolloutReport | None
    elapsed_s: float
    want: type
    cause: str | None = None
    rollout: Rollout = field(default_factory=lambda: CANARY)
    says: str = ""  # a fragment the verdict's message carries


VERDICTS = [
    VerdictCase("no report: wait, never promote", p.Stage("Canary", 0), None, 120, p.Wait),
    VerdictCase(
        "older generation: its figures are not this step's",
        p.Stage("Canary", 0),
        _report(generation=6, cand=VersionFigures(100, 0, 5.0)),
        120,
        p.Wait,
    ),
    VerdictCase(
        "another candidate reported: wait", p.Stage("Canary", 0), _report(candidate="4"), 120, p.Wait
    ),
    VerdictCase("no report past the deadline: timeout", p.Stage("Canary", 0), None, 700, p.Fail, "Timeout"),
    VerdictCase("smoke pending", p.Stage("SmokeTest"), _report(smoke="pending"), 3, p.Wait),
    VerdictCase(
        "smoke test could not load the candidate: rolled back as a failed load",
        p.Stage("SmokeTest"),
        replace(
            _report(smoke="failed"),
            smoke=SmokeReport("failed", code="version_load_failed", message="No module named 'x'"),
        ),
        3,
        p.Fail,
        "LoadFailed",
        says="failed to load",
    ),
    VerdictCase(
        "smoke test outlasted the app's bound (a stalled download): rolled back as a timeout",
        p.Stage("SmokeTest"),
        replace(_report(smoke="failed"), smoke=SmokeReport("failed", code="smoke_timeout")),
        3,
        p.Fail,
        "Timeout",
    ),
    VerdictCase(
        "smoke test finds the version gone from the registry: rolled back",
        p.Stage("SmokeTest"),
        replace(_report(smoke="failed"), smoke=SmokeReport("failed", code="unknown_version")),
        3,
        p.Fail,
        "CandidateDeleted",
    ),
    VerdictCase(
        "smoke test cut by a registry outage: rolled back, retried later (not the version's fault)",
        p.Stage("SmokeTest"),
        replace(_report(smoke="failed"), smoke=SmokeReport("failed", code="registry_unavailable")),
        3,
        p.Fail,
        "RegistryUnavailable",
        says="registry unavailable",
    ),
    VerdictCase(
        "the app refused the candidate config: rolled back at once",
        p.Stage("Canary", 0),
        replace(
            _report(smoke="failed", message="candidate.percent: too big"),
            candidate=None,
            smoke=SmokeReport("failed", code="invalid_candidate", message="candidate.percent: too big"),
        ),
        3,
        p.Fail,
        "DeployFailed",
        says="candidate.percent: too big",
    ),
    VerdictCase(
        "partial figures (one replica): no verdict, even a passing one",
        p.Stage("Canary", 0),
        replace(_report(stable=GOOD_STABLE, cand=VersionFigures(50, 0, 9.0)), partial=True),
        120,
        p.Wait,
    ),
    VerdictCase(
        "smoke pending past the deadline",
        p.Stage("SmokeTest"),
        _report(smoke="pending"),
        700,
        p.Fail,
        "Timeout",
    ),
    VerdictCase("smoke passed", p.Stage("SmokeTest"), _report(), 3, p.Pass),
    VerdictCase(
        "smoke failed: the app's message in the verdict",
        p.Stage("SmokeTest"),
        _report(smoke="failed", message="ValueError: boom"),
        3,
        p.Held,
        says="ValueError: boom",
    ),
    VerdictCase(
        "too few candidate requests after the step's time: wait",
        p.Stage("Canary", 0),
        _report(stable=GOOD_STABLE, cand=VersionFigures(19, 0, 9.0)),
        120,
        p.Wait,
        says="19 of 20",
    ),
    VerdictCase(
        "enough requests but the step's time not over: wait",
        p.Stage("Canary", 0),
        _report(stable=GOOD_STABLE, cand=VersionFigures(50, 0, 9.0)),
        30,
        p.Wait,
    ),
    VerdictCase(
        "step passes after its time and minRequests",
        p.Stage("Canary", 0),
        _report(stable=GOOD_STABLE, cand=VersionFigures(20, 0, 19.0)),
        60,
        p.Pass,
    ),
    VerdictCase(
        "5xx share over maxErrorRate: failed before the step's end",
        p.Stage("Canary", 0),
        _report(stable=GOOD_STABLE, cand=VersionFigures(21, 1, 9.0)),
        10,
        p.Fail,
        "CanaryFailed",
        says="candidate 1/21 errors",
    ),
    VerdictCase(
        "errors within maxErrorRate pass",
        p.Stage("Canary", 0),
        _report(stable=GOOD_STABLE, cand=VersionFigures(200, 2, 9.0)),
        60,
        p.Pass,
    ),
    VerdictCase(
        "p95 over maxLatencyRatio x stable: failed at the step's end",
        p.Stage("Canary", 0),
        _report(stable=GOOD_STABLE, cand=VersionFigures(40, 0, 20.5)),
        60,
        p.Fail,
        "CanaryFailed",
        says="p95 latency 20.5 ms",
    ),
    VerdictCase(
        "no stable p95 (no stable traffic): errors decide alone",
        p.Stage("Canary", 1),
        _report(stable=VersionFigures(), cand=VersionFigures(40, 0, 500.0)),
        60,
        p.Pass,
    ),
    VerdictCase(
        "shadow: before durationSeconds, wait",
        p.Stage("Shadow"),
        _report(shadow=ShadowFigures(100, 50, 0, 3.0)),
        10,
        p.Wait,
        rollout=_rollout(strategy="Shadow", shadow={"durationSeconds": 30, "maxDisagreementRate": 0.05}),
    ),
    VerdictCase(
        "shadow: disagreement over the rate, rolled back",
        p.Stage("Shadow"),
        _report(shadow=ShadowFigures(100, 5, 1, 3.0)),
        30,
        p.Fail,
        "ShadowDisagreement",
        rollout=_rollout(strategy="Shadow", shadow={"durationSeconds": 30, "maxDisagreementRate": 0.05}),
        says="rate 5.9%",
    ),
    VerdictCase(
        "shadow: within the rate, promoted",
        p.Stage("Shadow"),
        _report(shadow=ShadowFigures(100, 5, 0, 3.0)),
        30,
        p.Pass,
        rollout=_rollout(strategy="Shadow", shadow={"durationSeconds": 30, "maxDisagreementRate": 0.05}),
    ),
    VerdictCase(
        "shadow: no rate set, reported only",
        p.Stage("Shadow"),
        _report(shadow=ShadowFigures(100, 60, 0, 3.0)),
        30,
        p.Report,
        rollout=_rollout(strategy="Shadow", shadow={"durationSeconds": 30}),
        says="60 disagreements",
    ),
    VerdictCase(
        "shadow: one comparison is not a verdict",
        p.Stage("Shadow"),
        _report(shadow=ShadowFigures(1, 0, 0, 3.0)),
        30,
        p.Wait,
        rollout=_rollout(strategy="Shadow", shadow={"durationSeconds": 30, "maxDisagreementRate": 0.01}),
        says="1 of 20 mirrored requests",
    ),
    VerdictCase(
        "shadow: too few mirrored requests long past the stage's end, timed out",
        p.Stage("Shadow"),
        _report(shadow=ShadowFigures(3, 0, 0, 3.0)),
        30 + 601,
        p.Fail,
        "Timeout",
        rollout=_rollout(strategy="Shadow", shadow={"durationSeconds": 30, "maxDisagreementRate": 0.01}),
    ),
    VerdictCase(
        "canary: a candidate that gets no requests cannot wait forever",
        p.Stage("Canary", 0),
        _report(stable=GOOD_STABLE, cand=VersionFigures(0, 0, None)),
        60 + 601,
        p.Fail,
        "Timeout",
        says="0 of 20 candidate requests",
    ),
    VerdictCase(
        "canary: a replica that restarted mid-step failed the smoke test, held",
        p.Stage("Canary", 0),
        _report(smoke="failed", stable=GOOD_STABLE, cand=VersionFigures(25, 0, 9.0)),
        120,
        p.Held,
    ),
    VerdictCase(
        "canary: good figures while a replica's smoke test is pending, no pass yet",
        p.Stage("Canary", 0),
        _report(smoke="pending", stable=GOOD_STABLE, cand=VersionFigures(25, 0, 9.0)),
        120,
        p.Wait,
        says="smoke test",
    ),
    VerdictCase(
        "shadow: nothing mirrored yet, no verdict on no figures",
        p.Stage("Shadow"),
        _report(shadow=ShadowFigures()),
        30,
        p.Wait,
        rollout=_rollout(strategy="Shadow", shadow={"durationSeconds": 30, "maxDisagreementRate": 0.05}),
    ),
]


@pytest.mark.parametrize("case", VERDICTS, ids=[c.name for c in VERDICTS])
def test_judge_stage(case: VerdictCase) -> None:
    check = p.StageCheck(
        stage=case.stage,
        candidate="3",
        stable="2",
        generation=7,
        elapsed_s=case.elapsed_s,
        deadline_s=600,
        report=case.report,
    )
    verdict = p.judge_stage(case.rollout, check)
    assert type(verdict) is case.want, verdict
    if case.cause is not None:
        assert isinstance(verdict, p.Fail) and verdict.cause == case.cause
    assert case.says in verdict.message


REPORT_BODY: dict[str, Any] = {
    "generation": 7,
    "candidate": "3",
    "mode": "canary",
    "percent": 10,
    "replicas": 2,
    "smoke": {"state": "passed", "replicas_passed": 2, "replicas_failed": 0, "code": None, "message": None},
    "versions": {
        "2": {"requests": 180, "errors": 0, "p95_ms": 7.1},
        "3": {"requests": 21, "errors": 1, "p95_ms": 8.0},
    },
    "shadow": {"compared": 0, "disagreements": 0, "errors": 0, "p95_ms": None},
}


@pytest.mark.parametrize(
    ("name", "body", "ok"),
    [
        ("the contract's example", REPORT_BODY, True),
        ("no candidate", {**REPORT_BODY, "candidate": None, "mode": None, "versions": {}}, True),
        ("not an object", [1, 2], False),
        ("versions not a mapping", {**REPORT_BODY, "versions": [1]}, False),
        ("figures not a number", {**REPORT_BODY, "versions": {"3": {"requests": "many"}}}, False),
        ("figures not an object", {**REPORT_BODY, "versions": {"3": 5}}, False),
        ("generation not a number", {**REPORT_BODY, "generation": "seven"}, False),
    ],
)
def test_parse_rollout(name: str, body: Any, ok: bool) -> None:
    report = parse_rollout(body)
    assert (report is not None) == ok
    if name == "the contract's example":
        assert report == RolloutReport(
            generation=7,
            candidate="3",
            mode="canary",
            percent=10,
            replicas=2,
            smoke=SmokeReport("passed", 2, 0, None, None),
            versions={"2": VersionFigures(180, 0, 7.1), "3": VersionFigures(21, 1, 8.0)},
            shadow=ShadowFigures(0, 0, 0, None),
        )
        assert report.figures("3").error_rate == pytest.approx(1 / 21)
        assert report.figures("9") == VersionFigures()


def test_partial_report() -> None:
    report = parse_rollout({**REPORT_BODY, "partial": True})
    assert report is not None and report.partial
    assert parse_rollout(REPORT_BODY).partial is False  # type: ignore[union-attr]


def test_unknown_smoke_state_reads_as_pending() -> None:
    report = parse_rollout({**REPORT_BODY, "smoke": {"state": "exploded"}})
    assert report is not None and report.smoke.state == "pending"
