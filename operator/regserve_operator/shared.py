"""A RayService shared by the resources of one namespace that name the same `spec.placement.cluster`.
Pure: members come in as gathered, the shared RayService goes out.

Each member reconciles on its own, as an unshared resource does, and writes the whole shared object:
- its own application, as it decides it (version, candidate, replica size): other members'
  applications are copied from the RayService as it was read, so a member's promotion changes only
  its application;
- the RayCluster, from what every member agrees on (packing.membership: the oldest member leads)
  and worker pods packed for all of them (packing.plan_group);
- every accepted member as an owner (Kubernetes deletes the RayService with the last one).
A member that left (deleted) is dropped by the next write of any other. Writes are guarded by the
resourceVersion read, and a member that loses a race decides again from the fresh object rather than
re-sending its stale copy of the others' applications (`Plan.replans`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from regserve_operator import packing
from regserve_operator import spec as s
from regserve_operator.builders import (
    ANNOTATION_CLUSTER_HASH,
    FAST_LOADER,
    LABEL_CLUSTER,
    LABEL_MANAGED_BY,
    LABEL_NAME,
    MANAGED_BY,
    BuildDefaults,
    Owner,
    build_cluster_config,
    cluster_shape,
    config_hash,
    owner_reference,
    payload_headers_ref,
    route_prefix,
    serve_config_yaml,
)
from regserve_operator.sizing import GPU_RESOURCE, POD_OVERHEAD, ReplicaSize, WorkerBounds, gpu_placement

# Sorts after every RFC 3339 timestamp.
NEWEST = "9999"


@dataclass(frozen=True)
class Peer:
    """A resource naming the cluster, as read from the API server."""

    owner: Owner
    created: str
    spec: s.RegisteredModelServingSpec
    sizing: s.Sizing | None  # from its status: None until it has sized its replica once


@dataclass(frozen=True)
class Refused:
    """This member cannot join the cluster as it is; the others are not touched."""

    reason: str  # ClusterConflict | DoesNotFit
    message: str


def peer_of(obj: dict[str, Any]) -> Peer | None:
    """A gathered RegisteredModelServing as a peer; None for one whose spec does not parse (its own
    reconcile reports that) or that is being deleted."""
    meta = obj.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    try:
        spec = s.parse_spec(obj.get("spec") or {})
        status = s.parse_status(obj.get("status") or {})
    except ValueError:
        return None
    owner = Owner(str(meta.get("name")), str(meta.get("namespace")), str(meta.get("uid")))
    return Peer(
        owner=owner, created=str(meta.get("creationTimestamp") or ""), spec=spec, sizing=status.sizing
    )


def cluster_settings(spec: s.RegisteredModelServingSpec, defaults: BuildDefaults) -> packing.ClusterSettings:
    """What a member's spec says about the pods every member shares."""
    serving, registry, overrides = spec.serving, spec.registry, spec.ray_service
    auth = serving.auth.token_secret_ref.model_dump_json() if serving.auth else ""
    headers = payload_headers_ref(spec)
    pulls = ",".join(ref.name for ref in overrides.image_pull_secrets or [])
    credentials = registry.credentials_secret_ref.name if registry.credentials_secret_ref else ""
    upgrade = overrides.upgrade_strategy.type if overrides.upgrade_strategy else ""
    gpu_selector, gpu_tolerations = gpu_placement(spec.resources)
    pods = (
        ("registry.trackingUri", registry.tracking_uri),
        ("registry.credentialsSecretRef", credentials),
        ("serving.ingressMode", serving.ingress_mode),
        # HAProxy's setting: the Python proxy records these metrics whatever it says.
        ("serving.ingressMetrics", str(serving.ingress_metrics) if serving.ingress_mode == "haproxy" else ""),
        ("serving.auth", auth),
        # The pods' env holds the sink's headers Secret key, by reference.
        ("monitoring.payloads.sink.http.headersSecretRef", headers.model_dump_json() if headers else ""),
        ("serving.autoscaling", "on" if serving.autoscaling is not None else "off"),
        ("rayService.serviceAccountName", overrides.service_account_name or ""),
        ("rayService.imagePullSecrets", pulls),
        ("rayService.upgradeStrategy", upgrade),
        ("resources.gpuNodeSelector", config_hash(gpu_selector)),
        ("resources.gpuTolerations", config_hash(gpu_tolerations)),
    )
    return packing.ClusterSettings(
        image=overrides.image or defaults.image,
        ray_version=overrides.ray_version or defaults.ray_version,
        accelerator=spec.resources.accelerator,
        pods=pods,
    )


def member(
    owner: Owner,
    created: str,
    spec: s.RegisteredModelServingSpec,
    replica: packing.ReplicaShape,
    defaults: BuildDefaults,
) -> packing.Member:
    fewest, most = spec.serving.replica_bounds()
    return packing.Member(
        name=owner.name,
        created=created,
        settings=cluster_settings(spec, defaults),
        route_prefix=route_prefix(owner.name, spec.serving),
        replica=replica,
        min_replicas=fewest,
        max_replicas=most,
    )


def compose(
    owner: Owner,
    spec: s.RegisteredModelServingSpec,
    size: ReplicaSize,
    own_desired: dict[str, Any],
    existing: dict[str, Any] | None,
    peers: Sequence[Peer],
    defaults: BuildDefaults,
) -> dict[str, Any] | Refused:
    """The shared RayService with this member's application as `own_desired` (its unshared RayService)
    carries it, or why this member cannot be in it."""
    assert spec.placement is not None
    cluster = spec.placement.cluster
    # Peers include this member as listed; absent from the list (just created), it counts as newest.
    created = next((p.created for p in peers if p.owner.uid == owner.uid), NEWEST)
    owners = {owner.name: owner}
    members = [member(owner, created, spec, _shape(size), defaults)]
    for peer in peers:
        if peer.owner.uid == owner.uid or peer.sizing is None or not peer.sizing.memory_bytes:
            continue  # this member is counted with this pass's size; unsized peers join when they size
        owners[peer.owner.name] = peer.owner
        replica = packing.ReplicaShape(
            peer.sizing.memory_bytes, peer.spec.serving.cpus_per_replica, peer.sizing.gpus
        )
        members.append(member(peer.owner, peer.created, peer.spec, replica, defaults))
    joined = packing.membership(members)
    assert joined is not None
    conflict = next((c for c in joined.conflicts if c.member == owner.name), None)
    if conflict is not None:
        return Refused(
            "ClusterConflict",
            f"cluster {cluster}: {', '.join(conflict.fields)} differ from {joined.leader.name}'s, "
            "which leads the cluster (the oldest member); this resource's changes are not applied to it",
        )
    group = packing.plan_group(joined.members, current=_worker_pod(existing))
    assert group is not None  # this member is in it
    if owner.name in group.unfit:
        return Refused(
            "DoesNotFit",
            f"cluster {cluster}: a replica of {size.memory_bytes} bytes, {size.cpus} CPUs, {size.gpus} GPUs "
            "fits no worker pod the cluster may have",
        )
    # Members whose application the cluster carries stay in it even when they now conflict or no longer
    # fit: their own passes say so, and what they serve keeps answering until they are deleted.
    present = set(_apps_of(existing)) if existing is not None else set()
    accepted = [
        m
        for m in packing.ordered(members)
        if m.name == owner.name or m.name in present or (m in joined.members and m.name not in group.unfit)
    ]
    pod_size = _pod_size(group.pod, spec)
    ray_cluster = build_cluster_config(spec, pod_size, defaults, WorkerBounds(group.fewest, group.most))
    body = copy.deepcopy(own_desired)
    meta = body["metadata"]
    meta["name"] = cluster
    meta["labels"] = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_NAME: "regserve", LABEL_CLUSTER: cluster}
    meta["annotations"] = {ANNOTATION_CLUSTER_HASH: config_hash(cluster_shape(ray_cluster))}
    meta["ownerReferences"] = [owner_reference(owners[m.name], controller=False) for m in accepted]
    body["spec"]["rayClusterConfig"] = ray_cluster
    body["spec"]["serveConfigV2"] = serve_config_yaml(
        {"applications": _applications(owner.name, own_desired, existing, [m.name for m in accepted])}
    )
    return body


def has_application(rayservice: dict[str, Any] | None, name: str) -> bool:
    return rayservice is not None and name in _apps_of(rayservice)


def _shape(size: ReplicaSize) -> packing.ReplicaShape:
    return packing.ReplicaShape(memory_bytes=size.memory_bytes, cpus=size.cpus, gpus=size.gpus)


def _worker_pod(rayservice: dict[str, Any] | None) -> packing.PodShape | None:
    """The worker pod shape a shared RayService has now, as `build_cluster_config` writes it (plain
    integers); None for anything else, which a new shape then replaces."""
    cluster = ((rayservice or {}).get("spec") or {}).get("rayClusterConfig") or {}
    for group in cluster.get("workerGroupSpecs") or []:
        try:
            (container,) = group["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            return packing.PodShape(
                memory_bytes=int(limits["memory"]),
                cpus=int(limits["cpu"]),
                gpus=int(limits.get(GPU_RESOURCE, "0")),
            )
        except (KeyError, TypeError, ValueError):
            return None
    return None


def _pod_size(pod: packing.PodShape, spec: s.RegisteredModelServingSpec) -> ReplicaSize:
    """The worker pods' shape as the ReplicaSize `build_cluster_config` sizes pods from."""
    selector, tolerations = gpu_placement(spec.resources) if pod.gpus else ({}, [])
    return ReplicaSize(
        memory_bytes=pod.memory_bytes - POD_OVERHEAD,
        gpus=pod.gpus,
        cpus=float(pod.cpus),
        basis="shared",
        node_selector=selector,
        tolerations=tolerations,
    )


def _applications(
    own: str, own_desired: dict[str, Any], existing: dict[str, Any] | None, names: Sequence[str]
) -> list[dict[str, Any]]:
    """One application per accepted member, in member order: ours as decided, the others' as the
    RayService carries them (a member not written yet has none)."""
    ours = _apps_of(own_desired)
    theirs = _apps_of(existing) if existing is not None else {}
    apps = []
    for name in names:
        app = ours.get(name) if name == own else theirs.get(name)
        if app is not None:
            apps.append(app)
    return apps


def _apps_of(rayservice: dict[str, Any]) -> dict[str, dict[str, Any]]:
    text = (rayservice.get("spec") or {}).get("serveConfigV2")
    if not text:
        return {}
    try:
        config = yaml.load(text, Loader=FAST_LOADER)
    except yaml.YAMLError:
        return {}
    apps = config.get("applications") if isinstance(config, dict) else None
    return {str(app.get("name")): app for app in apps or [] if isinstance(app, dict)}


__all__ = ["Peer", "Refused", "cluster_settings", "compose", "has_application", "member", "peer_of"]
