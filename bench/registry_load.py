"""Registry load: N resources over M models → MLflow requests per poll cycle, operator CPU and memory.

    .venv/bin/python -m bench.registry_load [--models 10] [--resources 10,100,1000] [--cycles 3]
    .venv/bin/python -m bench.registry_load --models 1000 --resources 1000,10000   # 10,000 over 1,000

A real `mlflow server` holds M registered models (one version each, alias `champion`). For each N a
fresh child process runs the operator's Driver (the reconcile loop `regserve dev` and the operator
share) with N resources spread over the M models (the first reconcile lasts until every resource has
written its deployment-state tag to the registry), the real `Registry` poller, and an in-memory target
that reports every RayService Ready. MLflow is reached through a counting reverse proxy (HTTP-layer
count). A fake clock moves one poll interval per cycle, so every resource is due every cycle; the
driver thread's CPU time, the cycle's wall time and the process RSS (and its peak) are measured. The
child first imports what `regserve run` loads (kopf, the Kubernetes target, the webhook receiver), so its
RSS is an operator's. Baseline in the same run: N=0 (an operator process with nothing to do).

Promotions, with all N resources present: the alias of a model moves to its second version on the real
server, then `model_changed` (what the webhook receiver calls) and the driver's pass; the time is from
the alias call's return to the target's patch of the LAST of that model's resources. Two cases: "idle"
(nothing else due: the pass reconciles only the promoted model's resources) and "in a full cycle" (the
promotion lands as every resource falls due: the worst case of a sequential pass). The loop's wait for
its next pass (up to one tick, `TIMER_INTERVAL_S` in kopf) is not included.
Writes bench/results/registry_load.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import tempfile
import time
import uuid
import zlib
from datetime import UTC, datetime
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
SETTLE_PASSES = 5


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def tag_writes(proxy: Any) -> int:
    return sum(count for path, count in proxy.counts.items() if path.endswith("/set-tag"))


def child(spec: dict[str, Any]) -> dict[str, Any]:
    # What a running operator has loaded besides the Driver: without these N=0 would understate it.
    import aiohttp.web  # noqa: F401
    import regserve_operator.main
    import regserve_operator.targets.kube  # noqa: F401
    from regserve_operator.builders import BuildDefaults
    from regserve_operator.driver import Driver
    from regserve_operator.reconcile import Deps
    from regserve_operator.registry import Registry

    from tests.operator.counting_proxy import CountingProxy

    n, models, cycles = spec["n"], spec["models"], spec["cycles"]
    idle_rss = rss_mb()
    clock = [1000.0]
    with CountingProxy(spec["uri"]) as proxy:
        target = StubTarget()
        cache = {"facts_cache_size": spec["facts_cache"]} if spec.get("facts_cache") else {}
        deps = Deps(
            registry=Registry(clock=lambda: clock[0], **cache),
            target=target,
            defaults=BuildDefaults(image="rayproject/ray:bench", ray_version="2.60.0"),  # no `import ray`
            settle_seconds=5,
        )
        driver = Driver(
            deps,
            clock=lambda: clock[0],
            now=lambda: datetime.fromtimestamp(clock[0], UTC),  # settling is judged on it too
            tick_seconds=0.5,
        )
        _add_resources(driver, n, models, proxy.url)
        started_cpu, started_wall = time.thread_time(), time.perf_counter()
        driver.run_once()  # create
        clock[0] += 6
        driver.run_once()  # rollout judged
        # Each resource tags its serving version in the registry once the rollout has settled: one
        # write per resource, once, so part of the first reconcile rather than of a poll cycle.
        for _ in range(SETTLE_PASSES):
            tags = tag_writes(proxy)
            clock[0] += POLL_S + 1
            driver.run_once()
            if tags and tag_writes(proxy) == tags:
                break
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
        serving = sum(1 for r in driver._resources.values() if driver.status(r.owner).serving_version)
        promotions = _promotions(driver, target, proxy, clock, spec) if n else []
    return {
        "n": n,
        "m": len(models),
        "setup": setup,
        "cycles": per_cycle,
        "promotions": promotions,
        "rss_mb": rss_mb(),
        "peak_rss_mb": peak_rss_mb(),
        "idle_rss_mb": idle_rss,
        "serving": serving,
        "stub_store_mb": target.stored_bytes / 2**20,
    }


class StubTarget:
    """The Target port with every applied RayService at once Ready and its application RUNNING; applies
    are timed. Objects are kept as compressed JSON (the cluster's copy lives in the API server, not in
    the operator): `stored_bytes` is what they still add to the RSS measured here."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.times: list[tuple[float, str]] = []
        self._rv = 0

    @property
    def stored_bytes(self) -> int:
        return sum(len(v) for v in self.objects.values())

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        blob = self.objects.get((namespace, name))
        return json.loads(zlib.decompress(blob)) if blob else None

    def members(self, namespace: str, cluster: str) -> list[dict[str, Any]]:
        return []

    def apply(self, plan: Any) -> None:
        import jsonpatch
        from regserve_operator.ports import TargetConflict

        key = (plan.namespace, plan.name)
        if plan.action == "create":
            obj = copy.deepcopy(plan.desired)
        else:
            try:
                obj = jsonpatch.apply_patch(self.get(*key), plan.patch)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise TargetConflict(str(exc)) from exc
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        obj["status"] = {
            "conditions": [{"type": "Ready", "status": "True"}],
            "activeServiceStatus": {"applicationStatuses": {plan.name: {"status": "RUNNING"}}},
        }
        self.objects[key] = zlib.compress(json.dumps(obj).encode())
        self.times.append((time.perf_counter(), plan.name))

    def read_credentials(self, namespace: str, secret_name: str) -> dict[str, str]:
        from regserve_operator.ports import CredentialsUnavailable

        raise CredentialsUnavailable(f"secret {namespace}/{secret_name}: none in the benchmark")

    def url(self, namespace: str, name: str, route_prefix: str) -> str:
        return f"http://{name}-serve-svc.{namespace}.svc:8000{route_prefix}"


def _add_resources(driver: Any, n: int, models: list[str], tracking_uri: str) -> None:
    from regserve_operator.builders import Owner
    from regserve_operator.spec import parse_spec

    for i in range(n):
        spec = parse_spec(
            {
                "model": {"name": models[i % len(models)], "alias": "champion"},
                "registry": {"trackingUri": tracking_uri, "pollIntervalSeconds": POLL_S},
                "serving": {"routePrefix": f"/r{i}"},
            }
        )
        driver.apply(Owner(name=f"r{i}", namespace="bench", uid=str(uuid.uuid4())), spec)


def _promotions(
    driver: Any, target: Any, proxy: Any, clock: list[float], spec: dict[str, Any]
) -> list[dict[str, Any]]:
    """Move `champion` to version 2 of the models that have one, each in turn; time until the target
    has patched every resource of that model (see the module doc for the two cases)."""
    import httpx

    models, n = spec["models"], spec["n"]
    out = []
    for k, model in enumerate(spec["promoted"]):
        busy = k % 2 == 1
        names = {f"r{i}" for i in range(n) if models[i % len(models)] == model}
        if not names:
            continue
        clock[0] += 6  # settle any rollout judged before
        driver.run_once()
        proxy.reset()
        target.times.clear()
        response = httpx.post(
            f"{spec['uri']}/api/2.0/mlflow/registered-models/alias",
            json={"name": model, "alias": "champion", "version": "2"},
            timeout=30,
        )
        response.raise_for_status()
        moved = time.perf_counter()
        driver.model_changed(model)
        if busy:
            clock[0] += POLL_S + 1  # every resource is due in this pass too
        cpu = time.thread_time()
        outcomes = driver.run_once()
        pass_s = time.perf_counter() - moved
        patched = {name: at for at, name in target.times if name in names}
        out.append(
            {
                "model": model,
                "case": "in a full cycle" if busy else "idle",
                "resources": len(names),
                "patched": len(patched),
                "seconds": max(patched.values()) - moved if len(patched) == len(names) else float("nan"),
                "first_s": min(patched.values()) - moved if patched else float("nan"),
                "pass_s": pass_s,
                "pass_cpu_s": time.thread_time() - cpu,
                "reconciled": len(outcomes),
                "requests": proxy.total(),
            }
        )
    return out


def register_models(server: Any, m: int, promoted: int) -> tuple[list[str], list[str]]:
    """M registered models, `champion` on version 1; the first `promoted` get a version 2 to move to.

    One model is logged through the server; the others are versions of its artifacts written straight
    into the server's sqlite store with mlflow's own store class (over REST, 60 writes to the one-worker
    server took most of a minute on the loaded 2-core machine; 1000 models need 3000)."""
    from mlflow import MlflowClient
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore
    from regserve_operator.sandbox.models import log_phrasebook

    first = log_phrasebook(server.url, "bench_registry_0")
    source = MlflowClient(server.url).get_model_version("bench_registry_0", first)
    assert source.source is not None
    model_id = source.model_id or source.source.removeprefix("models:/")
    store = SqlAlchemyStore(f"sqlite:///{server.root / 'mlflow.db'}")
    names = [f"bench_registry_{i}" for i in range(m)]
    for i, name in enumerate(names):
        if i:
            store.create_registered_model(name)
            store.create_model_version(name, source.source, run_id=source.run_id, model_id=model_id)
        if i < promoted:
            store.create_model_version(name, source.source, run_id=source.run_id, model_id=model_id)
        store.set_registered_model_alias(name, "champion", "1")
    store.engine.dispose()
    return names, names[:promoted]


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [PYTHON, "-m", "bench.registry_load", "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--resources", default="10,100,1000")
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--promotions", type=int, default=4, help="alternately idle and in a full cycle")
    parser.add_argument(
        "--facts-cache",
        type=int,
        default=0,
        help="the Registry's facts cache size (versions); 0: the operator's default",
    )
    parser.add_argument("--out", default="registry_load", help="bench/results/<out>.{json,md,png}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    print(f"# registry load benchmark, {stamp()}\n# load before: {uptime()}", flush=True)
    before = uptime()
    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-registry-"))
    exit_cleanly_on_sigterm()
    server = start_mlflow(workdir / "mlflow")
    results = []
    try:
        started = time.perf_counter()
        names, promoted = register_models(server, args.models, min(args.promotions, args.models))
        print(f"{args.models} models registered in {time.perf_counter() - started:.0f} s", flush=True)
        for n in [0, *[int(x) for x in args.resources.split(",")]]:
            spec = {"n": n, "models": names, "uri": server.url, "cycles": args.cycles}
            spec["facts_cache"] = args.facts_cache
            # Each N promotes models its previous runs have not (the alias stays where a run left it).
            spec["promoted"] = []
            if n:
                spec["promoted"], promoted = promoted[: args.promotions], promoted[args.promotions :]
            result = run_child(spec)
            results.append(result)
            cyc = result["cycles"]
            print(
                f"N={n:5} M={args.models}: setup {result['setup']['requests']} MLflow requests "
                f"{result['setup']['wall_s']:.1f} s; per cycle {[c['requests'] for c in cyc]} requests, "
                f"reconciled {[c['reconciled'] for c in cyc]}, cpu {[round(c['cpu_s'], 3) for c in cyc]} s, "
                f"wall {[round(c['wall_s'], 2) for c in cyc]} s; RSS {result['rss_mb']:.0f} MB "
                f"(peak {result['peak_rss_mb']:.0f}); promotions "
                f"{[(p['case'], round(p['seconds'], 3)) for p in result['promotions']]}",
                flush=True,
            )
    finally:
        server.stop()
    report(results, args.models, f"{before}; facts cache: {args.facts_cache or 'default'}", args.out)


def _mid(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def report(results: list[dict[str, Any]], m: int, before: str, out: str = "registry_load") -> None:
    base = results[0]
    rows = []
    for r in results:
        cycles = r["cycles"]
        cpu = _mid([c["cpu_s"] for c in cycles])
        rows.append(
            [
                r["n"],
                m,
                r["setup"]["requests"],
                _mid([c["requests"] for c in cycles]),
                ", ".join(sorted({p for c in cycles for p in c["paths"]})) or "-",
                cpu,
                _mid([c["wall_s"] for c in cycles]),
                cpu / POLL_S * 100,
                r["rss_mb"],
                r.get("peak_rss_mb", float("nan")),
                r["rss_mb"] - base["rss_mb"],
                r.get("stub_store_mb", float("nan")),
                r["serving"],
            ]
        )
    headers = [
        "resources N", "models M", "MLflow requests (first reconcile)", "MLflow requests per poll cycle",
        "paths", "driver CPU s per cycle", "cycle wall s", "CPU % of one core at 30 s interval",
        "operator RSS MB", "peak RSS MB", "RSS minus N=0 baseline MB", "stub target's objects MB (in RSS)",
        "resources serving",
    ]  # fmt: skip
    promotion_rows = [
        [
            r["n"], p["case"], p["model"], p["resources"], p["patched"], p["first_s"], p["seconds"],
            p["pass_s"], p["pass_cpu_s"], p["reconciled"], p["requests"],
        ]
        for r in results
        for p in r.get("promotions", [])
    ]  # fmt: skip
    promotion_headers = [
        "resources N", "promotion", "model", "its resources", "patched", "first patch s",
        "last patch s (alias moved → RayService patched)", "pass s", "pass CPU s", "reconciled in the pass",
        "MLflow requests in the pass",
    ]  # fmt: skip
    text = markdown_table(headers, rows) + "\n\n" + markdown_table(promotion_headers, promotion_rows)
    header = (
        f"registry load benchmark {stamp()} (median of cycles); load before: {before}; after: {uptime()}\n"
    )
    print("\n" + header + "\n" + text)
    save_json(out, results)
    (RESULTS / f"{out}.md").write_text(header + "\n" + text + "\n")
    plot(rows, out)


def plot(rows: list[list[Any]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ns = [r[0] for r in rows if r[0] > 0]
    a.plot(ns, [r[3] for r in rows if r[0] > 0], marker="o", label="MLflow requests / cycle")
    a.plot(ns, [r[5] for r in rows if r[0] > 0], marker="o", label="driver CPU s / cycle")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("resources")
    a.legend()
    b.plot(ns, [r[8] for r in rows if r[0] > 0], marker="o", label="operator RSS MB")
    b.plot(ns, [r[9] for r in rows if r[0] > 0], marker="o", label="peak RSS MB")
    b.axhline(300, color="red", linestyle="--", label="target 300 MB")
    b.set_xscale("log")
    b.set_xlabel("resources")
    b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{out}.png", dpi=90)


if __name__ == "__main__":
    main()
