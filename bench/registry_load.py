"""Registry load: N resources over M models → MLflow requests per poll cycle, operator CPU and memory.

    .venv/bin/python -m bench.registry_load [--models 10] [--resources 10,100,1000] [--cycles 3]

A real `mlflow server` holds M registered models (one version each, alias `champion`). For each N a
fresh child process runs the operator's Driver (the reconcile loop `regserve dev` and the operator
share) with N resources spread over the M models, the real `Registry` poller, and an in-memory target
that reports every RayService Ready. MLflow is reached through a counting reverse proxy (HTTP-layer
count). A fake clock moves one poll interval per cycle, so every resource is due every cycle; the
driver thread's CPU time and the process RSS are measured. The child first imports what `regserve run`
loads (kopf, the Kubernetes target, the webhook receiver), so its RSS is an operator's. Baseline in
the same run: N=0 (an operator process with nothing to do). Writes bench/results/registry_load.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    PYTHON,
    RESULTS,
    exit_cleanly_on_sigterm,
    markdown_table,
    save_json,
    stamp,
    start_mlflow,
    uptime,
)

POLL_S = 30


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(n: int, models: list[str], tracking_uri: str, cycles: int) -> dict[str, Any]:
    # What a running operator has loaded besides the Driver: without these N=0 would understate it.
    import aiohttp.web  # noqa: F401
    import regserve_operator.main
    import regserve_operator.targets.kube  # noqa: F401
    from regserve_operator.builders import BuildDefaults, Owner
    from regserve_operator.driver import Driver
    from regserve_operator.plan import Plan
    from regserve_operator.reconcile import Deps
    from regserve_operator.registry import Registry
    from regserve_operator.spec import parse_spec

    from tests.operator.counting_proxy import CountingProxy
    from tests.operator.fakes import FakeTarget

    class ReadyTarget(FakeTarget):
        """Every applied RayService is at once Ready with its application RUNNING."""

        def apply(self, plan: Plan) -> None:
            super().apply(plan)
            obj = self.objects[(plan.namespace, plan.name)]
            obj["status"] = {
                "conditions": [{"type": "Ready", "status": "True"}],
                "activeServiceStatus": {"applicationStatuses": {plan.name: {"status": "RUNNING"}}},
            }

        def get(self, namespace: str, name: str) -> dict[str, Any] | None:
            obj = self.objects.get((namespace, name))
            return copy.deepcopy(obj) if obj else None

    idle_rss = rss_mb()
    clock = [1000.0]
    with CountingProxy(tracking_uri) as proxy:
        registry = Registry(clock=lambda: clock[0])
        deps = Deps(
            registry=registry,
            target=ReadyTarget(),
            defaults=BuildDefaults(image="rayproject/ray:bench", ray_version="2.60.0"),  # no `import ray`
            settle_seconds=5,
        )
        driver = Driver(deps, clock=lambda: clock[0], tick_seconds=0.5)
        for i in range(n):
            spec = parse_spec(
                {
                    "model": {"name": models[i % len(models)], "alias": "champion"},
                    "registry": {"trackingUri": proxy.url, "pollIntervalSeconds": POLL_S},
                    "serving": {"routePrefix": f"/r{i}"},
                }
            )
            driver.apply(Owner(name=f"r{i}", namespace="bench", uid=str(uuid.uuid4())), spec)
        started_cpu, started_wall = time.thread_time(), time.perf_counter()
        driver.run_once()  # create
        clock[0] += 6
        driver.run_once()  # rollout judged
        setup = {
            "requests": proxy.total(),
            "cpu_s": time.thread_time() - started_cpu,
            "wall_s": time.perf_counter() - started_wall,
        }
        per_cycle = []
        for _ in range(cycles):
            proxy.reset()
            clock[0] += POLL_S + 1
            cpu, wall = time.thread_time(), time.perf_counter()
            outcomes = driver.run_once()
            per_cycle.append(
                {
                    "requests": proxy.total(),
                    "paths": dict(proxy.counts),
                    "reconciled": len(outcomes),
                    "cpu_s": time.thread_time() - cpu,
                    "wall_s": time.perf_counter() - wall,
                }
            )
        serving = sum(1 for i in range(n) if driver.status(_owner_key(driver, i)).serving_version)
    return {
        "n": n,
        "m": len(models),
        "setup": setup,
        "cycles": per_cycle,
        "rss_mb": rss_mb(),
        "idle_rss_mb": idle_rss,
        "serving": serving,
    }


def _owner_key(driver: Any, i: int) -> Any:
    return next(r.owner for (ns, name), r in driver._resources.items() if name == f"r{i}")


def register_models(tracking_uri: str, m: int) -> list[str]:
    from mlflow import MlflowClient
    from regserve_operator.sandbox.models import log_phrasebook

    client = MlflowClient(tracking_uri)
    # One logged model; the other registered models get a version pointing at the same artifacts
    # (two REST calls each instead of a run and an upload: on a loaded machine logging is slow).
    first = log_phrasebook(tracking_uri, "bench_registry_0")
    source = client.get_model_version("bench_registry_0", first)
    assert source.source is not None
    client.set_registered_model_alias("bench_registry_0", "champion", first)
    names = ["bench_registry_0"]
    for i in range(1, m):
        name = f"bench_registry_{i}"
        client.create_registered_model(name)
        version = client.create_model_version(
            name,
            source.source,
            run_id=source.run_id,
            model_id=source.model_id or source.source.removeprefix("models:/"),
            await_creation_for=0,
        )
        client.set_registered_model_alias(name, "champion", version.version)
        names.append(name)
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--resources", default="10,100,1000")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["n"], spec["models"], spec["uri"], spec["cycles"])))
        return

    print(f"# registry load benchmark, {stamp()}\n# load before: {uptime()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-registry-"))
    exit_cleanly_on_sigterm()
    server = start_mlflow(workdir / "mlflow")
    results = []
    try:
        names = register_models(server.url, args.models)
        for n in [0, *[int(x) for x in args.resources.split(",")]]:
            spec = {"n": n, "models": names, "uri": server.url, "cycles": args.cycles}
            out = subprocess.run(
                [PYTHON, "-m", "bench.registry_load", "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=False,
                timeout=900,
            )
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(result)
            cyc = result["cycles"]
            print(
                f"N={n:5} M={args.models}: setup {result['setup']['requests']} MLflow requests; per cycle "
                f"{[c['requests'] for c in cyc]} requests, reconciled {[c['reconciled'] for c in cyc]}, "
                f"cpu {[round(c['cpu_s'], 3) for c in cyc]} s; RSS {result['rss_mb']:.0f} MB",
                flush=True,
            )
    finally:
        server.stop()
    report(results, args.models)


def report(results: list[dict[str, Any]], m: int) -> None:
    base = results[0]
    rows = []
    for r in results:
        cycles = r["cycles"]
        reqs = sorted(c["requests"] for c in cycles)[len(cycles) // 2]
        cpu = sorted(c["cpu_s"] for c in cycles)[len(cycles) // 2]
        rows.append(
            [
                r["n"],
                m,
                r["setup"]["requests"],
                reqs,
                ", ".join(sorted({p for c in cycles for p in c["paths"]})) or "-",
                cpu * 1000,
                cpu / POLL_S * 100,
                r["rss_mb"],
                r["rss_mb"] - base["rss_mb"],
                r["serving"],
            ]
        )
    headers = [
        "resources N", "models M", "MLflow requests (first reconcile)", "MLflow requests per poll cycle",
        "paths", "driver CPU ms per cycle", "CPU % of one core at 30 s interval", "operator RSS MB",
        "RSS minus N=0 baseline MB", "resources serving",
    ]  # fmt: skip
    text = markdown_table(headers, rows)
    header = f"registry load benchmark {stamp()} (median of cycles); load after: {uptime()}\n"
    print("\n" + header + "\n" + text)
    save_json("registry_load", results)
    (RESULTS / "registry_load.md").write_text(header + "\n" + text + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ns = [r[0] for r in rows if r[0] > 0]
    a.plot(ns, [r[3] for r in rows if r[0] > 0], marker="o", label="MLflow requests / cycle")
    a.plot(ns, [r[5] for r in rows if r[0] > 0], marker="o", label="driver CPU ms / cycle")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("resources")
    a.legend()
    b.plot(ns, [r[7] for r in rows if r[0] > 0], marker="o", label="operator RSS MB")
    b.axhline(200, color="red", linestyle="--", label="target 200 MB")
    b.set_xscale("log")
    b.set_xlabel("resources")
    b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "registry_load.png", dpi=90)


if __name__ == "__main__":
    main()
