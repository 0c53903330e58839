"""Which version answers an unpinned request during a rollout, and whether it is shadowed: pure
decisions over the replica's candidate (docs/rollouts.md), table-tested."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from serving_app.config import Candidate
from serving_app.monitoring.records import Choice, PayloadCapture

# Shares are decided on a grid of 10,000 points (0.01 % steps).
_GRID = 10_000


@dataclass(frozen=True)
class Decision:
    candidate: bool = False  # answered by the candidate (canary)
    shadow: bool = False  # answered by the stable version, then also sent to the candidate


STABLE = Decision()


def sticky_point(value: str, salt: str) -> float:
    """A point in [0, 100) fixed by `value` (and `salt`, the candidate's version): the same caller
    gets the same point on every replica and in every process (no `hash()`, which is salted per
    process). Growing the share keeps those already inside it inside."""
    digest = hashlib.blake2b(f"{salt}\x00{value}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") % _GRID) * 100 / _GRID


def in_share(percent: float, *, draw: float, sticky: str | None = None, salt: str = "") -> bool:
    """Whether a request falls in `percent`% of the traffic: by its sticky value when it carries
    one, else by `draw`, uniform in [0, 1)."""
    if percent <= 0:
        return False
    if percent >= 100:
        return True
    point = sticky_point(sticky, salt) if sticky is not None else draw * 100
    return point < percent


def decide(
    candidate: Candidate | None,
    *,
    smoke_passed: bool,
    pinned: bool,
    draw: float,
    sticky: str | None = None,
) -> Decision:
    """The candidate gets a share of unpinned requests only in canary or shadow mode and only on a
    replica where it passed its smoke test; a pinned request is never touched."""
    if candidate is None or pinned or not smoke_passed or candidate.mode == "smoke":
        return STABLE
    if not in_share(candidate.percent, draw=draw, sticky=sticky, salt=candidate.version):
        return STABLE
    return Decision(candidate=True) if candidate.mode == "canary" else Decision(shadow=True)


@dataclass
class RequestRollout:
    """One request's part in the rollout: its decision, and what the deployment learns while
    answering it (the version resolved, the stable answer to shadow)."""

    decision: Decision = STABLE
    version: str | None = None
    pinned: bool = False  # the request named a version (header or path)
    shadow_input: ShadowInput | None = None
    shadow_dropped: bool = False  # shadowed, but over the in-flight bound: counted as dropped
    payload: PayloadCapture | None = None  # sampled for payload logging (serving_app.monitoring)

    @property
    def choice(self) -> Choice:
        """How the answering version was chosen, as payload records name it."""
        if self.pinned:
            return "pinned"
        return "canary" if self.decision.candidate else "default"


@dataclass(frozen=True)
class ShadowInput:
    """What the candidate is sent after the stable answer: the same input, and that answer."""

    model_input: Any
    rows: int
    params: dict[str, Any] | None
    stable_answer: list[Any]
    payload: PayloadCapture | None = None
