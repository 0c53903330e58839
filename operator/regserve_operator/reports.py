"""What the operator reports about its own resources to the API server: status, as a merge patch of the
status subresource, and Events (core/v1, the kind `kubectl describe` and `kubectl get events` show)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from regserve_operator import spec as s
from regserve_operator.decide import Event
from regserve_operator.passes import WriteGone
from regserve_operator.rbac import rule
from regserve_operator.schedule import Key

log = logging.getLogger(__name__)

COMPONENT = "regserve-operator"
# Cut where kopf's poster cuts: a long message (a schema diff, say) is shortened, not refused.
MESSAGE_LIMIT = 1024

rule(__name__, [s.GROUP], [f"{s.PLURAL}/status"], ["patch"], "status, as a merge patch of the subresource")
rule(__name__, [""], ["events"], ["create"], "Events on transitions")


class KubeReports:
    def __init__(self, api_client: client.ApiClient, *, instance: str | None = None) -> None:
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        self._instance = instance or socket.gethostname()

    def write_status(self, key: Key, status_patch: dict[str, Any]) -> None:
        namespace, name = key
        try:
            self._custom.patch_namespaced_custom_object_status(
                s.GROUP, s.VERSION, namespace, s.PLURAL, name, {"status": status_patch}
            )
        except ApiException as exc:
            if exc.status == 404:
                raise WriteGone(f"{namespace}/{name}") from exc
            raise

    def post_event(self, body: Mapping[str, Any], event: Event) -> None:
        """Best effort, as Events are: a refused one is logged, never retried at the pass's expense."""
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace") or "default", meta.get("name") or ""
        now = datetime.now(UTC)
        record = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{name}.", namespace=namespace),
            involved_object=client.V1ObjectReference(
                api_version=body.get("apiVersion"),
                kind=body.get("kind"),
                name=name,
                namespace=namespace,
                uid=meta.get("uid"),
            ),
            type=event.type,
            reason=event.reason,
            message=event.message[:MESSAGE_LIMIT],
            source=client.V1EventSource(component=COMPONENT),
            reporting_component=COMPONENT,
            reporting_instance=self._instance,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self._core.create_namespaced_event(namespace, record)
        except ApiException as exc:
            log.warning("%s/%s: Event %s not posted: %s", namespace, name, event.reason, exc.reason)
