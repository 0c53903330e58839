"""The Kubernetes target: RayServices through the API server.

Every call here is one the shipped RBAC allows (see `rbac.py`, the single source of those rules):
rayservices get/create/patch (and list/watch for kopf's watch on them), secrets `get` only, on the
one Secret a resource names, in its namespace.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from regserve_operator import spec as s
from regserve_operator.builders import SERVE_PORT
from regserve_operator.plan import Plan, make_plan
from regserve_operator.ports import CredentialsUnavailable, TargetConflict
from regserve_operator.rbac import rule
from regserve_operator.targets.kube_cache import RayServiceCache

log = logging.getLogger(__name__)

RAY_GROUP = "ray.io"
RAY_VERSION = "v1"
RAY_PLURAL = "rayservices"
# Writes per apply: the first, then re-planned ones after conflicts; a writer that wins this often is
# left to the reconcile's backoff.
CONFLICT_ATTEMPTS = 4
# A restarted apiserver answers 403 for a few seconds while its authorizer loads the roles; 429 and
# 5xx are passing too. Asked again after these pauses before the resource is told it has no credentials.
CREDENTIAL_RETRY_PAUSES_S = (0.5, 1.0, 2.0)
_PASSING_STATUSES = {403, 429, 500, 502, 503, 504}

rule(
    __name__,
    [RAY_GROUP],
    [RAY_PLURAL],
    ["get", "create", "patch"],
    "create a RayService, patch it on rollouts",
)
rule(__name__, [s.GROUP], [s.PLURAL], ["list"], "list the members of a shared cluster (spec.placement)")
rule(__name__, [""], ["secrets"], ["get"], "read the one credentials Secret a resource names (no list/watch)")


class KubeTarget:
    def __init__(
        self,
        api_client: client.ApiClient | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        cache: RayServiceCache | None = None,
    ) -> None:
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._sleep = sleep
        self._cache = cache

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The RayService: the watch's copy when there is one (see kube_cache.py), else asked for."""
        cached = self._cache.get((namespace, name)) if self._cache is not None else None
        return cached if cached is not None else self._read(namespace, name)

    def _read(self, namespace: str, name: str) -> dict[str, Any] | None:
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
        """Carry out `plan`; when the object changed since it was read, plan again against what is there.

        Patches are guarded by a resourceVersion test, so any write in between fails them: a human's
        `kubectl annotate`, another controller's label, and above all KubeRay's own status updates, which
        it writes to the same object all along a rollout. Handing each of those back to the reconcile
        as a conflict would cost a backoff per write; planning the same desired object against the
        fresh one keeps every field the other writer set (the patch replaces only ours) and lands now.
        """
        if not plan.replans:
            self._write(plan)
            return
        for _attempt in range(CONFLICT_ATTEMPTS - 1):
            try:
                self._write(plan)
                return
            except TargetConflict:
                log.info(
                    "RayService %s/%s changed since it was read; planning again", plan.namespace, plan.name
                )
                fresh = make_plan(plan.desired, self._read(plan.namespace, plan.name))
                if fresh.action == "conflict":
                    raise TargetConflict(fresh.message) from None
                if not fresh.writes:
                    return  # someone else already made it so
                plan = fresh
        self._write(plan)

    def _write(self, plan: Plan) -> None:
        written: Any = None
        try:
            if plan.action == "create":
                written = self._custom.create_namespaced_custom_object(
                    RAY_GROUP, RAY_VERSION, plan.namespace, RAY_PLURAL, plan.desired
                )
            elif plan.action in ("patch_serve_config", "patch_cluster"):
                written = self._custom.patch_namespaced_custom_object(
                    RAY_GROUP,
                    RAY_VERSION,
                    plan.namespace,
                    RAY_PLURAL,
                    plan.name,
                    plan.patch,
                    _content_type="application/json-patch+json",  # the client defaults to merge-patch
                )
        except ApiException as exc:
            # 409: created meanwhile; 422 from a failed resourceVersion `test`: changed meanwhile.
            if exc.status == 409 or (exc.status == 422 and self._moved_past(plan)):
                if self._cache is not None:  # behind the API server: the next read asks it
                    self._cache.gone((plan.namespace, plan.name))
                raise TargetConflict(f"RayService {plan.namespace}/{plan.name} changed meanwhile") from exc
            raise
        if self._cache is not None and isinstance(written, dict):
            self._cache.saw(written)

    def _moved_past(self, plan: Plan) -> bool:
        """Whether the object is no longer at the resourceVersion the plan's patch tests for.

        The apiserver answers a failed JSON Patch `test` with a bare 422 Invalid that names no
        operation, the same answer as for a patch the schema refuses: only the object tells them apart.
        """
        guard = next(
            (
                op["value"]
                for op in plan.patch
                if op["op"] == "test" and op["path"] == "/metadata/resourceVersion"
            ),
            None,
        )
        if guard is None:
            return False
        current = self._read(plan.namespace, plan.name)
        return current is None or (current.get("metadata") or {}).get("resourceVersion") != guard

    def members(self, namespace: str, cluster: str) -> list[dict[str, Any]]:
        # kopf already lists and watches these (main.py's rules); one list per shared member's pass.
        listed = self._custom.list_namespaced_custom_object(s.GROUP, s.VERSION, namespace, s.PLURAL)
        return [
            item
            for item in cast(dict[str, Any], listed).get("items") or []
            if ((item.get("spec") or {}).get("placement") or {}).get("cluster") == cluster
        ]

    def read_credentials(self, namespace: str, secret_name: str) -> Mapping[str, str]:
        for pause in (*CREDENTIAL_RETRY_PAUSES_S, None):
            try:
                secret = self._core.read_namespaced_secret(secret_name, namespace)
                break
            except ApiException as exc:
                if pause is None or exc.status not in _PASSING_STATUSES:
                    # The reason only: the body of an error about a Secret is nothing to repeat.
                    raise CredentialsUnavailable(
                        f"secret {namespace}/{secret_name}: HTTP {exc.status} {exc.reason}"
                    ) from None
                self._sleep(pause)
        return decode_secret_data(f"{namespace}/{secret_name}", secret.data or {})

    def url(self, namespace: str, name: str, route_prefix: str) -> str:
        # KubeRay's serve Service for a RayService is `<name>-serve-svc`.
        return f"http://{name}-serve-svc.{namespace}.svc:{SERVE_PORT}{route_prefix}"


# What the API server accepts as a Secret key; anything else is not repeated in a message.
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")


def decode_secret_data(where: str, data: Mapping[str, str | bytes]) -> dict[str, str]:
    """A Secret's values as text. A value that is not UTF-8 (a binary keystore, a file saved in another
    encoding) cannot be a credential the registry clients read: the resource is told which key it is,
    never what it holds, rather than every pass failing on it."""
    decoded: dict[str, str] = {}
    for key, value in data.items():
        try:
            decoded[key] = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
            shown = repr(key) if _SECRET_KEY.fullmatch(key) else "a key"
            raise CredentialsUnavailable(f"secret {where}: the value of {shown} is not UTF-8 text") from None
    return decoded
