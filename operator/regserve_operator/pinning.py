"""`user_config.pinning`: the versions the app lets clients pin (`serving_app.pinning` decides per
request), from the owner's `spec.serving.pinning`, the registry's promotions and this resource's own
record of held, rolled-back and served versions. Pure: the caller gathers, this decides.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from regserve_operator.spec import RegisteredModelServingStatus
from serving_app.config import is_version_number
from serving_app.pinning import MAX_POLICY_VERSIONS, PinningMode

# Stages that promote a version; "None" (never staged) and "Archived" (retired) do not.
PROMOTION_STAGES = frozenset({"Staging", "Production"})


def promoted_versions(aliases: Iterable[str], stages: Iterable[tuple[str, str]]) -> frozenset[str]:
    """The versions an alias or a promotion stage points to (`stages`: (stage, version) pairs)."""
    return frozenset({*aliases, *(version for stage, version in stages if stage in PROMOTION_STAGES)})


@dataclass(frozen=True)
class PinningInputs:
    mode: PinningMode
    status: RegisteredModelServingStatus
    serving_version: str  # the default the RayService being built carries
    # Versions the registry promotes now; None when it could not be asked this pass (Promoted only).
    promoted: frozenset[str] | None
    # `allowed` of the policy the RayService carries: kept while the registry cannot be asked.
    previous_allowed: tuple[str, ...] = ()


def refused_versions(status: RegisteredModelServingStatus, serving_version: str) -> list[str]:
    """Versions the operator held or rolled back and has not served since (newest first)."""
    latest: dict[str, str] = {}
    for entry in status.history or []:
        latest[entry.version] = entry.outcome  # history is oldest first: the last entry wins
    refused = {version for version, outcome in latest.items() if outcome in ("Held", "RolledBack")}
    if status.rejected is not None:
        refused.add(status.rejected.version)
    # The versions the operator serves or judges are its own choice, never a client's pin.
    refused -= {v for v in (serving_version, status.last_good_version, status.rollout_version) if v}
    return _bounded(refused)


def served_versions(status: RegisteredModelServingStatus, serving_version: str) -> set[str]:
    served = {entry.version for entry in status.history or [] if entry.outcome == "Serving"}
    served |= {serving_version}
    if status.last_good_version:
        served.add(status.last_good_version)
    return served


def pinning_config(inputs: PinningInputs) -> dict[str, Any] | None:
    """`user_config.pinning` for the RayService being built; each list at most MAX_POLICY_VERSIONS
    long (the newest versions kept: a truncated allow list refuses more, never less). None when the
    policy is the app's own default (Compatible, nothing refused): the user_config of a resource that
    never asked for more stays as it was."""
    config: dict[str, Any] = {"mode": inputs.mode}
    if inputs.mode == "Any" or inputs.mode == "None":
        return config  # neither reads a list
    refused = refused_versions(inputs.status, inputs.serving_version)
    if inputs.mode == "Compatible" and not refused:
        return None
    config["refused"] = refused
    if inputs.mode == "Promoted":
        promoted = inputs.promoted if inputs.promoted is not None else frozenset(inputs.previous_allowed)
        allowed = (promoted | served_versions(inputs.status, inputs.serving_version)) - set(refused)
        config["allowed"] = _bounded(allowed)
    return config


def _bounded(versions: Collection[str]) -> list[str]:
    """Registry version numbers only (anything else is no version a client could pin), newest first."""
    valid = [version for version in versions if version and is_version_number(version)]
    return sorted(valid, key=int, reverse=True)[:MAX_POLICY_VERSIONS]
