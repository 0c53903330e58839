"""Replica autoscaling in local mode: a load step on a model that keeps a replica busy, served three ways
on one local Ray cluster (HAProxy ingress) — `autoscaling` 1-3 replicas, and fixed 1 and 3 replicas
as the baselines measured in the same run.

    .venv/bin/python -m bench.autoscaling [--rounds 1] [--step 40] [--delay 0.1]

Per target and round: a closed-loop load step (c=8, from a wrk process of its own) while the
replicas Serve runs are sampled every 0.5 s from the dashboard; after the step, how long the elastic one
takes to fall back to one replica. Table: req/s and latency during the step and ratios against the
fixed baselines, errors, time to 2 and to 3 replicas, replica-seconds used over the step (what the
capacity cost); a plot of replicas over time.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from regserve_operator.local import DevSession, load_resources, make_session
from regserve_operator.sandbox.models import log_slow_echo
from regserve_operator.sandbox.processes import free_port
from regserve_operator.spec import manifest, manifests_yaml
from regserve_operator.targets.local import ServeDashboard

from bench.common import (
    RESULTS,
    all_serving,
    check,
    exit_cleanly_on_sigterm,
    load,
    markdown_table,
    median,
    save_json,
    stamp,
    start_mlflow,
    uptime,
)

MODEL = "bench_slow_echo"
CONCURRENCY = 8
SAMPLE_S = 0.5
# Each resource's `spec.serving` fields for its replicas.
TARGETS: dict[str, dict[str, Any]] = {
    "elastic": {
        "autoscaling": {
            "minReplicas": 1,
            "maxReplicas": 3,
            "targetOngoingRequests": 2,
            "upscaleDelaySeconds": 1,
            "downscaleDelaySeconds": 10,
        }
    },
    "fixed-1": {"replicas": 1},
    "fixed-3": {"replicas": 3},
}


def resource(name: str, uri: str, replicas: dict[str, Any]) -> dict[str, Any]:
    return manifest(
        name,
        {
            "model": {"name": MODEL, "alias": "champion"},
            "registry": {"trackingUri": uri, "pollIntervalSeconds": 300},
            "serving": {"routePrefix": f"/{name}", "cpusPerReplica": 0.25, **replicas},
        },
    )


class Replicas:
    """Samples how many replicas of an application Serve runs, in a thread of its own."""

    def __init__(self, dashboard: ServeDashboard, app: str) -> None:
        self.dashboard, self.app = dashboard, app
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def count(self) -> int:
        return self.dashboard.running_replicas(self.app)

    def __enter__(self) -> Replicas:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self.started, self.count()))
            self._stop.wait(SAMPLE_S)

    def first_at(self, replicas: int) -> float | None:
        return next((t for t, n in self.samples if n >= replicas), None)

    def replica_seconds(self, until_s: float) -> float:
        inside = [(t, n) for t, n in self.samples if t <= until_s]
        return sum(n * SAMPLE_S for _, n in inside)


def step(session_url: str, dashboard: ServeDashboard, name: str, seconds: float) -> dict[str, Any]:
    """The load step, then (for the elastic target) the fall back to one replica, sampled throughout."""
    fell = None
    with Replicas(dashboard, name) as replicas:
        result = load(
            f"{session_url}/{name}/serve",
            {"prompt": "load"},
            concurrency=CONCURRENCY,
            duration_s=seconds,
            warmup_s=0.0,
        )
        if name == "elastic":
            started = time.monotonic()
            deadline = started + 120
            while time.monotonic() < deadline and replicas.count() > 1:
                time.sleep(SAMPLE_S)
            fell = time.monotonic() - started if replicas.count() == 1 else None
    return {
        **result,
        "to_2_s": replicas.first_at(2),
        "to_3_s": replicas.first_at(3),
        "replica_seconds": replicas.replica_seconds(seconds),
        "back_to_1_s": fell,
        "samples": replicas.samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--step", type=float, default=40.0, help="seconds of load per target")
    parser.add_argument("--delay", type=float, default=0.1, help="seconds per predict")
    args = parser.parse_args()
    before = uptime()
    print(f"# autoscaling in local mode, {stamp()}\n# load before: {before}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-autoscaling-"))
    exit_cleanly_on_sigterm()
    server = start_mlflow(workdir / "mlflow")
    session: DevSession | None = None
    try:
        version = log_slow_echo(server.url, MODEL, delay_s=args.delay)
        MlflowClient(server.url).set_registered_model_alias(MODEL, "champion", version)
        path = workdir / "rms.yaml"
        path.write_text(
            manifests_yaml(*(resource(name, server.url, replicas) for name, replicas in TARGETS.items()))
        )
        dashboard_url, serve_port = f"http://127.0.0.1:{free_port()}", free_port()
        session = running = make_session(
            load_resources(path),
            dashboard_url=dashboard_url,
            serve_port=serve_port,
            num_cpus=4,
            out=lambda line: None,
            log_dir=workdir,
        )
        deadline = time.monotonic() + 300
        running.run(until=lambda: all_serving(running, version) or time.monotonic() > deadline)
        if not all_serving(running, version):
            raise SystemExit("the resources never served")
        url = f"http://127.0.0.1:{serve_port}"
        dashboard = ServeDashboard(dashboard_url, token=running.cluster.token())
        for name in TARGETS:
            check(f"{url}/{name}/serve", {"prompt": "warm"})
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in TARGETS}
        for round_ in range(args.rounds):
            for name in TARGETS:
                result = step(url, dashboard, name, args.step)
                runs[name].append(result)
                print(
                    f"round {round_ + 1} {name}: {result['rps']:.1f} req/s, {result['errors']} errors",
                    flush=True,
                )
    finally:
        if session is not None:
            session.cluster.stop()
        server.stop()
    report(runs, args, before)


def report(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, before: str) -> None:
    def med(name: str, key: str) -> float:
        return median([r[key] for r in runs[name] if r[key] is not None])

    rows = []
    for name in TARGETS:
        rows.append(
            [
                name,
                med(name, "rps"),
                med(name, "rps") / med("fixed-1", "rps"),
                med(name, "rps") / med("fixed-3", "rps"),
                med(name, "p50_ms"),
                med(name, "p99_ms"),
                sum(r["errors"] for r in runs[name]),
                med(name, "to_2_s"),
                med(name, "to_3_s"),
                med(name, "back_to_1_s"),
                med(name, "replica_seconds") / med("fixed-3", "replica_seconds"),
            ]
        )
    headers = [
        "target",
        "req/s",
        "÷ fixed-1",
        "÷ fixed-3",
        "p50 ms",
        "p99 ms",
        "errors",
        "2 replicas after s",
        "3 replicas after s",
        "back to 1 after s",
        "replica-seconds ÷ fixed-3",
    ]
    text = markdown_table(headers, rows)
    header = (
        f"autoscaling benchmark {stamp()}: local mode, HAProxy ingress, c={CONCURRENCY}, {args.step:.0f} s "
        f"step, {args.delay * 1000:.0f} ms per predict, medians of {args.rounds} round(s); load before: "
        f"{before}; after: {uptime()}"
    )
    print("\n" + header + "\n\n" + text)
    save_json("autoscaling", runs)
    (RESULTS / "autoscaling.md").write_text(header + "\n\n" + text + "\n")
    plot(runs)


def plot(runs: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    for name, results in runs.items():
        samples = results[0]["samples"]
        axis.step([t for t, _ in samples], [n for _, n in samples], where="post", label=name)
    axis.set_xlabel("seconds from the start of the load step (elastic: until it is back at one replica)")
    axis.set_ylabel("running replicas")
    axis.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "autoscaling.png", dpi=90)


if __name__ == "__main__":
    main()
