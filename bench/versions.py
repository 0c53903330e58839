"""Version switching and cold loads.

    .venv/bin/python -m bench.versions [--modes proxy,haproxy] [--rounds 2] [--duration 3] [--cold 3]

1. Switching: c=8 requests spread round-robin over 1, 2 and 3 versions (header
   `serve-multiplexed-model-id`; the first version is the default) with `max_models_per_replica=2`
   (the default version plus ONE multiplexed slot), on one and on two replicas, per ingress mode.
   Baseline in the same run: the same app asked for its default version only. The same traffic also
   goes to the thin-ingress design (`bench/thin_app.py`, ingress `<mode>+thin`: a multiplexed model
   deployment with 2 slots per replica behind a handle, so Serve's router keeps version affinity).
2. Cold load: the first request pinned to a version never loaded before (client-measured, includes
   the signature compatibility check), against a bare `mlflow.pyfunc.load_model` + first predict of the
   same version in a warm process (mlflow and sklearn imported, another version loaded), interleaved.
Writes bench/results/versions.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from math import nan
from pathlib import Path
from typing import Any

import httpx
from regserve_operator.sandbox.models import log_sklearn_classifier

from bench.common import (
    PYTHON,
    RESULTS,
    RayCluster,
    cell,
    check,
    exit_cleanly_on_sigterm,
    load_cells,
    markdown_table,
    median,
    regserve_app,
    save_json,
    stamp,
    start_mlflow,
    thin_app,
    uptime,
)
from serving_app.timing import parse_header

MODEL = "bench_versions"
HEADER = "serve-multiplexed-model-id"

BARE_LOAD = """
import json, sys, time
import mlflow, numpy as np
mlflow.set_tracking_uri(sys.argv[1])
row = np.asarray([json.loads(sys.argv[4])], dtype=np.float64)
mlflow.pyfunc.load_model(f"models:/{sys.argv[2]}/1").predict(row)  # warm: imports and one load done
started = time.perf_counter()
mlflow.pyfunc.load_model(f"models:/{sys.argv[2]}/{sys.argv[3]}").predict(row)
print((time.perf_counter() - started) * 1000)
"""


def bare_cold_ms(tracking_uri: str, version: str, row: list[float]) -> float:
    out = subprocess.run(
        [PYTHON, "-c", BARE_LOAD, tracking_uri, MODEL, version, json.dumps(row)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(out.stdout.strip().splitlines()[-1])


# The replica's steps of a cold load, from its `Server-Timing` header (serving_app/timing.py).
COLD_STEPS = ("gate", "download", "load", "pinned", "predict", "total")


def served_cold_ms(
    http: httpx.Client, url: str, version: str, row: list[float]
) -> tuple[float, dict[str, float]]:
    """The first pinned request's time as the client sees it, and the replica's own steps.

    The client is made once and warmed: `httpx.post` builds a client per call, TLS context included,
    which cost about 50 ms of this side's CPU on every call and was counted as the replica's."""
    started = time.perf_counter()
    response = http.post(url, json=row, headers={HEADER: version}, timeout=300)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200 or response.headers.get("x-model-version") != version:
        raise AssertionError(f"cold request for {version}: {response.status_code} {response.text[:300]}")
    return elapsed, parse_header(response.headers.get("server-timing", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--modes", default="proxy,haproxy")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--cold", type=int, default=3, help="cold loads per ingress mode")
    args = parser.parse_args()
    modes = args.modes.split(",")
    print(f"# version switching benchmark, {stamp()}\n# load before: {uptime()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-versions-"))
    exit_cleanly_on_sigterm()
    server = start_mlflow(workdir / "mlflow")
    cluster: RayCluster | None = None
    switching: list[dict[str, Any]] = []
    cold: list[dict[str, Any]] = []
    try:
        versions = []
        row: list[float] = []
        for seed in range(3 + args.cold * len(modes)):
            version, samples, _ = log_sklearn_classifier(server.url, MODEL, seed=seed)
            versions.append(version)
            row = [float(x) for x in samples[0]]
        fresh = iter(versions[3:])
        for mode in modes:
            cluster = RayCluster(mode, workdir).start()
            apps = []
            for r in (1, 2):
                apps.append(
                    regserve_app(
                        f"ver{r}", MODEL, versions[0], server.url, replicas=r, max_models_per_replica=2
                    )
                )
                apps.append(thin_app(f"thin{r}", MODEL, versions[0], model_replicas=r))
            cluster.deploy(apps)
            # (ingress label, replicas) -> (url, body): regserve takes the record, the thin design `inputs`.
            targets = {
                **{(mode, r): (f"{cluster.serve_url}/ver{r}/serve", row) for r in (1, 2)},
                **{(f"{mode}+thin", r): (f"{cluster.serve_url}/thin{r}", {"inputs": [row]}) for r in (1, 2)},
            }
            for url, body in targets.values():
                for v in versions[:3]:
                    check(url, body, {HEADER: v})
            plan = [(target, k) for target in targets for k in (1, 2, 3)]
            for round_no in range(args.rounds):
                print(f"[{mode}] switching round {round_no + 1}; load: {uptime()}", flush=True)
                cells = [
                    cell(
                        targets[target][0],
                        targets[target][1],
                        concurrency=8,
                        duration_s=args.duration,
                        bodies=[(targets[target][1], {HEADER: v}) for v in versions[:k]],
                    )
                    for target, k in plan
                ]
                for ((ingress, r), k), result in zip(plan, load_cells(cells), strict=True):
                    switching.append(
                        {"ingress": ingress, "replicas": r, "versions": k, "round": round_no, **result}
                    )
                    print(
                        f"  {ingress:13} replicas={r} versions={k}: {result['rps']:6.0f} req/s "
                        f"p50 {result['p50_ms']:6.1f} ms p99 {result['p99_ms']:7.1f} ms "
                        f"err {result['errors']}",
                        flush=True,
                    )
            http = httpx.Client()
            http.post(targets[(mode, 1)][0], json=row, timeout=120).raise_for_status()  # connected, warm
            for _ in range(args.cold):
                version = next(fresh)
                bare = bare_cold_ms(server.url, version, row)
                served, steps = served_cold_ms(http, targets[(mode, 1)][0], version, row)
                # The same version again, loaded now: the request path's own share, for comparison.
                warm, warm_steps = served_cold_ms(http, targets[(mode, 1)][0], version, row)
                cold.append(
                    {"ingress": mode, "version": version, "bare_ms": bare, "served_ms": served,
                     "steps": steps, "warm_ms": warm, "warm_total_ms": warm_steps.get("total", nan)}
                )  # fmt: skip
                print(f"  cold v{version}: bare {bare:.0f} ms, served {served:.0f} ms", steps, flush=True)
            http.close()
            cluster.stop()
            cluster = None
    finally:
        if cluster is not None:
            cluster.stop()
        server.stop()
    report(switching, cold, args)


def report(switching: list[dict[str, Any]], cold: list[dict[str, Any]], args: argparse.Namespace) -> None:
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for s in switching:
        groups.setdefault((s["ingress"], s["replicas"], s["versions"]), []).append(s)
    summary = {
        key: {f: median([g[f] for g in group]) for f in ("rps", "p50_ms", "p99_ms")}
        for key, group in groups.items()
    }
    rows = []
    for (mode, r, k), values in sorted(summary.items()):
        base = summary[(mode, r, 1)]
        regserve = summary.get((mode.removesuffix("+thin"), r, k))
        rows.append(
            [mode, r, k, values["rps"], values["p50_ms"], values["p99_ms"], values["rps"] / base["rps"],
             values["rps"] / regserve["rps"] if regserve else float("nan"),
             sum(g["errors"] for g in groups[(mode, r, k)])]
        )  # fmt: skip
    switch_text = markdown_table(
        [
            "ingress",
            "replicas",
            "versions in traffic",
            "req/s",
            "p50 ms",
            "p99 ms",
            "req/s ÷ 1 version",
            "req/s ÷ regserve (same mode, replicas, versions)",
            "errors",
        ],
        rows,
    )

    def step_ms(c: dict[str, Any], name: str) -> float:
        return float(c.get("steps", {}).get(name, nan))

    cold_rows = [
        [c["ingress"], c["version"], c["bare_ms"], c["served_ms"], c["served_ms"] / c["bare_ms"],
         *(step_ms(c, name) for name in COLD_STEPS), c.get("warm_ms", nan), c.get("warm_total_ms", nan)]
        for c in cold
    ]  # fmt: skip
    for mode in sorted({c["ingress"] for c in cold}):
        mine = [c for c in cold if c["ingress"] == mode]
        bare = median([c["bare_ms"] for c in mine])
        served = median([c["served_ms"] for c in mine])
        steps = [median([step_ms(c, name) for c in mine]) for name in COLD_STEPS]
        warm = [median([c.get(key, nan) for c in mine]) for key in ("warm_ms", "warm_total_ms")]
        cold_rows.append([mode, "median", bare, served, served / bare, *steps, *warm])
    cold_text = markdown_table(
        ["ingress", "version", "bare load_model+predict ms", "regserve first pinned request ms", "ratio"]
        + [f"replica: {name} ms" for name in COLD_STEPS]
        + ["second request ms", "second: replica total ms"],
        cold_rows,
    )
    header = (
        f"version switching {stamp()}: c=8, {args.duration} s per cell, medians of {args.rounds} rounds, "
        f"max_models_per_replica=2; load after: {uptime()}\n"
    )
    print("\n" + header + "\n" + switch_text + "\n\ncold loads\n\n" + cold_text)
    save_json("versions", {"switching": switching, "cold": cold})
    (RESULTS / "versions.md").write_text(header + "\n" + switch_text + "\n\n" + cold_text + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in sorted({k[0] for k in summary}):
        for r in (1, 2):
            points = sorted((k[2], v["rps"]) for k, v in summary.items() if k[0] == mode and k[1] == r)
            a.plot(
                [p[0] for p in points], [p[1] for p in points], marker="o", label=f"{mode}, {r} replica(s)"
            )
    a.set_xlabel("versions in traffic (max_models_per_replica=2)")
    a.set_ylabel("req/s at c=8")
    a.legend()
    labels = [f"{c['ingress']} v{c['version']}" for c in cold]
    xs = range(len(cold))
    b.bar([x - 0.2 for x in xs], [c["bare_ms"] for c in cold], width=0.4, label="bare load_model+predict")
    b.bar(
        [x + 0.2 for x in xs],
        [c["served_ms"] for c in cold],
        width=0.4,
        label="regserve first pinned request",
    )
    b.set_xticks(list(xs), labels, rotation=45, fontsize=7)
    b.set_ylabel("ms")
    b.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "versions.png", dpi=90)


if __name__ == "__main__":
    main()
