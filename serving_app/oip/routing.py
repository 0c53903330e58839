"""Which Open Inference Protocol route a path under `<prefix>/v2` names, and which version it selects."""

from __future__ import annotations

from dataclasses import dataclass

from serving_app.errors import InvalidVersion, ServingError


class UnknownModel(ServingError):
    status_code = 404
    code = "unknown_model"


@dataclass(frozen=True)
class Route:
    """What a path under `<prefix>/v2` asks for."""

    action: str  # "live" | "ready" | "server" | "metadata" | "model_ready" | "infer"
    model: str | None = None
    version: str | None = None


class UnknownRoute(ServingError):
    status_code = 404
    code = "unknown_route"


class MethodNotAllowed(ServingError):
    status_code = 405
    code = "method_not_allowed"


_HEALTH = {("health", "live"): "live", ("health", "ready"): "ready", (): "server"}
_MODEL_ACTIONS = {(): "metadata", ("ready",): "model_ready", ("infer",): "infer"}


def match_route(method: str, path: str) -> Route:
    """The route for `method` on `path` (what follows `/v2`), or UnknownRoute / MethodNotAllowed."""
    segments = tuple(segment for segment in path.split("/") if segment)
    route = _health_route(segments) or _model_route(segments)
    if route is None:
        raise UnknownRoute(f"no Open Inference Protocol route /v2{path}")
    expected = "POST" if route.action == "infer" else "GET"
    if method != expected:
        raise MethodNotAllowed(f"/v2{path} takes {expected}, not {method}", headers={"Allow": expected})
    return route


def _health_route(segments: tuple[str, ...]) -> Route | None:
    action = _HEALTH.get(segments)
    return Route(action) if action else None


def _model_route(segments: tuple[str, ...]) -> Route | None:
    if len(segments) < 2 or segments[0] != "models":
        return None
    model, rest, version = segments[1], segments[2:], None
    if rest[:1] == ("versions",):
        if len(rest) < 2:
            return None
        version, rest = rest[1], rest[2:]
    action = _MODEL_ACTIONS.get(rest)
    return Route(action, model, version) if action else None


def check_model_name(requested: str, served: str) -> None:
    if requested != served:
        raise UnknownModel(f"no model {requested!r} here; this endpoint serves {served!r}")


def pinned_version(path_version: str | None, header_version: str | None) -> str | None:
    """The version a request selects: its path's, else its header's; both must agree when both are set."""
    if path_version and header_version and path_version != header_version:
        raise InvalidVersion(
            f"the path selects version {path_version!r} but the version header says {header_version!r}"
        )
    return path_version or header_version
