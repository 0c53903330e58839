"""Which versions a client may pin, and how often a replica loads a pinned version it does not hold.

Both are pure: the policy is what the operator sent in `user_config.pinning` (the owner's
`spec.serving.pinning` with the versions the registry promotes and the operator refused), the bucket
is told the time. The replica checks both before anything is fetched for a pinned version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

# Any: every version (the compatibility gate still applies). Compatible: any version compatible with
# the default, except those the operator held or rolled back. Promoted: only versions an alias or a
# stage points to or that served the resource, less the held ones. None: no pinned requests at all.
PinningMode = Literal["Any", "Compatible", "Promoted", "None"]

# Versions each list of a policy may name: the operator truncates to this, the replica refuses more.
MAX_POLICY_VERSIONS = 64


@dataclass(frozen=True)
class PinPolicy:
    mode: PinningMode = "Compatible"
    allowed: frozenset[str] = frozenset()  # read in Promoted mode only
    refused: frozenset[str] = frozenset()  # held or rolled back; read in every mode but Any


# What a replica applies when the operator's policy cannot be read: no client pins, nothing loaded.
REFUSE_ALL = PinPolicy(mode="None")


def pin_allowed(policy: PinPolicy, version: str, *, default: str | None, candidate: str | None) -> bool:
    """Whether a client may pin `version`. The default and the rollout's candidate are the operator's
    own choices, never a client's, so no policy refuses them."""
    if version in (default, candidate):
        return True
    if policy.mode == "Any":
        return True
    if policy.mode == "None" or version in policy.refused:
        return False
    if policy.mode == "Promoted":
        return version in policy.allowed
    return True  # Compatible: the compatibility gate decides


@dataclass
class LoadBucket:
    """A token bucket for cold loads of pinned versions on one replica: `burst` loads at once, then
    one every `window_s / burst` seconds, so alternating versions cannot keep a replica loading."""

    burst: int
    window_s: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, burst: int, window_s: float, now: float) -> LoadBucket:
        return cls(burst=burst, window_s=window_s, tokens=float(burst), updated=now)

    @property
    def refill_per_s(self) -> float:
        return self.burst / self.window_s

    def take(self, now: float) -> float:
        """Take a token: 0.0 when one was there, else the seconds until one will be (none taken)."""
        elapsed = max(0.0, now - self.updated)  # a clock that went back refills nothing
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.refill_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.refill_per_s


def retry_after_header(wait_s: float) -> str:
    """`Retry-After` in whole seconds, never 0 (a client told 0 would retry at once and be refused)."""
    return str(max(1, math.ceil(wait_s)))
