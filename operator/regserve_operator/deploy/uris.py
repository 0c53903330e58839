"""Target URIs (`regserve`, `regserve:/<namespace>`, `regserve-local`) and `models:/` URIs, read strictly."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Literal

KUBE_TARGET = "regserve"
LOCAL_TARGET = "regserve-local"
STAGES = ("Staging", "Production", "Archived")

# What the API server accepts as a namespace (a DNS label).
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_VERSION = re.compile(r"[1-9][0-9]{0,17}")
_ALIAS = re.compile(r"[A-Za-z0-9_-]{1,255}")


class UriError(ValueError):
    """A URI regserve cannot use; the message says what would work."""


@dataclass(frozen=True)
class Target:
    kind: Literal["kube", "local"]
    namespace: str | None  # None: the kube context's namespace (kube) or "default" (local)


@dataclass(frozen=True)
class ModelSelector:
    """What `spec.model` holds: the name and exactly one of alias, stage or version."""

    name: str
    alias: str | None = None
    stage: str | None = None
    version: str | None = None

    def to_spec(self) -> dict[str, str]:
        fields = {"name": self.name, "alias": self.alias, "stage": self.stage, "version": self.version}
        return {key: value for key, value in fields.items() if value is not None}


def parse_target(uri: str) -> Target:
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme or parsed.path
    if scheme not in (KUBE_TARGET, LOCAL_TARGET) or parsed.netloc or parsed.query or parsed.fragment:
        raise UriError(
            f"not a regserve target: {uri!r}; use {KUBE_TARGET}, {KUBE_TARGET}:/<namespace> or {LOCAL_TARGET}"
        )
    kind: Literal["kube", "local"] = "kube" if scheme == KUBE_TARGET else "local"
    if not parsed.scheme:
        return Target(kind, None)
    namespace = parsed.path.strip("/")
    if not namespace:
        return Target(kind, None)
    if not _NAMESPACE.fullmatch(namespace):
        raise UriError(f"{namespace[:64]!r} is not a Kubernetes namespace name (a DNS label)")
    return Target(kind, namespace)


def parse_model_uri(uri: str) -> ModelSelector:
    """`models:/<name>@<alias>`, `models:/<name>/<stage>` or `models:/<name>/<version>`."""
    if uri.startswith("models://"):
        raise UriError(
            "a models:// URI names a registry by profile; regserve reads the registry at the resource's "
            "trackingUri (-C trackingUri=...): use models:/<name>@<alias>"
        )
    if not uri.startswith("models:/"):
        raise UriError(
            f"regserve serves registered models: {uri[:200]!r} is not a models:/ URI. Register the model "
            "(mlflow.register_model) and use models:/<name>@<alias>, models:/<name>/<stage> or "
            "models:/<name>/<version>"
        )
    rest = uri[len("models:/") :]
    if "?" in rest or "#" in rest:
        raise UriError("a models:/ URI for regserve takes no query or fragment")
    if "@" in rest:
        name, _, alias = rest.rpartition("@")
        if not name or "/" in name or not _ALIAS.fullmatch(alias):
            raise UriError(f"expected models:/<name>@<alias>, got {uri[:200]!r}")
        return ModelSelector(name, alias=alias)
    name, slash, suffix = rest.rpartition("/")
    if not slash or not name or "/" in name:
        raise UriError(
            f"expected models:/<name>@<alias>, models:/<name>/<stage> or models:/<name>/<version>, "
            f"got {uri[:200]!r}"
        )
    if _VERSION.fullmatch(suffix):
        return ModelSelector(name, version=suffix)
    stage = next((s for s in STAGES if s.lower() == suffix.lower()), None)
    if stage is not None:
        return ModelSelector(name, stage=stage)
    if suffix.lower() == "latest":
        raise UriError(
            "regserve follows a registry pointer that a promotion moves: use an alias "
            "(models:/<name>@champion), a stage or a version instead of 'latest'"
        )
    raise UriError(f"{suffix[:64]!r} is neither a version nor a stage ({', '.join(STAGES)})")
