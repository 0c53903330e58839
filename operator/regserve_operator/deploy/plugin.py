"""The `regserve` and `regserve-local` targets of `mlflow deployments` (MLflow's deployment plugin contract:
`run_local`, `target_help` and one `BaseDeploymentClient`)."""

from __future__ import annotations

import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
)

from regserve_operator.deploy import ops
from regserve_operator.deploy.flatconfig import CLIENT_KEYS, ConfigError, spec_fields, split_config
from regserve_operator.deploy.stores import ResourceStore
from regserve_operator.deploy.uris import KUBE_TARGET, LOCAL_TARGET, UriError, parse_model_uri, parse_target
from regserve_operator.spec import manifest, manifests_yaml

FLAVOR = "python_function"


@contextmanager
def _as_mlflow_errors() -> Iterator[None]:
    try:
        yield
    except ops.DeployError as error:
        code = RESOURCE_DOES_NOT_EXIST if error.missing else INVALID_PARAMETER_VALUE
        raise MlflowException(str(error), error_code=code) from None
    except (UriError, ConfigError) as error:
        raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from None


def _check_flavor(flavor: str | None) -> None:
    if flavor not in (None, FLAVOR):
        raise MlflowException(f"regserve serves the {FLAVOR} flavor, not {flavor}", INVALID_PARAMETER_VALUE)


def _no_endpoints(endpoint: str | None) -> None:
    if endpoint is not None:
        raise MlflowException("regserve has deployments, not endpoints: use --name", INVALID_PARAMETER_VALUE)


def _tracking_uri() -> str | None:
    """The caller's tracking server, when it is one a cluster could reach (http or https)."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    return uri if urllib.parse.urlsplit(uri).scheme in ("http", "https") else None


class RegserveDeploymentClient(BaseDeploymentClient):
    """Deployments are RegisteredModelServing resources; a deployment's name is the resource's name."""

    def __init__(self, target_uri: str) -> None:
        super().__init__(target_uri)
        with _as_mlflow_errors():
            self._target = parse_target(target_uri)
        self._opened: ResourceStore | None = None

    @property
    def _store(self) -> ResourceStore:
        if self._opened is None:
            with _as_mlflow_errors():
                self._opened = ops.open_store(self._target)
        return self._opened

    def create_deployment(
        self,
        name: str,
        model_uri: str,
        flavor: str | None = None,
        config: dict[str, Any] | None = None,
        endpoint: str | None = None,
    ) -> dict[str, Any]:
        """Create the resource and wait until its version serves (config `wait=false` returns at once)."""
        _check_flavor(flavor)
        _no_endpoints(endpoint)
        with _as_mlflow_errors():
            done = ops.create(self._store, name, model_uri, config, _tracking_uri())
        return ops.view(done.resource)

    def update_deployment(
        self,
        name: str,
        model_uri: str | None = None,
        flavor: str | None = None,
        config: dict[str, Any] | None = None,
        endpoint: str | None = None,
    ) -> dict[str, Any]:
        """Change the selector and/or the config; the change rolls out with every gate, and this waits
        for its verdict (a held or rolled-back version raises with the reason)."""
        _check_flavor(flavor)
        _no_endpoints(endpoint)
        with _as_mlflow_errors():
            done = ops.update(self._store, name, model_uri, config)
        return ops.view(done.resource)

    def delete_deployment(
        self, name: str, config: dict[str, Any] | None = None, endpoint: str | None = None
    ) -> None:
        """Idempotent: deleting a deployment that does not exist is not an error."""
        _no_endpoints(endpoint)
        with _as_mlflow_errors():
            ops.delete(self._store, name, config)

    def list_deployments(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        _no_endpoints(endpoint)
        with _as_mlflow_errors():
            return [ops.view(resource) for resource in self._store.list()]

    def get_deployment(self, name: str, endpoint: str | None = None) -> dict[str, Any]:
        _no_endpoints(endpoint)
        with _as_mlflow_errors():
            return ops.get(self._store, name)

    def predict(
        self,
        deployment_name: str | None = None,
        inputs: Any = None,
        endpoint: str | None = None,
        version: str | None = None,
    ) -> PredictionsResponse:
        """Score `inputs` (a DataFrame, array, list, dict of columns or a scoring payload) on the
        deployment's default version, or on `version` when the deployment's pinning allows it."""
        _no_endpoints(endpoint)
        if deployment_name is None:
            raise MlflowException("predict needs the deployment's name", INVALID_PARAMETER_VALUE)
        with _as_mlflow_errors():
            answer, _ = ops.score(self._store, deployment_name, inputs, version)
        return PredictionsResponse.from_json(answer.body.decode("utf-8"))

    def explain(self, deployment_name: str | None = None, df: Any = None, endpoint: str | None = None) -> Any:
        raise MlflowException("regserve deployments do not explain predictions", INVALID_PARAMETER_VALUE)


def run_local(
    name: str, model_uri: str, flavor: str | None = None, config: dict[str, Any] | None = None
) -> None:
    """Serve the model on this machine with local mode (`regserve dev`) until Ctrl-C.

    Without a target argument: MLflow's `run_local` calls the plugin so (its base module's docstring
    shows one, the call passes none)."""
    _check_flavor(flavor)
    with _as_mlflow_errors():
        selector = parse_model_uri(model_uri)
        _, fields = split_config(config)
        spec = ops.new_spec(selector, fields, _tracking_uri())
    from regserve_operator.local import main as dev_main

    with tempfile.TemporaryDirectory(prefix="regserve-run-local-") as scratch:
        path = Path(scratch) / "deployment.yaml"
        path.write_text(manifests_yaml(manifest(name, spec, namespace="default")))
        dev_main(["-f", str(path)])


def target_help() -> str:
    keys = "\n".join(f"      {path}" for path in sorted(spec_fields()) if "." in path)
    return f"""\
regserve serves a registered MLflow model on Ray Serve: on Kubernetes (as a RegisteredModelServing
resource that the regserve operator turns into a KubeRay RayService) or in local mode (`regserve dev`).

Target URIs
  {KUBE_TARGET}               the current kube context and its namespace
  {KUBE_TARGET}:/<namespace>  that namespace of the current kube context
  {LOCAL_TARGET}         a running `regserve dev` on this machine (namespace "default")

Model URIs (regserve serves registered models; runs:/ and paths are refused)
  models:/<name>@<alias>     follow an alias: moving it in MLflow is the deployment step
  models:/<name>/<stage>     follow a stage (Staging, Production, Archived)
  models:/<name>/<version>   serve that version

Config (-C key=value): any spec field, by its path or an unambiguous tail of it; lists comma-separated
(or JSON), objects as JSON. The tracking URI defaults to MLFLOW_TRACKING_URI when it is http(s).
  {", ".join(sorted(CLIENT_KEYS))}: wait=false returns without waiting; timeout=<seconds> (default 900)
  e.g. -C strategy=Canary -C canary.steps=10,50 -C maxModelsPerReplica=3 -C trackingUri=http://mlflow:5000
  Spec fields:
{keys}

create and update wait until the version serves (or the rollout's verdict) and fail with the status'
reason; delete is idempotent; predict goes through the Kubernetes API server's service proxy, so only
a kubeconfig is needed. Python: client.predict(name, df, version="3") pins a version where the
deployment's pinning allows it.
"""
