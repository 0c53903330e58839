"""Operator faults on the real control plane: the operator killed mid-rollout, the API server restarted
under its watches, concurrent writers on the objects it reads and writes, and credentials that must
never surface anywhere a user or a log collector can see.

The operator runs as a real process (`regserve run`, as its image runs it), so it can be SIGKILLed and
its complete log read. RayServices live in a namespace KubeRay does not watch: the tests write their
status, which holds a rollout in flight for as long as a test needs.
"""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from regserve_operator.sandbox.mlflow_server import MlflowServer

from tests.k8s import plane
from tests.k8s.operator_support import (
    GROUP,
    PLURAL,
    VERSION,
    Cluster,
    OperatorProcess,
    carried,
    cond,
    new_model,
    operator_account,
    operator_process,
    rms_spec,
    until,
)
from tests.operator.mlflow_fixture import free_port, log_version

pytestmark = pytest.mark.k8s

SIGNATURE = {"prompt": "string"}


@pytest.fixture
def cluster(kube_api: client.ApiClient, kube_namespace: str) -> Cluster:
    return Cluster(kube_api, kube_namespace)


@pytest.fixture
def kubeconfig(
    kube_api: client.ApiClient, kube_namespace: str, mint_kubeconfig: plane.MintKubeconfig
) -> Iterator[Path]:
    with operator_account(kube_api, kube_namespace, mint_kubeconfig) as path:
        yield path


@pytest.fixture
def operator(kubeconfig: Path, kube_namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    with operator_process(kubeconfig, kube_namespace, tmp_path / "operator.log") as process:
        yield process


def status(cluster: Cluster, name: str) -> dict[str, Any]:
    return dict(cluster.rms(name).get("status") or {})


def serve_first_version(
    cluster: Cluster, mlflow_url: str, name: str, secret: dict[str, str] | None = None
) -> tuple[str, str]:
    """Register v1 under `champion`, apply the resource, play KubeRay: RUNNING. Returns (model, v1)."""
    model = new_model()
    v1 = log_version(mlflow_url, model, SIGNATURE, alias="champion")
    cluster.secret("mlflow-auth", secret or {})
    cluster.create_rms(name, rms_spec(model, mlflow_url))
    until("RayService created", lambda: carried(cluster, name) == v1)
    cluster.set_app_status(name, "RUNNING")
    until("v1 confirmed", lambda: status(cluster, name).get("lastGoodVersion") == v1)
    return model, v1


def move_alias(mlflow_url: str, model: str, version: str) -> None:
    mlflow.MlflowClient(mlflow_url).set_registered_model_alias(model, "champion", version)


def rayservices(cluster: Cluster) -> list[dict[str, Any]]:
    listed = cluster.custom.list_namespaced_custom_object("ray.io", "v1", cluster.namespace, "rayservices")
    return list(listed["items"])


def settled_on(cluster: Cluster, name: str, version: str) -> bool:
    """The rollout of `version` is finished and every status field says so, for the current spec."""
    rms = cluster.rms(name)
    st = rms.get("status") or {}
    return (
        st.get("servingVersion") == version
        and st.get("lastGoodVersion") == version
        and not st.get("rolloutVersion")
        and st.get("observedGeneration") == rms["metadata"]["generation"]
        and cond(rms, "Ready").get("status") == "True"
        and cond(rms, "RolloutInProgress").get("status") == "False"
    )


def reasons(cluster: Cluster, name: str) -> list[str]:
    items = cluster.core.list_namespaced_event(
        cluster.namespace, field_selector=f"involvedObject.name={name}"
    )
    return [e.reason for e in items.items for _ in range(e.count or 1)]


# ------------------------------------------------------------------------ 1. SIGKILL mid-rollout


@pytest.mark.parametrize("status_written", [True, False], ids=["status-recorded", "status-lost"])
def test_sigkill_mid_rollout_then_restart_converges(
    cluster: Cluster, operator: OperatorProcess, mlflow_server: MlflowServer, status_written: bool
) -> None:
    """Killed while v2 rolls out: the RayService carries v2, nobody has reported it RUNNING yet
    (this namespace's RayService status is only written by the test), and either the status recorded
    the rollout or, killed between the RayService patch and the status write, it did not."""
    model, v1 = serve_first_version(cluster, mlflow_server.url, "crash")
    (before,) = rayservices(cluster)
    before_rollout = cluster.rms("crash")["status"]
    v2 = log_version(mlflow_server.url, model, SIGNATURE)
    move_alias(mlflow_server.url, model, v2)
    until("RayService patched to v2", lambda: carried(cluster, "crash") == v2)
    until("rollout recorded", lambda: status(cluster, "crash").get("rolloutVersion") == v2)
    assert cond(cluster.rms("crash"), "RolloutInProgress")["status"] == "True"
    operator.kill()
    if not status_written:
        # What a kill between the two writes leaves: the new RayService, the old status.
        body = cluster.rms("crash")
        body["status"] = before_rollout
        cluster.custom.replace_namespaced_custom_object_status(
            GROUP, VERSION, cluster.namespace, PLURAL, "crash", body
        )
        assert "rolloutVersion" not in status(cluster, "crash")

    # KubeRay carries on while the operator is down: the new version comes up.
    cluster.set_app_status("crash", "RUNNING")
    operator.start()
    waited = plane.wait_for("converged after restart", lambda: settled_on(cluster, "crash", v2), 60, 0.25)
    print(f"restarted operator converged in {waited:.1f} s (process start included)")
    assert operator.alive()

    (after,) = rayservices(cluster)
    assert after["metadata"]["uid"] == before["metadata"]["uid"], "RayService replaced"
    assert len(after["metadata"]["ownerReferences"]) == 1
    st = status(cluster, "crash")
    assert st["resolvedVersion"] == v2 and "rejected" not in st
    serving = [h["version"] for h in st["history"] if h["outcome"] == "Serving"]
    assert serving == [v1, v2]
    events = reasons(cluster, "crash")
    # One Created, one RolloutSucceeded per version. A rollout whose start the status never recorded
    # is started again after the restart, which says so once more.
    started = 2 if status_written else 3
    assert (events.count("Created"), events.count("RolloutStarted"), events.count("RolloutSucceeded")) == (
        1,
        started,
        2,
    ), events


# ----------------------------------------------------------------------- 2. API server restarted


def test_apiserver_restart_under_watches(
    cluster: Cluster, operator: OperatorProcess, mlflow_server: MlflowServer, kube_plane: plane.ControlPlane
) -> None:
    model, _v1 = serve_first_version(cluster, mlflow_server.url, "outage")
    v2 = log_version(mlflow_server.url, model, SIGNATURE)
    v3 = log_version(mlflow_server.url, model, SIGNATURE)
    seen = len(operator.output())
    kube_plane.kill_apiserver()
    try:
        # The alias moves while the operator cannot reach the API server: it must not lose that.
        move_alias(mlflow_server.url, model, v2)
        until("the operator meets the outage", lambda: "Connect" in operator.output()[seen:], timeout=30)
    finally:
        readyz = kube_plane.start_apiserver()
    back = time.monotonic()
    until("alias move made during the outage rolled out", lambda: carried(cluster, "outage") == v2)
    caught_up = time.monotonic() - back
    # Until its authorizer has loaded the roles, a restarted apiserver refuses the operator's requests.
    operator.excused.append((seen, len(operator.output())))

    # A spec change after the restart reaches the operator only through its re-established watch.
    patch = {"spec": {"model": {"name": model, "alias": None, "version": v3}}}
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "outage", patch)
    edited = time.monotonic()
    until("spec change after the restart rolled out", lambda: carried(cluster, "outage") == v3)
    reacted = time.monotonic() - edited
    cluster.set_app_status("outage", "RUNNING")
    until("v3 settled", lambda: settled_on(cluster, "outage", v3))
    print(
        f"apiserver /readyz {readyz:.1f} s; outage's alias move {caught_up:.1f} s; spec edit {reacted:.1f} s"
    )
    assert operator.alive() and operator.starts == 1
    assert len(rayservices(cluster)) == 1
    assert (
        status(cluster, "outage")["selector"] == f"version {v3}"
        or v3 in status(cluster, "outage")["selector"]
    )
    kube_plane.check_alive()  # the rest of the plane rode it out too


def test_apiserver_outage_longer_than_kopfs_retry_budget(
    cluster: Cluster, operator: OperatorProcess, mlflow_server: MlflowServer, kube_plane: plane.ControlPlane
) -> None:
    """kopf retries a failing API request 9 times over about 54 s, then gives up: an outage past that
    (a control-plane upgrade, an etcd restore) must not end or wedge the operator either."""
    model, _v1 = serve_first_version(cluster, mlflow_server.url, "long")
    v2 = log_version(mlflow_server.url, model, SIGNATURE)
    seen = len(operator.output())
    kube_plane.kill_apiserver()
    killed = time.monotonic()
    try:
        move_alias(mlflow_server.url, model, v2)

        def operator_lives() -> None:
            assert operator.alive(), operator.output()[-3000:]

        def gave_up() -> bool:
            return "escalating" in operator.output()[seen:]  # kopf's words for its failed last attempt

        plane.wait_for("kopf to exhaust its retries", gave_up, 75, 0.5, operator_lives)
    finally:
        kube_plane.start_apiserver()
    back = time.monotonic()
    until("the alias move made during the outage rolled out", lambda: carried(cluster, "long") == v2)
    print(f"after a {back - killed:.0f} s outage, rolled out {time.monotonic() - back:.1f} s after /readyz")
    operator.excused.append((seen, len(operator.output())))
    cluster.set_app_status("long", "RUNNING")
    until("v2 settled", lambda: settled_on(cluster, "long", v2))
    assert operator.alive() and operator.starts == 1
    kube_plane.check_alive()


# -------------------------------------------------------------------- 3. concurrent edits


def test_spec_edits_racing_status_writes_end_on_the_latest_spec(
    cluster: Cluster, operator: OperatorProcess, mlflow_server: MlflowServer
) -> None:
    """A user re-points the selector again and again with `kubectl edit` (GET, change, PUT with the
    resourceVersion read) while the operator writes status. Each edit is read before, and written
    after, an operator status write (the operator records every spec change it sees, and only
    changes): the stale PUT must be refused (409) rather than merged silently, the user's retry lands,
    the operator never touches the spec, and it ends on the last one."""
    model, v1 = serve_first_version(cluster, mlflow_server.url, "racing")
    v2 = log_version(mlflow_server.url, model, SIGNATURE)
    v3 = log_version(mlflow_server.url, model, SIGNATURE)
    selectors: list[dict[str, str]] = [{"version": v2}, {"version": v3}, {"alias": "champion"}]
    selectors += [{"version": v3}, {"version": v2}, {"alias": "champion"}, {"version": v2}]
    refused = 0

    def put(body: dict[str, Any]) -> dict[str, Any]:
        return dict(
            cluster.custom.replace_namespaced_custom_object(
                GROUP, VERSION, cluster.namespace, PLURAL, "racing", body
            )
        )

    # The object as our own write left it, so the operator's status write that follows comes after it.
    body = cluster.rms("racing")
    body["spec"]["model"] = {"name": model, "version": v1}  # what it serves: only the status changes
    body = put(body)
    for selector in selectors:
        revision = (body.get("status") or {}).get("revision")
        until("operator wrote status", lambda r=revision: status(cluster, "racing").get("revision") != r)
        while True:
            body["spec"]["model"] = {"name": model, **selector}
            try:
                body = put(body)
                break
            except ApiException as exc:
                if exc.status != 409:
                    raise
                refused += 1
                body = cluster.rms("racing")
    assert refused >= len(selectors), "every stale edit is refused"
    final = selectors[-1]["version"]
    assert cluster.rms("racing")["spec"]["model"] == {"name": model, "version": final}
    until("RayService on the last spec's version", lambda: carried(cluster, "racing") == final)
    cluster.set_app_status("racing", "RUNNING")
    waited = plane.wait_for(
        "settled on the last spec", lambda: settled_on(cluster, "racing", final), 60, 0.25
    )
    print(f"{len(selectors)} edits, {refused} stale ones refused; settled {waited:.1f} s after RUNNING")
    st = status(cluster, "racing")
    assert st["resolvedVersion"] == final and st["lastGoodVersion"] == final and v1 != final
    assert st["selector"] == f"v{final}"
    assert len(rayservices(cluster)) == 1


def test_write_between_read_and_patch_is_kept(
    cluster: Cluster, operator: OperatorProcess, mlflow_server: MlflowServer, kube_api: client.ApiClient
) -> None:
    """The operator's patch is planned from the RayService it read; someone writes in between. The
    patch must neither clobber that write nor be dropped: it is planned again and lands."""
    from regserve_operator.plan import make_plan
    from regserve_operator.targets.kube import KubeTarget

    serve_first_version(cluster, mlflow_server.url, "between")
    operator.stop()  # this test plays the operator's part, one step at a time
    target = KubeTarget(kube_api)
    read = target.get(cluster.namespace, "between")
    assert read is not None
    desired = copy.deepcopy(read)
    config = yaml.safe_load(read["spec"]["serveConfigV2"])
    config["applications"][0]["deployments"][0]["user_config"] = {"default_version": "2"}
    desired["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    plan = make_plan(desired, read)
    assert plan.action == "patch_serve_config" and plan.patch[0]["op"] == "test"
    human = {"metadata": {"annotations": {"ops.example.com/note": "hands off"}, "labels": {"team": "ml"}}}
    cluster.custom.patch_namespaced_custom_object(
        "ray.io", "v1", cluster.namespace, "rayservices", "between", human
    )
    target.apply(plan)
    rs = cluster.rayservice("between")
    assert rs is not None
    assert carried(cluster, "between") == "2"
    assert rs["metadata"]["annotations"]["ops.example.com/note"] == "hands off"
    assert rs["metadata"]["labels"]["team"] == "ml"
    assert rs["metadata"]["labels"].items() >= read["metadata"]["labels"].items()


def test_human_edits_rayservice_while_operator_patches(
    cluster: Cluster, operator: OperatorProcess, mlflow_server: MlflowServer, kube_api: client.ApiClient
) -> None:
    """Someone annotates the RayService over and over (`kubectl annotate`: a patch without a
    resourceVersion) while the operator rolls out a new version. Both updates must survive: the
    operator's version lands, the human's annotations and labels stay."""
    model, _v1 = serve_first_version(cluster, mlflow_server.url, "shared")
    v2 = log_version(mlflow_server.url, model, SIGNATURE)
    stop = threading.Event()
    writes = 0
    human = client.CustomObjectsApi(kube_api)

    def annotate() -> None:
        nonlocal writes
        while not stop.is_set():
            writes += 1
            patch = {
                "metadata": {
                    "annotations": {"ops.example.com/note": f"edit-{writes}"},
                    "labels": {"team": "ml"},
                }
            }
            human.patch_namespaced_custom_object(
                "ray.io", "v1", cluster.namespace, "rayservices", "shared", patch
            )

    writer = threading.Thread(target=annotate, daemon=True)
    writer.start()
    try:
        seen = len(operator.output())
        move_alias(mlflow_server.url, model, v2)
        start = time.monotonic()
        until(
            "v2 patched in despite the concurrent writer",
            lambda: carried(cluster, "shared") == v2,
            timeout=45,
        )
        landed = time.monotonic() - start
    finally:
        stop.set()
        writer.join(timeout=10)
    during = operator.output()[seen:]
    conflicts = during.count("changed since it was read")
    assert f"reconcile of {cluster.namespace}/shared failed" not in during, during[-3000:]
    print(f"v2 landed {landed:.1f} s after the alias move; {writes} human writes, {conflicts} conflicts")
    rs = cluster.rayservice("shared")
    assert rs is not None
    assert rs["metadata"]["annotations"]["ops.example.com/note"] == f"edit-{writes}"
    assert rs["metadata"]["labels"]["team"] == "ml"
    cluster.set_app_status("shared", "RUNNING")
    until("v2 settled", lambda: settled_on(cluster, "shared", v2))


# ------------------------------------------------------------------ 4. credentials never leak


@pytest.fixture
def metrics_operator(
    kubeconfig: Path, kube_namespace: str, tmp_path: Path
) -> Iterator[tuple[OperatorProcess, int]]:
    """The operator with its Prometheus endpoint on: metric labels are a place a secret could leak to."""
    port = free_port()
    process = OperatorProcess(
        kubeconfig, kube_namespace, tmp_path / "operator.log", env={"REGSERVE_METRICS_PORT": str(port)}
    ).start()
    try:
        yield process, port
    finally:
        process.stop()


def test_credentials_never_leak(
    cluster: Cluster, metrics_operator: tuple[OperatorProcess, int], mlflow_server: MlflowServer
) -> None:
    """Distinctive credential values (the test MLflow server ignores them) go through creation, a
    promotion, a held incompatible version and an unreachable registry; no value, raw or base64 (as in a
    Secret or a basic-auth header), appears in the operator's log, its metrics, the resource, any Event
    in the namespace, the RayService (labels, annotations, Serve args, env) or the registry tags it
    wrote. A key the operator does not use (PYTHONPATH) is named in status, its value nowhere."""
    operator, metrics_port = metrics_operator
    tag = uuid.uuid4().hex
    secret = {
        "MLFLOW_TRACKING_TOKEN": f"tok-{tag}",
        "MLFLOW_TRACKING_USERNAME": f"user-{tag}",
        "MLFLOW_TRACKING_PASSWORD": f"pw-{tag}",
        "AWS_ACCESS_KEY_ID": f"AKIA{tag[:16].upper()}",
        "AWS_SECRET_ACCESS_KEY": f"aws-secret-{tag}",
        "PYTHONPATH": f"/nowhere-{tag}",
    }
    model, v1 = serve_first_version(cluster, mlflow_server.url, "secretive", secret)
    ignored = cond(cluster.rms("secretive"), "CredentialsAccepted")
    assert (ignored.get("status"), ignored.get("reason")) == ("False", "KeysIgnored"), ignored
    assert "PYTHONPATH" in ignored.get("message", "")
    v2 = log_version(mlflow_server.url, model, SIGNATURE)
    move_alias(mlflow_server.url, model, v2)
    until("promoted", lambda: carried(cluster, "secretive") == v2)
    cluster.set_app_status("secretive", "RUNNING")
    until("v2 settled", lambda: settled_on(cluster, "secretive", v2))
    v3 = log_version(mlflow_server.url, model, {"text": "string"})  # `prompt` gone: incompatible
    move_alias(mlflow_server.url, model, v3)
    until("held", lambda: cond(cluster.rms("secretive"), "SignatureCompatible").get("status") == "False")
    dead = {"spec": {"registry": {"trackingUri": f"http://127.0.0.1:{free_port()}"}}}
    cluster.custom.patch_namespaced_custom_object(
        GROUP, VERSION, cluster.namespace, PLURAL, "secretive", dead
    )
    until("unreachable", lambda: cond(cluster.rms("secretive"), "RegistryReachable").get("status") == "False")
    until("its Event posted", lambda: "RegistryUnreachable" in reasons(cluster, "secretive"))

    rs = cluster.rayservice("secretive")
    assert rs is not None
    containers = [
        c
        for group in [
            rs["spec"]["rayClusterConfig"]["headGroupSpec"],
            *rs["spec"]["rayClusterConfig"]["workerGroupSpecs"],
        ]
        for c in group["template"]["spec"]["containers"]
    ]
    assert containers and all({"secretRef": {"name": "mlflow-auth"}} in c["envFrom"] for c in containers)
    events = cluster.core.list_namespaced_event(cluster.namespace).items
    tags = {
        version: mlflow.MlflowClient(mlflow_server.url).get_model_version(model, version).tags
        for version in (v1, v2, v3)
    }
    surfaces = {
        "operator log": operator.output(),
        "metrics": httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text,
        "resource": json.dumps(cluster.rms("secretive")),
        "events": json.dumps(cluster.core.api_client.sanitize_for_serialization(events)),
        "RayService": json.dumps(rs),
        "registry tags": json.dumps(tags),
    }
    basic = f"{secret['MLFLOW_TRACKING_USERNAME']}:{secret['MLFLOW_TRACKING_PASSWORD']}"
    needles = [*secret.values(), basic]
    needles += [base64.b64encode(n.encode()).decode() for n in needles]
    leaks = [(where, n) for where, text in surfaces.items() for n in needles if n in text]
    assert not leaks, leaks
    # The checks looked at real content: the operator did talk about this resource and its failures.
    assert "secretive" in surfaces["operator log"] and "SignatureIncompatible" in surfaces["events"]
    assert "regserve_" in surfaces["metrics"] and any(tags.values()), (surfaces["metrics"][:500], tags)
