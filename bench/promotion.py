"""Promotion to serving in local mode: alias moved in MLflow → first answer from the new version.

    .venv/bin/python -m bench.promotion [--ingress proxy] [--promotions 3] [--poll-interval 10]

`regserve dev`'s session (the operator's reconcile driving a local Ray cluster through its dashboard)
runs in-process against a real `mlflow server`. Two resources, each alone in its session: one with a
5-minute poll interval that only the MLflow webhook can wake, one with `--poll-interval` and no
webhook, and the webhook one again with `rollout.smokeTest: false`. A client asks the endpoint every 50 ms
and stops the clock at the first answer whose `X-Model-Version` is the promoted version; that answer's
own latency shows whether the switch found the version loaded (the smoke test prewarms it on every
replica) or loaded it on the request path. Baseline in the same run: the model's own load time
(`mlflow.pyfunc.load_model` + predict of the same versions). Writes bench/results/promotion.{json,md,png}.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from mlflow import MlflowClient
from regserve_operator.local import load_resources, make_session, register_local_webhook, webhook_receiver
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook
from regserve_operator.sandbox.processes import free_port, wait_for
from regserve_operator.spec import manifest, manifests_yaml

from bench.common import (
    RESULTS,
    RayCluster,
    exit_cleanly_on_sigterm,
    markdown_table,
    median,
    save_json,
    stamp,
    start_mlflow,
    uptime,
)


def rms(name: str, model: str, uri: str, interval: int, smoke: bool) -> dict[str, Any]:
    return manifest(
        name,
        {
            "model": {"name": model, "alias": "champion"},
            "registry": {"trackingUri": uri, "pollIntervalSeconds": interval},
            "serving": {"routePrefix": f"/{name}", "cpusPerReplica": 0.5},
            "rollout": {"deadlineSeconds": 120, "smokeTest": smoke},
        },
    )


def answered_by(url: str, version: str, latencies: list[float] | None = None) -> bool:
    """Whether `version` answered; its answer's latency (ms) goes to `latencies`."""
    started = time.perf_counter()
    try:
        response = httpx.post(url, json={"prompt": "Hello"}, timeout=30)
    except httpx.HTTPError:
        return False
    answered = response.status_code == 200 and response.headers.get("x-model-version") == version
    if answered and latencies is not None:
        latencies.append((time.perf_counter() - started) * 1000)
    return answered


def load_time_ms(tracking_uri: str, model: str, version: str) -> float:
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(tracking_uri)
    started = time.perf_counter()
    mlflow.pyfunc.load_model(f"models:/{model}/{version}").predict(pd.DataFrame({"prompt": ["Hello"]}))
    return (time.perf_counter() - started) * 1000


def scenario(
    kind: str, cluster: RayCluster, server: MlflowServer, workdir: Path, promotions: int, interval: int
) -> list[dict[str, Any]]:
    name = f"promo-{kind}"
    model = f"bench_promo_{kind}".replace("-", "_")
    smoke = kind != "webhook-nosmoke"
    waker = "polling" if kind == "polling" else "webhook"
    versions = [
        log_phrasebook(server.url, model, lang_to="de" if i % 2 else "fr") for i in range(promotions + 1)
    ]
    client = MlflowClient(server.url)
    client.set_registered_model_alias(model, "champion", versions[0])
    path = workdir / f"{name}.yaml"
    path.write_text(
        manifests_yaml(rms(name, model, server.url, 300 if waker == "webhook" else interval, smoke))
    )
    lines: list[str] = []
    session = make_session(
        load_resources(path),
        dashboard_url=cluster.dashboard_url,
        serve_port=cluster.serve_port,
        out=lines.append,
        log_dir=workdir,
    )
    thread = threading.Thread(target=session.run, name=f"session-{kind}", daemon=True)
    url = f"{cluster.serve_url}/{name}/serve"
    results: list[dict[str, Any]] = []
    secret = "bench-promotion-secret"
    receiver = webhook_receiver(session.driver, free_port(), secret) if waker == "webhook" else None
    try:
        if receiver is not None:
            hook_url = receiver.__enter__()
            if not register_local_webhook(server.url, hook_url, secret):
                raise RuntimeError("the MLflow webhook could not be registered")
        thread.start()
        wait_for(
            lambda: answered_by(url, versions[0]), timeout=240, interval=0.5, message=f"{name} serving v1"
        )
        for version in versions[1:]:
            # De-phase the alias move from the poll schedule (polling) / let the rollout settle.
            time.sleep(random.uniform(2, 2 + interval) if waker == "polling" else 3)
            first: list[float] = []
            started = time.perf_counter()
            client.set_registered_model_alias(model, "champion", version)
            wait_for(
                lambda v=version, f=first: answered_by(url, v, f),  # type: ignore[misc]
                timeout=interval + 180,
                interval=0.05,
                message=f"{name} answering from v{version}",
            )
            elapsed = time.perf_counter() - started
            load_ms = load_time_ms(server.url, model, version)
            results.append(
                {
                    "path": kind,
                    "version": version,
                    "seconds": elapsed,
                    "load_ms": load_ms,
                    "first_answer_ms": first[0],
                    "smoke_test": smoke,
                }
            )
            print(
                f"  {kind:15} v{version}: first answer after {elapsed:.2f} s, that answer took "
                f"{first[0]:.0f} ms (model load {load_ms:.0f} ms)",
                flush=True,
            )
    finally:
        session.stop_event.set()
        thread.join(timeout=30)
        if receiver is not None:
            receiver.__exit__(None, None, None)
        try:
            cluster.remove({name})
        except Exception as error:  # the cluster goes away at the end anyway
            print(f"  (could not remove {name}: {error})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ingress", default="proxy")
    parser.add_argument("--promotions", type=int, default=3)
    parser.add_argument("--poll-interval", type=int, default=10)
    args = parser.parse_args()
    print(f"# promotion benchmark, {stamp()}\n# load before: {uptime()}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-promotion-"))
    exit_cleanly_on_sigterm()
    server = start_mlflow(workdir / "mlflow")
    cluster: RayCluster | None = None
    results: list[dict[str, Any]] = []
    try:
        cluster = RayCluster(args.ingress, workdir).start()
        for kind in ("polling", "webhook", "webhook-nosmoke"):
            results += scenario(kind, cluster, server, workdir, args.promotions, args.poll_interval)
    finally:
        if cluster is not None:
            cluster.stop()
        server.stop()
    report(results, args)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    rows = []
    for kind, budget in (
        ("webhook", 2.0),
        ("webhook-nosmoke", 2.0),
        ("polling", args.poll_interval + 2.0),
    ):
        mine = [r for r in results if r["path"] == kind]
        if not mine:
            continue
        seconds = median([r["seconds"] for r in mine])
        load_s = median([r["load_ms"] for r in mine]) / 1000
        target = budget + load_s
        rows.append(
            [args.ingress, kind, len(mine), seconds, max(r["seconds"] for r in mine), load_s, target,
             "yes" if max(r["seconds"] for r in mine) <= target else "no",
             median([r["first_answer_ms"] for r in mine])]
        )  # fmt: skip
    text = markdown_table(
        [
            "ingress",
            "path",
            "promotions",
            "median s",
            "max s",
            "model load s (baseline)",
            "target s",
            "max ≤ target",
            "first answer of the new version, median ms",
        ],
        rows,
    )
    header = (
        f"promotion to serving {stamp()}, local mode, poll interval {args.poll_interval} s "
        "for the polling path; "
        f"load after: {uptime()}\n"
    )
    print("\n" + header + "\n" + text)
    save_json("promotion", results)
    (RESULTS / "promotion.md").write_text(header + "\n" + text + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, kind in enumerate(("webhook", "webhook-nosmoke", "polling")):
        values = [r["seconds"] for r in results if r["path"] == kind]
        ax.scatter([i] * len(values), values, label=kind)
    ax.set_xticks([0, 1, 2], ["webhook", "webhook, no smoke test", f"polling ({args.poll_interval} s)"])
    ax.set_ylabel("alias moved → first answer from the new version (s)")
    fig.tight_layout()
    fig.savefig(RESULTS / "promotion.png", dpi=90)


if __name__ == "__main__":
    main()
