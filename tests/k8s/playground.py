"""``make plane``: the test control plane with everything a promotion needs, for trying it by hand.

Starts the plane (KubeRay, and the pod runner that runs real Ray behind the pods of namespace
``kuberay-ray``), a real ``mlflow server`` on the host's address on the pod bridge (so the pods reach it),
a demo model with two versions (``champion`` → version 1, German; version 2 is French), and the operator as
its ServiceAccount with the shipped RBAC, watching ``kuberay-ray``. Prints what to ``kubectl apply``, how to
``curl`` the app from the host and how to promote. Ctrl-C stops everything.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from pathlib import Path

from kubernetes import client
from regserve_operator.spec import manifest, manifests_yaml

from tests.k8s import network, plane
from tests.k8s.podrunner import with_cluster_hosts

MODEL = "playground_translator"
RMS_NAME = "translator"


def rms_yaml(namespace: str, tracking_uri: str) -> str:
    spec = {
        "model": {"name": MODEL, "alias": "champion"},
        "registry": {"trackingUri": tracking_uri, "pollIntervalSeconds": 5},
        "serving": {"cpusPerReplica": 0.5},
    }
    return manifests_yaml(manifest(RMS_NAME, spec, namespace=namespace))


def instructions(started: plane.ControlPlane, tracking_uri: str, rms_file: Path, python: str) -> str:
    ns = started.ray_namespace
    hosts = started.hosts_path
    promote = (
        f'{python} -c "from mlflow import MlflowClient; '
        f"MlflowClient('{tracking_uri}').set_registered_model_alias('{MODEL}', 'champion', '2')\""
    )
    return f"""
control plane, pod runner, mlflow and the operator are up.
  export KUBECONFIG={started.admin_kubeconfig}
  kubectl apply -f {rms_file}
  kubectl -n {ns} get registeredmodelservings,rayservices,rayclusters,pods -w     # a few minutes, cold
The serve address (<name>-serve-svc) is in the plane's hosts file {hosts}:
  ADDR=$(awk '/{RMS_NAME}-serve-svc.{ns}.svc /{{print $1}}' {hosts}); echo $ADDR
  curl -s http://$ADDR:8000/{RMS_NAME}/serve -H 'content-type: application/json' -d '{{"prompt": "Hello"}}'
Promote version 2 (French) and ask again:
  {promote}
mlflow: {tracking_uri}   logs: {started.log_dir}   operator log: {started.workdir / "operator.log"}
Ctrl-C stops everything (Ray processes and network namespaces included).
"""


def main() -> int:
    from regserve_operator.sandbox.mlflow_server import MlflowServer
    from regserve_operator.sandbox.models import log_phrasebook

    from tests.k8s.operator_support import OperatorProcess, operator_account

    try:
        started = plane.ControlPlane(tools=plane.find_tools()).start()
    except plane.PlaneError as exc:
        print(exc, file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    mlflow = MlflowServer(
        root=Path(tempfile.mkdtemp(prefix="regserve-playground-mlflow-")), host=network.BRIDGE_IP
    )
    try:
        mlflow.start()
        from mlflow import MlflowClient

        log_phrasebook(mlflow.url, MODEL, lang_to="de")
        log_phrasebook(mlflow.url, MODEL, lang_to="fr")
        MlflowClient(mlflow.url).set_registered_model_alias(MODEL, "champion", "1")
        rms_file = started.workdir / "translator.yaml"
        rms_file.write_text(rms_yaml(started.ray_namespace, mlflow.url))
        with (
            started.api_client() as api,
            operator_account(api, started.ray_namespace, started.mint_kubeconfig) as kubeconfig,
        ):
            operator = OperatorProcess(
                kubeconfig,
                started.ray_namespace,
                started.workdir / "operator.log",
                env={"REGSERVE_PROBE_SERVING": "on"},  # the serve names resolve (plane hosts file)
                wrap=lambda argv: with_cluster_hosts(argv, started.hosts_path),
            ).start()
            try:
                print(instructions(started, mlflow.url, rms_file, sys.executable), flush=True)
                while not stop.wait(1):
                    if not operator.alive():
                        print(f"operator exited; see {operator.log}", file=sys.stderr)
                        break
                _delete_resources(api, started.ray_namespace)
            finally:
                operator.stop()
    finally:
        mlflow.stop()
        started.stop(keep_logs=True)
        print(f"stopped; logs kept in {started.log_dir}")
    return 0


def _delete_resources(api: client.ApiClient, namespace: str) -> None:
    """What was applied goes before the plane: the runner then stops its Ray processes on the way out."""
    custom = client.CustomObjectsApi(api)
    listing = custom.list_namespaced_custom_object(
        "regserve.io", "v1alpha1", namespace, "registeredmodelservings"
    )
    for item in listing["items"]:
        custom.delete_namespaced_custom_object(
            "regserve.io", "v1alpha1", namespace, "registeredmodelservings", item["metadata"]["name"]
        )
    # The operator (still running) removes their MLflow tags and then its finalizer.
    plane.wait_for(
        "resources deleted",
        lambda: (
            not custom.list_namespaced_custom_object(
                "regserve.io", "v1alpha1", namespace, "registeredmodelservings"
            )["items"]
        ),
        timeout=60,
        interval=0.5,
    )


if __name__ == "__main__":
    sys.exit(main())
