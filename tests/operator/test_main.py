"""One resource's pass as the operator's loop runs it: status merge patches, Events, scheduling. No
cluster (the loop against the API server: tests/k8s/test_operator_*)."""

from __future__ import annotations

from typing import Any

import pytest
from regserve_operator import operator_state
from regserve_operator.decide import Event
from regserve_operator.settings import Settings

from .fakes import World, signature
from .helpers import OWNER, make_spec


@pytest.fixture
def world_state(monkeypatch: pytest.MonkeyPatch) -> tuple[World, operator_state.State, list[tuple[str, str]]]:
    world = World(make_spec())
    world.server.add("1", signature(prompt="string"))
    world.server.add("2", signature(text="string"))
    world.server.aliases["champion"] = "1"
    events: list[tuple[str, str]] = []

    def post(body: Any, event: Event) -> None:
        events.append((event.type, event.reason))

    state = operator_state.State(Settings(webhook_port=0, metrics_port=0), world.deps, post_event=post)
    return world, state, events


def _body(world: World, status: dict[str, Any]) -> dict[str, Any]:
    return {
        "metadata": {"name": OWNER.name, "namespace": OWNER.namespace, "uid": OWNER.uid, "generation": 1},
        "spec": world.spec.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "status": status,
    }


def _apply(status: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """JSON merge patch of the status, as the API server applies it."""
    merged = dict(status)
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def test_handle_writes_status_and_clears_fields(world_state: Any) -> None:
    world, state, events = world_state
    key = (OWNER.namespace, OWNER.name)
    stored: dict[str, Any] = {"kopf": {"progress": {}}}  # kopf's own field stays untouched
    patch = operator_state.handle(state, key, OWNER.uid, 1, _body(world, stored), world.now)
    stored = _apply(stored, patch)
    assert stored["servingVersion"] == "1" and stored["rolloutVersion"] == "1" and "kopf" in stored
    assert events == [("Normal", "RolloutStarted"), ("Normal", "Created")]

    world.target.set_app_status("RUNNING")
    world.advance(11)
    patch = operator_state.handle(state, key, OWNER.uid, 1, _body(world, stored), world.now)
    assert patch["rolloutVersion"] is None  # cleared fields are sent as null
    stored = _apply(stored, patch)
    assert "rolloutVersion" not in stored and stored["lastGoodVersion"] == "1"


def test_stale_body_does_not_repeat_events(world_state: Any) -> None:
    world, state, events = world_state
    key = (OWNER.namespace, OWNER.name)
    operator_state.handle(state, key, OWNER.uid, 1, _body(world, {}), world.now)
    world.server.aliases["champion"] = "2"  # incompatible
    world.advance(31)
    # The body still shows no status at all.
    operator_state.handle(state, key, OWNER.uid, 1, _body(world, {}), world.now)
    operator_state.handle(state, key, OWNER.uid, 1, _body(world, {}), world.now)
    assert [r for _, r in events].count("SignatureIncompatible") == 1
    assert [r for _, r in events].count("Created") == 1


def test_invalid_spec_is_reported_once(world_state: Any) -> None:
    world, state, events = world_state
    key = (OWNER.namespace, OWNER.name)
    body = _body(world, {})
    body["spec"]["model"]["version"] = "3"  # two selectors (the API server's CEL would refuse this)
    stored: dict[str, Any] = {}
    for _ in range(2):
        patch = operator_state.handle(state, key, OWNER.uid, 1, {**body, "status": stored}, world.now)
        stored = _apply(stored, patch)
    ready = next(c for c in stored["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec" and "exactly one" in ready["message"]
    assert events == [("Warning", "InvalidSpec")]
    assert world.target.objects == {}


def test_metrics_count_reconciles_and_rollouts(world_state: Any) -> None:
    from prometheus_client import REGISTRY

    world, state, _ = world_state

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    before = (
        sample("regserve_reconciles_total", result="ok"),
        sample("regserve_rollouts_total", outcome="started"),
    )
    operator_state.handle(state, (OWNER.namespace, OWNER.name), OWNER.uid, 1, _body(world, {}), world.now)
    after = (
        sample("regserve_reconciles_total", result="ok"),
        sample("regserve_rollouts_total", outcome="started"),
    )
    assert after == (before[0] + 1, before[1] + 1)


def test_rollout_phase_and_weight_gauges() -> None:
    from prometheus_client import REGISTRY
    from regserve_operator import metrics

    def phase(name: str) -> list[str]:
        return [
            p
            for p in metrics.PHASES
            if REGISTRY.get_sample_value(
                "regserve_rollout_phase", {"resource_namespace": "g", "resource": name, "phase": p}
            )
        ]

    def weight(name: str) -> float | None:
        labels = {"resource_namespace": "g", "resource": name}
        return REGISTRY.get_sample_value("regserve_rollout_weight_percent", labels)

    metrics.record_rollout("g", "a", "Canary", 10)
    metrics.record_rollout("g", "b", None, None)
    assert (phase("a"), weight("a"), phase("b"), weight("b")) == (["Canary"], 10.0, ["Idle"], 0.0)
    metrics.record_rollout("g", "a", "Switching", 100)
    assert (phase("a"), weight("a")) == (["Switching"], 100.0)
    metrics.forget_rollout("g", "a")
    assert (phase("a"), weight("a")) == ([], None)
