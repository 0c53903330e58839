"""Local mode (`regserve dev`) against `mlflow models serve` on the sklearn model, one node, loopback.

    .venv/bin/python -m bench.local_mode [--rounds 2] [--duration 5]

(run from the repository root). Local mode runs as `regserve dev` does (`local.make_session`: it starts
its own Ray cluster, HAProxy ingress by default, and reconciles two resources for the same registered
model: one unbatched, one with `maxBatchSize` 32 / 5 ms). `mlflow models serve` (uvicorn, one worker)
serves the same version beside it. Every round measures every target at c=1 and c=32 in turn (a wrk
process per cell), so baseline and candidates see the same machine load; prints medians over
rounds and ratios against the baseline: the targets are c=1 p50 at most 1.2x and, batched, c=32 at least 3.5x.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from regserve_operator.local import DevSession, load_resources, make_session
from regserve_operator.sandbox.models import log_sklearn_classifier
from regserve_operator.sandbox.processes import free_port
from regserve_operator.spec import manifest, manifests_yaml

from bench.common import (
    MlflowModelsServe,
    all_serving,
    cell,
    check,
    exit_cleanly_on_sigterm,
    load_cells,
    median,
    save_json,
    stamp,
    start_mlflow,
    uptime,
)

MODEL = "bench_local_sklearn"
CONCURRENCY = (1, 32)


def resources(uri: str) -> list[dict[str, Any]]:
    """The same model twice: as it comes, and with Serve's request batching."""

    def following(serving: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": {"name": MODEL, "alias": "champion"},
            "registry": {"trackingUri": uri, "pollIntervalSeconds": 30},
            "serving": serving,
        }

    return [
        manifest("plain", following({"routePrefix": "/plain", "cpusPerReplica": 0.5})),
        manifest(
            "batched",
            following(
                {
                    "routePrefix": "/batched",
                    "cpusPerReplica": 0.5,
                    "batching": {"maxBatchSize": 32, "batchWaitTimeoutMs": 5},
                }
            ),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    print(f"# local mode vs mlflow models serve, {stamp()}\n# load before: {uptime()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-local-"))
    exit_cleanly_on_sigterm()
    server = start_mlflow(workdir / "mlflow")
    baseline: MlflowModelsServe | None = None
    session: DevSession | None = None
    try:
        version, samples, _ = log_sklearn_classifier(server.url, MODEL)
        from mlflow import MlflowClient

        MlflowClient(server.url).set_registered_model_alias(MODEL, "champion", version)
        baseline = MlflowModelsServe(f"models:/{MODEL}/{version}", server.url, workdir).start()
        (workdir / "rms.yaml").write_text(manifests_yaml(*resources(server.url)))
        serve_port = free_port()
        session = make_session(
            load_resources(workdir / "rms.yaml"),
            dashboard_url=f"http://127.0.0.1:{free_port()}",
            serve_port=serve_port,
            log_dir=workdir,
        )
        deadline = time.monotonic() + 600
        session.run(until=lambda: all_serving(session, version) or time.monotonic() > deadline)
        if not all_serving(session, version):
            raise SystemExit("local mode did not serve within 10 minutes")
        rows = measure(args, baseline.url, f"http://127.0.0.1:{serve_port}", [float(x) for x in samples[0]])
        report(rows)
    finally:
        if session is not None:
            session.cluster.stop()
        if baseline is not None:
            baseline.stop()
        server.stop()


def measure(
    args: argparse.Namespace, baseline_url: str, serve_url: str, row: list[float]
) -> list[dict[str, Any]]:
    targets = [
        ("mlflow models serve /invocations", f"{baseline_url}/invocations", {"inputs": [row]}),
        ("local mode /serve", f"{serve_url}/plain/serve", row),
        ("local mode /invocations", f"{serve_url}/plain/invocations", {"inputs": [row]}),
        ("local mode batched /serve", f"{serve_url}/batched/serve", row),
        ("local mode batched /invocations", f"{serve_url}/batched/invocations", {"inputs": [row]}),
    ]
    for _label, url, body in targets:
        check(url, body)
    load_cells([cell(url, body, concurrency=8, duration_s=1.0, warmup_s=0.5) for _l, url, body in targets])
    samples: list[dict[str, Any]] = []
    for round_no in range(args.rounds):
        print(f"round {round_no + 1}/{args.rounds}; load: {uptime()}", flush=True)
        order = [(c, label, url, body) for c in CONCURRENCY for label, url, body in targets]
        results = load_cells(
            [cell(url, body, concurrency=c, duration_s=args.duration) for c, _l, url, body in order]
        )
        for (c, label, _url, _body), result in zip(order, results, strict=True):
            samples.append({"target": label, "c": c, "round": round_no, **result})
            print(
                f"  c={c:<2} {label:34} {result['rps']:7.0f} req/s p50 {result['p50_ms']:6.2f} ms "
                f"err {result['errors']}",
                flush=True,
            )
    save_json("local_mode", {"samples": samples, "stamp": stamp()})
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["target"], s["c"]), []).append(s)
    return [
        {
            "target": target,
            "c": c,
            "rps": median([g["rps"] for g in group]),
            "p50_ms": median([g["p50_ms"] for g in group]),
            "errors": sum(g["errors"] for g in group),
        }
        for (target, c), group in groups.items()
    ]


def report(rows: list[dict[str, Any]]) -> None:
    base = {r["c"]: r for r in rows if r["target"].startswith("mlflow")}
    print(f"\n# medians; load after: {uptime()}")
    for r in rows:
        p50_ratio = r["p50_ms"] / base[r["c"]]["p50_ms"]
        rps_ratio = r["rps"] / base[r["c"]]["rps"]
        print(
            f"c={r['c']:<2} {r['target']:34} {r['rps']:7.0f} req/s ({rps_ratio:4.2f}x) "
            f"p50 {r['p50_ms']:6.2f} ms ({p50_ratio:4.2f}x) err {r['errors']}"
        )


if __name__ == "__main__":
    main()
