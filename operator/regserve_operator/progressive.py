"""Progressive delivery of a candidate version, pure: where a rollout goes next and the verdicts on the
app's figures (docs/rollouts.md).

A rollout whose version passed the signature gate goes through stages:

    SmokeTest (rollout.smokeTest) → Canary step 0 … step n-1 (strategy Canary)
                                  → Shadow (strategy Shadow)              → Switching → succeeded
                                  → (strategy Immediate)

While smoke-tested, canaried or shadowed the candidate travels in `user_config.candidate` and the stable
version stays the default; Switching makes the candidate the default (judged by rollout.py as any
switch). The first version of a resource has no stable version beside it: it goes straight to
Switching.

Verdicts are made on the app's typed `/rollout` figures of the current generation only; no figures (the
app cannot be asked, or still reports an older generation) → wait, never promote. Past the rollout
deadline without figures of this generation → Timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from regserve_operator.probe import (
    INVALID_CANDIDATE_CODE,
    REGISTRY_UNAVAILABLE_CODE,
    RolloutReport,
    ShadowFigures,
    VersionFigures,
)
from regserve_operator.spec import Canary, Rollout, RolloutPhase, Shadow

CandidateMode = Literal["smoke", "canary", "shadow"]
RollbackCause = Literal[
    "CanaryFailed",
    "ShadowDisagreement",
    "Timeout",
    "DeployFailed",
    "LoadFailed",
    "RegistryUnavailable",
    "CandidateDeleted",
]
# A smoke test that failed because the candidate could not be loaded is a failed load, as it was before
# smoke tests: rolled back (and retried after a back-off when the registry was unreachable); one that
# failed predicting its example holds the version.
SMOKE_LOAD_FAILURES: dict[str, RollbackCause] = {
    REGISTRY_UNAVAILABLE_CODE: "RegistryUnavailable",
    "version_load_failed": "LoadFailed",
    "unknown_version": "CandidateDeleted",  # the registry no longer has the version
    "smoke_timeout": "Timeout",  # the load and smoke test outlasted the app's bound (a stalled download)
}

CANDIDATE_PHASES: frozenset[RolloutPhase] = frozenset({"SmokeTest", "Canary", "Shadow"})


@dataclass(frozen=True)
class Stage:
    phase: RolloutPhase
    step: int | None = None  # the canary step (0-based) in phase Canary


def first_stage(rollout: Rollout, has_stable: bool) -> Stage:
    """Where a rollout that passed the signature gate starts."""
    if not has_stable:
        return Stage("Switching")
    if rollout.smoke_test:
        return Stage("SmokeTest")
    return _traffic_stage(rollout)


def next_stage(rollout: Rollout, stage: Stage) -> Stage:
    """The stage after `stage` passed."""
    if stage.phase == "SmokeTest":
        return _traffic_stage(rollout)
    if stage.phase == "Canary" and stage.step is not None and stage.step + 1 < len(rollout.canary.steps):
        return Stage("Canary", stage.step + 1)
    return Stage("Switching")


def _traffic_stage(rollout: Rollout) -> Stage:
    if rollout.strategy == "Canary":
        return Stage("Canary", 0)
    if rollout.strategy == "Shadow":
        return Stage("Shadow")
    return Stage("Switching")


def weight(rollout: Rollout, stage: Stage) -> int:
    """Percent of unpinned requests the candidate answers (Canary), or that are mirrored to it (Shadow)."""
    if stage.phase == "Canary" and stage.step is not None:
        steps = rollout.canary.steps
        return steps[min(stage.step, len(steps) - 1)]
    if stage.phase == "Shadow":
        return rollout.shadow.percent
    if stage.phase == "Switching":
        return 100
    return 0


_MODES: dict[str, CandidateMode] = {"SmokeTest": "smoke", "Canary": "canary", "Shadow": "shadow"}


def candidate_mode(phase: RolloutPhase | None) -> CandidateMode | None:
    """What the app does with the candidate in `phase` (None: no candidate in user_config)."""
    return _MODES.get(phase or "")


# ------------------------------------------------------------------------------------------ verdicts


@dataclass(frozen=True)
class Wait:
    message: str


@dataclass(frozen=True)
class Pass:
    message: str


@dataclass(frozen=True)
class Fail:
    """Roll back to the stable version."""

    cause: RollbackCause
    message: str


@dataclass(frozen=True)
class Held:
    """The candidate failed its smoke test: held, no request was ever answered by it."""

    message: str


@dataclass(frozen=True)
class Report:
    """Shadow without a threshold: the figures are reported, the default stays."""

    message: str


StageVerdict = Wait | Pass | Fail | Held | Report


@dataclass(frozen=True)
class StageCheck:
    stage: Stage
    candidate: str
    stable: str | None
    generation: int
    elapsed_s: float  # since the stage (the canary step) started
    deadline_s: float
    report: RolloutReport | None


def judge_stage(rollout: Rollout, check: StageCheck) -> StageVerdict:
    report = check.report
    refused = _refused_candidate(check)
    if refused is not None:
        return refused
    if report is None or report.generation != check.generation or report.candidate != check.candidate:
        if check.elapsed_s > check.deadline_s:
            seen = "no report" if report is None else f"generation {report.generation}"
            return Fail(
                "Timeout",
                f"the app did not report generation {check.generation} within "
                f"{check.deadline_s:.0f}s ({seen})",
            )
        return Wait(f"waiting for the app to report generation {check.generation}")
    if report.partial:
        return Wait("the app reported one replica's figures only (partial): no verdict on them")
    phase = check.stage.phase
    if phase == "SmokeTest":
        return smoke_verdict(report, check.candidate, check.elapsed_s, check.deadline_s)
    if phase not in ("Canary", "Shadow"):
        return Wait("switching")
    if report.smoke.state == "failed":
        # A replica that (re)started during the stage failed the candidate's smoke test: it never routes
        # to it, so the others' figures would pass a version that fails there once it is the default.
        return smoke_verdict(report, check.candidate, check.elapsed_s, check.deadline_s)
    verdict = _traffic_verdict(rollout, check, report)
    if isinstance(verdict, Pass) and report.smoke.state != "passed":
        return Wait(f"a replica has not finished the candidate's smoke test; {verdict.message}")
    if isinstance(verdict, Wait) and check.elapsed_s > _stage_seconds(rollout, phase) + check.deadline_s:
        # Too little traffic, or a candidate that never answers: the stage cannot end by itself.
        return Fail("Timeout", f"no verdict {check.deadline_s:.0f}s past the stage's end: {verdict.message}")
    return verdict


def _traffic_verdict(rollout: Rollout, check: StageCheck, report: RolloutReport) -> StageVerdict:
    if check.stage.phase == "Canary":
        return canary_verdict(
            rollout.canary,
            report.figures(check.stable),
            report.figures(check.candidate),
            check.elapsed_s,
        )
    return shadow_verdict(rollout.shadow, report.shadow, check.elapsed_s)


def _stage_seconds(rollout: Rollout, phase: RolloutPhase) -> float:
    return float(rollout.canary.step_seconds if phase == "Canary" else rollout.shadow.duration_seconds)


def _refused_candidate(check: StageCheck) -> Fail | None:
    """The app refused this generation's `user_config.candidate` as invalid: not the version's fault,
    but nothing can be judged either, so it is rolled back at once rather than timing out."""
    report = check.report
    if report is None or report.generation != check.generation or report.candidate is not None:
        return None
    if report.smoke.state != "failed" or report.smoke.code != INVALID_CANDIDATE_CODE:
        return None
    return Fail("DeployFailed", f"the app refused the candidate: {report.smoke.message or 'invalid'}")


def smoke_verdict(report: RolloutReport, candidate: str, elapsed_s: float, deadline_s: float) -> StageVerdict:
    smoke = report.smoke
    if smoke.state == "failed" and smoke.code in SMOKE_LOAD_FAILURES:
        cause = SMOKE_LOAD_FAILURES[smoke.code]
        if cause == "RegistryUnavailable":
            return Fail(cause, f"version {candidate} not loaded, registry unavailable")
        return Fail(
            cause, f"version {candidate} failed to load ({smoke.code}): {smoke.message or 'no message'}"
        )
    if smoke.state == "failed":
        code = f" ({smoke.code})" if smoke.code else ""
        return Held(
            f"version {candidate} failed its smoke test on {smoke.replicas_failed} of {report.replicas} "
            f"replicas{code}: {smoke.message or 'no message'}",
        )
    if smoke.state == "passed":
        return Pass(f"version {candidate} passed its smoke test on {smoke.replicas_passed} replicas")
    if elapsed_s > deadline_s:
        return Fail("Timeout", f"smoke test of version {candidate} not finished within {deadline_s:.0f}s")
    return Wait(f"smoke test pending ({smoke.replicas_passed} of {report.replicas} replicas passed)")


def figures_text(stable: VersionFigures, candidate: VersionFigures) -> str:
    return (
        f"candidate {candidate.errors}/{candidate.requests} errors ({candidate.error_rate:.1%}), "
        f"p95 {_ms(candidate.p95_ms)}; "
        f"stable {stable.errors}/{stable.requests} errors, p95 {_ms(stable.p95_ms)}"
    )


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def canary_verdict(
    canary: Canary, stable: VersionFigures, candidate: VersionFigures, elapsed_s: float
) -> StageVerdict:
    """One canary step. Errors are judged as soon as minRequests candidate requests were seen (a
    failing candidate is stopped within its step); latency and the pass only at the step's end."""
    figures = figures_text(stable, candidate)
    if candidate.requests < canary.min_requests:
        return Wait(f"{candidate.requests} of {canary.min_requests} candidate requests; {figures}")
    if candidate.error_rate > canary.max_error_rate:
        return Fail(
            "CanaryFailed",
            f"error rate {candidate.error_rate:.1%} over {canary.max_error_rate:.1%}: {figures}",
        )
    if elapsed_s < canary.step_seconds:
        return Wait(f"step runs {canary.step_seconds}s; {figures}")
    if _latency_over(canary, stable, candidate):
        return Fail(
            "CanaryFailed",
            f"p95 latency {_ms(candidate.p95_ms)} over {canary.max_latency_ratio:g}x the stable "
            f"{_ms(stable.p95_ms)}: {figures}",
        )
    return Pass(figures)


def _latency_over(canary: Canary, stable: VersionFigures, candidate: VersionFigures) -> bool:
    if candidate.p95_ms is None or stable.p95_ms is None or stable.p95_ms <= 0:
        return False  # no stable figure to compare with (no unpinned stable traffic): errors decide alone
    return candidate.p95_ms > canary.max_latency_ratio * stable.p95_ms


def disagreement_rate(figures: ShadowFigures) -> float:
    """Disagreements and candidate errors over every mirrored request that was answered or failed."""
    judged = figures.compared + figures.errors
    return (figures.disagreements + figures.errors) / judged if judged else 0.0


def shadow_text(figures: ShadowFigures) -> str:
    return (
        f"{figures.compared} compared, {figures.disagreements} disagreements, {figures.errors} errors "
        f"(rate {disagreement_rate(figures):.1%}), candidate p95 {_ms(figures.p95_ms)}"
    )


def shadow_verdict(shadow: Shadow, figures: ShadowFigures, elapsed_s: float) -> StageVerdict:
    text = shadow_text(figures)
    if elapsed_s < shadow.duration_seconds:
        return Wait(f"shadowing for {shadow.duration_seconds}s; {text}")
    judged = figures.compared + figures.errors
    if judged < shadow.min_comparisons:
        return Wait(f"{judged} of {shadow.min_comparisons} mirrored requests judged; {text}")
    limit = shadow.max_disagreement_rate
    if limit is None:
        return Report(text)
    rate = disagreement_rate(figures)
    if rate > limit:
        return Fail("ShadowDisagreement", f"disagreement rate {rate:.1%} over {limit:.1%}: {text}")
    return Pass(text)
