"""What a tenant may ask for, as the platform team set it (operator settings, Helm values `policy.*`). Pure.

A tenant who may create RegisteredModelServings in its namespace must gain nothing beyond it: the
fields below are the ones that reach further (the registry the operator talks to, the code and
identity the Ray pods run with, GPU nodes, the cluster's capacity). The same rules run at admission
(the chart's ValidatingAdmissionPolicy, CEL on the same values) and here, where they also catch what
admission cannot see: resources created before the policy changed or while it was absent, and the
memory and GPUs sizing decides from the model.

`violations(spec, None, policy)` checks the spec alone, before anything is read or written (a refused
tracking URI is never contacted); `violations(spec, size, policy)` adds what sizing decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from regserve_operator.sizing import GiB, ReplicaSize
from regserve_operator.spec import RegisteredModelServingSpec, Resources

Rule = Literal[
    "TrackingUriNotAllowed",
    "ImageNotAllowed",
    "ServiceAccountNotAllowed",
    "GpuNotAllowed",
    "GpuPlacementNotAllowed",
    "TooManyReplicas",
    "TooMuchMemory",
]
# Tenant values are quoted in status and Events: bounded, so a long field cannot flood either.
MAX_QUOTED = 128


@dataclass(frozen=True)
class Policy:
    """The platform team's limits. Empty allowlists allow nothing overridable (the operator's own image,
    the namespace's default ServiceAccount) except `tracking_uri_prefixes`, where empty means any."""

    enabled: bool = True
    tracking_uri_prefixes: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    allow_gpus: bool = False
    # gpuNodeSelector / gpuTolerations: a toleration of every taint would put pods on any node.
    allow_gpu_placement: bool = False
    max_replicas: int = 8
    max_replica_memory_bytes: int = 32 * GiB
    # Versions whose artifacts are not behind the tracking server's artifact proxy (s3://, an http
    # store, another host) are read by the operator itself, from its network, where the registry says.
    artifact_reads_outside_proxy: bool = False

    @property
    def allows_reads_outside_proxy(self) -> bool:
        return not self.enabled or self.artifact_reads_outside_proxy


OFF = Policy(enabled=False)


@dataclass(frozen=True)
class Violation:
    field: str  # the spec path, as the user wrote it
    rule: Rule
    value: str  # what the resource asks for (bounded)
    limit: str  # what the policy allows

    def text(self) -> str:
        return f"{self.field}: {self.value} not allowed ({self.limit})"


def violations(spec: RegisteredModelServingSpec, size: ReplicaSize | None, policy: Policy) -> list[Violation]:
    if not policy.enabled:
        return []
    found: list[Violation] = []
    uri = spec.registry.tracking_uri
    if policy.tracking_uri_prefixes and not tracking_uri_allowed(uri, policy.tracking_uri_prefixes):
        allowed = ", ".join(policy.tracking_uri_prefixes)
        found.append(
            Violation(
                "spec.registry.trackingUri", "TrackingUriNotAllowed", _quote(uri), f"allowed: {allowed}"
            )
        )
    image = spec.ray_service.image
    if image is not None and image not in policy.images:
        found.append(
            Violation("spec.rayService.image", "ImageNotAllowed", _quote(image), _allowed(policy.images))
        )
    account = spec.ray_service.service_account_name
    if account is not None and account not in policy.service_accounts:
        found.append(
            Violation(
                "spec.rayService.serviceAccountName",
                "ServiceAccountNotAllowed",
                _quote(account),
                _allowed(policy.service_accounts),
            )
        )
    if not policy.allow_gpus and spec.resources.accelerator == "gpu":
        found.append(Violation("spec.resources.accelerator", "GpuNotAllowed", "gpu", "GPUs are not allowed"))
    if not policy.allow_gpu_placement:
        for name in ("gpu_node_selector", "gpu_tolerations"):
            if getattr(spec.resources, name) is not None:
                field = "spec.resources." + (
                    "gpuNodeSelector" if name == "gpu_node_selector" else "gpuTolerations"
                )
                found.append(
                    Violation(field, "GpuPlacementNotAllowed", "set", "the platform's GPU placement only")
                )
    _, most = spec.serving.replica_bounds()
    if most > policy.max_replicas:
        field = (
            "spec.serving.autoscaling.maxReplicas" if spec.serving.autoscaling else "spec.serving.replicas"
        )
        found.append(Violation(field, "TooManyReplicas", str(most), f"at most {policy.max_replicas}"))
    if size is not None:
        found += _sized(size, policy)
    return found


def _sized(size: ReplicaSize, policy: Policy) -> list[Violation]:
    found: list[Violation] = []
    if size.gpus and not policy.allow_gpus:
        # Only a resource sized before GPUs were refused gets here: `effective_resources` keeps `auto`
        # on CPUs, and `gpu` is refused from the spec.
        found.append(Violation("status.sizing.gpus", "GpuNotAllowed", str(size.gpus), "GPUs are not allowed"))
    if size.memory_bytes > policy.max_replica_memory_bytes:
        found.append(
            Violation(
                "spec.resources.memoryMultiplier",
                "TooMuchMemory",
                f"a replica of {_gib(size.memory_bytes)} for this model",
                f"at most {_gib(policy.max_replica_memory_bytes)} per replica",
            )
        )
    return found


def effective_resources(resources: Resources, policy: Policy) -> Resources:
    """The resources sizing works from: `auto` never sizes to a GPU where GPUs are not allowed."""
    if policy.enabled and not policy.allow_gpus and resources.accelerator == "auto":
        return resources.model_copy(update={"accelerator": "cpu"})
    return resources


def tracking_uri_allowed(uri: str, prefixes: tuple[str, ...]) -> bool:
    """A prefix matches the URI itself or at a path boundary: `https://mlflow.example.com` allows
    `https://mlflow.example.com/team-a`, never `https://mlflow.example.com.evil.net` nor
    `https://mlflow.example.com@evil.net`."""
    for prefix in prefixes:
        base = prefix.rstrip("/")
        if uri == base or uri.startswith(base + "/"):
            return True
    return False


def message(found: list[Violation]) -> str:
    return "refused by the cluster's policy: " + "; ".join(v.text() for v in found)


def _allowed(names: tuple[str, ...]) -> str:
    return "allowed: " + ", ".join(names) if names else "none may be set"


def _quote(text: str) -> str:
    cut = text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED] + "..."
    return repr(cut)


def _gib(amount: int) -> str:
    return f"{amount / GiB:g} GiB"


__all__ = ["OFF", "Policy", "Rule", "Violation", "effective_resources", "message", "violations"]
