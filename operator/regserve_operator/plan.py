"""Desired vs existing RayService → the smallest change that gets there. Pure.

The order of preference matters for rollouts: a version change alone is a `serveConfigV2` patch,
which KubeRay applies to the running cluster in place; only a changed cluster shape (image, memory,
GPU) is a `patch_cluster`, which makes KubeRay bring up a new cluster. Worker pod bounds (replicas,
minReplicas, maxReplicas) are patched too when they change, but KubeRay v1.6.2 leaves them out of
the hash that decides on a new cluster, so such a patch stays in place (`patch_serve_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from regserve_operator.builders import ANNOTATION_CLUSTER_HASH, FAST_LOADER, LABEL_CLUSTER, cluster_shape

Action = Literal["create", "patch_serve_config", "patch_cluster", "none", "conflict"]


@dataclass(frozen=True)
class Plan:
    action: Action
    name: str
    namespace: str
    # The full desired RayService, whatever the action: targets that cannot patch (local mode) use it.
    desired: dict[str, Any]
    # patch_*: a JSON Patch (RFC 6902) taking the existing object to the desired one, guarded by a
    # resourceVersion test so a concurrent writer makes it fail rather than be clobbered.
    patch: list[dict[str, Any]] = field(default_factory=list)
    changes: tuple[str, ...] = ()
    message: str = ""
    # Whether a target may plan `desired` again against a fresher object after a conflict. Not for a
    # shared RayService: `desired` carries the other members' applications as they were read.
    replans: bool = True

    @property
    def writes(self) -> bool:
        return self.action in ("create", "patch_serve_config", "patch_cluster")


def make_plan(desired: dict[str, Any], existing: dict[str, Any] | None) -> Plan:
    meta = desired["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    shared = LABEL_CLUSTER in meta["labels"]
    if existing is None:
        return Plan("create", name, namespace, desired, changes=("created",), replans=not shared)
    existing_meta = existing.get("metadata") or {}
    have_owners = [ref.get("uid") for ref in existing_meta.get("ownerReferences") or []]
    if shared:
        ours = (existing_meta.get("labels") or {}).get(LABEL_CLUSTER) == meta["labels"][LABEL_CLUSTER]
        whose = "the shared cluster of that name"
    else:
        ours = meta["ownerReferences"][0]["uid"] in have_owners
        whose = "this RegisteredModelServing"
    if not ours:
        return Plan(
            "conflict",
            name,
            namespace,
            desired,
            message=f"RayService {namespace}/{name} exists and is not owned by {whose}",
        )

    want, have = desired["spec"], existing.get("spec") or {}
    ops: list[dict[str, Any]] = []
    changes: list[str] = []
    want_cluster, have_cluster = want["rayClusterConfig"], have.get("rayClusterConfig")
    cluster_changed = _annotation(existing, ANNOTATION_CLUSTER_HASH) != meta["annotations"][
        ANNOTATION_CLUSTER_HASH
    ] or not is_subset(cluster_shape(want_cluster), _shape_of(have_cluster))
    if cluster_changed or not is_subset(want_cluster, have_cluster):
        ops.append(_set("/spec/rayClusterConfig", want_cluster, have, "rayClusterConfig"))
        ops.append(
            _set_annotation(existing, ANNOTATION_CLUSTER_HASH, meta["annotations"][ANNOTATION_CLUSTER_HASH])
        )
        changes.append("rayClusterConfig" if cluster_changed else "workerBounds")
    # The string we wrote comes back unchanged in the steady state: equal text needs no parse.
    want_serve, have_serve = want["serveConfigV2"], have.get("serveConfigV2")
    if want_serve != have_serve and _parse_yaml(want_serve) != _parse_yaml(have_serve):
        ops.append(_set("/spec/serveConfigV2", want["serveConfigV2"], have, "serveConfigV2"))
        changes.append("serveConfigV2")
    if "upgradeStrategy" in want and not is_subset(want["upgradeStrategy"], have.get("upgradeStrategy")):
        ops.append(_set("/spec/upgradeStrategy", want["upgradeStrategy"], have, "upgradeStrategy"))
        changes.append("upgradeStrategy")
    if not is_subset(meta["labels"], existing_meta.get("labels")):
        ops.append(
            _set(
                "/metadata/labels",
                {**(existing_meta.get("labels") or {}), **meta["labels"]},
                existing_meta,
                "labels",
            )
        )
        changes.append("labels")

    want_owners = [ref["uid"] for ref in meta["ownerReferences"]]
    if shared and want_owners != have_owners:
        ops.append(
            _set("/metadata/ownerReferences", meta["ownerReferences"], existing_meta, "ownerReferences")
        )
        changes.append("owners")

    if not ops:
        return Plan("none", name, namespace, desired, replans=not shared)
    action: Action = "patch_cluster" if cluster_changed else "patch_serve_config"
    # A resourceVersion test makes the patch fail instead of clobbering a concurrent writer.
    rv = existing_meta.get("resourceVersion")
    if rv:
        ops.insert(0, {"op": "test", "path": "/metadata/resourceVersion", "value": rv})
    return Plan(action, name, namespace, desired, patch=ops, changes=tuple(changes), replans=not shared)


def is_subset(want: Any, have: Any) -> bool:
    """True when every field `want` sets has the same value in `have` (which may carry server defaults)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(is_subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(want) == len(have)
            and all(is_subset(w, h) for w, h in zip(want, have, strict=True))
        )
    if isinstance(want, (int, float)) and not isinstance(want, bool) and isinstance(have, str):
        return str(want) == have
    return bool(want == have)


def _shape_of(cluster: Any) -> Any:
    return cluster_shape(cluster) if isinstance(cluster, dict) else cluster


def _set(path: str, value: Any, parent: dict[str, Any], key: str) -> dict[str, Any]:
    return {"op": "replace" if key in parent else "add", "path": path, "value": value}


def _annotation(obj: dict[str, Any], key: str) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(key)


def _set_annotation(obj: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    annotations = (obj.get("metadata") or {}).get("annotations")
    if annotations is None:
        return {"op": "add", "path": "/metadata/annotations", "value": {key: value}}
    escaped = key.replace("~", "~0").replace("/", "~1")
    return {"op": "add", "path": f"/metadata/annotations/{escaped}", "value": value}


def _parse_yaml(text: str | None) -> Any:
    if not text:
        return None
    try:
        return yaml.load(text, Loader=FAST_LOADER)
    except yaml.YAMLError:
        return text
