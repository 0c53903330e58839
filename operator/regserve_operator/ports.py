"""The operator's ports: what reconcile asks of the registry and of the place the RayService lives.

Adapters: `registry.Registry` (MLflow over REST), `targets.kube.KubeTarget` (the API server) and
`targets.local.LocalRayTarget` (a local Ray dashboard). Reconcile depends on these protocols only.
Registry credentials and facts are the vocabulary both sides share, so they live here too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from regserve_operator.plan import Plan
from regserve_operator.spec import ModelSelector
from serving_app import child_env
from serving_app.compat import Signature
from serving_app.mlmodel import RegistryAuth

# Keys the credentials' fingerprints with a secret of this process: a fingerprint that ever showed up
# somewhere could not be checked against guessed passwords.
_FINGERPRINT_KEY = os.urandom(32)

# ------------------------------------------------------------------------------------------ registry


class RegistryError(Exception):
    """The registry could not answer."""


class RegistryUnreachable(RegistryError):
    """Network failure, 5xx, or auth refused: nothing is known about the selector."""


class NotFound(RegistryError):
    """The registry answered: no such model, alias, stage or version."""


class RegistryRefused(RegistryError):
    """The registry refused a write (401/403: read-only credentials)."""


@dataclass(frozen=True)
class Credentials:
    """Environment-style keys from a Secret. Values are kept out of repr and logs."""

    items: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_mapping(cls, data: Mapping[str, str] | None) -> Credentials:
        return cls(tuple(sorted((data or {}).items())))

    def __repr__(self) -> str:
        return f"Credentials(keys={[k for k, _ in self.items]})"

    __str__ = __repr__

    @property
    def env(self) -> dict[str, str]:
        return dict(self.items)

    @property
    def fingerprint(self) -> str:
        """Tells credentials apart in cache keys (one tenant's answers never serve another's)."""
        return hmac.new(_FINGERPRINT_KEY, repr(self.items).encode(), hashlib.sha256).hexdigest()[:32]

    @property
    def ignored_keys(self) -> tuple[str, ...]:
        """Keys no registry read of the operator's uses (not on `serving_app.child_env`'s allowlist)."""
        return child_env.split(self.env).ignored

    @property
    def registry_auth(self) -> RegistryAuth:
        """How requests to the tracking server authenticate with these keys (serving_app's rules,
        the same ones a serving replica follows)."""
        return RegistryAuth.of(self.env)


@dataclass(frozen=True)
class ModelFacts:
    """What the operator needs to know about one registry version (from its MLmodel file)."""

    name: str
    version: str
    signature: Signature | None  # as MLmodel stores it (`ModelSignature.to_dict()`), for serving_app.compat
    flavors: tuple[str, ...]
    model_size_bytes: int | None
    requirements: tuple[str, ...] = ()


class RegistryPort(Protocol):
    """What reconcile asks MLflow: which version a selector points at, and what a version is."""

    def resolve(
        self, tracking_uri: str, credentials: Credentials, selector: ModelSelector, poll_interval_s: float
    ) -> str:
        """The version `selector` points at now. Raise RegistryUnreachable or NotFound."""
        ...

    def facts(self, tracking_uri: str, credentials: Credentials, name: str, version: str) -> ModelFacts:
        """Signature, flavors, size and requirements of one version (immutable, so cacheable).
        Raise RegistryError when the registry cannot answer; anything else means an unreadable MLmodel."""
        ...

    def model_changed(self, model_name: str) -> None:
        """A webhook said `model_name` changed: the next resolve must not answer from a stale snapshot."""
        ...

    def promoted(
        self, tracking_uri: str, credentials: Credentials, name: str, poll_interval_s: float
    ) -> frozenset[str]:
        """Versions of `name` an alias or a Staging/Production stage points to (from the same snapshot
        `resolve` reads). Raise RegistryError."""
        ...

    def set_version_tag(
        self,
        tracking_uri: str,
        credentials: Credentials,
        name: str,
        version: str,
        key: str,
        value: str | None,
    ) -> None:
        """Set (or, with None, delete) a model version's tag. A version that is gone counts as done.
        Raise RegistryRefused (401/403) or RegistryUnreachable."""
        ...

    def log_window_metrics(
        self,
        tracking_uri: str,
        credentials: Credentials,
        run: VersionRunRef,
        metrics: Mapping[str, float],
        timestamp_ms: int,
        step: int,
    ) -> None:
        """Log one window's figures on a served version's run (found by its tag, or created).
        Raise RegistryError when the tracking server refuses or cannot be reached."""
        ...


@dataclass(frozen=True)
class VersionRunRef:
    """Which run: the resource's experiment, and the served version's run in it."""

    experiment: str
    model: str
    resource: str
    version: str


# ------------------------------------------------------------------------------------------- target


class TargetConflict(Exception):
    """The object changed between get and apply (e.g. resourceVersion test failed): retry soon."""


class CredentialsUnavailable(Exception):
    """The Secret the resource names cannot be read (missing, or forbidden)."""


class Target(Protocol):
    """Where the RayService lives. Kept small so a local Ray cluster can stand in for Kubernetes.

    Objects are RayService-shaped dicts as the Kubernetes API returns them: `metadata`
    (ownerReferences, annotations, labels, resourceVersion), `spec.serveConfigV2` (YAML string),
    `spec.rayClusterConfig`, and `status` as KubeRay writes it (`conditions`,
    `activeServiceStatus.applicationStatuses.<app>.status`, `pendingServiceStatus`).
    """

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The RayService, or None if it does not exist."""
        ...

    def apply(self, plan: Plan) -> None:
        """Carry out a `create`/`patch_*` plan (`plan.desired` is the full desired object;
        `plan.patch` a JSON Patch against the object `get` returned). Raise TargetConflict when the
        object changed in between."""
        ...

    def members(self, namespace: str, cluster: str) -> list[dict[str, Any]]:
        """The RegisteredModelServings of `namespace` whose `spec.placement.cluster` is `cluster`, as
        the API returns them (metadata, spec, status)."""
        ...

    def read_credentials(self, namespace: str, secret_name: str) -> Mapping[str, str]:
        """The named Secret's data, decoded (kube: one `get` on that Secret, nothing else).
        Raise CredentialsUnavailable when it cannot be read."""
        ...

    def url(self, namespace: str, name: str, route_prefix: str) -> str:
        """Where clients reach the application."""
        ...
