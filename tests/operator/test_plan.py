from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest
from regserve_operator import builders as b
from regserve_operator.plan import is_subset, make_plan
from regserve_operator.sizing import GiB, MiB, size_replica

from .helpers import DEFAULTS, OWNER, make_spec


def _desired(
    version: str = "3", model_bytes: int = 100 * MiB, previous: Any = None, **spec_overrides: Any
) -> dict[str, Any]:
    spec = make_spec(**spec_overrides)
    size = size_replica(
        model_size_bytes=model_bytes,
        flavors=["sklearn"],
        serving=spec.serving,
        resources=spec.resources,
        previous=previous,
    )
    return b.build_rayservice(OWNER, spec, version, size, DEFAULTS)


def _as_stored(body: dict[str, Any]) -> dict[str, Any]:
    """What the API server returns: our body plus server fields and defaults."""
    stored = copy.deepcopy(body)
    stored["metadata"]["resourceVersion"] = "100"
    stored["metadata"]["uid"] = "rs-uid"
    stored["spec"]["rayClusterConfig"]["headGroupSpec"]["serviceType"] = "ClusterIP"  # a server default
    stored["status"] = {"serviceStatus": "Running"}
    return stored


def _apply(stored: dict[str, Any], plan: Any) -> dict[str, Any]:
    return jsonpatch.apply_patch(stored, plan.patch)


CASES = [
    ("nothing exists -> create", lambda: _desired(), lambda: None, "create", ()),
    ("same -> nothing", lambda: _desired(), lambda: _as_stored(_desired()), "none", ()),
    (
        "promotion of a similar size -> serve config only",
        lambda: _desired("4", 110 * MiB),
        lambda: _as_stored(_desired("3", 100 * MiB)),
        "patch_serve_config",
        ("serveConfigV2",),
    ),
    (
        "promotion that needs more memory -> cluster",
        lambda: _desired("4", 3 * GiB),
        lambda: _as_stored(_desired("3", 100 * MiB)),
        "patch_cluster",
        ("rayClusterConfig", "serveConfigV2"),
    ),
    (
        "replicas changed -> worker bounds, in place (KubeRay keeps the cluster)",
        lambda: _desired(serving={"replicas": 2}),
        lambda: _as_stored(_desired()),
        "patch_serve_config",
        ("workerBounds", "serveConfigV2"),
    ),
    (
        "autoscaling bounds widened -> worker bounds, in place",
        lambda: _desired(serving={"autoscaling": {"minReplicas": 0, "maxReplicas": 8}}),
        lambda: _as_stored(_desired(serving={"autoscaling": {"minReplicas": 1, "maxReplicas": 2}})),
        "patch_serve_config",
        ("workerBounds", "serveConfigV2"),
    ),
    (
        "autoscaling target changed -> serve config only",
        lambda: _desired(serving={"autoscaling": {"maxReplicas": 4, "targetOngoingRequests": 5}}),
        lambda: _as_stored(_desired(serving={"autoscaling": {"maxReplicas": 4}})),
        "patch_serve_config",
        ("serveConfigV2",),
    ),
    (
        "fixed replicas -> autoscaling: the in-tree autoscaler is a new cluster",
        lambda: _desired(serving={"autoscaling": {"maxReplicas": 4}}),
        lambda: _as_stored(_desired()),
        "patch_cluster",
        ("rayClusterConfig", "serveConfigV2"),
    ),
    (
        "gpu dropped -> cluster (removal seen through the hash)",
        lambda: _desired(),
        lambda: _as_stored(_desired(resources={"accelerator": "gpu"})),
        "patch_cluster",
        ("rayClusterConfig", "serveConfigV2"),
    ),
    (
        "upgrade strategy set -> serve config patch path",
        lambda: _desired(rayService={"upgradeStrategy": {"type": "NewCluster"}}),
        lambda: _as_stored(_desired()),
        "patch_serve_config",
        ("upgradeStrategy",),
    ),
]


@pytest.mark.parametrize(("case", "desired", "existing", "action", "changes"), CASES)
def test_make_plan(case: str, desired: Any, existing: Any, action: str, changes: tuple[str, ...]) -> None:
    want, have = desired(), existing()
    plan = make_plan(want, have)
    assert plan.action == action, plan
    assert plan.changes == changes or action == "create"
    if plan.action.startswith("patch"):
        after = _apply(have, plan)
        assert after["spec"]["serveConfigV2"] == want["spec"]["serveConfigV2"]
        assert is_subset(want["spec"]["rayClusterConfig"], after["spec"]["rayClusterConfig"])
        assert make_plan(want, after).action == "none"  # applying the plan converges


def test_similar_size_promotion_leaves_cluster_untouched() -> None:
    have = _as_stored(_desired("3", 100 * MiB))
    plan = make_plan(_desired("4", 120 * MiB), have)
    assert {op["path"] for op in plan.patch} == {"/metadata/resourceVersion", "/spec/serveConfigV2"}
    assert _apply(have, plan)["spec"]["rayClusterConfig"] == have["spec"]["rayClusterConfig"]


def test_patch_is_guarded_by_resource_version() -> None:
    plan = make_plan(_desired("4"), _as_stored(_desired("3")))
    assert plan.patch[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "100"}


def test_not_ours_is_a_conflict() -> None:
    have = _as_stored(_desired())
    have["metadata"]["ownerReferences"] = []
    plan = make_plan(_desired(), have)
    assert plan.action == "conflict" and not plan.writes and "not owned" in plan.message


def test_foreign_label_edits_are_kept() -> None:
    have = _as_stored(_desired())
    have["metadata"]["labels"] = {"team": "a"}
    plan = make_plan(_desired(), have)
    after = _apply(have, plan)
    assert after["metadata"]["labels"]["team"] == "a"
    assert after["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "regserve"


@pytest.mark.parametrize(
    ("want", "have", "expected"),
    [
        ({"a": 1}, {"a": 1, "b": 2}, True),
        ({"a": 1}, {"a": 2}, False),
        ({"a": [1, 2]}, {"a": [1, 2]}, True),
        ({"a": [1]}, {"a": [1, 2]}, False),
        ({"cpu": 1}, {"cpu": "1"}, True),
        ({"a": {"b": 1}}, {"a": None}, False),
        ({"flag": True}, {"flag": "True"}, False),
    ],
)
def test_is_subset(want: Any, have: Any, expected: bool) -> None:
    assert is_subset(want, have) is expected
