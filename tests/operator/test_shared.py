"""The shared RayService one member writes (pure): its application beside the others', every member
an owner, one cluster for all, and the members it refuses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from regserve_operator import shared
from regserve_operator.builders import LABEL_CLUSTER, Owner, build_rayservice
from regserve_operator.plan import make_plan
from regserve_operator.sizing import GiB, size_replica
from regserve_operator.spec import RegisteredModelServingSpec, Sizing, parse_spec

from .helpers import DEFAULTS

CLUSTER = "shared-cpu"


def spec_of(**overrides: Any) -> RegisteredModelServingSpec:
    body: dict[str, Any] = {
        "model": {"name": "m", "alias": "champion"},
        "registry": {"trackingUri": "http://mlflow:5000"},
        "placement": {"cluster": CLUSTER},
    }
    body.update(overrides)
    return parse_spec(body)


@dataclass(frozen=True)
class Resource:
    name: str
    created: str
    spec: RegisteredModelServingSpec = field(default_factory=spec_of)
    model_bytes: int = 100 * 2**20

    @property
    def owner(self) -> Owner:
        return Owner(self.name, "ml", f"uid-{self.name}")

    def size(self) -> Any:
        return size_replica(
            model_size_bytes=self.model_bytes,
            flavors=(),
            serving=self.spec.serving,
            resources=self.spec.resources,
            previous=None,
        )

    def peer(self) -> shared.Peer:
        size = self.size()
        return shared.Peer(self.owner, self.created, self.spec, Sizing(memory_bytes=size.memory_bytes))

    def write(self, existing: dict[str, Any] | None, peers: list[shared.Peer], version: str = "1") -> Any:
        own = build_rayservice(self.owner, self.spec, version, self.size(), DEFAULTS)
        return shared.compose(self.owner, self.spec, self.size(), own, existing, peers, DEFAULTS)


A = Resource("a", "2026-01-01T00:00:00Z")
B = Resource("b", "2026-01-02T00:00:00Z")
C = Resource("c", "2026-01-03T00:00:00Z")


def apps(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    config = yaml.safe_load(body["spec"]["serveConfigV2"])
    return {app["name"]: app for app in config["applications"]}


def owners(body: dict[str, Any]) -> list[str]:
    return [ref["name"] for ref in body["metadata"]["ownerReferences"]]


def workers(body: dict[str, Any]) -> tuple[int, int]:
    (group,) = body["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group["minReplicas"], group["maxReplicas"]


def default_version(body: dict[str, Any], app: str) -> str:
    return str(apps(body)[app]["deployments"][0]["user_config"]["default_version"])


def written(*steps: tuple[Resource, list[Resource], str]) -> dict[str, Any] | None:
    """The shared RayService after each (writer, members listed, version) write in turn."""
    body: dict[str, Any] | None = None
    for writer, listed, version in steps:
        result = writer.write(body, [r.peer() for r in listed], version)
        assert isinstance(result, dict), result
        body = result
    return body


@pytest.mark.parametrize(
    ("case", "steps", "want_apps", "want_owners", "want_workers"),
    [
        ("a first member alone", [(A, [A], "1")], {"a": "1"}, ["a"], (1, 1)),
        ("the first write when the list does not show it yet", [(A, [], "1")], {"a": "1"}, ["a"], (1, 1)),
        (
            "a second member joins beside the first",
            [(A, [A], "1"), (B, [A, B], "4")],
            {"a": "1", "b": "4"},
            ["a", "b"],
            (2, 2),
        ),
        (
            "owners and applications in member order (oldest first), whoever writes",
            [(C, [C, A, B], "7"), (A, [C, A, B], "1"), (B, [B, C, A], "4")],
            {"a": "1", "b": "4", "c": "7"},
            ["a", "b", "c"],
            (3, 3),
        ),
        (
            "a member deleted is dropped by the next write of another",
            [(A, [A, B, C], "1"), (B, [A, B, C], "4"), (C, [A, B, C], "7"), (A, [A, C], "1")],
            {"a": "1", "c": "7"},
            ["a", "c"],
            (2, 2),
        ),
        (
            "a member listed but not written yet is an owner without an application",
            [(A, [A, B], "1")],
            {"a": "1"},
            ["a", "b"],
            (2, 2),
        ),
        (
            "autoscaling bounds of all members bound the worker pods",
            [
                (
                    Resource(
                        "a", A.created, spec_of(serving={"autoscaling": {"minReplicas": 1, "maxReplicas": 4}})
                    ),
                    [],
                    "1",
                ),
            ],
            {"a": "1"},
            ["a"],
            (1, 4),
        ),
    ],
)
def test_compose(
    case: str,
    steps: list[tuple[Resource, list[Resource], str]],
    want_apps: dict[str, str],
    want_owners: list[str],
    want_workers: tuple[int, int],
) -> None:
    body = written(*steps)
    assert body is not None
    assert {name: default_version(body, name) for name in apps(body)} == want_apps, case
    assert owners(body) == want_owners, case
    assert all(ref["controller"] is False for ref in body["metadata"]["ownerReferences"]), case
    assert workers(body) == want_workers, case
    assert body["metadata"]["name"] == CLUSTER and body["metadata"]["labels"][LABEL_CLUSTER] == CLUSTER


def test_an_unsized_peer_is_neither_owner_nor_application() -> None:
    unsized = shared.Peer(B.owner, B.created, B.spec, None)
    body = A.write(None, [A.peer(), unsized])
    assert isinstance(body, dict)
    assert owners(body) == ["a"] and list(apps(body)) == ["a"]


def test_a_promotion_changes_only_its_own_application() -> None:
    before = written((A, [A, B], "1"), (B, [A, B], "4"))
    after = B.write(before, [A.peer(), B.peer()], "5")
    assert isinstance(before, dict) and isinstance(after, dict)
    assert apps(after)["a"] == apps(before)["a"]
    assert default_version(after, "b") == "5"
    plan = make_plan(after, {**before, "metadata": {**before["metadata"], "resourceVersion": "9"}})
    assert plan.action == "patch_serve_config" and plan.changes == ("serveConfigV2",)
    assert not plan.replans  # a conflict is decided again from the fresh object, not re-sent


@pytest.mark.parametrize(
    ("case", "joiner", "reason", "words"),
    [
        (
            "another image than the leader's",
            Resource("b", B.created, spec_of(rayService={"image": "other:1"})),
            "ClusterConflict",
            ["image", "a's"],
        ),
        (
            "another registry than the leader's",
            Resource("b", B.created, spec_of(registry={"trackingUri": "http://other:5000"})),
            "ClusterConflict",
            ["registry.trackingUri"],
        ),
        (
            "another ingress mode than the leader's",
            Resource("b", B.created, spec_of(serving={"ingressMode": "proxy"})),
            "ClusterConflict",
            ["serving.ingressMode"],
        ),
        (
            "HAProxy's ingress metrics where the leader has them off",
            Resource("b", B.created, spec_of(serving={"ingressMetrics": True})),
            "ClusterConflict",
            ["serving.ingressMetrics"],
        ),
        (
            "the route prefix of an older member",
            Resource("b", B.created, spec_of(serving={"routePrefix": "/a"})),
            "ClusterConflict",
            ["routePrefix"],
        ),
        (
            "a replica no worker pod may hold",
            Resource("b", B.created, model_bytes=40 * GiB),
            "DoesNotFit",
            ["fits no worker pod"],
        ),
    ],
)
def test_refused_members_leave_the_cluster_as_it_is(
    case: str, joiner: Resource, reason: str, words: list[str]
) -> None:
    result = joiner.write(written((A, [A], "1")), [A.peer(), joiner.peer()])
    assert isinstance(result, shared.Refused), case
    assert result.reason == reason, case
    assert all(word in result.message for word in words), (case, result.message)


def test_the_leaders_view_leaves_a_conflicting_member_out() -> None:
    other = Resource("b", B.created, spec_of(rayService={"image": "other:1"}))
    body = A.write(None, [A.peer(), other.peer()])
    assert isinstance(body, dict) and owners(body) == ["a"]


@pytest.mark.parametrize(
    ("case", "existing_labels", "existing_owners", "action"),
    [
        ("a shared RayService of that name", {LABEL_CLUSTER: CLUSTER}, ["uid-x"], "patch_serve_config"),
        ("a RayService of one resource with that name", {}, ["uid-x"], "conflict"),
        ("a shared RayService of another cluster", {LABEL_CLUSTER: "other"}, ["uid-x"], "conflict"),
    ],
)
def test_whose_rayservice_a_member_may_write(
    case: str, existing_labels: dict[str, str], existing_owners: list[str], action: str
) -> None:
    body = A.write(None, [A.peer()])
    assert isinstance(body, dict)
    existing = {
        "metadata": {
            "name": CLUSTER,
            "labels": existing_labels,
            "ownerReferences": [{"uid": uid} for uid in existing_owners],
            "resourceVersion": "3",
        },
        "spec": {"rayClusterConfig": body["spec"]["rayClusterConfig"], "serveConfigV2": ""},
    }
    existing["metadata"]["annotations"] = body["metadata"]["annotations"]
    assert make_plan(body, existing).action == action, case


def test_peer_of_skips_what_cannot_be_a_member() -> None:
    good = {
        "metadata": {"name": "a", "namespace": "ml", "uid": "u", "creationTimestamp": A.created},
        "spec": {"model": {"name": "m", "alias": "x"}, "registry": {"trackingUri": "http://m:1"}},
        "status": {"sizing": {"memoryBytes": 5}},
    }
    peer = shared.peer_of(good)
    assert peer is not None and peer.sizing is not None and peer.sizing.memory_bytes == 5
    assert shared.peer_of({**good, "spec": {"model": {}}}) is None
    deleting = {**good, "metadata": {**good["metadata"], "deletionTimestamp": "2026-01-05T00:00:00Z"}}
    assert shared.peer_of(deleting) is None


def test_a_member_that_turns_conflicting_keeps_what_it_serves() -> None:
    body = written((A, [A, B], "1"), (B, [A, B], "4"))
    changed = Resource("b", B.created, spec_of(rayService={"image": "other:1"}))
    assert isinstance(changed.write(body, [A.peer(), changed.peer()], "5"), shared.Refused)
    after = A.write(body, [A.peer(), changed.peer()], "2")
    assert isinstance(after, dict) and isinstance(body, dict)
    assert owners(after) == ["a", "b"] and apps(after)["b"] == apps(body)["b"]
    assert shared.has_application(after, "b") and not shared.has_application(after, "c")


def test_the_worker_pod_shape_stays_while_it_holds_every_member() -> None:
    big = Resource("a", A.created, model_bytes=900 * 2**20)
    small = Resource("b", B.created)
    with_big = written((big, [big], "1"), (small, [big, small], "1"))
    assert isinstance(with_big, dict)
    shape = with_big["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    # The large member leaves: the pods it needed still hold the rest, so the cluster stays as it is.
    without = small.write(with_big, [small.peer()])
    assert isinstance(without, dict) and owners(without) == ["b"]
    assert without["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"] == shape
    assert without["metadata"]["annotations"] == with_big["metadata"]["annotations"]  # same cluster hash
    # Built afresh, the small member alone would have smaller pods.
    alone = small.write(None, [small.peer()])
    assert isinstance(alone, dict)
    assert alone["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"] != shape


@pytest.mark.parametrize(
    ("mode", "shareable"),
    [("haproxy", False), ("proxy", True)],  # the Python proxy records ingress metrics whatever they say
)
def test_ingress_metrics_split_clusters_only_where_they_act(mode: str, shareable: bool) -> None:
    with_metrics = spec_of(serving={"ingressMode": mode, "ingressMetrics": True})
    without = spec_of(serving={"ingressMode": mode})
    same = shared.cluster_settings(with_metrics, DEFAULTS) == shared.cluster_settings(without, DEFAULTS)
    assert same is shareable
