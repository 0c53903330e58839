"""Where a resource stands against what a client asked of it: still going, done, or failed and why.

Decided on the status' typed fields (versions, condition types and reasons), never on message text; the
messages are only carried to the user.
"""

from __future__ import annotations

from dataclasses import dataclass

from regserve_operator import conditions as c
from regserve_operator.spec import RegisteredModelServingStatus

# Ready=False reasons that no amount of waiting changes: the spec, the policy or the cluster must change.
STUCK_REASONS = frozenset(
    {"InvalidSpec", "PolicyViolation", "Conflict", "ClusterConflict", "DoesNotFit", "CredentialsUnavailable"}
)


@dataclass(frozen=True)
class Pending:
    detail: str  # what it waits for, one line


@dataclass(frozen=True)
class Succeeded:
    version: str


@dataclass(frozen=True)
class Failed:
    reason: str
    message: str


Verdict = Pending | Succeeded | Failed


def judge(
    generation: int, status: RegisteredModelServingStatus, expected_version: str | None = None
) -> Verdict:
    """The verdict for the spec at `generation` (the resource's metadata.generation after the client's
    write): succeeded once the version its selector names serves with nothing in flight. With
    `expected_version` (a promotion made in the registry), pending until the selector names that one."""
    if (status.observed_generation or 0) < generation:
        return Pending("waiting for the operator to read the change")
    if expected_version is not None and status.resolved_version != expected_version:
        return Pending(_waiting(status, f"waiting for the selector to name version {expected_version}"))
    ready = c.get_condition(status.conditions, c.READY)
    if ready is not None and ready.status == "False" and ready.reason in STUCK_REASONS:
        return Failed(ready.reason, ready.message)
    resolved = c.get_condition(status.conditions, c.SELECTOR_RESOLVED)
    if resolved is not None and resolved.status == "False":
        return Failed(resolved.reason or "SelectorUnresolved", resolved.message)
    version = status.resolved_version
    if version is None:
        return Pending(_waiting(status, "resolving the selector"))
    rejected = status.rejected
    if rejected is not None and rejected.version == version and status.serving_version != version:
        kept = f"; version {status.serving_version} keeps serving" if status.serving_version else ""
        return Failed(rejected.reason, f"version {version}: {rejected.message}{kept}")
    if (
        status.serving_version == version
        and status.rollout_version is None
        and c.is_true(status.conditions, c.READY)
    ):
        return Succeeded(version)
    return Pending(_waiting(status, f"version {version}"))


def progress_line(status: RegisteredModelServingStatus) -> str:
    """One line a person can follow: serving version, the rollout's phase and weight, what is not well."""
    parts = [f"serving {status.serving_version or '-'}"]
    if status.rollout_version is not None:
        phase = status.rollout_phase or "starting"
        weight = f" {status.rollout_weight}%" if status.rollout_weight is not None else ""
        parts.append(f"rollout of {status.rollout_version}: {phase}{weight}")
        stages = status.rollout_stages or []
        if stages and stages[-1].candidate is not None:
            figures = stages[-1].candidate
            parts.append(f"candidate {figures.requests} requests, {figures.errors} errors")
    ready = c.get_condition(status.conditions, c.READY)
    if ready is not None and ready.status != "True":
        parts.append(f"{ready.reason}: {ready.message}" if ready.message else ready.reason)
    unwell = [
        cond.type for cond in status.conditions or [] if cond.status == "False" and cond.type != c.READY
    ]
    if unwell:
        parts.append("not " + ", ".join(unwell))
    return "; ".join(parts)


def _waiting(status: RegisteredModelServingStatus, what: str) -> str:
    return f"{what}: {progress_line(status)}"
