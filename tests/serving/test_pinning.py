"""The pin decision, the cold-load bucket and `user_config.pinning` parsing, table-driven (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from serving_app.config import Pinning, parse_user_config, pinning_error
from serving_app.pinning import (
    MAX_POLICY_VERSIONS,
    LoadBucket,
    PinPolicy,
    pin_allowed,
    retry_after_header,
)

HELD = frozenset({"3"})
PROMOTED = frozenset({"2", "4"})


@dataclass(frozen=True)
class PinCase:
    name: str
    policy: PinPolicy
    version: str
    allowed: bool
    default: str | None = "1"
    candidate: str | None = None


pin_cases = [
    PinCase("Compatible allows a version nobody refused", PinPolicy("Compatible", refused=HELD), "5", True),
    PinCase("Compatible refuses a held version", PinPolicy("Compatible", refused=HELD), "3", False),
    PinCase("Compatible ignores the allow list", PinPolicy("Compatible", allowed=PROMOTED), "7", True),
    PinCase("Promoted allows a promoted version", PinPolicy("Promoted", PROMOTED, HELD), "4", True),
    PinCase("Promoted refuses an unpromoted one", PinPolicy("Promoted", PROMOTED, HELD), "5", False),
    PinCase(
        "Promoted refuses a held version even if listed",
        PinPolicy("Promoted", PROMOTED | HELD, HELD),
        "3",
        False,
    ),
    PinCase("None refuses everything", PinPolicy("None"), "2", False),
    PinCase("Any allows a held version", PinPolicy("Any", refused=HELD), "3", True),
    PinCase("the default is never refused (None)", PinPolicy("None"), "1", True),
    PinCase(
        "the default is never refused (held)", PinPolicy("Compatible", refused=frozenset({"1"})), "1", True
    ),
    PinCase("the candidate is never refused", PinPolicy("Promoted", PROMOTED), "9", True, candidate="9"),
    PinCase("no default yet: the policy decides", PinPolicy("None"), "1", False, default=None),
]


@pytest.mark.parametrize("case", pin_cases, ids=lambda case: case.name)
def test_pin_allowed(case: PinCase) -> None:
    got = pin_allowed(case.policy, case.version, default=case.default, candidate=case.candidate)
    assert got == case.allowed


@dataclass(frozen=True)
class BucketCase:
    name: str
    burst: int
    window_s: float
    takes_at: tuple[float, ...]  # times of successive takes
    waits: tuple[float, ...]  # what each take answered (0.0: a token was taken)


bucket_cases = [
    BucketCase("a full bucket gives its burst at once", 3, 9.0, (0, 0, 0), (0, 0, 0)),
    BucketCase("past the burst: wait for one token", 3, 9.0, (0, 0, 0, 0), (0, 0, 0, 3.0)),
    BucketCase("a refusal takes nothing", 1, 10.0, (0, 0, 4, 10), (0, 10.0, 6.0, 0)),
    BucketCase("refills at burst per window", 2, 10.0, (0, 0, 5, 5), (0, 0, 0, 5.0)),
    BucketCase("never more than the burst", 2, 10.0, (0, 100, 100, 100), (0, 0, 0, 5.0)),
    BucketCase("a clock that goes back refills nothing", 1, 10.0, (10, 0, 5), (0, 10.0, 5.0)),
]


@pytest.mark.parametrize("case", bucket_cases, ids=lambda case: case.name)
def test_load_bucket(case: BucketCase) -> None:
    bucket = LoadBucket.full(case.burst, case.window_s, now=case.takes_at[0])
    got = tuple(round(bucket.take(now), 6) for now in case.takes_at)
    assert got == case.waits


@pytest.mark.parametrize(("wait_s", "header"), [(0.01, "1"), (1.0, "1"), (1.2, "2"), (9.99, "10")])
def test_retry_after_is_whole_seconds_never_zero(wait_s: float, header: str) -> None:
    assert retry_after_header(wait_s) == header


@dataclass(frozen=True)
class ConfigCase:
    name: str
    raw: dict[str, Any]
    policy: PinPolicy
    problem: bool = False  # pinning_error names a problem
    candidate_kept: bool = True


config_cases = [
    ConfigCase("absent: today's behaviour", {"default_version": "2"}, PinPolicy()),
    ConfigCase(
        "versions written as numbers are text",
        {"default_version": "2", "pinning": {"mode": "Promoted", "allowed": [4, "5"], "refused": [3]}},
        PinPolicy("Promoted", frozenset({"4", "5"}), frozenset({"3"})),
    ),
    ConfigCase(
        "an unknown mode refuses every pin",
        {"default_version": "2", "pinning": {"mode": "Some"}},
        PinPolicy("None"),
        problem=True,
    ),
    ConfigCase(
        "a list too long refuses every pin",
        {
            "default_version": "2",
            "pinning": {"mode": "Compatible", "refused": ["7"] * (MAX_POLICY_VERSIONS + 1)},
        },
        PinPolicy("None"),
        problem=True,
    ),
    ConfigCase(
        "a version that is no number refuses every pin",
        {"default_version": "2", "pinning": {"mode": "Compatible", "refused": ["3\n"]}},
        PinPolicy("None"),
        problem=True,
    ),
    ConfigCase(
        "null refuses every pin", {"default_version": "2", "pinning": None}, PinPolicy("None"), problem=True
    ),
    ConfigCase(
        "a broken pinning keeps a valid candidate",
        {
            "default_version": "2",
            "candidate": {"version": "3", "mode": "smoke", "generation": 1},
            "pinning": "Any",
        },
        PinPolicy("None"),
        problem=True,
    ),
    ConfigCase(
        "a broken candidate keeps a valid pinning",
        {"default_version": "2", "candidate": {"version": "x"}, "pinning": {"mode": "Any"}},
        PinPolicy("Any"),
        candidate_kept=False,
    ),
]


@pytest.mark.parametrize("case", config_cases, ids=lambda case: case.name)
def test_user_config_pinning(case: ConfigCase) -> None:
    config, candidate_problem = parse_user_config(case.raw)
    assert config.default_version == "2"  # neither part ever takes the default with it
    assert config.pinning.policy() == case.policy
    assert (pinning_error(case.raw) is not None) == case.problem
    assert (config.candidate is not None) == (case.candidate_kept and "candidate" in case.raw)
    assert (candidate_problem is not None) == (not case.candidate_kept)


def test_pinning_model_is_the_operators_contract() -> None:
    assert Pinning().policy() == PinPolicy("Compatible")
