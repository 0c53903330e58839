"""Where RegisteredModelServing resources live for a client: the Kubernetes API server of the current
kube context, or a running `regserve dev`. Both hand back objects shaped as Kubernetes stores them, and
send scoring requests to a resource's endpoint (through the API server's service proxy on Kubernetes,
so a laptop with only a kubeconfig can score)."""

from __future__ import annotations

import json
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from regserve_operator.spec import GROUP, KIND, PLURAL, VERSION, manifest

REQUEST_TIMEOUT_S = 30.0
SCORING_TIMEOUT_S = 120.0
MAX_ANSWER_BYTES = 64 * 1024 * 1024


class StoreError(Exception):
    """A store refused or could not be reached; `missing` when the named resource does not exist."""

    def __init__(self, message: str, *, missing: bool = False, conflict: bool = False) -> None:
        super().__init__(message)
        self.missing = missing
        self.conflict = conflict


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str


class ResourceStore(Protocol):
    namespace: str
    where: str  # for messages: "namespace ns of cluster https://..." or "regserve dev at ..."

    def get(self, name: str) -> dict[str, Any] | None: ...
    def list(self) -> list[dict[str, Any]]: ...
    def create(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]: ...
    def replace_spec(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]: ...
    def delete(self, name: str) -> bool: ...
    def score(
        self, url: str, route: str, payload: Mapping[str, Any], headers: Mapping[str, str]
    ) -> Answer: ...


# ------------------------------------------------------------------------------------------ Kubernetes


class KubeStore:
    """The resources of one namespace on the API server of the current kube context (or in-cluster)."""

    def __init__(self, namespace: str | None) -> None:
        from kubernetes import client, config

        # Read now, not when the kubernetes package was imported (it snapshots KUBECONFIG then).
        kubeconfig = os.environ.get("KUBECONFIG") or None
        try:
            config.load_kube_config(config_file=kubeconfig)
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            default_namespace = (active or {}).get("context", {}).get("namespace") or "default"
        except config.ConfigException:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                raise StoreError(
                    "no Kubernetes configuration: set KUBECONFIG or a current context (kubectl config "
                    "use-context), or use the regserve-local target"
                ) from None
            default_namespace = _incluster_namespace()
        self.namespace = namespace or default_namespace
        self._api = client.ApiClient()
        self._objects = client.CustomObjectsApi(self._api)
        self.where = f"namespace {self.namespace} of {self._api.configuration.host}"

    def _call(self, what: str, call: Any, *args: Any) -> Any:
        """`call` on this namespace's resources (group, version, namespace and plural go first)."""
        from kubernetes.client.exceptions import ApiException

        try:
            return call(GROUP, VERSION, self.namespace, PLURAL, *args, _request_timeout=REQUEST_TIMEOUT_S)
        except ApiException as error:
            raise _kube_error(what, error, self.namespace) from None
        except OSError as error:  # urllib3's connection errors derive from it
            raise StoreError(f"{what}: cannot reach {self._api.configuration.host}: {error}") from None

    def _unless_missing(self, what: str, call: Any, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self._call(what, call, name)
        except StoreError as error:
            if error.missing:
                return None
            raise
        return found

    def get(self, name: str) -> dict[str, Any] | None:
        return self._unless_missing(f"reading {name}", self._objects.get_namespaced_custom_object, name)

    def list(self) -> list[dict[str, Any]]:
        listed = self._call("listing", self._objects.list_namespaced_custom_object)
        return list(listed.get("items") or [])

    def create(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        body = manifest(name, spec, namespace=self.namespace)
        created: dict[str, Any] = self._call(
            f"creating {name}", self._objects.create_namespaced_custom_object, body
        )
        return created

    def replace_spec(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        current = self.get(name)
        if current is None:
            raise StoreError(f"{name} does not exist in {self.where}", missing=True)
        # Replaced whole, guarded by resourceVersion: a field the user removed goes, and a write that
        # raced with another is refused rather than merged blindly.
        body = {**current, "spec": dict(spec)}
        body.pop("status", None)
        replace = self._objects.replace_namespaced_custom_object
        replaced: dict[str, Any] = self._call(f"updating {name}", replace, name, body)
        return replaced

    def delete(self, name: str) -> bool:
        deleted = self._unless_missing(
            f"deleting {name}", self._objects.delete_namespaced_custom_object, name
        )
        return deleted is not None

    def score(self, url: str, route: str, payload: Mapping[str, Any], headers: Mapping[str, str]) -> Answer:
        service, namespace, port, prefix = service_of(url)
        path = (
            f"/api/v1/namespaces/{_segment(namespace)}/services/{_segment(service)}:{port}/proxy"
            f"{prefix.rstrip('/')}{route}"
        )
        method, full_url, header_params, body, post_params = self._api.param_serialize(
            "POST",
            path,
            header_params={"Content-Type": "application/json", "Accept": "application/json", **headers},
            body=dict(payload),
            auth_settings=["BearerToken"],
        )
        from kubernetes.client.exceptions import ApiException

        try:
            response = self._api.call_api(
                method, full_url, header_params, body, post_params, _request_timeout=SCORING_TIMEOUT_S
            )
            data = response.read()
        except ApiException as error:  # the proxy's own refusals (no endpoints, forbidden)
            refused = error.body or b""
            raw = refused.encode() if isinstance(refused, str) else bytes(refused)
            return Answer(error.status or 502, raw[:MAX_ANSWER_BYTES], "text/plain")
        except OSError as error:
            raise StoreError(f"scoring: cannot reach {self._api.configuration.host}: {error}") from None
        return Answer(response.status, data[:MAX_ANSWER_BYTES], response.getheader("Content-Type") or "")


def service_of(url: str) -> tuple[str, str, int, str]:
    """(service, namespace, port, path) of a status URL such as http://x-serve-svc.ns.svc:8000/x."""
    parsed = urllib.parse.urlsplit(url)
    labels = (parsed.hostname or "").split(".")
    if len(labels) < 3 or labels[2] != "svc" or not parsed.port:
        raise StoreError(f"the status URL {url[:200]!r} is not a cluster Service address")
    return labels[0], labels[1], parsed.port, parsed.path or "/"


def _segment(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def _incluster_namespace() -> str:
    path = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
    try:
        with open(path) as handle:
            return handle.read(253).strip() or "default"
    except OSError:
        return "default"


def _kube_error(what: str, error: Any, namespace: str) -> StoreError:
    """A readable StoreError from an ApiException, decided on its status code and Status details."""
    try:
        status = json.loads(error.body or b"{}")
    except (ValueError, TypeError):
        status = {}  # a bare "404 page not found": no such API on this server
    status = status if isinstance(status, dict) else {}
    details = status.get("details") or {}
    message = str(status.get("message") or error.reason or "")[:500]
    code = error.status
    if code == 404 and details.get("kind") == "namespaces":
        return StoreError(f"{what}: namespace {namespace} does not exist")
    if code == 404 and details.get("kind") == PLURAL:
        return StoreError(f"{what}: not found in namespace {namespace}", missing=True)
    if code == 404:
        return StoreError(
            f"{what}: this cluster has no {KIND} API ({GROUP}/{VERSION}); install regserve's CRDs "
            "(helm install regserve charts/regserve, or kubectl apply -f crds/)"
        )
    if code == 403:
        return StoreError(f"{what}: forbidden in namespace {namespace}: {message}")
    if code == 409:
        return StoreError(f"{what}: {message}", conflict=True)
    if code == 422:
        return StoreError(f"{what}: the API server refused the resource: {message}")
    return StoreError(f"{what}: the API server answered {code}: {message}")


# ------------------------------------------------------------------------------------------ local mode


class LocalStore:
    """The resources of a running `regserve dev`, through its control API."""

    def __init__(self, namespace: str | None) -> None:
        from regserve_operator.local_client import LocalControlClient, LocalSessionNotFound

        try:
            self._client = LocalControlClient.discover()
        except LocalSessionNotFound as error:
            raise StoreError(str(error)) from None
        self.namespace = namespace or "default"
        self.where = f"namespace {self.namespace} of regserve dev"

    def _call(self, what: str, call: Any, *args: Any) -> Any:
        from regserve_operator.local_client import LocalControlError

        try:
            return call(*args)
        except LocalControlError as error:
            raise StoreError(
                f"{what}: {error.message}", missing=error.status == 404, conflict=error.status == 409
            ) from None

    def get(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._call(f"reading {name}", self._client.get, self.namespace, name)
        return found

    def list(self) -> list[dict[str, Any]]:
        return list(self._call("listing", self._client.list, self.namespace))

    def create(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        if self.get(name) is not None:
            raise StoreError(f"creating {name}: it already exists in {self.where}", conflict=True)
        created: dict[str, Any] = self._call(
            f"creating {name}", self._client.apply, manifest(name, spec, namespace=self.namespace)
        )
        return created

    def replace_spec(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        if self.get(name) is None:
            raise StoreError(f"{name} does not exist in {self.where}", missing=True)
        replaced: dict[str, Any] = self._call(
            f"updating {name}", self._client.apply, manifest(name, spec, namespace=self.namespace)
        )
        return replaced

    def delete(self, name: str) -> bool:
        return bool(self._call(f"deleting {name}", self._client.delete, self.namespace, name))

    def score(self, url: str, route: str, payload: Mapping[str, Any], headers: Mapping[str, str]) -> Answer:
        import httpx

        try:
            response = httpx.post(
                url.rstrip("/") + route, json=dict(payload), headers=dict(headers), timeout=SCORING_TIMEOUT_S
            )
        except httpx.HTTPError as error:
            raise StoreError(f"scoring: cannot reach {url}: {error}") from None
        return Answer(
            response.status_code,
            response.content[:MAX_ANSWER_BYTES],
            response.headers.get("content-type", ""),
        )
