from __future__ import annotations

from typing import Any

import pytest
from regserve_operator.sizing import (
    RUNTIME_OVERHEAD,
    STEP,
    GiB,
    MiB,
    WorkerBounds,
    basis_of,
    replicas_per_pod,
    round_up,
    size_replica,
    worker_bounds,
)
from regserve_operator.spec import Resources, Serving, Sizing

S = Serving()
R = Resources()


@pytest.mark.parametrize(
    ("case", "size", "flavors", "serving", "resources", "previous", "memory", "gpus"),
    [
        ("unknown size: overhead only", None, ["python_function"], S, R, None, RUNTIME_OVERHEAD, 0),
        ("tiny model rounds up to a step", 10 * MiB, ["sklearn"], S, R, None, RUNTIME_OVERHEAD + STEP, 0),
        # 1 GiB + 2.0 * 300 MiB * 2 = 2224 MiB -> 2560 MiB
        ("multiplier x models", 300 * MiB, ["sklearn"], S, R, None, 2560 * MiB, 0),
        (
            "one model per replica",
            300 * MiB,
            ["sklearn"],
            Serving(max_models_per_replica=1),
            R,
            None,
            2 * GiB,
            0,
        ),
        ("big torch model on auto gets a GPU", 2 * GiB, ["pytorch"], S, R, None, 9 * GiB, 1),
        ("small torch model stays on CPU", 100 * MiB, ["pytorch"], S, R, None, 1536 * MiB, 0),
        ("big sklearn model stays on CPU", 2 * GiB, ["sklearn"], S, R, None, 9 * GiB, 0),
        ("gpu forced", 10 * MiB, ["sklearn"], S, Resources(accelerator="gpu"), None, 1536 * MiB, 1),
        ("cpu forced", 2 * GiB, ["pytorch"], S, Resources(accelerator="cpu"), None, 9 * GiB, 0),
        (
            "promotion to a smaller version does not shrink",
            10 * MiB,
            ["sklearn"],
            S,
            R,
            Sizing(memory_bytes=4 * GiB, gpus=0, basis=basis_of(S, R)),
            4 * GiB,
            0,
        ),
        (
            "promotion to a bigger version grows",
            2 * GiB,
            ["sklearn"],
            S,
            R,
            Sizing(memory_bytes=2 * GiB, gpus=0, basis=basis_of(S, R)),
            9 * GiB,
            0,
        ),
        (
            "spec change allows shrinking",
            10 * MiB,
            ["sklearn"],
            Serving(max_models_per_replica=1),
            R,
            Sizing(memory_bytes=4 * GiB, gpus=0, basis=basis_of(S, R)),
            1536 * MiB,
            0,
        ),
        (
            "auto keeps its GPU on promotion to a small version",
            10 * MiB,
            ["pytorch"],
            S,
            R,
            Sizing(memory_bytes=9 * GiB, gpus=1, basis=basis_of(S, R)),
            9 * GiB,
            1,
        ),
    ],
)
def test_size_replica(
    case: str,
    size: int | None,
    flavors: list[str],
    serving: Serving,
    resources: Resources,
    previous: Sizing | None,
    memory: int,
    gpus: int,
) -> None:
    got = size_replica(
        model_size_bytes=size, flavors=flavors, serving=serving, resources=resources, previous=previous
    )
    assert (got.memory_bytes, got.gpus) == (memory, gpus)
    assert got.memory_bytes % STEP == 0


@pytest.mark.parametrize(
    ("case", "size", "holds_candidate", "memory"),
    [
        # 1 GiB + 2.0 * 300 MiB * 2 = 2224 MiB -> 2560 MiB
        ("no candidate: the cached versions only", 300 * MiB, False, 2560 * MiB),
        # 1 GiB + 2.0 * 300 MiB * 3 = 2824 MiB -> 3 GiB
        ("a held candidate counts as one more version", 300 * MiB, True, 3 * GiB),
        ("a tiny model's candidate fits in the rounding", 10 * MiB, True, RUNTIME_OVERHEAD + STEP),
    ],
)
def test_a_held_candidate_is_sized_for(case: str, size: int, holds_candidate: bool, memory: int) -> None:
    got = size_replica(
        model_size_bytes=size,
        flavors=["sklearn"],
        serving=S,
        resources=R,
        previous=None,
        holds_candidate=holds_candidate,
    )
    assert got.memory_bytes == memory, case


def test_gpu_placement_defaults_and_overrides() -> None:
    got = size_replica(
        model_size_bytes=0, flavors=[], serving=S, resources=Resources(accelerator="gpu"), previous=None
    )
    assert got.node_selector and got.tolerations
    assert got.actor_options()["num_gpus"] == 1
    custom = Resources.model_validate(
        {
            "accelerator": "gpu",
            "gpuNodeSelector": {"pool": "a100"},
            "gpuTolerations": [{"key": "gpu", "operator": "Exists"}],
        }
    )
    got = size_replica(model_size_bytes=0, flavors=[], serving=S, resources=custom, previous=None)
    assert got.node_selector == {"pool": "a100"}
    assert got.tolerations == [{"key": "gpu", "operator": "Exists"}]


def test_actor_options_fit_in_the_pod() -> None:
    got = size_replica(
        model_size_bytes=700 * MiB,
        flavors=[],
        serving=Serving(cpus_per_replica=0.5),
        resources=R,
        previous=None,
    )
    options: dict[str, Any] = got.actor_options()
    assert options["memory"] < got.pod_memory_bytes
    assert options["num_cpus"] <= got.pod_cpus
    assert "num_gpus" not in options


@pytest.mark.parametrize(("value", "expected"), [(0, STEP), (1, STEP), (STEP, STEP), (STEP + 1, 2 * STEP)])
def test_round_up(value: int, expected: int) -> None:
    assert round_up(value) == expected


@pytest.mark.parametrize(
    ("case", "pod", "replica", "per_pod"),
    [
        # (pod cpus, pod memory, pod gpus), (replica cpus, replica memory, replica gpus)
        ("one replica sized pod", (1, 1 * GiB + 2 * GiB, 0), (1.0, 2 * GiB, 0), 1),
        ("cpu decides", (4, 1 * GiB + 16 * GiB, 0), (1.0, 2 * GiB, 0), 4),
        ("memory decides", (8, 1 * GiB + 4 * GiB, 0), (1.0, 2 * GiB, 0), 2),
        ("fractional cpus", (1, 1 * GiB + 8 * GiB, 0), (0.25, 2 * GiB, 0), 4),
        ("gpu decides", (8, 1 * GiB + 32 * GiB, 1), (1.0, 2 * GiB, 1), 1),
        ("two gpus per pod", (8, 1 * GiB + 32 * GiB, 2), (1.0, 2 * GiB, 1), 2),
        ("pod overhead counted", (4, 4 * GiB, 0), (1.0, 2 * GiB, 0), 1),
        ("never below one", (1, 512 * MiB, 0), (2.0, 2 * GiB, 0), 1),
    ],
)
def test_replicas_per_pod(
    case: str, pod: tuple[int, int, int], replica: tuple[float, int, int], per_pod: int
) -> None:
    got = replicas_per_pod(
        pod_cpus=pod[0],
        pod_memory_bytes=pod[1],
        pod_gpus=pod[2],
        replica_cpus=replica[0],
        replica_memory_bytes=replica[1],
        replica_gpus=replica[2],
    )
    assert got == per_pod, case


@pytest.mark.parametrize(
    ("case", "min_replicas", "max_replicas", "per_pod", "bounds"),
    [
        ("fixed count", 3, 3, 1, WorkerBounds(3, 3)),
        ("autoscaling, one per pod", 1, 8, 1, WorkerBounds(1, 8)),
        ("scale to zero keeps no pod", 0, 4, 1, WorkerBounds(0, 4)),
        ("packed pods round up", 3, 7, 2, WorkerBounds(2, 4)),
        ("one pod holds all", 1, 4, 4, WorkerBounds(1, 1)),
        ("zero to a partial pod", 0, 1, 4, WorkerBounds(0, 1)),
    ],
)
def test_worker_bounds(
    case: str, min_replicas: int, max_replicas: int, per_pod: int, bounds: WorkerBounds
) -> None:
    assert worker_bounds(min_replicas, max_replicas, per_pod) == bounds, case
