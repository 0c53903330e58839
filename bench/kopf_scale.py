"""The kopf operator (`regserve run`) with N resources on a real API server: CPU, memory, MLflow requests.

    .venv/bin/python -m bench.kopf_scale [--models 100] [--resources 1000] [--window 60]

(run from the repository root; needs the test control plane's tools, `make tools`, and root for its
network namespaces). `bench.registry_load` measures the reconcile loop the operator shares with local
mode; this runs the operator itself, as its image does, against the test control plane's kube-apiserver
and etcd: a real `mlflow server` with M models behind a counting proxy, N RegisteredModelServings in a
namespace KubeRay does not watch (their RayServices' status is written here: Ready, RUNNING), and the
operator process with the RBAC it ships. Measured from /proc: the time until every resource has its
RayService and then serves; over a steady window the operator's CPU (all its threads) and MLflow
requests per poll interval; its RSS; and a promotion (the alias moved and MLflow's signed webhook
delivery sent to the operator's receiver) until the last of that model's RayServices is patched.
Writes bench/results/<--out>.{json,md} (default kopf_scale).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from kubernetes import client
from regserve_operator.builders import serving_version_of
from regserve_operator.spec import manifest
from regserve_operator.webhook import DELIVERY_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, sign

from bench.common import (
    RESULTS,
    exit_cleanly_on_sigterm,
    markdown_table,
    save_json,
    stamp,
    start_mlflow,
    uptime,
)
from bench.registry_load import register_models, tag_writes
from tests.k8s import plane
from tests.k8s.operator_support import GROUP, PLURAL, VERSION, OperatorProcess, operator_account
from tests.operator.counting_proxy import CountingProxy
from tests.operator.mlflow_fixture import free_port

NAMESPACE = "bench-scale"
POLL_S = 30
WEBHOOK_SECRET = "bench-secret"


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait(what: str, check: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    plane.wait_for(what, check, timeout=timeout, interval=1.0)
    return time.monotonic() - started


def rms_body(i: int, model: str, tracking_uri: str) -> dict[str, Any]:
    return manifest(
        f"r{i}",
        {
            "model": {"name": model, "alias": "champion"},
            "registry": {"trackingUri": tracking_uri, "pollIntervalSeconds": POLL_S},
            "serving": {"routePrefix": f"/r{i}"},
        },
    )


def ready_status(name: str) -> dict[str, Any]:
    return {
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "Bench", "message": "",
                            "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "activeServiceStatus": {"applicationStatuses": {name: {"status": "RUNNING", "message": ""}}},
        }
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--resources", type=int, default=1000)
    parser.add_argument("--window", type=float, default=60.0, help="steady-state seconds measured")
    parser.add_argument("--timeout", type=float, default=1800.0, help="per phase")
    parser.add_argument("--out", default="kopf_scale", help="results file name under bench/results/")
    args = parser.parse_args()
    n, m = args.resources, args.models
    print(f"# kopf operator at scale, {stamp()}\n# load before: {uptime()}", flush=True)
    before = uptime()
    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-kopf-"))
    exit_cleanly_on_sigterm()
    server = start_mlflow(workdir / "mlflow")
    result: dict[str, Any] = {"n": n, "m": m, "poll_s": POLL_S, "out": args.out}
    try:
        names, promoted = register_models(server, m, 1)
        with CountingProxy(server.url) as proxy, plane.ControlPlane(plane.find_tools()) as kube:
            api = kube.api_client()
            core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
            started = time.monotonic()
            for i in range(n):
                custom.create_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, PLURAL, rms_body(i, names[i % m], proxy.url)
                )
            result["create_s"] = time.monotonic() - started
            print(f"{n} resources created in {result['create_s']:.0f} s", flush=True)

            def rayservices() -> list[dict[str, Any]]:
                listed = custom.list_namespaced_custom_object("ray.io", "v1", NAMESPACE, "rayservices")
                return list(listed["items"])

            def serving() -> int:
                listed = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)
                return sum(1 for o in listed["items"] if (o.get("status") or {}).get("servingVersion"))

            with operator_account(api, NAMESPACE, kube.mint_kubeconfig) as kubeconfig:
                webhook_port = free_port()
                webhook_env = {
                    "REGSERVE_WEBHOOK_HOST": "127.0.0.1",
                    "REGSERVE_WEBHOOK_PORT": str(webhook_port),
                    "REGSERVE_WEBHOOK_SECRET": WEBHOOK_SECRET,
                }
                operator = OperatorProcess(
                    kubeconfig, NAMESPACE, workdir / "operator.log", env=webhook_env
                ).start()
                assert operator.proc is not None
                pid = operator.proc.pid
                try:
                    result["all_created_s"] = wait(
                        "every RayService created", lambda: len(rayservices()) >= n, args.timeout
                    )
                    print(f"every RayService created after {result['all_created_s']:.0f} s", flush=True)
                    for obj in rayservices():
                        name = obj["metadata"]["name"]
                        custom.patch_namespaced_custom_object_status(
                            "ray.io", "v1", NAMESPACE, "rayservices", name, ready_status(name)
                        )
                    result["all_serving_s"] = wait(
                        "every resource serving", lambda: serving() >= n, args.timeout
                    )
                    print(f"every resource serving after {result['all_serving_s']:.0f} s more", flush=True)
                    # Settled rollouts tag the registry once each (~70 ms a write on the one-worker
                    # server): the window starts once a whole poll interval has passed without one.
                    for _ in range(20):
                        tags = tag_writes(proxy)
                        time.sleep(POLL_S)  # an observation interval, as in bench.registry_load
                        if tag_writes(proxy) == tags:
                            break
                    proxy.reset()
                    cpu, wall = proc_cpu_s(pid), time.monotonic()
                    time.sleep(args.window)  # the measurement window itself
                    window = time.monotonic() - wall
                    result["cpu_share"] = (proc_cpu_s(pid) - cpu) / window
                    result["mlflow_requests_per_poll"] = proxy.total() * POLL_S / window
                    result["paths"] = dict(proxy.counts)
                    result["rss_mb"], result["peak_rss_mb"] = proc_rss_mb(pid), proc_rss_mb(pid, "VmHWM")
                    print(
                        f"steady: {result['cpu_share']:.2f} cores, RSS {result['rss_mb']:.0f} MB", flush=True
                    )
                    result["promotion_s"] = promote(
                        custom, server.url, f"http://127.0.0.1:{webhook_port}/webhook", promoted[0], names, n,
                        args.timeout,
                    )  # fmt: skip
                    result["alive"] = operator.alive()
                finally:
                    operator.stop()
                    result["log_tail"] = operator.output()[-2000:]
            api.close()
    finally:
        server.stop()
    result["load_before"], result["load_after"] = before, uptime()
    report(result)


def promote(custom: client.CustomObjectsApi, tracking_uri: str, webhook_url: str, model: str,
            names: list[str], n: int, timeout: float) -> float:  # fmt: skip
    """Move `champion` to version 2 and deliver MLflow's webhook for it; seconds until every RayService
    of that model serves version 2."""
    mine = [f"r{i}" for i in range(n) if names[i % len(names)] == model]
    started = time.monotonic()
    httpx.post(
        f"{tracking_uri}/api/2.0/mlflow/registered-models/alias",
        json={"name": model, "alias": "champion", "version": "2"},
        timeout=30,
    ).raise_for_status()
    body = json.dumps(
        {"entity": "model_version_alias", "action": "created", "data": {"name": model, "alias": "champion"}}
    ).encode()
    delivery, timestamp = f"bench-{time.time_ns()}", str(int(time.time()))
    headers = {
        DELIVERY_ID_HEADER: delivery,
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(WEBHOOK_SECRET, delivery, timestamp, body),
        "Content-Type": "application/json",
    }
    httpx.post(webhook_url, content=body, headers=headers, timeout=30).raise_for_status()

    def patched() -> bool:
        for name in mine:
            obj: dict[str, Any] = custom.get_namespaced_custom_object(
                "ray.io", "v1", NAMESPACE, "rayservices", name
            )
            if serving_version_of(obj) != "2":
                return False
        return True

    plane.wait_for(f"{model}'s RayServices patched", patched, timeout=timeout, interval=0.1)
    return time.monotonic() - started


def report(r: dict[str, Any]) -> None:
    header = (
        f"kopf operator at scale {stamp()}; load before: {r['load_before']}; after: {r['load_after']}; "
        f"poll interval {r['poll_s']} s"
    )
    headers = [
        "resources N", "models M", "create N objects s", "all RayServices created s",
        "all serving s (after Ready)", "operator CPU, cores (steady)", "MLflow requests per poll interval",
        "operator RSS MB (peak)", "promotion → last RayService patched s",
    ]  # fmt: skip
    row = [
        r["n"], r["m"], r["create_s"], r["all_created_s"], r["all_serving_s"], r["cpu_share"],
        r["mlflow_requests_per_poll"], f"{r['rss_mb']:.0f} ({r['peak_rss_mb']:.0f})", r["promotion_s"],
    ]  # fmt: skip
    table = markdown_table(headers, [row])
    print("\n" + header + "\n\n" + table + f"\n\npaths: {r['paths']}")
    save_json(r["out"], r)
    (RESULTS / f"{r['out']}.md").write_text(header + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
