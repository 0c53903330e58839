"""The tenant policy: the decision on typed values (table-driven), and what the reconcile does with it:
Ready=False PolicyViolation, one Event, nothing read from a refused registry, nothing written."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
from regserve_operator import conditions as c
from regserve_operator.policy import (
    OFF,
    Policy,
    Rule,
    effective_resources,
    tracking_uri_allowed,
    violations,
)
from regserve_operator.ports import ModelFacts
from regserve_operator.settings import Settings
from regserve_operator.sizing import GiB, ReplicaSize

from .fakes import World, signature
from .helpers import OWNER, make_spec

SHARED = Policy(
    tracking_uri_prefixes=("http://mlflow:5000", "https://mlflow.example.com/team-a/"),
    images=("regserve/ray:approved",),
    service_accounts=("ray-reader",),
    max_replicas=4,
    max_replica_memory_bytes=8 * GiB,
)


def _size(memory_gib: float = 2, gpus: int = 0) -> ReplicaSize:
    return ReplicaSize(memory_bytes=int(memory_gib * GiB), gpus=gpus, cpus=1.0, basis="")


@dataclass(frozen=True)
class Case:
    name: str
    spec: dict[str, Any]
    want: list[tuple[str, Rule]]  # (field, rule) in order
    policy: Policy = SHARED
    size: ReplicaSize | None = None


CASES = [
    Case("within policy", {}, []),
    Case("within policy, sized", {}, [], size=_size(8)),
    Case(
        "tracking uri elsewhere",
        {"registry": {"trackingUri": "http://evil.example.net/"}},
        [("spec.registry.trackingUri", "TrackingUriNotAllowed")],
    ),
    Case(
        "tracking uri sharing the prefix's host text",
        {"registry": {"trackingUri": "http://mlflow:5000.evil.net/"}},
        [("spec.registry.trackingUri", "TrackingUriNotAllowed")],
    ),
    Case(
        "tracking uri under an allowed path",
        {"registry": {"trackingUri": "https://mlflow.example.com/team-a/api"}},
        [],
    ),
    Case(
        "tracking uri beside an allowed path",
        {"registry": {"trackingUri": "https://mlflow.example.com/team-b"}},
        [("spec.registry.trackingUri", "TrackingUriNotAllowed")],
    ),
    Case(
        "any tracking uri when no prefixes are listed",
        {"registry": {"trackingUri": "http://anywhere:5000"}},
        [],
        policy=Policy(),
    ),
    Case("approved image", {"rayService": {"image": "regserve/ray:approved"}}, []),
    Case(
        "other image",
        {"rayService": {"image": "attacker/ray:latest"}},
        [("spec.rayService.image", "ImageNotAllowed")],
    ),
    Case(
        "no image overridable by default",
        {"rayService": {"image": "regserve/ray:approved"}},
        [("spec.rayService.image", "ImageNotAllowed")],
        policy=Policy(),
    ),
    Case("allowed service account", {"rayService": {"serviceAccountName": "ray-reader"}}, []),
    Case(
        "other service account",
        {"rayService": {"serviceAccountName": "admin"}},
        [("spec.rayService.serviceAccountName", "ServiceAccountNotAllowed")],
    ),
    Case("pull secrets stay in the namespace", {"rayService": {"imagePullSecrets": [{"name": "x"}]}}, []),
    Case(
        "gpu asked for",
        {"resources": {"accelerator": "gpu"}},
        [("spec.resources.accelerator", "GpuNotAllowed")],
    ),
    Case("gpu allowed", {"resources": {"accelerator": "gpu"}}, [], policy=replace(SHARED, allow_gpus=True)),
    Case(
        "gpu placement",
        {"resources": {"gpuNodeSelector": {"a": "b"}, "gpuTolerations": [{"operator": "Exists"}]}},
        [
            ("spec.resources.gpuNodeSelector", "GpuPlacementNotAllowed"),
            ("spec.resources.gpuTolerations", "GpuPlacementNotAllowed"),
        ],
    ),
    Case(
        "gpu placement allowed",
        {"resources": {"gpuTolerations": [{"operator": "Exists"}]}},
        [],
        policy=replace(SHARED, allow_gpu_placement=True),
    ),
    Case("replicas at the limit", {"serving": {"replicas": 4}}, []),
    Case("too many replicas", {"serving": {"replicas": 5}}, [("spec.serving.replicas", "TooManyReplicas")]),
    Case(
        "autoscaling beyond the limit",
        {"serving": {"autoscaling": {"minReplicas": 0, "maxReplicas": 9}}},
        [("spec.serving.autoscaling.maxReplicas", "TooManyReplicas")],
    ),
    Case(
        "sized beyond the memory limit",
        {},
        [("spec.resources.memoryMultiplier", "TooMuchMemory")],
        size=_size(8.5),
    ),
    Case("sized to a gpu", {}, [("status.sizing.gpus", "GpuNotAllowed")], size=_size(2, gpus=1)),
    Case(
        "everything at once",
        {
            "registry": {"trackingUri": "http://evil/"},
            "rayService": {"image": "x", "serviceAccountName": "y"},
            "resources": {"accelerator": "gpu"},
            "serving": {"replicas": 100},
        },
        [
            ("spec.registry.trackingUri", "TrackingUriNotAllowed"),
            ("spec.rayService.image", "ImageNotAllowed"),
            ("spec.rayService.serviceAccountName", "ServiceAccountNotAllowed"),
            ("spec.resources.accelerator", "GpuNotAllowed"),
            ("spec.serving.replicas", "TooManyReplicas"),
        ],
    ),
    Case(
        "policy off",
        {"rayService": {"image": "x"}, "resources": {"accelerator": "gpu"}, "serving": {"replicas": 100}},
        [],
        policy=OFF,
        size=_size(100, gpus=1),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_violations(case: Case) -> None:
    spec = make_spec(**case.spec) if "registry" not in case.spec else _with_registry(case.spec)
    found = violations(spec, case.size, case.policy)
    assert [(v.field, v.rule) for v in found] == case.want


def _with_registry(overrides: dict[str, Any]) -> Any:
    return make_spec(**{**overrides, "registry": {**overrides["registry"]}})


@pytest.mark.parametrize(
    ("uri", "prefixes", "allowed"),
    [
        ("http://mlflow:5000", ("http://mlflow:5000/",), True),
        ("http://mlflow:5000/x", ("http://mlflow:5000",), True),
        ("http://mlflow:50001", ("http://mlflow:5000",), False),
        ("http://mlflow:5000@evil.net/", ("http://mlflow:5000",), False),
        ("https://a.example.com/", ("https://",), True),
        ("http://a.example.com/", ("https://",), False),
    ],
)
def test_tracking_uri_prefixes_match_at_a_path_boundary(
    uri: str, prefixes: tuple[str, ...], allowed: bool
) -> None:
    assert tracking_uri_allowed(uri, prefixes) is allowed


@pytest.mark.parametrize(
    ("accelerator", "policy", "want"),
    [
        ("auto", SHARED, "cpu"),
        ("auto", replace(SHARED, allow_gpus=True), "auto"),
        ("auto", OFF, "auto"),
        ("gpu", SHARED, "gpu"),  # refused from the spec instead
        ("cpu", SHARED, "cpu"),
    ],
)
def test_auto_never_sizes_to_a_gpu_where_gpus_are_refused(
    accelerator: str, policy: Policy, want: str
) -> None:
    resources = make_spec(resources={"accelerator": accelerator}).resources
    assert effective_resources(resources, policy).accelerator == want


def test_violation_messages_bound_what_the_tenant_wrote() -> None:
    found = violations(make_spec(rayService={"image": "x" * 500}), None, SHARED)
    assert len(found[0].text()) < 300 and "spec.rayService.image" in found[0].text()


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().policy() == Policy()  # the defaults are the shared-cluster ones
    monkeypatch.setenv("REGSERVE_POLICY_TRACKING_URI_PREFIXES", '["https://mlflow.example.com"]')
    monkeypatch.setenv("REGSERVE_POLICY_IMAGES", '["a/b:1"]')
    monkeypatch.setenv("REGSERVE_POLICY_SERVICE_ACCOUNTS", '["ray"]')
    monkeypatch.setenv("REGSERVE_POLICY_ALLOW_GPUS", "true")
    monkeypatch.setenv("REGSERVE_POLICY_MAX_REPLICAS", "3")
    monkeypatch.setenv("REGSERVE_POLICY_MAX_REPLICA_MEMORY_GIB", "4")
    assert Settings().policy() == Policy(
        tracking_uri_prefixes=("https://mlflow.example.com",),
        images=("a/b:1",),
        service_accounts=("ray",),
        allow_gpus=True,
        max_replicas=3,
        max_replica_memory_bytes=4 * GiB,
    )
    monkeypatch.setenv("REGSERVE_POLICY_ENABLED", "false")
    assert not Settings().policy().enabled


# ------------------------------------------------------------------------------------- the reconcile


def _world(policy: Policy = SHARED, **spec: Any) -> World:
    world = World(make_spec(**spec), policy=policy)
    world.server.add("1", signature(prompt="string"))
    world.server.aliases["champion"] = "1"
    return world


def _ready(world: World) -> c.Condition:
    ready = c.get_condition(world.status.conditions, c.READY)
    assert ready is not None
    return ready


def test_a_refused_registry_is_never_contacted_and_nothing_is_written() -> None:
    world = _world(
        registry={"trackingUri": "http://evil:5000", "credentialsSecretRef": {"name": "mlflow-auth"}}
    )
    calls: list[str] = []

    def resolve(*args: Any, **kwargs: Any) -> str:
        calls.append("resolve")
        return "1"

    world.registry.resolve = resolve  # type: ignore[method-assign]
    for _ in range(3):
        outcome = world.step()
        assert outcome.plan is None and not outcome.tag_writes
    ready = _ready(world)
    assert (ready.status, ready.reason) == ("False", "PolicyViolation")
    assert "spec.registry.trackingUri" in ready.message
    assert world.target.secret_reads == [] and calls == [] and world.target.applied == []
    assert world.events == [("Warning", "PolicyViolation")]  # one Event, not one per pass


def test_a_serving_resource_changed_beyond_policy_keeps_serving() -> None:
    world = _world(serving={"replicas": 2})
    world.step()
    world.target.set_app_status("RUNNING")
    world.step()
    assert _ready(world).reason == "Serving"
    before = world.rayservice()
    applied = len(world.target.applied)
    world.spec = make_spec(serving={"replicas": 20})
    world.step()
    world.step()
    ready = _ready(world)
    assert (ready.status, ready.reason) == ("False", "PolicyViolation")
    assert "spec.serving.replicas: 20" in ready.message
    assert len(world.target.applied) == applied and world.rayservice() == before
    assert world.status.serving_version == "1"
    assert world.events.count(("Warning", "PolicyViolation")) == 1
    world.spec = make_spec(serving={"replicas": 3})  # back within policy: the refusal ends
    world.step()
    assert _ready(world).reason != "PolicyViolation"
    assert len(world.target.applied) == applied + 1


def test_memory_is_checked_where_sizing_decides_it() -> None:
    world = _world()
    big = 6 * GiB  # 1 GiB + 2.0 x 6 GiB x 2 models > 8 GiB
    world.server.facts["1"] = replace(world.server.facts["1"], model_size_bytes=big)
    outcome = world.step()
    assert outcome.plan is None and world.target.applied == []
    ready = _ready(world)
    assert (ready.reason, "spec.resources.memoryMultiplier" in ready.message) == ("PolicyViolation", True)


def test_auto_sizes_a_big_torch_model_to_cpus_where_gpus_are_refused() -> None:
    world = _world()
    facts = world.server.facts["1"]
    world.server.facts["1"] = ModelFacts(
        facts.name, "1", facts.signature, ("pytorch",), 2 * GiB, facts.requirements
    )
    world.deps.policy = replace(SHARED, max_replica_memory_bytes=64 * GiB)
    world.step()
    assert world.status.sizing is not None and world.status.sizing.gpus == 0
    worker = world.rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert "nvidia.com/gpu" not in worker["containers"][0]["resources"]["limits"]
    assert OWNER.name == world.rayservice()["metadata"]["name"]


@pytest.mark.parametrize(
    ("policy", "reads"),
    [
        (Policy(), False),  # the shared-cluster default: only through the artifact proxy
        (Policy(artifact_reads_outside_proxy=True), True),
        (Policy(enabled=False), True),  # a single-team install
    ],
)
def test_reads_outside_the_artifact_proxy(policy: Policy, reads: bool) -> None:
    assert policy.allows_reads_outside_proxy is reads
