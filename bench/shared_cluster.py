"""What shared clusters save: N small models as N RayServices vs one shared RayService (`spec.placement`).

The operator's own output is counted, not estimated: every RayService is built by the same code the
operator runs (`build_rayservice`, and `shared.compose` with the members written one after another as
their reconciles would), and the pods and requests are read from the result: the head pod, the
autoscaler sidecar when there is one, and the worker pods at the group's minimum (idle) and maximum.

Run: `.venv/bin/python -m bench.shared_cluster` (a second; no cluster needed).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from kubernetes.utils import parse_quantity
from regserve_operator import shared
from regserve_operator.builders import BuildDefaults, Owner, build_rayservice
from regserve_operator.sizing import size_replica
from regserve_operator.spec import RegisteredModelServingSpec, Sizing, parse_spec

from bench.common import RESULTS, markdown_table, save_json, stamp

DEFAULTS = BuildDefaults(image="regserve:bench", ray_version="2.60.0")
MiB = 2**20


@dataclass(frozen=True)
class Footprint:
    rayservices: int
    pods_idle: int
    pods_peak: int
    cpu_idle: float
    memory_idle_gib: float
    cpu_peak: float
    memory_peak_gib: float


def spec_for(index: int, shared_cluster: bool, autoscaling: bool) -> RegisteredModelServingSpec:
    body: dict[str, Any] = {
        "model": {"name": f"model_{index}", "alias": "champion"},
        "registry": {"trackingUri": "http://mlflow:5000"},
        "serving": {"cpusPerReplica": 0.5},
    }
    if autoscaling:
        body["serving"]["autoscaling"] = {"minReplicas": 1, "maxReplicas": 3}
    if shared_cluster:
        body["placement"] = {"cluster": "pool"}
    return parse_spec(body)


def model_bytes(index: int) -> int:
    return (5 + 20 * (index % 5)) * MiB  # 5-85 MB: sklearn pipelines, small boosted trees


def build_all(count: int, shared_cluster: bool, autoscaling: bool) -> list[dict[str, Any]]:
    owners = [Owner(f"model-{i}", "ml", f"uid-{i}") for i in range(count)]
    specs = [spec_for(i, shared_cluster, autoscaling) for i in range(count)]
    sizes = [
        size_replica(
            model_size_bytes=model_bytes(i),
            flavors=("sklearn",),
            serving=s.serving,
            resources=s.resources,
            previous=None,
        )
        for i, s in enumerate(specs)
    ]
    bodies = [build_rayservice(o, s, "1", z, DEFAULTS) for o, s, z in zip(owners, specs, sizes, strict=True)]
    if not shared_cluster:
        return bodies
    peers = [
        shared.Peer(o, f"2026-01-01T00:00:{i:02d}Z", s, Sizing(memory_bytes=z.memory_bytes, gpus=z.gpus))
        for i, (o, s, z) in enumerate(zip(owners, specs, sizes, strict=True))
    ]
    current: dict[str, Any] | None = None
    for owner, spec, size, body in zip(owners, specs, sizes, bodies, strict=True):
        composed = shared.compose(owner, spec, size, body, current, peers, DEFAULTS)
        assert isinstance(composed, dict), composed
        current = composed
    assert current is not None
    return [current]


def footprint(bodies: list[dict[str, Any]]) -> Footprint:
    pods_idle = pods_peak = 0
    cpu_idle = cpu_peak = memory_idle = memory_peak = 0.0
    for body in bodies:
        cluster = body["spec"]["rayClusterConfig"]
        head_cpu, head_memory = requests_of(cluster["headGroupSpec"]["template"]["spec"])
        if cluster.get("enableInTreeAutoscaling"):
            sidecar = cluster["autoscalerOptions"]["resources"]["requests"]
            head_cpu += float(parse_quantity(sidecar["cpu"]))
            head_memory += float(parse_quantity(sidecar["memory"]))
        pods_idle += 1
        pods_peak += 1
        cpu_idle += head_cpu
        cpu_peak += head_cpu
        memory_idle += head_memory
        memory_peak += head_memory
        for group in cluster["workerGroupSpecs"]:
            cpu, memory = requests_of(group["template"]["spec"])
            pods_idle += group["minReplicas"]
            pods_peak += group["maxReplicas"]
            cpu_idle += cpu * group["minReplicas"]
            cpu_peak += cpu * group["maxReplicas"]
            memory_idle += memory * group["minReplicas"]
            memory_peak += memory * group["maxReplicas"]
    gib = float(2**30)
    return Footprint(
        len(bodies), pods_idle, pods_peak, cpu_idle, memory_idle / gib, cpu_peak, memory_peak / gib
    )


def requests_of(pod: dict[str, Any]) -> tuple[float, float]:
    cpu = memory = 0.0
    for container in pod["containers"]:
        requests = (container.get("resources") or {}).get("requests") or {}
        cpu += float(parse_quantity(requests.get("cpu", "0")))
        memory += float(parse_quantity(requests.get("memory", "0")))
    return cpu, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1,5,20,50")
    args = parser.parse_args()
    rows, results = [], []
    for autoscaling in (False, True):
        for count in (int(c) for c in args.counts.split(",")):
            apart = footprint(build_all(count, False, autoscaling))
            together = footprint(build_all(count, True, autoscaling))
            replicas = "1-3 (autoscaling)" if autoscaling else "1"
            for label, f in (("one RayService each", apart), ("one shared", together)):
                rows.append(
                    [
                        count,
                        replicas,
                        label,
                        f.rayservices,
                        f.pods_idle,
                        f.pods_peak,
                        f.cpu_idle,
                        f.memory_idle_gib,
                        f.cpu_peak,
                        f.memory_peak_gib,
                        f.cpu_idle / apart.cpu_idle,
                        f.memory_idle_gib / apart.memory_idle_gib,
                    ]
                )
                results.append({"models": count, "autoscaling": autoscaling, "layout": label, **f.__dict__})
    headers = [
        "models",
        "replicas each",
        "layout",
        "RayServices",
        "pods idle",
        "pods peak",
        "CPU requested idle",
        "memory GiB idle",
        "CPU peak",
        "memory GiB peak",
        "CPU ÷ apart",
        "memory ÷ apart",
    ]
    text = markdown_table(headers, rows)
    header = f"shared cluster footprint {stamp()}: models of 5-85 MB, 0.5 CPU per replica"
    print(header + "\n\n" + text)
    save_json("shared_cluster", results)
    (RESULTS / "shared_cluster.md").write_text(header + "\n\n" + text + "\n")
    plot(rows)


def plot(rows: list[list[Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, column, title in ((a, 6, "CPU requested at idle"), (b, 7, "memory GiB requested at idle")):
        for label in ("one RayService each", "one shared"):
            picked = [r for r in rows if r[2] == label and r[1] == "1"]
            axis.plot([r[0] for r in picked], [r[column] for r in picked], marker="o", label=label)
        axis.set_xlabel("models")
        axis.set_title(title)
        axis.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "shared_cluster.png", dpi=90)


if __name__ == "__main__":
    main()
