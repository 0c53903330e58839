"""Serving throughput and latency: regserve vs `mlflow models serve`, a bare Ray Serve deployment, MLServer.

    .venv/bin/python -m bench.serving [--rounds 2] [--duration 1.5] [--modes proxy,haproxy] [--models sklearn]
        [--peers mlserver] [--no-thin] [--lean]

(run from the repository root).

For each ingress mode a fresh Ray cluster (`ray start`, HAProxy mode by env var) serves, per model:
regserve without and with batching (`max_batch_size` 32, 5 ms), a bare deployment without and with
batching, and the same bare model behind a thin ingress deployment that forwards through a handle to a
multiplexed model deployment (`bench/thin_app.py`: the third ingress design, whose `÷ bare` is the
extra hop's cost). `mlflow models serve` (uvicorn, one worker) runs beside it all the time; every
round measures every target at c=1, 8, 32 in turn, so baseline and candidates see the same machine
load. Load comes from `wrk` in its own process (bench/wrk.py). Prints medians over rounds and ratios
against the baseline; writes bench/results/serving.{json,md,png}.

Peer (`--peers mlserver`, the default): MLServer 1.7.1 with the MLflow runtime (`bench/mlserver.py`, its
own cached virtualenv), one server process per model and batching setting, on the same version's model
directory downloaded from the registry: `/invocations` (MLflow's scoring protocol, the body every other
`/invocations` target gets) and its Open Inference Protocol endpoint `/v2/models/<name>/infer`, each
without and with adaptive batching (`max_batch_size` 32, `max_batch_time` 5 ms, like regserve's). Before
measuring, it checks that MLServer's `/invocations` answers what `mlflow models serve` answers, and
whether MLServer starts with `parallel_workers: 1` (recorded; the measured servers use 0). A second
table gives regserve ÷ MLServer per model, concurrency and batching setting.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
from regserve_operator.local_ray import IngressMode
from regserve_operator.sandbox.models import log_sklearn_classifier, log_tiny_translator

from bench import peers as mlserver
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
    v2_body: Any = None  # the same record in the Open Inference Protocol


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
                "sklearn",
                "bench_sklearn",
                version,
                row,
                {"inputs": [row]},
                {"inputs": [row]},
                [row] * 32,
                mlserver.v2_request("sklearn", row),
            )
        )
    if "sklearn-cols" in models:
        version, record = log_sklearn_columns(tracking_uri, "bench_sklearn_cols")
        columns = list(record)
        cases.append(
            ModelCase(
                "sklearn-cols",
                "bench_sklearn_cols",
                version,
                record,
                # What MLflow's own client sends for a pandas DataFrame.
                {"dataframe_split": {"columns": columns, "data": [list(record.values())]}},
                {"records": [record]},
                [record] * 32,
                mlserver.v2_request("sklearn-cols", record),
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
                mlserver.v2_request("t5", record),
            )
        )
    return cases


def log_sklearn_columns(tracking_uri: str, model_name: str) -> tuple[str, dict[str, float]]:
    """The sklearn pipeline fitted on a DataFrame of 4 named double columns (a column signature, the
    shape most tabular models are logged with), and one record for it."""
    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mlflow.set_tracking_uri(tracking_uri)
    rng = np.random.default_rng(0)
    features = pd.DataFrame(rng.normal(size=(200, 4)), columns=["f0", "f1", "f2", "f3"])
    labels = (features["f0"] + 0.5 * features["f1"] > 0).astype(np.int64)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(features, labels)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            signature=infer_signature(features, pipeline.predict(features)),
            pip_requirements=["mlflow", "scikit-learn"],
            registered_model_name=model_name,
        )
    record = {str(k): float(v) for k, v in features.iloc[0].items()}
    return str(info.registered_model_version), record


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
        Target(
            "regserve /invocations access log on",
            mode,
            f"{base}/rsq-{case.key}/invocations",
            case.invocations_body,
        ),
        Target(
            "regserve /invocations throughput-optimized",
            mode,
            f"{base}/rst-{case.key}/invocations",
            case.invocations_body,
        ),
        Target("bare Ray Serve", mode, f"{base}/bare-{case.key}", case.bare_body),
        Target("bare Ray Serve batch", mode, f"{base}/bareb-{case.key}", case.bare_body),
        Target("bare thin ingress", f"{mode}+thin", f"{base}/thin-{case.key}", case.bare_body),
        Target("bare thin ingress batch", f"{mode}+thin", f"{base}/thinb-{case.key}", case.bare_body),
    ]


# `--lean`: regserve as shipped, batched and not, and nothing else on the Ray cluster.
LEAN_TARGETS = frozenset(
    {"regserve /serve", "regserve /serve batch", "regserve /invocations", "regserve /invocations batch"}
)


def apps_for(
    case: ModelCase, tracking_uri: str, *, thin: bool = True, lean: bool = False
) -> list[dict[str, Any]]:
    uri = f"models:/{case.name}/{case.version}"
    shipped = [
        regserve_app(f"rs-{case.key}", case.name, case.version, tracking_uri),
        regserve_app(f"rsb-{case.key}", case.name, case.version, tracking_uri, batch=32),
    ]
    if lean:
        return shipped
    apps = [
        *shipped,
        regserve_app(f"rsq-{case.key}", case.name, case.version, tracking_uri, access_log=True),
        throughput_optimized(regserve_app(f"rst-{case.key}", case.name, case.version, tracking_uri)),
        bare_app(f"bare-{case.key}", uri),
        bare_app(f"bareb-{case.key}", uri, batch=32),
    ]
    if thin:
        apps += [
            thin_app(f"thin-{case.key}", case.name, case.version),
            thin_app(f"thinb-{case.key}", case.name, case.version, batch=32),
        ]
    return apps


def throughput_optimized(app: dict[str, Any]) -> dict[str, Any]:
    """The same application with Ray Serve's `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` in its replica's env:
    user code on the replica's own event loop (no hop to a second loop thread) and request-path logs
    buffered. Ray's knob, not regserve's: what Serve's own per-request machinery costs."""
    env = {"env_vars": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}}
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0.5, "runtime_env": env}
    return app


@dataclass
class Peers:
    """Peer servers beside the Ray cluster (MLServer), their targets per model, and what was checked."""

    servers: list[mlserver.MLServer] = field(default_factory=list)
    targets: dict[str, list[Target]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def stop(self) -> None:
        for peer in self.servers:
            peer.stop()


def download_model(case: ModelCase, tracking_uri: str, workdir: Path) -> Path:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    dst = workdir / f"model-{case.key}"
    dst.mkdir(parents=True, exist_ok=True)
    uri = f"models:/{case.name}/{case.version}"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))


def check_parallel_workers(bin_dir: Path, model_dir: Path, body: Any, workdir: Path) -> str:
    """Does MLServer serve with `parallel_workers: 1` (inference in a worker process)? One request."""
    peer = mlserver.MLServer(bin_dir, [mlserver.ModelSpec("pw", model_dir)], workdir, parallel_workers=1)
    try:
        peer.start(timeout=120)
        response = httpx.post(f"{peer.url}/invocations", json=body, timeout=60)
        outcome = f"started and answered HTTP {response.status_code}"
    except (AssertionError, TimeoutError, httpx.HTTPError) as error:
        outcome = f"failed: {str(error).splitlines()[0][:200]}"
    finally:
        tail = peer.log_tail(20000)
        peer.stop()
    marker = "There is no current event loop"
    found = f"; its log says {marker!r} ({tail.count(marker)} times)" if marker in tail else ""
    return f"MLServer {mlserver.VERSION} with parallel_workers 1: {outcome}{found}; log {peer.log}"


def start_peers(cases: list[ModelCase], tracking_uri: str, workdir: Path, peers: Peers) -> None:
    """One MLServer per model and batching setting, started together, on the registry's model directory."""
    bin_dir = mlserver.ensure_venv(any(c.key == "t5" for c in cases), log=workdir / "mlserver-venv.log")
    dirs = {case.key: download_model(case, tracking_uri, workdir) for case in cases}
    first = cases[0]
    peers.notes.append(check_parallel_workers(bin_dir, dirs[first.key], first.invocations_body, workdir))
    print(peers.notes[-1], flush=True)
    started = time.perf_counter()
    pending = []
    for case in cases:
        for batch in (1, 32):
            spec = mlserver.ModelSpec(case.key, dirs[case.key], batch, 0.005 if batch > 1 else 0.0)
            peer = mlserver.MLServer(bin_dir, [spec], workdir)
            peers.servers.append(peer)
            peer.launch()
            pending.append((case, batch, peer))
    for case, batch, peer in pending:
        peer.wait()
        suffix = " batch" if batch > 1 else ""
        targets = peers.targets.setdefault(case.key, [])
        targets.append(
            Target(
                f"MLServer /invocations{suffix}", "mlserver", f"{peer.url}/invocations", case.invocations_body
            )
        )
        v2 = Target(
            f"MLServer v2{suffix}", "mlserver", f"{peer.url}/v2/models/{case.key}/infer", case.v2_body
        )
        answer = httpx.post(v2.url, json=v2.body, timeout=120)
        if answer.status_code == 200:
            targets.append(v2)
        else:  # e.g. a model whose output its v2 codec cannot encode: say so, measure the rest
            lines = reversed(peer.log_tail(20000).splitlines())
            error = next((ln.strip()[:160] for ln in lines if "Error" in ln), "") or f"see {peer.log}"
            peers.notes.append(f"{case.key}: MLServer v2 answers HTTP {answer.status_code} ({error})")
    print(f"{len(pending)} MLServer processes ready after {time.perf_counter() - started:.0f} s", flush=True)


def same_answers(plan: list[tuple[ModelCase, Target]], peers: Peers) -> None:
    """MLServer's `/invocations` must answer what `mlflow models serve` answers (same body)."""
    answers: dict[tuple[str, str], Any] = {}
    for case, target in plan:
        if target.label == "mlflow models serve" or target.label.startswith("MLServer /invocations"):
            answers[(case.key, target.label)] = check(target.url, target.body).json()
    for (key, label), answer in answers.items():
        expected = answers[(key, "mlflow models serve")]
        if answer != expected:
            raise AssertionError(f"{label} on {key} answered {answer!r}, mlflow models serve {expected!r}")
        if label != "mlflow models serve":
            peers.notes.append(
                f"{key}: {label} answers what mlflow models serve answers: {str(answer)[:120]}"
            )


def measure_round(
    plan: list[tuple[ModelCase, Target]], mode: str, round_no: int, duration: float
) -> list[dict[str, Any]]:
    order = [(c, case, t) for c in CONCURRENCY for case, t in plan]
    results = load_cells([cell(t.url, t.body, concurrency=c, duration_s=duration) for c, _case, t in order])
    samples = []
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
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=1.5, help="seconds measured per cell")
    parser.add_argument("--modes", default="proxy,haproxy")
    parser.add_argument("--models", default="sklearn", help="sklearn,t5 (t5 needs ~4 GB more RAM)")
    parser.add_argument("--peers", default="mlserver", help="mlserver, or '' for none")
    parser.add_argument(
        "--thin", action=argparse.BooleanOptionalAction, default=True, help="thin-ingress rows"
    )
    parser.add_argument(
        "--lean",
        action="store_true",
        help="only regserve as shipped (batched and not) on the Ray cluster: no bare, thin or variant apps",
    )
    parser.add_argument(
        "--ingress-metrics",
        action="store_true",
        help="HAProxy's per-request metrics on (serving.ingressMetrics; off as shipped)",
    )
    args = parser.parse_args()
    before = uptime()
    print(f"# serving benchmark, {stamp()}\n# load before: {before}", flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-serving-"))
    exit_cleanly_on_sigterm()
    server = start_mlflow(workdir / "mlflow")
    baselines: dict[str, MlflowModelsServe] = {}
    peers = Peers()
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
        if "mlserver" in args.peers.split(","):
            start_peers(cases, server.url, workdir, peers)
        for mode in args.modes.split(","):
            cluster = RayCluster(
                cast(IngressMode, mode), workdir, ingress_metrics=args.ingress_metrics
            ).start()
            apps = [
                app for case in cases for app in apps_for(case, server.url, thin=args.thin, lean=args.lean)
            ]
            started = time.perf_counter()
            cluster.deploy(apps, timeout=900)  # a loaded 2-core box can need more than 300 s
            print(
                f"[{mode}] {len(apps)} applications running after {time.perf_counter() - started:.0f} s",
                flush=True,
            )
            plan = plan_for(cases, cluster, baselines, peers, thin=args.thin, lean=args.lean)
            for _case, target in plan:
                check(target.url, target.body)
            same_answers(plan, peers)
            load_cells([cell(t.url, t.body, concurrency=8, duration_s=0.5, warmup_s=0.2) for _c, t in plan])
            for round_no in range(args.rounds):
                print(f"[{mode}] round {round_no + 1}/{args.rounds}; load: {uptime()}", flush=True)
                samples += measure_round(plan, mode, round_no, args.duration)
                save_json("serving-partial", {"samples": samples, "limits": limits})
            cluster.stop()
            cluster = None
    finally:
        if cluster is not None:
            cluster.stop()
        peers.stop()
        for serve_process in baselines.values():
            serve_process.stop()
        server.stop()
    report(samples, limits, args, before=before, notes=sorted(set(peers.notes)))


def plan_for(
    cases: list[ModelCase],
    cluster: RayCluster,
    baselines: dict[str, MlflowModelsServe],
    peers: Peers,
    *,
    thin: bool,
    lean: bool = False,
) -> list[tuple[ModelCase, Target]]:
    plan: list[tuple[ModelCase, Target]] = []
    for case in cases:
        baseline = Target(
            "mlflow models serve", "uvicorn", f"{baselines[case.key].url}/invocations", case.invocations_body
        )
        ray_targets = [
            t
            for t in targets_for(case, cluster)
            if (thin or not t.ingress.endswith("+thin")) and (not lean or t.label in LEAN_TARGETS)
        ]
        plan += [(case, t) for t in [baseline, *ray_targets, *peers.targets.get(case.key, [])]]
    return plan


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
    samples: list[dict[str, Any]],
    limits: dict[str, dict[str, float]],
    args: argparse.Namespace,
    *,
    before: str = "",
    notes: list[str] | None = None,
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
                r["phase"] if r["ingress"] not in ("uvicorn", "mlserver") else f"({r['phase']} run)",
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
    peer_text = peer_table(index)
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
        f"load before: {before}\nload after: {uptime()}\n" + "".join(f"- {note}\n" for note in notes or [])
    )
    body = text + ("\n\nregserve ÷ MLServer (same run)\n\n" + peer_text if peer_text else "")
    body += "\n\nin-process predict limit\n\n" + limit_text
    print("\n" + header + "\n" + body)
    save_json("serving", {"samples": samples, "rows": rows, "limits": limits, "notes": notes or []})
    (RESULTS / "serving.md").write_text(header + "\n" + body + "\n")
    plot(rows)


def peer_table(index: dict[tuple[str, str, str, int], dict[str, Any]]) -> str:
    """Per model, Ray run, concurrency and batching: MLServer's numbers and regserve's ratios to them."""
    nan = float("nan")
    table = []
    keys = sorted({(m, phase, c) for (m, phase, t, c) in index if t.startswith("MLServer")})
    for model, phase, c in keys:
        for suffix in ("", " batch"):

            def get(label: str, field: str, m: str = model, p: str = phase, cc: int = c) -> float:
                row = index.get((m, p, label, cc))
                return float(row[field]) if row else nan

            peer_rps, peer_p50 = (
                get(f"MLServer /invocations{suffix}", "rps"),
                get(f"MLServer /invocations{suffix}", "p50_ms"),
            )
            table.append(
                [
                    model, phase, c, "on" if suffix else "off", peer_rps, peer_p50,
                    get(f"MLServer v2{suffix}", "rps"), get(f"MLServer v2{suffix}", "p50_ms"),
                    get(f"regserve /invocations{suffix}", "rps"),
                    get(f"regserve /invocations{suffix}", "p50_ms"),
                    get(f"regserve /invocations{suffix}", "rps") / peer_rps,
                    get(f"regserve /invocations{suffix}", "p50_ms") / peer_p50,
                    get(f"regserve /serve{suffix}", "rps") / peer_rps,
                    get(f"regserve /serve{suffix}", "p50_ms") / peer_p50,
                    get(f"bare Ray Serve{suffix}", "rps") / peer_rps,
                    get("mlflow models serve", "rps") / peer_rps,
                    get(f"regserve /invocations access log on{suffix}", "rps") / peer_rps,
                    get(f"regserve /invocations access log on{suffix}", "p50_ms") / peer_p50,
                    get(f"regserve /invocations throughput-optimized{suffix}", "rps") / peer_rps,
                    get(f"regserve /invocations throughput-optimized{suffix}", "p50_ms") / peer_p50,
                ]
            )  # fmt: skip
    headers = [
        "model", "Ray ingress", "c", "batching", "MLServer /invocations req/s", "p50 ms", "MLServer v2 req/s",
        "v2 p50 ms", "regserve /invocations req/s", "p50 ms", "req/s ÷ MLServer", "p50 ÷ MLServer",
        "regserve /serve req/s ÷ MLServer", "/serve p50 ÷ MLServer", "bare Ray Serve req/s ÷ MLServer",
        "mlflow models serve req/s ÷ MLServer", "access log on req/s ÷ MLServer",
        "access log on p50 ÷ MLServer", "throughput-optimized req/s ÷ MLServer",
        "throughput-optimized p50 ÷ MLServer",
    ]  # fmt: skip
    return markdown_table(headers, table) if table else ""


def _against_bare(target: str) -> bool:
    return not target.startswith(("bare Ray", "mlflow", "MLServer"))


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
