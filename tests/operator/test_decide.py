"""The reconcile decision, table-driven: what was gathered and the status before → the decision.

One table per group of rules in decide.py's docstring; each case names the rule it pins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from regserve_operator import conditions as c
from regserve_operator.builders import build_rayservice, serving_version_of
from regserve_operator.decide import (
    Inputs,
    NeedFacts,
    Observation,
    Outcome,
    Unreadable,
    decide,
    iso,
    wants_app_report,
)
from regserve_operator.ports import ModelFacts, NotFound, RegistryUnreachable
from regserve_operator.probe import AppReport, SwitchFailure
from regserve_operator.sizing import size_replica
from regserve_operator.spec import RegisteredModelServingStatus, VersionRecord

from .helpers import DEFAULTS, OWNER, make_spec

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
URL = "http://translator-serve-svc.ml.svc:8000/translator"


def _sig(*columns: str) -> dict[str, Any]:
    inputs = [{"type": "string", "name": n, "required": True} for n in columns]
    return {"inputs": json.dumps(inputs), "outputs": None, "params": None}


def _facts(version: str, sig: dict[str, Any]) -> ModelFacts:
    return ModelFacts("translation_model", version, sig, ("python_function",), 10 * 1024**2)


FACTS = {
    "1": _facts("1", _sig("prompt")),
    "2": _facts("2", _sig("prompt")),
    "3": _facts("3", _sig("text")),  # incompatible with 1 and 2: prompt dropped, text required
    "4": _facts("4", _sig("prompt")),
}


def _rayservice(version: str, app_status: str | None = "RUNNING", message: str = "") -> dict[str, Any]:
    spec = make_spec()
    size = size_replica(
        model_size_bytes=10 * 1024**2,
        flavors=(),
        serving=spec.serving,
        resources=spec.resources,
        previous=None,
    )
    obj = build_rayservice(OWNER, spec, version, size, DEFAULTS)
    obj["metadata"]["resourceVersion"] = "7"
    if app_status is not None:
        obj["status"] = {
            "conditions": [{"type": "Ready", "status": "True" if app_status == "RUNNING" else "False"}],
            "activeServiceStatus": {
                "applicationStatuses": {OWNER.name: {"status": app_status, "message": message}}
            },
        }
    return obj


def _status(
    *,
    last_good: str | None = "1",
    rollout: str | None = None,
    started_ago_s: float = 30,
    attempt: int | None = None,
    rejected: VersionRecord | None = None,
) -> RegisteredModelServingStatus:
    return RegisteredModelServingStatus(
        last_good_version=last_good,
        serving_version=rollout or last_good,
        rollout_version=rollout,
        rollout_started_at=iso(NOW - timedelta(seconds=started_ago_s)) if rollout else None,
        rollout_attempt=attempt if rollout else None,
        rejected=rejected,
    )


@dataclass
class Case:
    name: str
    status: RegisteredModelServingStatus
    resolved: Any
    existing: dict[str, Any] | None
    app: AppReport | None = None
    spec: dict[str, Any] = field(default_factory=dict)
    # expected
    carries: str | None = None  # the version the desired RayService carries (None: no plan)
    results: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    last_good: str | None = "unchanged"
    rollout: str | None = "unchanged"
    rejected: tuple[str, str, str | None] | None = None  # (version, reason, cause)
    retry: bool = False
    in_flight: bool | None = None


def _spec(overrides: dict[str, Any]) -> Any:
    """The tables below pin the rules of an Immediate rollout without the smoke test (the gate, the
    switch and its judgement); test_decide_rollouts.py has the smoke test, canary and shadow."""
    rollout = {"smokeTest": False, **overrides.get("rollout", {})}
    return make_spec(**{**overrides, "rollout": rollout})


def _decide(case: Case, facts: dict[str, Any] | None = None) -> Outcome:
    inputs = Inputs(OWNER, 1, _spec(case.spec), case.status, NOW, DEFAULTS, settle_seconds=5)
    observed = Observation(
        url=URL, existing=case.existing, resolved=case.resolved, facts=facts or FACTS, app=case.app
    )
    outcome = decide(inputs, observed)
    assert isinstance(outcome, Outcome), outcome
    return outcome


def _check(case: Case, outcome: Outcome) -> None:
    st = outcome.status
    carried = serving_version_of(outcome.plan.desired) if outcome.plan and outcome.plan.desired else None
    assert carried == case.carries, "carries"
    assert outcome.results == case.results, "results"
    assert [e.reason for e in outcome.events] == case.events, "events"
    if case.last_good != "unchanged":
        assert st.last_good_version == case.last_good, "last good"
    if case.rollout != "unchanged":
        assert st.rollout_version == case.rollout, "rollout"
    got = (st.rejected.version, st.rejected.reason, st.rejected.cause) if st.rejected else None
    assert got == case.rejected, "rejected"
    assert outcome.retry == case.retry, "retry"
    if case.in_flight is not None:
        assert outcome.in_flight == case.in_flight, "in flight"


SWITCH_FAILED_REGISTRY = AppReport("1", SwitchFailure("2", "registry_unavailable", NOW.timestamp() - 10))
SWITCH_FAILED_LOAD = AppReport("1", SwitchFailure("2", "version_load_failed", NOW.timestamp() - 10))
HELD_3 = VersionRecord(version="3", reason="Incompatible", at=iso(NOW - timedelta(seconds=60)))


def _outage_record(attempts: int, ago_s: float) -> VersionRecord:
    return VersionRecord(
        version="2",
        reason="RolledBack",
        cause="RegistryUnavailable",
        attempts=attempts,
        message="version 2 not loaded, registry unavailable; retried in 5s",
        at=iso(NOW - timedelta(seconds=ago_s)),
    )


STEADY_AND_GATE = [
    Case(
        "steady: the selector's version serves, nothing to do", _status(), "1", _rayservice("1"), carries="1"
    ),
    Case(
        "first version: created, judged like any rollout",
        _status(last_good=None),
        "1",
        None,
        carries="1",
        results=["started"],
        events=["RolloutStarted", "Created"],
        rollout="1",
        in_flight=True,
    ),
    Case(
        "compatible promotion starts a rollout",
        _status(),
        "2",
        _rayservice("1"),
        carries="2",
        results=["started"],
        events=["RolloutStarted"],
        rollout="2",
        in_flight=True,
    ),
    Case(
        "incompatible version is held, the serving one stays",
        _status(),
        "3",
        _rayservice("1"),
        carries="1",
        results=["held"],
        events=["SignatureIncompatible"],
        rejected=("3", "Incompatible", None),
    ),
    Case(
        "held version is not tried again while the selector points at it",
        _status(rejected=HELD_3),
        "3",
        _rayservice("1"),
        carries="1",
        rejected=("3", "Incompatible", None),
    ),
    Case(
        "allowIncompatibleVersion lets a breaking version through",
        _status(rejected=HELD_3),
        "3",
        _rayservice("1"),
        spec={"rollout": {"allowIncompatibleVersion": "3"}},
        carries="3",
        results=["started"],
        events=["RolloutStarted"],
    ),
    Case(
        "the selector moving on clears the hold",
        _status(rejected=HELD_3),
        "2",
        _rayservice("1"),
        carries="2",
        results=["started"],
        events=["RolloutStarted"],
    ),
    Case(
        "paused: no rollout starts",
        _status(),
        "2",
        _rayservice("1"),
        spec={"paused": True},
        carries="1",
    ),
    Case(
        "unreachable registry: nothing changes, retried with back-off",
        _status(),
        RegistryUnreachable("connection refused"),
        _rayservice("1"),
        carries="1",
        events=["RegistryUnreachable"],
        retry=True,
    ),
    Case(
        "missing alias: reported, nothing created",
        _status(last_good=None),
        NotFound("no alias champion"),
        None,
        events=["SelectorUnresolved"],
        retry=True,
    ),
]

JUDGING = [
    Case(
        "RUNNING after settling and the app answers with it: succeeded",
        _status(rollout="2"),
        "2",
        _rayservice("2"),
        app=AppReport("2"),
        carries="2",
        results=["succeeded"],
        events=["RolloutSucceeded"],
        last_good="2",
        rollout=None,
    ),
    Case(
        "RUNNING before settling: still judged",
        _status(rollout="2", started_ago_s=2),
        "2",
        _rayservice("2"),
        carries="2",
        rollout="2",
        in_flight=True,
    ),
    Case(
        "RUNNING and the app cannot be asked: Ray's word decides",
        _status(rollout="2"),
        "2",
        _rayservice("2"),
        app=None,
        carries="2",
        results=["succeeded"],
        events=["RolloutSucceeded"],
        last_good="2",
    ),
    Case(
        "Ray reports the application failed: rolled back (DeployFailed), not retried",
        _status(rollout="2"),
        "2",
        _rayservice("2", "DEPLOY_FAILED", "ModelServer: failed to load version"),
        carries="1",
        results=["rolled_back"],
        events=["RolledBack"],
        last_good="1",
        rollout=None,
        rejected=("2", "RolledBack", "DeployFailed"),
    ),
    Case(
        "the app reports the switch failed to load: rolled back (LoadFailed)",
        _status(rollout="2", started_ago_s=20),
        "2",
        _rayservice("2"),
        app=SWITCH_FAILED_LOAD,
        carries="1",
        results=["rolled_back"],
        events=["RolledBack"],
        rejected=("2", "RolledBack", "LoadFailed"),
    ),
    Case(
        "the app could not reach the registry: rolled back (RegistryUnavailable), retry scheduled",
        _status(rollout="2", started_ago_s=20),
        "2",
        _rayservice("2"),
        app=SWITCH_FAILED_REGISTRY,
        carries="1",
        results=["rolled_back"],
        events=["RolledBack"],
        rejected=("2", "RolledBack", "RegistryUnavailable"),
    ),
    Case(
        "a switch failure from before this rollout started belongs to an earlier attempt",
        _status(rollout="2", started_ago_s=5),
        "2",
        _rayservice("2"),
        app=SWITCH_FAILED_LOAD,
        carries="2",
        rollout="2",
        in_flight=True,
    ),
    Case(
        "the old default still answers past the deadline: Timeout",
        _status(rollout="2", started_ago_s=700),
        "2",
        _rayservice("2"),
        app=AppReport("1"),
        carries="1",
        results=["rolled_back"],
        events=["RolledBack"],
        rejected=("2", "RolledBack", "Timeout"),
    ),
    Case(
        "not RUNNING within the deadline: Timeout",
        _status(rollout="2", started_ago_s=700),
        "2",
        _rayservice("2", "DEPLOYING"),
        carries="1",
        results=["rolled_back"],
        events=["RolledBack"],
        rejected=("2", "RolledBack", "Timeout"),
    ),
    Case(
        "rolled back for a failure of the version: not retried",
        _status(
            rejected=VersionRecord(
                version="2", reason="RolledBack", cause="LoadFailed", attempts=1, at=iso(NOW)
            )
        ),
        "2",
        _rayservice("1"),
        carries="1",
        rejected=("2", "RolledBack", "LoadFailed"),
    ),
    Case(
        "rolled back for a registry outage: waits out its back-off",
        _status(rejected=_outage_record(attempts=1, ago_s=2)),
        "2",
        _rayservice("1"),
        carries="1",
        rejected=("2", "RolledBack", "RegistryUnavailable"),
    ),
    Case(
        "rolled back for a registry outage: retried once the back-off is over",
        _status(rejected=_outage_record(attempts=1, ago_s=6)),
        "2",
        _rayservice("1"),
        carries="2",
        results=["started"],
        events=["RolloutStarted"],
        rollout="2",
    ),
]

# Superseded rollouts: every ordering of promote (1→2), promote again (→4 compatible, →3 incompatible),
# hold and fail, with the rollout of 2 still loading, failed, or already answering.
SUPERSEDED = [
    Case(
        "2 answering, selector → incompatible 3: 2 stays and 3 is held against it",
        _status(rollout="2", started_ago_s=2),
        "3",
        _rayservice("2"),
        app=AppReport("2"),
        carries="2",
        results=["succeeded", "held"],
        events=["RolloutSucceeded", "SignatureIncompatible"],
        last_good="2",
        rollout=None,
        rejected=("3", "Incompatible", None),
    ),
    Case(
        "2 answering, selector → compatible 4: 2 is the baseline, 4 rolls out",
        _status(rollout="2", started_ago_s=2),
        "4",
        _rayservice("2"),
        app=AppReport("2"),
        carries="4",
        results=["succeeded", "started"],
        events=["RolloutSucceeded", "RolloutStarted"],
        last_good="2",
        rollout="4",
    ),
    Case(
        "2 still loading, selector → incompatible 3: back to the last good 1, 3 held",
        _status(rollout="2", started_ago_s=2),
        "3",
        _rayservice("2", "DEPLOYING"),
        carries="1",
        results=["held"],
        events=["SignatureIncompatible"],
        last_good="1",
        rollout=None,
        rejected=("3", "Incompatible", None),
    ),
    Case(
        "2 still loading, selector → compatible 4: 4 rolls out, gated against 1",
        _status(rollout="2", started_ago_s=2),
        "4",
        _rayservice("2", "DEPLOYING"),
        carries="4",
        results=["started"],
        events=["RolloutStarted"],
        last_good="1",
        rollout="4",
    ),
    Case(
        "2 running but the app still answers 1 (loading), selector → 3: 2 dropped for 1",
        _status(rollout="2", started_ago_s=2),
        "3",
        _rayservice("2"),
        app=AppReport("1"),
        carries="1",
        results=["held"],
        events=["SignatureIncompatible"],
        last_good="1",
        rejected=("3", "Incompatible", None),
    ),
    Case(
        "2 failed as the selector moves to 4: rolled back, then 4 rolls out against 1",
        _status(rollout="2", started_ago_s=20),
        "4",
        _rayservice("2", "DEPLOY_FAILED", "boom"),
        carries="4",
        results=["rolled_back", "started"],
        events=["RolledBack", "RolloutStarted"],
        last_good="1",
        rollout="4",
    ),
    Case(
        "2 answering, selector back to the last good 1: 2 succeeds, then 1 rolls out again",
        _status(rollout="2", started_ago_s=2),
        "1",
        _rayservice("2"),
        app=AppReport("2"),
        carries="1",
        results=["succeeded", "started"],
        events=["RolloutSucceeded", "RolloutStarted"],
        last_good="2",
        rollout="1",
    ),
    Case(
        "2 still loading, selector back to the last good 1: 2 dropped, 1 carried, nothing to roll out",
        _status(rollout="2", started_ago_s=2),
        "1",
        _rayservice("2", "DEPLOYING"),
        carries="1",
        last_good="1",
        rollout=None,
    ),
    Case(
        "2 waiting out a registry-outage back-off, selector → 4: the record goes, 4 rolls out",
        _status(rejected=_outage_record(attempts=1, ago_s=1)),
        "4",
        _rayservice("1"),
        carries="4",
        results=["started"],
        events=["RolloutStarted"],
        rollout="4",
    ),
    Case(
        "paused: a superseded rollout is left to finish",
        _status(rollout="2", started_ago_s=2),
        "3",
        _rayservice("2"),
        app=AppReport("2"),
        spec={"paused": True},
        carries="2",
        rollout="2",
        in_flight=True,
    ),
]


@pytest.mark.parametrize("case", STEADY_AND_GATE + JUDGING + SUPERSEDED, ids=lambda case: case.name)
def test_decide(case: Case) -> None:
    _check(case, _decide(case))


def test_needs_the_facts_it_was_not_given() -> None:
    case = Case("promotion", _status(), "2", _rayservice("1"))
    inputs = Inputs(OWNER, 1, _spec({}), case.status, NOW, DEFAULTS, settle_seconds=5)
    observed = Observation(url=URL, existing=case.existing, resolved="2", facts={"1": FACTS["1"]})
    assert decide(inputs, observed) == NeedFacts("2")


@pytest.mark.parametrize(
    "facts, expected",
    [
        (Unreadable("ValueError: while parsing a flow mapping"), ("2", "Unreadable", None)),
        (RegistryUnreachable("down"), None),
    ],
)
def test_candidate_facts_problems(facts: Any, expected: Any) -> None:
    case = Case("promotion", _status(), "2", _rayservice("1"))
    outcome = _decide(case, {**FACTS, "2": facts})
    got = outcome.status.rejected
    assert ((got.version, got.reason, got.cause) if got else None) == expected
    assert outcome.retry == (expected is None)
    assert serving_version_of(outcome.plan.desired if outcome.plan else None) == "1"


@pytest.mark.parametrize(
    "attempts, ago_s, retried_after_s",
    [(1, 2, 3.0), (2, 2, 8.0), (3, 30, None), (6, 100, 20.0), (9, 100, 20.0)],
)
def test_outage_back_off_doubles_and_is_capped(
    attempts: int, ago_s: float, retried_after_s: float | None
) -> None:
    case = Case("outage", _status(rejected=_outage_record(attempts, ago_s)), "2", _rayservice("1"))
    outcome = _decide(case)
    assert outcome.requeue_after_s == retried_after_s
    started = outcome.status.rollout_version == "2"
    assert started == (retried_after_s is None)
    if started:
        assert outcome.status.rollout_attempt == attempts + 1


def test_roll_back_records_the_attempt_count() -> None:
    status = _status(rollout="2", started_ago_s=20, attempt=3)
    case = Case("third attempt", status, "2", _rayservice("2"), app=SWITCH_FAILED_REGISTRY)
    rejected = _decide(case).status.rejected
    assert rejected is not None and rejected.attempts == 3 and "retried in 20s" in rejected.message


@pytest.mark.parametrize(
    "rollout, app_status, asked",
    [("2", "RUNNING", True), ("2", "DEPLOYING", False), (None, "RUNNING", False)],
)
def test_the_app_is_asked_only_while_a_running_rollout_is_judged(
    rollout: str | None, app_status: str, asked: bool
) -> None:
    status = _status(rollout=rollout)
    assert wants_app_report(status, _rayservice(rollout or "1", app_status), OWNER.name) == asked


def test_credentials_problem_decides_nothing_else() -> None:
    inputs = Inputs(OWNER, 1, make_spec(), _status(), NOW, DEFAULTS)
    outcome = decide(inputs, Observation(url=URL, credentials_problem="secret ml/mlflow-auth not found"))
    assert isinstance(outcome, Outcome) and outcome.retry and outcome.plan is None
    ready = c.get_condition(outcome.status.conditions, c.READY)
    assert ready is not None and ready.reason == "CredentialsUnavailable"


@pytest.mark.parametrize(
    ("ignored", "condition", "events"),
    [
        (None, None, []),  # no Secret named: nothing to say
        ((), ("True", "AllKeysUsed"), []),
        (("LD_PRELOAD", "PYTHONPATH"), ("False", "KeysIgnored"), ["CredentialKeysIgnored"]),
    ],
)
def test_ignored_credential_keys_are_named_in_status(
    ignored: tuple[str, ...] | None, condition: tuple[str, str] | None, events: list[str]
) -> None:
    inputs = Inputs(OWNER, 1, _spec({}), _status(), NOW, DEFAULTS)
    observed = Observation(url=URL, resolved="1", facts=FACTS, ignored_credential_keys=ignored)
    outcome = decide(inputs, observed)
    assert isinstance(outcome, Outcome)
    got = c.get_condition(outcome.status.conditions, c.CREDENTIALS_ACCEPTED)
    assert (got.status, got.reason) == condition if got else condition is None
    assert [e.reason for e in outcome.events if e.reason == "CredentialKeysIgnored"] == events
    if ignored:
        assert got is not None and all(key in got.message for key in ignored)
