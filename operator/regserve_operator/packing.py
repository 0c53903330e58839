"""Resources that share one Ray cluster (`spec.placement.cluster`): who decides the cluster-level
settings, which members conflict, and how many worker pods hold every member's replicas. Pure.

Every member computes the shared RayService from the same gathered member list, so these functions
must give the same answer whichever member runs them: the oldest member (then the name) leads, and
members are always considered in that order.

Worker pods of a shared cluster have one shape per group (CPU, GPU), big enough for the largest
replica of the group and never above the largest pod a node can hold. Replicas are packed first-fit
decreasing: a pod count is the fewest pods that hold `min` (idle) or `max` (peak) replicas of every
member at once, which is what KubeRay's autoscaler is bounded by.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from regserve_operator.sizing import POD_OVERHEAD, GiB


@dataclass(frozen=True, order=True)
class ReplicaShape:
    memory_bytes: int
    cpus: float
    gpus: int = 0


@dataclass(frozen=True)
class PodShape:
    memory_bytes: int  # what the pod requests, its own overhead included
    cpus: int
    gpus: int = 0

    def holds(self, replica: ReplicaShape) -> bool:
        return (
            replica.memory_bytes <= self.memory_bytes - POD_OVERHEAD
            and replica.cpus <= self.cpus + 1e-9
            and replica.gpus <= self.gpus
        )


# The largest worker pod we create when the operator is told nothing about its nodes.
DEFAULT_POD_CEILING = PodShape(memory_bytes=64 * GiB, cpus=16, gpus=8)


@dataclass(frozen=True)
class ClusterSettings:
    """What every application on one Ray cluster must agree on."""

    image: str | None
    ray_version: str | None
    accelerator: str
    # The rest of what the pods share, by spec field: registry, Secrets, ingress mode, service account…
    pods: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Member:
    name: str
    created: str  # RFC 3339 creation timestamp: orders members the same way for every reader
    settings: ClusterSettings
    route_prefix: str
    replica: ReplicaShape
    min_replicas: int
    max_replicas: int


@dataclass(frozen=True)
class Conflict:
    member: str
    fields: tuple[str, ...]  # which settings differ from the leader's, or "routePrefix"


@dataclass(frozen=True)
class Membership:
    leader: Member
    members: tuple[Member, ...]  # agreeing members in leader-first order: one application each
    conflicts: tuple[Conflict, ...]


def ordered(members: Iterable[Member]) -> list[Member]:
    return sorted(members, key=lambda m: (m.created, m.name))


def membership(members: Sequence[Member]) -> Membership | None:
    """Split members into those served by the shared cluster and those in conflict with it: other
    cluster settings than the leader's, or a route prefix an earlier member already uses. A conflicting
    member is left out (its condition says why) rather than changing the cluster under the others."""
    queue = ordered(members)
    if not queue:
        return None
    leader = queue[0]
    accepted: list[Member] = []
    conflicts: list[Conflict] = []
    prefixes: set[str] = set()
    for member in queue:
        differing = _differing_settings(leader.settings, member.settings)
        if member.route_prefix in prefixes:
            differing = (*differing, "routePrefix")
        if differing:
            conflicts.append(Conflict(member.name, differing))
            continue
        prefixes.add(member.route_prefix)
        accepted.append(member)
    return Membership(leader=leader, members=tuple(accepted), conflicts=tuple(conflicts))


def _differing_settings(leader: ClusterSettings, member: ClusterSettings) -> tuple[str, ...]:
    pairs = (
        ("image", leader.image, member.image),
        ("rayVersion", leader.ray_version, member.ray_version),
        ("accelerator", leader.accelerator, member.accelerator),
    )
    named = tuple(name for name, ours, theirs in pairs if ours != theirs)
    theirs = dict(member.pods)
    fields = {name for name, value in leader.pods if theirs.get(name) != value}
    fields |= {name for name, _ in member.pods if name not in dict(leader.pods)}
    return named + tuple(sorted(fields))


def pod_shape(replicas: Iterable[ReplicaShape], ceiling: PodShape = DEFAULT_POD_CEILING) -> PodShape | None:
    """The worker pod for a group: room for its largest replica in every dimension, capped by
    `ceiling`; None for a group with no replicas."""
    shapes = list(replicas)
    if not shapes:
        return None
    memory = max(s.memory_bytes for s in shapes) + POD_OVERHEAD
    cpus = max(1, math.ceil(max(s.cpus for s in shapes) - 1e-9))
    gpus = max(s.gpus for s in shapes)
    return PodShape(
        memory_bytes=min(memory, ceiling.memory_bytes),
        cpus=min(cpus, ceiling.cpus),
        gpus=min(gpus, ceiling.gpus),
    )


def pods_for(replicas: Iterable[ReplicaShape], pod: PodShape) -> int:
    """Fewest pods of shape `pod` that hold all `replicas` (first-fit decreasing); each replica must
    fit a pod on its own (see `unfit`)."""
    free: list[list[float]] = []  # per open pod: memory, cpus, gpus left
    for replica in sorted(replicas, reverse=True):
        for room in free:
            if _fits(room, replica):
                _take(room, replica)
                break
        else:
            room = [float(pod.memory_bytes - POD_OVERHEAD), float(pod.cpus), float(pod.gpus)]
            _take(room, replica)
            free.append(room)
    return len(free)


def _fits(room: list[float], replica: ReplicaShape) -> bool:
    return replica.memory_bytes <= room[0] and replica.cpus <= room[1] + 1e-9 and replica.gpus <= room[2]


def _take(room: list[float], replica: ReplicaShape) -> None:
    room[0] -= replica.memory_bytes
    room[1] -= replica.cpus
    room[2] -= replica.gpus


@dataclass(frozen=True)
class GroupPlan:
    """One worker group of the shared cluster: its pod shape and how many pods the autoscaler may run."""

    pod: PodShape
    fewest: int
    most: int
    unfit: tuple[str, ...]  # members whose replica is larger than any pod this group may have


def plan_group(
    members: Sequence[Member], ceiling: PodShape = DEFAULT_POD_CEILING, current: PodShape | None = None
) -> GroupPlan | None:
    """Worker bounds for members placed in one group (all CPU or all GPU). `current`: the pod shape
    the cluster has now, kept while it holds every member's replica: a new pod shape is a new
    RayCluster, so a member joining with smaller replicas or a large one leaving does not make one."""
    fitting = [m for m in members if ceiling.holds(m.replica)]
    unfit = tuple(m.name for m in members if not ceiling.holds(m.replica))
    pod = pod_shape((m.replica for m in fitting), ceiling)
    if pod is None:
        return GroupPlan(pod=ceiling, fewest=0, most=0, unfit=unfit) if unfit else None
    if current is not None and all(current.holds(m.replica) for m in fitting):
        pod = current

    def replicas(count: Callable[[Member], int]) -> list[ReplicaShape]:
        return [m.replica for m in fitting for _ in range(count(m))]

    return GroupPlan(
        pod=pod,
        fewest=pods_for(replicas(lambda m: m.min_replicas), pod),
        most=pods_for(replicas(lambda m: m.max_replicas), pod),
        unfit=unfit,
    )
