from __future__ import annotations

import pytest
from regserve_operator.packing import (
    ClusterSettings,
    Conflict,
    Member,
    PodShape,
    ReplicaShape,
    membership,
    plan_group,
    pod_shape,
    pods_for,
)
from regserve_operator.sizing import POD_OVERHEAD, GiB

CPU = ClusterSettings(image="regserve:1", ray_version="2.53.0", accelerator="auto")
SMALL = ReplicaShape(memory_bytes=2 * GiB, cpus=1.0)
BIG = ReplicaShape(memory_bytes=6 * GiB, cpus=1.0)
HALF_CPU = ReplicaShape(memory_bytes=1 * GiB, cpus=0.5)


def member(
    name: str,
    created: str = "2026-01-01T00:00:00Z",
    *,
    settings: ClusterSettings = CPU,
    prefix: str | None = None,
    replica: ReplicaShape = SMALL,
    bounds: tuple[int, int] = (1, 1),
) -> Member:
    return Member(
        name=name,
        created=created,
        settings=settings,
        route_prefix=prefix or f"/{name}",
        replica=replica,
        min_replicas=bounds[0],
        max_replicas=bounds[1],
    )


def pod(memory_gib: int, cpus: int, gpus: int = 0) -> PodShape:
    return PodShape(memory_bytes=memory_gib * GiB + POD_OVERHEAD, cpus=cpus, gpus=gpus)


@pytest.mark.parametrize(
    ("case", "members", "leader", "accepted", "conflicts"),
    [
        ("one member leads alone", [member("a")], "a", ["a"], []),
        (
            "the oldest leads whatever the list order",
            [
                member("b", "2026-01-02T00:00:00Z"),
                member("a", "2026-01-03T00:00:00Z"),
                member("c", "2026-01-01T00:00:00Z"),
            ],
            "c",
            ["c", "b", "a"],
            [],
        ),
        ("same age: the name decides", [member("b"), member("a")], "a", ["a", "b"], []),
        (
            "another image conflicts, the leader's cluster stays",
            [member("a"), member("b", settings=ClusterSettings("regserve:2", "2.53.0", "auto"))],
            "a",
            ["a"],
            [Conflict("b", ("image",))],
        ),
        (
            "every differing setting is named",
            [member("a"), member("b", settings=ClusterSettings("regserve:2", "2.52.0", "gpu"))],
            "a",
            ["a"],
            [Conflict("b", ("image", "rayVersion", "accelerator"))],
        ),
        (
            "a route prefix already taken: the younger member conflicts",
            [member("a", prefix="/m"), member("b", "2026-02-01T00:00:00Z", prefix="/m")],
            "a",
            ["a"],
            [Conflict("b", ("routePrefix",))],
        ),
    ],
)
def test_membership(
    case: str, members: list[Member], leader: str, accepted: list[str], conflicts: list[Conflict]
) -> None:
    got = membership(members)
    assert got is not None, case
    assert got.leader.name == leader, case
    assert [m.name for m in got.members] == accepted, case
    assert list(got.conflicts) == conflicts, case


def test_no_members_no_membership() -> None:
    assert membership([]) is None


@pytest.mark.parametrize(
    ("case", "replicas", "want"),
    [
        ("largest replica decides memory and CPUs", [SMALL, BIG, HALF_CPU], pod(6, 1)),
        ("fractional CPUs round up to a whole pod CPU", [ReplicaShape(GiB, 1.5)], pod(1, 2)),
        ("GPU replicas ask for GPU pods", [ReplicaShape(GiB, 1.0, 1)], pod(1, 1, 1)),
        (
            "the ceiling caps the shape",
            [ReplicaShape(200 * GiB, 40.0, 9)],
            PodShape(memory_bytes=64 * GiB, cpus=16, gpus=8),
        ),
    ],
)
def test_pod_shape(case: str, replicas: list[ReplicaShape], want: PodShape) -> None:
    assert pod_shape(replicas) == want, case


def test_no_replicas_no_pod() -> None:
    assert pod_shape([]) is None


@pytest.mark.parametrize(
    ("case", "replicas", "shape", "want"),
    [
        ("nothing to hold", [], pod(4, 2), 0),
        ("two small replicas share a pod", [SMALL, SMALL], pod(4, 2), 1),
        ("CPU is the scarce dimension", [SMALL, SMALL, SMALL], pod(8, 2), 2),
        ("memory is the scarce dimension", [SMALL, SMALL, SMALL], pod(4, 8), 2),
        ("half-CPU replicas pack two per CPU", [HALF_CPU] * 4, pod(8, 2), 1),
        # Decreasing order puts the 6 GiB replicas first; the 2 GiB ones fill the gaps beside them.
        ("big first, small fill the gaps", [SMALL, BIG, SMALL, BIG], pod(8, 4), 2),
        ("GPUs: one replica per GPU", [ReplicaShape(GiB, 1.0, 1)] * 3, pod(8, 8, 2), 2),
    ],
)
def test_pods_for(case: str, replicas: list[ReplicaShape], shape: PodShape, want: int) -> None:
    assert pods_for(replicas, shape) == want, case


@pytest.mark.parametrize(
    ("case", "members", "ceiling", "want"),
    [
        (
            "three small models at one replica share pods sized for one",
            [member("a"), member("b"), member("c")],
            pod(64, 16),
            (pod(2, 1), 3, 3, ()),
        ),
        (
            "idle bound from minReplicas, peak from maxReplicas",
            [member("a", bounds=(0, 4)), member("b", bounds=(1, 2))],
            pod(64, 16),
            (pod(2, 1), 1, 6, ()),
        ),
        (
            "a big member's pod shape leaves room for small ones beside it",
            [member("a", replica=BIG), member("b"), member("c"), member("d", replica=HALF_CPU)],
            pod(64, 16),
            (pod(6, 1), 4, 4, ()),
        ),
        (
            "a member larger than the ceiling is unfit, the others are planned",
            [member("a", replica=ReplicaShape(100 * GiB, 1.0)), member("b")],
            pod(16, 4),
            (pod(2, 1), 1, 1, ("a",)),
        ),
    ],
)
def test_plan_group(
    case: str, members: list[Member], ceiling: PodShape, want: tuple[PodShape, int, int, tuple[str, ...]]
) -> None:
    got = plan_group(members, ceiling)
    assert got is not None, case
    assert (got.pod, got.fewest, got.most, got.unfit) == want, case


def test_a_group_of_unfit_members_plans_no_pods() -> None:
    got = plan_group([member("a", replica=ReplicaShape(100 * GiB, 1.0))], pod(16, 4))
    assert got is not None
    assert (got.fewest, got.most, got.unfit) == (0, 0, ("a",))


@pytest.mark.parametrize(
    ("case", "current", "want"),
    [
        ("no cluster yet: shaped for the largest replica", None, pod(6, 1)),
        ("a larger current pod that holds every replica is kept", pod(8, 2), pod(8, 2)),
        ("a current pod too small for a replica gives way", pod(4, 1), pod(6, 1)),
        (
            "a current pod with too few CPUs gives way",
            PodShape(memory_bytes=pod(8, 1).memory_bytes, cpus=0),
            pod(6, 1),
        ),
    ],
)
def test_plan_group_keeps_the_current_pod_while_it_holds_every_replica(
    case: str, current: PodShape | None, want: PodShape
) -> None:
    group = plan_group([member("a", replica=SMALL), member("b", replica=BIG)], current=current)
    assert group is not None and group.pod == want, case
