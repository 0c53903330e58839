"""The pod runner as a kubelet: plain pods (no Ray) in the runner's namespace, run for real.

The containers are small shell programs from the machine; what is checked is what a kubelet does:
address and namespace, environment from Secrets/ConfigMaps/fields, private /tmp, readiness from the
probe, restarts of a failing container, teardown when the pod goes.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.k8s import network, plane
from tests.k8s.operator_support import until
from tests.k8s.podrunner import device_env

pytestmark = pytest.mark.k8s

SERVER = "cd /tmp && exec python3 -m http.server 8080 --bind 0.0.0.0"


@pytest.fixture
def pods(kube_plane: plane.ControlPlane, kube_api: client.ApiClient) -> Iterator[client.CoreV1Api]:
    if kube_plane.runner is None:
        pytest.fail("the plane has no pod runner", pytrace=False)
    core = client.CoreV1Api(kube_api)
    yield core
    for pod in core.list_namespaced_pod(kube_plane.ray_namespace, label_selector="test=podrunner").items:
        core.delete_namespaced_pod(pod.metadata.name, kube_plane.ray_namespace, grace_period_seconds=0)


def _pod(name: str, script: str, **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"test": "podrunner", "app": name}},
        "spec": {
            "nodeName": plane.CPU_NODE,
            "containers": [
                {"name": "main", "image": "none", "command": ["sh", "-c"], "args": [script], **container}
            ],
        },
    }


def _read(core: client.CoreV1Api, namespace: str, name: str) -> Any:
    return core.read_namespaced_pod(name, namespace)


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


def test_pod_runs_in_its_own_namespace_with_resolved_env_and_probed_readiness(
    kube_plane: plane.ControlPlane, pods: client.CoreV1Api
) -> None:
    ns = kube_plane.ray_namespace
    name = f"env-{uuid.uuid4().hex[:6]}"
    pods.create_namespaced_secret(
        ns,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name=name, labels={"test": "podrunner"}),
            string_data={"FROM_SECRET": "s3cret", "TOKEN": "t0k"},
        ),
    )
    pods.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"mode": "blue"})
    )
    script = (
        'printf "%s|%s|%s|%s|%s|%s" "$FROM_SECRET" "$TOKEN_REF" "$MODE" "$MY_IP" "$MY_NS" "$DERIVED"'
        f" > /tmp/env.txt && touch /tmp/{name}.marker && " + SERVER
    )
    body = _pod(
        name,
        script,
        envFrom=[{"secretRef": {"name": name}}],
        env=[
            {"name": "TOKEN_REF", "valueFrom": {"secretKeyRef": {"name": name, "key": "TOKEN"}}},
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": name, "key": "mode"}}},
            {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "DERIVED", "value": "$(MODE)-x"},
        ],
        readinessProbe={"httpGet": {"path": "/env.txt", "port": 8080}, "periodSeconds": 1},
    )
    try:
        pods.create_namespaced_pod(ns, body)
        until("pod Ready from its probe", lambda: _ready(_read(pods, ns, name)), timeout=60)
        pod = _read(pods, ns, name)
        address = pod.status.pod_ip
        assert address and address.startswith("10.244."), address
        assert _get(f"http://{address}:8080/env.txt") == f"s3cret|t0k|blue|{address}|{ns}|blue-x"
        (status,) = pod.status.container_statuses
        assert status.ready and status.state.running is not None and status.restart_count == 0
        # Its /tmp is its own: what it wrote there is not in the host's.
        assert _get(f"http://{address}:8080/{name}.marker") == ""
        assert not Path(f"/tmp/{name}.marker").exists()
    finally:
        pods.delete_namespaced_config_map(name, ns)
        pods.delete_namespaced_secret(name, ns)


def test_failing_command_is_restarted_and_reported_like_a_kubelet(
    kube_plane: plane.ControlPlane, pods: client.CoreV1Api
) -> None:
    ns = kube_plane.ray_namespace
    name = f"crash-{uuid.uuid4().hex[:6]}"
    pods.create_namespaced_pod(ns, _pod(name, "echo failing; exit 3"))

    seen: list[Any] = []

    def backing_off() -> bool:
        statuses = _read(pods, ns, name).status.container_statuses or []
        seen[:] = statuses
        return bool(statuses) and statuses[0].restart_count >= 1 and statuses[0].state.waiting is not None

    until("a restart reported, the container backing off", backing_off, timeout=60)
    (status,) = seen
    assert status.last_state.terminated.exit_code == 3
    assert status.last_state.terminated.reason == "Error"
    assert status.state.waiting.reason == "CrashLoopBackOff"
    assert not status.ready


def test_deleted_pod_leaves_no_process_or_namespace(
    kube_plane: plane.ControlPlane, pods: client.CoreV1Api
) -> None:
    ns = kube_plane.ray_namespace
    runner = kube_plane.runner
    assert runner is not None
    name = f"gone-{uuid.uuid4().hex[:6]}"
    pods.create_namespaced_pod(ns, _pod(name, "exec sleep 1000"))
    uid = _read(pods, ns, name).metadata.uid
    until(
        "the runner runs it",
        lambda: uid in runner.workers and bool(runner.workers[uid].containers),
        timeout=60,
    )
    worker = runner.workers[uid]
    netns = worker.sandbox.netns
    until("its process running", lambda: bool(network.netns_pids(netns)), timeout=30)
    pids = network.netns_pids(netns)
    pods.delete_namespaced_pod(name, ns, grace_period_seconds=0)

    def gone() -> bool:
        try:
            _read(pods, ns, name)
            return False
        except ApiException as exc:
            return exc.status == 404 and uid not in runner.workers and netns not in network.list_namespaces()

    until("pod, worker and namespace gone", gone, timeout=60)
    assert not [pid for pid in pids if network._alive(pid) and not network._zombie(pid)]


def test_pods_deleted_while_starting_leave_nothing_behind(
    kube_plane: plane.ControlPlane, pods: client.CoreV1Api
) -> None:
    """One pod waits for a Secret that does not exist (CreateContainerConfigError), one for an init
    container that never finishes: both deleted before their containers run, both torn down."""
    ns = kube_plane.ray_namespace
    runner = kube_plane.runner
    assert runner is not None
    suffix = uuid.uuid4().hex[:6]
    missing = _pod(f"nosecret-{suffix}", SERVER, envFrom=[{"secretRef": {"name": f"absent-{suffix}"}}])
    initing = _pod(f"initing-{suffix}", SERVER)
    initing["spec"]["initContainers"] = [
        {"name": "wait", "image": "none", "command": ["sh", "-c", "exec sleep 1000"]}
    ]
    uids = {}
    for body in (missing, initing):
        pods.create_namespaced_pod(ns, body)
        uids[body["metadata"]["name"]] = _read(pods, ns, body["metadata"]["name"]).metadata.uid

    def config_error() -> bool:
        statuses = _read(pods, ns, missing["metadata"]["name"]).status.container_statuses or []
        return any(
            s.state.waiting is not None and s.state.waiting.reason == "CreateContainerConfigError"
            for s in statuses
        )

    until("the missing Secret reported", config_error, timeout=60)
    init_uid = uids[initing["metadata"]["name"]]
    until(
        "the init container running",
        lambda: (
            init_uid in runner.workers and bool(network.netns_pids(runner.workers[init_uid].sandbox.netns))
        ),
        timeout=60,
    )
    netns = {uid: runner.workers[uid].sandbox.netns for uid in uids.values()}
    pids = network.netns_pids(netns[init_uid])
    assert not _read(pods, ns, initing["metadata"]["name"]).status.container_statuses[0].ready
    for name in uids:
        pods.delete_namespaced_pod(name, ns, grace_period_seconds=0)

    def gone() -> bool:
        present = {p.metadata.uid for p in pods.list_namespaced_pod(ns).items}
        namespaces = set(network.list_namespaces(runner.netns_prefix))
        return all(uid not in present and uid not in runner.workers for uid in uids.values()) and not (
            namespaces & set(netns.values())
        )

    until("both pods, their workers and namespaces gone", gone, timeout=60)
    assert not [pid for pid in pids if network._alive(pid) and not network._zombie(pid)]


# What an in-cluster client does: the apiserver from the environment, the projected token and CA.
WHO_AM_I = """
import json, os, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
url = "https://%s:%s/apis/authentication.k8s.io/v1/selfsubjectreviews" % (
    os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT_HTTPS"])
body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}).encode()
request = urllib.request.Request(url, body, {
    "Authorization": "Bearer " + open(sa + "/token").read(), "Content-Type": "application/json"})
context = ssl.create_default_context(cafile=sa + "/ca.crt")
review = json.load(urllib.request.urlopen(request, context=context, timeout=10))
user = review["status"]["userInfo"]["username"]
open("/tmp/whoami", "w").write(user + "|" + open(sa + "/namespace").read())
"""


def test_pod_with_a_service_account_calls_the_apiserver_as_it(
    kube_plane: plane.ControlPlane, pods: client.CoreV1Api
) -> None:
    """The pod waits while its account does not exist (as KubeRay's autoscaler pod may), then finds
    the apiserver in its environment and authenticates with the token projected for it, over TLS
    checked against the projected CA."""
    ns = kube_plane.ray_namespace
    name = f"sa-{uuid.uuid4().hex[:6]}"
    body = _pod(name, f"python3 -c '{WHO_AM_I}' && " + SERVER)
    body["spec"]["serviceAccountName"] = name
    pods.create_namespaced_pod(ns, body)

    def waiting_for_account() -> bool:
        statuses = _read(pods, ns, name).status.container_statuses or []
        return any(
            s.state.waiting is not None
            and s.state.waiting.reason == "CreateContainerConfigError"
            and "serviceaccount" in (s.state.waiting.message or "")
            for s in statuses
        )

    until("the missing account reported", waiting_for_account, timeout=60)
    account = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name, labels={"test": "podrunner"}))
    pods.create_namespaced_service_account(ns, account)
    try:
        address: list[str] = []

        def answered() -> bool:
            pod = _read(pods, ns, name)
            address[:] = [pod.status.pod_ip or ""]
            return bool(pod.status.pod_ip) and _get(f"http://{pod.status.pod_ip}:8080/whoami") is not None

        until("the pod's review written", answered, timeout=60)
        assert _get(f"http://{address[0]}:8080/whoami") == f"system:serviceaccount:{ns}:{name}|{ns}"
        assert not Path("/var/run/secrets/kubernetes.io/serviceaccount/token").exists()  # the pod's own
    finally:
        pods.delete_namespaced_service_account(name, ns)


API_ACCESS = {
    "name": "api-access",
    "projected": {
        "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {
                "downwardAPI": {
                    "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                }
            },
        ]
    },
}


def test_projected_token_volume_reaches_only_the_container_that_mounts_it(
    kube_plane: plane.ControlPlane, pods: client.CoreV1Api
) -> None:
    """Automounting off, the token in a projected volume one container mounts (KubeRay's autoscaler
    sidecar beside ray-head): that container authenticates as the account, read-only; the other
    container of the pod finds nothing where in-cluster clients look."""
    ns = kube_plane.ray_namespace
    name = f"sav-{uuid.uuid4().hex[:6]}"
    sa = "/var/run/secrets/kubernetes.io/serviceaccount"
    account = client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name, labels={"test": "podrunner"}))
    pods.create_namespaced_service_account(ns, account)
    body = _pod(
        name,
        f"python3 -c '{WHO_AM_I}' && (touch {sa}/x 2>/dev/null && echo rw || echo ro) > /tmp/mode && "
        + SERVER,
        volumeMounts=[{"name": "api-access", "mountPath": sa, "readOnly": True}],
    )
    other = f"(test -e {sa}/token && echo seen || echo absent) > /tmp/other && exec sleep 3600"
    body["spec"]["containers"].append({"name": "other", "image": "none", "command": ["sh", "-c", other]})
    body["spec"].update(serviceAccountName=name, automountServiceAccountToken=False, volumes=[API_ACCESS])
    try:
        pods.create_namespaced_pod(ns, body)
        address: list[str] = []

        def answered() -> bool:
            pod = _read(pods, ns, name)
            address[:] = [pod.status.pod_ip or ""]
            return bool(address[0]) and all(
                _get(f"http://{address[0]}:8080/{file}") is not None for file in ("whoami", "mode", "other")
            )

        until("both containers wrote what they found", answered, timeout=60)
        assert _get(f"http://{address[0]}:8080/whoami") == f"system:serviceaccount:{ns}:{name}|{ns}"
        assert _get(f"http://{address[0]}:8080/mode") == "ro\n"
        assert _get(f"http://{address[0]}:8080/other") == "absent\n"
    finally:
        pods.delete_namespaced_service_account(name, ns)


@pytest.mark.parametrize(
    ("limits", "expected"),
    [
        (None, {}),
        ({"cpu": "1", "memory": "1Gi"}, {}),
        ({"nvidia.com/gpu": "0"}, {}),
        ({"nvidia.com/gpu": "1"}, {"NVIDIA_VISIBLE_DEVICES": "GPU-node-0"}),
        ({"nvidia.com/gpu": "2", "cpu": "1"}, {"NVIDIA_VISIBLE_DEVICES": "GPU-node-0,GPU-node-1"}),
    ],
)
def test_device_env_names_the_granted_gpus(limits: dict[str, str] | None, expected: dict[str, str]) -> None:
    container = client.V1Container(name="c", resources=client.V1ResourceRequirements(limits=limits))
    assert device_env(container, "node") == expected
