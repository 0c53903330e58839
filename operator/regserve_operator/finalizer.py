"""The finalizer that takes a resource's deployment-state tags out of MLflow when it is deleted.

The RayService goes with its owner through its owner reference; the tags the operator wrote on model
versions (`tags.py`, remembered in `status.registryTags`) live in the registry, which Kubernetes knows
nothing of. So a resource that has tags written carries the finalizer `regserve.io/registry-tags`; when
it is deleted, the operator removes those tags and then the finalizer.

- Our own finalizer, added and removed with JSON patches guarded by a `test`, from the watch handler
  (`main.py`): no kopf change-detecting handler, so kopf still writes nothing of its own.
- Bounded: the tag removal has `BUDGET_S` in all (the Secret read included). The finalizer is removed
  whatever happened, so a registry that is down, slow or refusing never blocks a deletion; the tags it
  kept are named in a log line and a Warning Event (`RegistryTagsNotRemoved`).
- Added once tags are written, so a resource that never tagged anything (read-only credentials, a spec
  never valid) is deleted without the operator. A resource deleted in the moment between its first
  tag write and the finalizer's patch keeps its tags, as do resources deleted while the operator was
  uninstalled (remove the finalizer by hand then: `kubectl patch rms NAME --type=json -p
  '[{"op":"remove","path":"/metadata/finalizers/0"}]'`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from regserve_operator import spec as s
from regserve_operator.policy import OFF, Policy, violations
from regserve_operator.ports import Credentials, CredentialsUnavailable, RegistryError, RegistryPort, Target
from regserve_operator.rbac import rule
from regserve_operator.tags import tag_key

log = logging.getLogger(__name__)

FINALIZER = "regserve.io/registry-tags"
# Everything a deletion waits for the registry: the Secret read and every tag removal.
BUDGET_S = 10.0
PATCH_RETRY_PAUSES_S = (0.5, 1.0, 2.0)

rule(__name__, [s.GROUP], [s.PLURAL], ["patch"], "add and remove the finalizer that removes MLflow tags")

Step = Literal["add", "finalize", "none"]
JsonPatch = list[dict[str, Any]]


def deleting(body: Mapping[str, Any]) -> bool:
    return bool((body.get("metadata") or {}).get("deletionTimestamp"))


def finalizer_step(body: Mapping[str, Any]) -> Step:
    """What the finalizer needs for this copy of a resource."""
    meta = body.get("metadata") or {}
    ours = FINALIZER in (meta.get("finalizers") or [])
    if deleting(body):
        return "finalize" if ours else "none"  # no finalizer may be added once deletion started
    wrote_tags = bool((body.get("status") or {}).get("registryTags"))
    return "add" if wrote_tags and not ours else "none"


def add_patch(meta: Mapping[str, Any]) -> JsonPatch:
    """Append ours; guarded by the resourceVersion, so a list changed meanwhile is not overwritten."""
    guard = {"op": "test", "path": "/metadata/resourceVersion", "value": meta.get("resourceVersion")}
    if meta.get("finalizers"):
        return [guard, {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}]
    return [guard, {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}]


def remove_patch(meta: Mapping[str, Any]) -> JsonPatch:
    """Remove ours at the index it is at, tested there, so another controller's finalizer is never hit."""
    index = list(meta.get("finalizers") or []).index(FINALIZER)
    path = f"/metadata/finalizers/{index}"
    return [{"op": "test", "path": path, "value": FINALIZER}, {"op": "remove", "path": path}]


@dataclass(frozen=True)
class Removal:
    """What became of the tags a deleted resource had written."""

    removed: tuple[str, ...]  # versions
    kept: tuple[str, ...]
    problem: str | None = None


def remove_tags(
    body: Mapping[str, Any],
    registry: RegistryPort,
    target: Target,
    *,
    budget_s: float = BUDGET_S,
    policy: Policy = OFF,
) -> Removal:
    """Remove the tags `status.registryTags` says were written, within `budget_s` in all.

    The work runs on a thread of its own that is left behind at the deadline: a registry call in
    flight then ends on its own timeout, and nothing after it is started."""
    meta = body.get("metadata") or {}
    versions = tuple(sorted(((body.get("status") or {}).get("registryTags") or {}).keys()))
    if not versions:
        return Removal((), ())
    deadline = time.monotonic() + budget_s
    removed: list[str] = []
    problems: list[str] = []

    def work() -> None:
        try:
            spec = s.parse_spec(dict(body.get("spec") or {}))
        except ValidationError:
            problems.append("the spec is not valid: the registry it names is unknown")
            return
        if violations(spec, None, policy):
            # A tracking URI the policy refuses is never sent the Secret, not even on the way out.
            problems.append("the resource is outside the cluster's policy: its registry is not contacted")
            return
        credentials = Credentials()
        ref = spec.registry.credentials_secret_ref
        try:
            if ref is not None:
                credentials = Credentials.from_mapping(target.read_credentials(meta["namespace"], ref.name))
        except CredentialsUnavailable as exc:
            problems.append(str(exc))
            return
        key = tag_key(meta["namespace"], meta["name"])
        for version in versions:
            if time.monotonic() >= deadline:
                return
            try:
                registry.set_version_tag(
                    spec.registry.tracking_uri, credentials, spec.model.name, version, key, None
                )
            except RegistryError as exc:
                problems.append(str(exc))
                return  # the same registry answers the next one the same way: keep the budget
            removed.append(version)

    worker = threading.Thread(target=work, name=f"finalize-{meta.get('name')}", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    done = tuple(removed)  # a copy: the thread may still append after the deadline
    kept = tuple(v for v in versions if v not in done)
    if kept and not problems:
        problems.append(f"the registry did not answer within {budget_s:.0f} s")
    return Removal(done, kept, problems[0] if problems else None)


class KubeFinalizers:
    """The finalizer's two writes, on the resource itself (RBAC: `patch` on the resource)."""

    def __init__(self, api_client: Any, *, sleep: Callable[[float], None] = time.sleep) -> None:
        from kubernetes import client

        self._custom = client.CustomObjectsApi(api_client)
        self._sleep = sleep

    def patch(self, meta: Mapping[str, Any], patch: JsonPatch) -> bool:
        """Apply a guarded patch; False when the object changed or went meanwhile (the watch brings
        the fresh copy, and the step is decided again on it).

        An API server that is restarting or overloaded is asked again after short pauses: a deleted
        resource may see no further event to try again on."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        namespace, name = meta["namespace"], meta["name"]
        for pause in (*PATCH_RETRY_PAUSES_S, None):
            try:
                self._custom.patch_namespaced_custom_object(
                    s.GROUP,
                    s.VERSION,
                    namespace,
                    s.PLURAL,
                    name,
                    patch,
                    _content_type="application/json-patch+json",
                )
                return True
            except ApiException as exc:
                if exc.status in (404, 409, 422):
                    log.info("%s/%s: finalizer patch not applied (HTTP %s)", namespace, name, exc.status)
                    return False
                if pause is None or exc.status not in (429, 500, 502, 503, 504):
                    raise
            except HTTPError:
                if pause is None:
                    raise
            self._sleep(pause)
        return False  # not reached: the last attempt returns or raises
