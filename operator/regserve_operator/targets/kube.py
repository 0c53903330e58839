"""The Kubernetes target: RayServices through the API server.

Every call here is one the shipped RBAC allows (see `rbac.py`, the single source of those rules):
rayservices get/create/patch (and list/watch for kopf's watch on them), secrets `get` only, on the
one Secret a resource names, in its namespace.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from regserve_operator.builders import SERVE_PORT
from regserve_operator.plan import Plan
from regserve_operator.rbac import rule
from regserve_operator.reconcile import CredentialsUnavailable, TargetConflict

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_PLURAL = "rayservices"

rule(
    __name__,
    [RAY_GROUP],
    [RAY_PLURAL],
    ["get", "create", "patch"],
    "create a RayService, patch it on rollouts",
)
rule(__name__, [""], ["secrets"], ["get"], "read the one credentials Secret a resource names (no list/watch)")


class KubeTarget:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            obj = self._custom.get_namespaced_custom_object(
                RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return cast(dict[str, Any], obj)

    def apply(self, plan: Plan) -> None:
        try:
            if plan.action == "create":
                self._custom.create_namespaced_custom_object(
                    RAY_GROUP, RAY_VERSION, plan.namespace, RAY_PLURAL, plan.desired
                )
            elif plan.action in ("patch_serve_config", "patch_cluster"):
                self._custom.patch_namespaced_custom_object(
                    RAY_GROUP,
                    RAY_VERSION,
                    plan.namespace,
                    RAY_PLURAL,
                    plan.name,
                    plan.patch,
                    _content_type="application/json-patch+json",  # the client defaults to merge-patch
                )
        except ApiException as exc:
            # 409: created meanwhile; 422 from a failed JSON Patch `test`: changed meanwhile.
            if exc.status in (409, 422) and (exc.status == 409 or "test" in str(exc.body or "")):
                raise TargetConflict(f"RayService {plan.namespace}/{plan.name} changed meanwhile") from exc
            raise

    def read_credentials(self, namespace: str, secret_name: str) -> Mapping[str, str]:
        try:
            secret = self._core.read_namespaced_secret(secret_name, namespace)
        except ApiException as exc:
            # The reason only: the body of an error about a Secret is nothing to repeat.
            raise CredentialsUnavailable(
                f"secret {namespace}/{secret_name}: HTTP {exc.status} {exc.reason}"
            ) from None
        return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}

    def url(self, namespace: str, name: str, route_prefix: str) -> str:
        # KubeRay's serve Service for a RayService is `<name>-serve-svc`.
        return f"http://{name}-serve-svc.{namespace}.svc:{SERVE_PORT}{route_prefix}"
