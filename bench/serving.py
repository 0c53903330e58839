"""Serving throughput and latency: regserve vs `mlflow models serve` vs a bare Ray Serve deployment.

    .venv/bin/python -m bench.serving [--rounds 2] [--duration 1.5] [--modes proxy,haproxy] [--models sklearn]

(run from the repository root).

For each ingress mode a fresh Ray cluster (`ray start`, HAProxy mode by env var) serves, per model:
regserve without and with batching (`max_batch_size` 32, 5 ms), a bare deployment without and with
batching, and the same bare model behind a thin ingress deployment that forwards through a handle to a
multiplexed model deployment (`bench/thin_app.py`: the third ingress design, whose `÷ bare` is the
extra hop's cost). `mlflow models serve` (uvicorn, one worker) runs beside it all the time; every
round measures every target at c=1, 8, 32 in turn, so baseline and candidates see the same machine
load. Load comes from `bench/loadgen.py` in its own process. Prints medians over rounds and ratios
against the baseline; writes bench/results/serving.{json,md,png}.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regserve_operator.sandbox.models import log_sklearn_classifier, log_tiny_translator

from bench.common import (
    RESULTS,
    MlflowModelsServe,
    RayCluster,
    bare_app,
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

CONCURRENCY = (1, 8, 32)


@dataclass
class ModelCase:
    key: str
    name: str
    version: str
    serve_body: Any  # one record for /serve
    invocations_body: Any  # the same record in MLflow's scoring protocol
    bare_body: Any
    batch_rows: list[Any]  # rows for the in-process predict limit


@dataclass
class Target:
    label: str  # e.g. "regserve /serve batch"
    ingress: str
    url: str
    body: Any


def register(tracking_uri: str, workdir: Path, models: list[str]) -> list[ModelCase]:
    cases = []
    if "sklearn" in models:
        version, samples, _ = log_sklearn_classifier(tracking_uri, "bench_sklearn")
        row = [float(x) for x in samples[0]]
        cases.append(
            ModelCase(
                "sklearn", "bench_sklearn", version, row, {"inputs": [row]}, {"inputs": [row]}, [row] * 32
            )
        )
    if "t5" in models:
        from serving_app.examples.tiny_t5 import build_tiny_t5

        model_dir = build_tiny_t5(workdir / "tiny_t5")
        version = log_tiny_translator(tracking_uri, "bench_t5", model_dir)
        record = {"prompt": "Hello world"}
        cases.append(
            ModelCase(
                "t5",
                "bench_t5",
                version,
                record,
                {"dataframe_records": [record]},
                {"records": [record]},
                [record] * 32,
            )
        )
    return cases


def in_process_limit(case: ModelCase, tracking_uri: str, seconds: float = 2.0) -> dict[str, float]:
    """`predict` alone, one row per call and 32 rows per call: rows/s, the ceiling of any server."""
    import mlflow
    import numpy as np
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{case.name}/{case.version}")

    def frame(rows: list[Any]) -> Any:
        if case.key == "sklearn":
            return np.asarray(rows, dtype=np.float64)
        return pd.DataFrame(rows)

    out = {}
    for size in (1, 32):
        data = frame(case.batch_rows[:size])
        model.predict(data)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model.predict(data)
            calls += 1
        elapsed = time.perf_counter() - started
        out[f"rows_per_s_batch{size}"] = calls * size / elapsed
        out[f"ms_per_call_batch{size}"] = elapsed / calls * 1000
    return out


def targets_for(case: ModelCase, cluster: RayCluster) -> list[Target]:
    base = cluster.serve_url
    mode = cluster.ingress
    return [
        Target("regserve /serve", mode, f"{base}/rs-{case.key}/serve", case.serve_body),
        Target("regserve /serve batch", mode, f"{base}/rsb-{case.key}/serve", case.serve_body),
        Target("regserve /invocations", mode, f"{base}/rs-{case.key}/invocations", case.invocations_body),
        Target(
            "regserve /invocations batch", mode, f"{base}/rsb-{case.key}/invocations", case.invocations_body
        ),
        Target("bare Ray Serve", mode, f"{base}/bare-{case.key}", case.bare_body),
        Target("bare Ray Serve batch", mode, f"{base}/bareb-{case.key}", case.bare_body),
        Target("bare thin ingress", f"{mode}+thin", f"{base}/thin-{case.key}", case.bare_body),
        Target("bare thin ingress batch", f"{mode}+thin", f"{base}/thinb-{case.key}", case.bare_body),
    ]


def apps_for(case: ModelCase, tracking_uri: str) -> list[dict[str, Any]]:
    uri = f"models:/{case.name}/{case.version}"
    return [
        regserve_app(f"rs-{case.key}", case.name, case.version, tracking_uri),
        regserve_app(f"rsb-{case.key}", case.name, case.version, tracking_uri, batch=32),
        bare_app(f"bare-{case.key}", uri),
        bare_app(f"bareb-{case.key}", uri, batch=32),
        thin_app(f"thin-{case.key}", case.name, case.version),
        thin_app(f"thinb-{case.key}", case.name, case.version, batch=32),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=1.5, help="seconds measured per cell")
    parser.add_argument("--modes", default="proxy,haproxy")
    parser.add_argument("--models", default="sklearn", help="sklearn,t5 (t5 needs ~4 GB more RAM)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    print(f"# serving benchmark, {stamp()}\n# load before: {uptime()}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-serving-"))
    exit_cleanly_on_sigterm()
    server = start_mlflow(workdir / "mlflow")
    baselines: dict[str, MlflowModelsServe] = {}
    cluster: RayCluster | None = None
    samples: list[dict[str, Any]] = []
    limits: dict[str, dict[str, float]] = {}
    try:
        cases = register(server.url, workdir, args.models.split(","))
        for case in cases:
            limits[case.key] = in_process_limit(case, server.url)
            print(f"in-process predict limit {case.key}: {limits[case.key]}", flush=True)
            baselines[case.key] = MlflowModelsServe(
                f"models:/{case.name}/{case.version}", server.url, workdir
            ).start()
        for mode in modes:
            cluster = RayCluster(mode, workdir).start()
            apps = [app for case in cases for app in apps_for(case, server.url)]
            started = time.perf_counter()
            cluster.deploy(apps)
            print(
                f"[{mode}] {len(apps)} applications running after {time.perf_counter() - started:.0f} s",
                flush=True,
            )
            plan: list[tuple[ModelCase, Target]] = []
            for case in cases:
                baseline = Target(
                    "mlflow models serve",
                    "uvicorn",
                    f"{baselines[case.key].url}/invocations",
                    case.invocations_body,
                )
                plan += [(case, t) for t in [baseline, *targets_for(case, cluster)]]
            for _case, target in plan:
                check(target.url, target.body)
            load_cells([cell(t.url, t.body, concurrency=8, duration_s=0.5, warmup_s=0.2) for _c, t in plan])
            for round_no in range(args.rounds):
                print(f"[{mode}] round {round_no + 1}/{args.rounds}; load: {uptime()}", flush=True)
                order = [(c, case, t) for c in CONCURRENCY for case, t in plan]
                results = load_cells(
                    [cell(t.url, t.body, concurrency=c, duration_s=args.duration) for c, _case, t in order]
                )
                for (concurrency, case, target), result in zip(order, results, strict=True):
                    samples.append(
                        {
                            "model": case.key,
                            "phase": mode,
                            "target": target.label,
                            "ingress": target.ingress,
                            "c": concurrency,
                            "round": round_no,
                            **result,
                        }
                    )
                    print(
                        f"  {case.key:7} c={concurrency:<2} {target.ingress:8} {target.label:28} "
                        f"{result['rps']:7.0f} req/s p50 {result['p50_ms']:6.1f} ms "
                        f"p99 {result['p99_ms']:6.1f} ms err {result['errors']}",
                        flush=True,
                    )
                save_json("serving-partial", {"samples": samples, "limits": limits})
            cluster.stop()
            cluster = None
    finally:
        if cluster is not None:
            cluster.stop()
        for serve_process in baselines.values():
            serve_process.stop()
        server.stop()
    report(samples, limits, args)


def summarise(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str, str, int], list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["model"], s["phase"], s["target"], s["ingress"], s["c"]), []).append(s)
    rows = []
    for (model, phase, target, ingress, c), group in groups.items():
        rows.append(
            {
                "model": model,
                "phase": phase,
                "target": target,
                "ingress": ingress,
                "c": c,
                "rps": median([g["rps"] for g in group]),
                "p50_ms": median([g["p50_ms"] for g in group]),
                "p99_ms": median([g["p99_ms"] for g in group]),
                "errors": sum(g["errors"] for g in group),
            }
        )
    return rows


def report(
    samples: list[dict[str, Any]], limits: dict[str, dict[str, float]], args: argparse.Namespace
) -> None:
    rows = summarise(samples)
    index = {(r["model"], r["phase"], r["target"], r["c"]): r for r in rows}
    table = []
    for r in rows:
        base = index.get((r["model"], r["phase"], "mlflow models serve", r["c"]))
        bare_label = "bare Ray Serve batch" if r["target"].endswith("batch") else "bare Ray Serve"
        bare = index.get((r["model"], r["phase"], bare_label, r["c"]))
        table.append(
            [
                r["model"],
                r["phase"] if r["ingress"] != "uvicorn" else f"({r['phase']} run)",
                r["target"],
                r["ingress"],
                r["c"],
                r["rps"],
                r["p50_ms"],
                r["p99_ms"],
                r["rps"] / base["rps"] if base else float("nan"),
                r["p50_ms"] / base["p50_ms"] if base else float("nan"),
                r["rps"] / bare["rps"] if bare and _against_bare(r["target"]) else float("nan"),
                r["errors"],
            ]
        )
    headers = [
        "model", "run", "target", "ingress", "c", "req/s", "p50 ms", "p99 ms",
        "req/s ÷ mlflow", "p50 ÷ mlflow", "req/s ÷ bare", "errors",
    ]  # fmt: skip
    text = markdown_table(headers, table)
    limit_rows = [
        [
            k,
            v["rows_per_s_batch1"],
            v["ms_per_call_batch1"],
            v["rows_per_s_batch32"],
            v["ms_per_call_batch32"],
        ]
        for k, v in limits.items()
    ]
    limit_text = markdown_table(
        ["model", "rows/s (1 row/call)", "ms/call", "rows/s (32 rows/call)", "ms/call (32)"], limit_rows
    )
    header = (
        f"serving benchmark {stamp()}, rounds={args.rounds}, {args.duration} s per cell, "
        "medians over rounds\n"
        f"load after: {uptime()}\n"
    )
    print("\n" + header + "\n" + text + "\n\nin-process predict limit\n\n" + limit_text)
    save_json("serving", {"samples": samples, "rows": rows, "limits": limits})
    (RESULTS / "serving.md").write_text(header + "\n" + text + "\n\n" + limit_text + "\n")
    plot(rows)


def _against_bare(target: str) -> bool:
    return not target.startswith(("bare Ray", "mlflow"))


def plot(rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    phases = sorted({r["phase"] for r in rows})
    fig, axes = plt.subplots(
        len(models), len(phases), figsize=(7 * len(phases), 4.5 * len(models)), squeeze=False
    )
    for i, model in enumerate(models):
        for j, phase in enumerate(phases):
            ax = axes[i][j]
            subset = [r for r in rows if r["model"] == model and r["phase"] == phase]
            for label in sorted({r["target"] for r in subset}):
                points = sorted((r["c"], r["rps"]) for r in subset if r["target"] == label)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
            ax.set_title(f"{model}, Ray ingress: {phase}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel("req/s (median)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "serving.png", dpi=90)


if __name__ == "__main__":
    main()
