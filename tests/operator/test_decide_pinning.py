"""`user_config.pinning`: the policy the operator sends the app (regserve_operator.pinning), table-driven,
and the decision carrying it into the RayService it writes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from regserve_operator.builders import user_config_of
from regserve_operator.decide import Inputs, Observation, Outcome, decide
from regserve_operator.pinning import PinningInputs, pinning_config, promoted_versions
from regserve_operator.ports import ModelFacts
from regserve_operator.spec import HistoryEntry, RegisteredModelServingStatus, VersionRecord

from serving_app.pinning import MAX_POLICY_VERSIONS, PinningMode

from .fakes import World, signature
from .helpers import DEFAULTS, OWNER, make_spec

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
AT = "2026-01-01T11:00:00Z"


def _history(*entries: tuple[str, str]) -> list[HistoryEntry]:
    return [HistoryEntry(version=v, outcome=outcome, at=AT) for v, outcome in entries]  # type: ignore[arg-type]


def _status(
    *,
    last_good: str | None = "5",
    rollout: str | None = None,
    rejected: str | None = None,
    history: list[HistoryEntry] | None = None,
) -> RegisteredModelServingStatus:
    return RegisteredModelServingStatus(
        last_good_version=last_good,
        serving_version=last_good,
        rollout_version=rollout,
        rejected=VersionRecord(version=rejected, reason="RolledBack", at=AT) if rejected else None,
        history=history,
    )


@dataclass(frozen=True)
class Case:
    name: str
    mode: PinningMode
    status: RegisteredModelServingStatus
    expected: dict[str, Any] | None
    serving: str = "5"
    promoted: frozenset[str] | None = None
    previous_allowed: tuple[str, ...] = ()


cases = [
    Case("Compatible with nothing held: absent (the app's default)", "Compatible", _status(), None),
    Case(
        "Compatible refuses the held version",
        "Compatible",
        _status(rejected="6"),
        {"mode": "Compatible", "refused": ["6"]},
    ),
    Case(
        "held and rolled-back versions from the history, newest first",
        "Compatible",
        _status(history=_history(("3", "Held"), ("4", "RolledBack"), ("5", "Serving"))),
        {"mode": "Compatible", "refused": ["4", "3"]},
    ),
    Case(
        "a version that served after it was rolled back is not refused",
        "Compatible",
        _status(history=_history(("4", "RolledBack"), ("4", "Serving"), ("5", "Serving"))),
        None,
    ),
    Case(
        "the serving version, last good and candidate are never refused",
        "Compatible",
        _status(last_good="4", rollout="7", rejected="7", history=_history(("5", "Held"), ("4", "Held"))),
        None,
    ),
    Case("Any sends no lists", "Any", _status(rejected="6"), {"mode": "Any"}),
    Case("None sends no lists", "None", _status(rejected="6"), {"mode": "None"}),
    Case(
        "Promoted: promoted and served versions, less the held ones",
        "Promoted",
        _status(rejected="8", history=_history(("2", "Serving"), ("3", "Superseded"), ("5", "Serving"))),
        {"mode": "Promoted", "refused": ["8"], "allowed": ["9", "5", "2"]},
        promoted=frozenset({"8", "9"}),
    ),
    Case(
        "Promoted, registry not asked this pass: the allow list the RayService carries stays",
        "Promoted",
        _status(),
        {"mode": "Promoted", "refused": [], "allowed": ["9", "5"]},
        previous_allowed=("9",),
    ),
    Case(
        "Promoted: what is no version number is dropped",
        "Promoted",
        _status(),
        {"mode": "Promoted", "refused": [], "allowed": ["5"]},
        promoted=frozenset({"", "v1", "1; drop"}),
    ),
    Case(
        "Promoted: bounded, the newest versions kept",
        "Promoted",
        _status(),
        {
            "mode": "Promoted",
            "refused": [],
            "allowed": [str(v) for v in range(1000, 1000 - MAX_POLICY_VERSIONS, -1)],
        },
        promoted=frozenset(str(v) for v in range(1, 1001)),
    ),
]


@pytest.mark.parametrize("case", cases, ids=lambda case: case.name)
def test_pinning_config(case: Case) -> None:
    got = pinning_config(
        PinningInputs(case.mode, case.status, case.serving, case.promoted, case.previous_allowed)
    )
    assert got == case.expected


@pytest.mark.parametrize(
    ("aliases", "stages", "expected"),
    [
        (["3"], [("Production", "4"), ("Staging", "5")], {"3", "4", "5"}),
        ([], [("None", "6"), ("Archived", "2")], set()),  # never staged or retired: not promoted
        (["3", "3"], [("Production", "3")], {"3"}),
    ],
)
def test_promoted_versions(aliases: list[str], stages: list[tuple[str, str]], expected: set[str]) -> None:
    assert promoted_versions(aliases, stages) == expected


def _facts(version: str) -> ModelFacts:
    signature = {"inputs": '[{"type": "string", "name": "prompt", "required": true}]'}
    return ModelFacts("translation_model", version, signature, ("python_function",), 10 * 1024**2)


def test_a_rolled_back_version_is_refused_in_the_write_that_rolls_it_back() -> None:
    """The decision writes the policy with the status it leaves: a version held by the gate this pass
    is refused to pins by the same RayService write."""
    spec = make_spec(rollout={"smokeTest": False}, serving={"pinning": "Promoted"})
    status = RegisteredModelServingStatus(last_good_version="1", serving_version="1")
    incompatible = ModelFacts(
        "translation_model", "2", {"inputs": '[{"type": "string", "name": "text", "required": true}]'}, (), 1
    )
    observed = Observation(
        url="http://x",
        resolved="2",
        facts={"1": _facts("1"), "2": incompatible},
        promoted=frozenset({"1", "2"}),
    )
    outcome = decide(Inputs(OWNER, 1, spec, status, NOW, DEFAULTS, settle_seconds=5), observed)
    assert isinstance(outcome, Outcome) and outcome.plan is not None
    assert outcome.status.rejected is not None and outcome.status.rejected.version == "2"
    pinning = user_config_of(outcome.plan.desired, OWNER.name)["pinning"]
    assert pinning == {"mode": "Promoted", "refused": ["2"], "allowed": ["1"]}


def test_promoted_follows_the_registry_and_keeps_its_list_through_an_outage() -> None:
    """The whole pass (gather → decide → act) with the real registry client: aliases that move change
    the allow list in place; a registry outage keeps the list the RayService carries."""
    world = World(make_spec(rollout={"smokeTest": False}, serving={"pinning": "Promoted"}))
    for version in ("1", "2", "3"):
        world.server.add(version, signature(prompt="string"))
    world.server.aliases.update({"champion": "1", "challenger": "2"})
    world.step()

    def pinning() -> dict[str, Any]:
        return dict(user_config_of(world.rayservice(), OWNER.name)["pinning"])

    assert pinning() == {"mode": "Promoted", "refused": [], "allowed": ["2", "1"]}
    world.server.aliases["challenger"] = "3"
    world.step()
    assert pinning()["allowed"] == ["3", "1"]
    world.server.down = True
    world.step()
    assert pinning()["allowed"] == ["3", "1"]
