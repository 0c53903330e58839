"""How big a serving replica must be, from the model's size and flavor. Pure.

A replica may hold up to `maxModelsPerReplica` versions (the default one plus versions pinned by
requests), so it is sized for that many copies of the default version:

    memory = RUNTIME_OVERHEAD + memoryMultiplier * model_size_bytes * (maxModelsPerReplica + candidate)

where `candidate` is 1 when rollouts hold a candidate beside them (a smoke test, canary or shadow keeps
the candidate loaded outside the replica's model cache) and 0 otherwise. It counts whether or not a
rollout is under way: sizing that changed when a candidate arrives would replace the cluster mid-rollout.

rounded up to STEP. Sizing must not defeat in-place switching: a promotion only *grows* the replica
when the new version needs more than the current size, and it never shrinks on promotion (a change
of the RayCluster replaces the cluster, which costs a cold start). Shrinking happens only when the
user changes a field sizing depends on (`basis`).

GPU: `gpu` always; `cpu` never; `auto` when the flavor is a deep-learning framework AND the model is
at least GPU_AUTO_MIN_BYTES (small torch models run fine on CPU, and GPU nodes are scarce). Once on a
GPU, `auto` stays there until the spec changes (same grow-only rule).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from regserve_operator.spec import Resources, Serving, Sizing

MiB = 1024**2
GiB = 1024**3
STEP = 512 * MiB
# Python + Ray worker + mlflow/pandas imports in a replica, measured at roughly 600-800 MiB.
RUNTIME_OVERHEAD = 1 * GiB
# raylet, dashboard agent and the object store's slack in each worker pod, beyond the replica itself.
POD_OVERHEAD = 1 * GiB
GPU_AUTO_MIN_BYTES = 1 * GiB
GPU_FLAVORS = frozenset(
    {"pytorch", "transformers", "tensorflow", "keras", "sentence_transformers", "diffusers", "paddle", "onnx"}
)
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
DEFAULT_GPU_TOLERATIONS: list[dict[str, Any]] = [
    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
]


@dataclass(frozen=True)
class ReplicaSize:
    memory_bytes: int  # Ray actor memory of one replica
    gpus: int
    cpus: float
    basis: str
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pod_memory_bytes(self) -> int:
        return self.memory_bytes + POD_OVERHEAD

    @property
    def pod_cpus(self) -> int:
        return max(1, math.ceil(self.cpus))

    def actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.cpus, "memory": self.memory_bytes}
        if self.gpus:
            options["num_gpus"] = self.gpus
        return options

    def to_status(self) -> Sizing:
        return Sizing(memory_bytes=self.memory_bytes, gpus=self.gpus, basis=self.basis)


def round_up(value: float, step: int = STEP) -> int:
    return max(step, math.ceil(value / step) * step)


def basis_of(serving: Serving, resources: Resources) -> str:
    """The spec fields sizing depends on; when they change, sizing may shrink."""
    return (
        f"mult={resources.memory_multiplier};models={serving.max_models_per_replica};"
        f"acc={resources.accelerator};cpus={serving.cpus_per_replica}"
    )


def wants_gpu(accelerator: str, flavors: Iterable[str], model_size_bytes: int | None) -> bool:
    if accelerator == "gpu":
        return True
    if accelerator == "cpu":
        return False
    return bool(GPU_FLAVORS.intersection(flavors)) and (model_size_bytes or 0) >= GPU_AUTO_MIN_BYTES


def size_replica(
    *,
    model_size_bytes: int | None,
    flavors: Iterable[str],
    serving: Serving,
    resources: Resources,
    previous: Sizing | None,
    holds_candidate: bool = False,
) -> ReplicaSize:
    """Size for the default version; `previous` is what the cluster has now (grow-only against it)."""
    basis = basis_of(serving, resources)
    models = serving.max_models_per_replica + (1 if holds_candidate else 0)
    need = round_up(RUNTIME_OVERHEAD + resources.memory_multiplier * (model_size_bytes or 0) * models)
    gpus = 1 if wants_gpu(resources.accelerator, flavors, model_size_bytes) else 0
    if previous is not None and previous.basis == basis and previous.memory_bytes:
        need = max(need, previous.memory_bytes)
        gpus = max(gpus, previous.gpus)
    selector, tolerations = gpu_placement(resources) if gpus else ({}, [])
    return ReplicaSize(
        memory_bytes=need,
        gpus=gpus,
        cpus=serving.cpus_per_replica,
        basis=basis,
        node_selector=selector,
        tolerations=tolerations,
    )


def gpu_placement(resources: Resources) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Node selector and tolerations that put a pod with GPUs on a GPU node."""
    selector = dict(resources.gpu_node_selector or DEFAULT_GPU_NODE_SELECTOR)
    tolerations = (
        [t.model_dump(exclude_none=True) for t in resources.gpu_tolerations]
        if resources.gpu_tolerations is not None
        else list(DEFAULT_GPU_TOLERATIONS)
    )
    return selector, tolerations


# ------------------------------------------------------------------------------------- worker pods


@dataclass(frozen=True)
class WorkerBounds:
    """How many worker pods KubeRay's autoscaler may run: `fewest` at idle, `most` at the replica cap."""

    fewest: int
    most: int


def replicas_per_pod(
    *,
    pod_cpus: float,
    pod_memory_bytes: int,
    pod_gpus: int,
    replica_cpus: float,
    replica_memory_bytes: int,
    replica_gpus: int,
) -> int:
    """How many replicas one worker pod holds: the scarcest of CPU, memory (after the pod's own
    overhead) and GPUs decides. At least 1: a pod is always sized for one replica."""
    fits = [math.floor(pod_cpus / replica_cpus + 1e-9)]
    if replica_memory_bytes:
        fits.append(max(0, pod_memory_bytes - POD_OVERHEAD) // replica_memory_bytes)
    if replica_gpus:
        fits.append(pod_gpus // replica_gpus)
    return max(1, min(fits))


def worker_bounds(min_replicas: int, max_replicas: int, per_pod: int) -> WorkerBounds:
    """Worker pods for the replica bounds: enough pods for `min_replicas` to stay up (0 when the app
    may scale to zero) and for `max_replicas` at peak, never more."""
    return WorkerBounds(fewest=math.ceil(min_replicas / per_pod), most=math.ceil(max_replicas / per_pod))


def size_worker_bounds(size: ReplicaSize, min_replicas: int, max_replicas: int) -> WorkerBounds:
    """`worker_bounds` for worker pods shaped by `size` (one pod per replica as sized today)."""
    per_pod = replicas_per_pod(
        pod_cpus=size.pod_cpus,
        pod_memory_bytes=size.pod_memory_bytes,
        pod_gpus=size.gpus,
        replica_cpus=size.cpus,
        replica_memory_bytes=size.memory_bytes,
        replica_gpus=size.gpus,
    )
    return worker_bounds(min_replicas, max_replicas, per_pod)
