"""Running the operator against the test control plane, as its ServiceAccount with the RBAC we ship."""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from regserve_operator import rbac
from regserve_operator.builders import serving_version_of
from regserve_operator.spec import manifest

from tests.k8s import plane

GROUP, VERSION, PLURAL = "regserve.io", "v1alpha1", "registeredmodelservings"
POLL_S = 2
DEADLINE = 60.0
SA = "regserve-operator"
# What every test operator runs with: no webhook receiver or metrics port to collide on, a short settle
# time so rollouts are judged within a test's deadline, a recognisable image.
OPERATOR_ENV = {
    "REGSERVE_WEBHOOK_PORT": "0",
    "REGSERVE_METRICS_PORT": "0",
    "REGSERVE_SETTLE_SECONDS": "1",
    "REGSERVE_IMAGE": "regserve/test:1",
    # These tests ask for GPUs and images of their own; the policy has tests of its own.
    "REGSERVE_POLICY_ENABLED": "false",
}
# An HTTP 403 shows as "(403)" and "Forbidden"; a bare "403" also matches timestamps and ids.
FORBIDDEN = re.compile(r"Forbidden|\(403\)")


@contextlib.contextmanager
def operator_account(
    kube_api: client.ApiClient, namespace: str, mint_kubeconfig: plane.MintKubeconfig, account: str = SA
) -> Iterator[Path]:
    """A kubeconfig for the operator's ServiceAccount, bound to exactly the rendered ClusterRole."""
    rbac_api = client.RbacAuthorizationV1Api(kube_api)
    role = rbac.cluster_role()
    try:
        rbac_api.create_cluster_role(role)
    except ApiException as exc:
        if exc.status != 409:
            raise
        rbac_api.replace_cluster_role(role["metadata"]["name"], role)
    binding_name = f"{rbac.NAME}-{namespace}-{account}"
    binding = copy.deepcopy(next(d for d in rbac.manifests(namespace) if d["kind"] == "ClusterRoleBinding"))
    binding["metadata"]["name"] = binding_name
    binding["subjects"][0]["name"] = account
    rbac_api.create_cluster_role_binding(binding)
    try:
        yield mint_kubeconfig(namespace, account)
    finally:
        rbac_api.delete_cluster_role_binding(binding_name)


@contextlib.contextmanager
def running_operator(
    kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch, *, webhook: bool = False
) -> Iterator[KopfRunner]:
    """`regserve_operator.main` under kopf's test runner, watching one namespace."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    for key, value in OPERATOR_ENV.items():
        if webhook and key == "REGSERVE_WEBHOOK_PORT":
            continue
        monkeypatch.setenv(key, value)
    args = ["run", "--standalone", "--namespace", namespace, "-m", "regserve_operator.main"]
    with KopfRunner(args, timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-3000:]
    assert not FORBIDDEN.search(runner.output), runner.output[-3000:]


class OperatorProcess:
    """The operator as its image runs it (`regserve run --standalone --namespace NS`), as a real process.

    Unlike kopf's in-process runner it can be killed without warning: it runs in its own process group
    (SIGKILL reaches everything it started) and dies with the test process (parent-death signal). Every
    start appends to the same log file, so `output()` is the complete log of all its lives.
    """

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log: Path,
        *,
        env: dict[str, str] | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> None:
        self.namespace = namespace
        self.log = log
        self.env = {**OPERATOR_ENV, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1", **(env or {})}
        # e.g. a mount namespace with the cluster names (tests/k8s/podrunner.with_cluster_hosts)
        self.wrap = wrap
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        # Log spans (character offsets) where RBAC refusals are expected, e.g. while an apiserver
        # restarts and its authorizer has not loaded the roles yet.
        self.excused: list[tuple[int, int]] = []

    def start(self) -> OperatorProcess:
        assert not self.alive(), "already running"
        regserve = Path(sys.executable).with_name("regserve")
        argv = [str(regserve), "run", "--standalone", "--namespace", self.namespace]
        if self.wrap is not None:
            argv = self.wrap(argv)
        component = plane.Component(name="regserve-operator", argv=argv, log=self.log, env=self.env)
        component.start()
        self.proc = component.proc
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL to the whole process group: no cleanup handler, no last status write."""
        assert self.proc is not None and self.alive(), "not running"
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def audited_output(self) -> str:
        """The log without its excused spans."""
        text, kept, at = self.output(), [], 0
        for start, end in sorted(self.excused):
            kept.append(text[at:start])
            at = max(at, end)
        return "".join([*kept, text[at:]])


@contextlib.contextmanager
def operator_process(kubeconfig: Path, namespace: str, log: Path) -> Iterator[OperatorProcess]:
    """A running `OperatorProcess`; stopped afterwards, and its log checked for RBAC refusals."""
    process = OperatorProcess(kubeconfig, namespace, log).start()
    try:
        yield process
    finally:
        process.stop()
    refused = FORBIDDEN.search(process.audited_output())
    assert refused is None, process.audited_output()[max(0, refused.start() - 1500) : refused.end() + 1500]


class Cluster:
    """The test's view of one namespace, as the admin (the user applying resources)."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.namespace = namespace
        self.created: list[str] = []
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def create_rms(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = manifest(name, spec)
        return dict(self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body))

    def rms(self, name: str) -> dict[str, Any]:
        return dict(self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name))

    def rayservice(self, name: str) -> dict[str, Any] | None:
        try:
            return dict(
                self.custom.get_namespaced_custom_object("ray.io", "v1", self.namespace, "rayservices", name)
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def set_app_status(self, name: str, app_status: str, message: str = "") -> None:
        status = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if app_status == "RUNNING" else "False",
                    "reason": "Test",
                    "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
            "activeServiceStatus": {
                "applicationStatuses": {name: {"status": app_status, "message": message}}
            },
        }
        self.custom.patch_namespaced_custom_object_status(
            "ray.io", "v1", self.namespace, "rayservices", name, {"status": status}
        )

    def events(self, name: str, reason: str) -> list[Any]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        ).items
        return [e for e in items if e.reason == reason]

    def secret(self, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(
            self.namespace, client.V1Secret(metadata=client.V1ObjectMeta(name=name), string_data=data)
        )


def until(what: str, check: Callable[[], bool], timeout: float = DEADLINE) -> None:
    plane.wait_for(what, check, timeout=timeout, interval=0.25)


def steady(what: str, value: Callable[[], Any], seconds: float) -> Any:
    """Observe `value` over `seconds` (an observation window, not synchronisation): it must not change."""
    first = value()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert value() == first, f"{what} changed"
        time.sleep(0.25)
    return first


def cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def rms_spec(model: str, mlflow_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"name": model, "alias": "champion"},
        "registry": {
            "trackingUri": mlflow_url,
            "credentialsSecretRef": {"name": "mlflow-auth"},
            "pollIntervalSeconds": POLL_S,
        },
        **extra,
    }


def new_model() -> str:
    return f"k8s_{uuid.uuid4().hex[:8]}"


def carried(cluster: Cluster, name: str) -> str | None:
    rs = cluster.rayservice(name)
    return serving_version_of(rs) if rs else None
