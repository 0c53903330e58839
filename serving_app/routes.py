"""The replica's routes: one table, matched by hand on every request and documented by FastAPI.

The deployment answers from a plain `__call__`: FastAPI's middleware, routing and dependency layers
cost about as much replica CPU per request as regserve's own work, and the routes are few and fixed.
FastAPI still writes the OpenAPI document (`openapi_app`), from the same table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

# Under `/v2` every path belongs to the Open Inference Protocol, which routes the rest itself.
OIP_PREFIX = "/v2"


@dataclass(frozen=True)
class Route:
    path: str
    methods: frozenset[str]
    handler: str  # the name of the deployment's method that answers it
    summary: str
    documented: bool = True


ROUTES = (
    Route(
        "/serve", frozenset({"POST"}), "serve_records", "Predict with records shaped by the model signature"
    ),
    Route("/invocations", frozenset({"POST"}), "invocations", "MLflow scoring protocol"),
    Route(
        OIP_PREFIX + "{path}",
        frozenset({"GET", "POST"}),
        "open_inference",
        "Open Inference Protocol (KServe v2)",
    ),
    Route(
        "/healthz",
        frozenset({"GET"}),
        "healthz",
        "Liveness, readiness, the default version and a failed switch",
    ),
    Route(
        "/rollout",
        frozenset({"GET"}),
        "rollout_report",
        "The rollout's figures summed over every replica (docs/rollouts.md)",
    ),
    Route(
        "/monitoring",
        frozenset({"GET"}),
        "monitoring_report",
        "Per-version figures and drift of the last completed window, summed over every replica",
    ),
    Route(
        "/metadata", frozenset({"GET"}), "metadata", "Model, default version, signature and loaded versions"
    ),
    # MLflow's scoring server's own routes, answered as it answers them (`mlflow models serve`).
    Route(
        "/ping",
        frozenset({"GET"}),
        "ping",
        "MLflow scoring server health: 200 once the default version answers",
    ),
    Route("/health", frozenset({"GET"}), "ping", "Same as /ping"),
    Route("/version", frozenset({"GET"}), "mlflow_version", "The MLflow version serving, as text"),
    Route("/openapi.json", frozenset({"GET"}), "openapi", "", documented=False),
    Route("/docs", frozenset({"GET"}), "docs", "", documented=False),
)

_EXACT: Mapping[str, Route] = {route.path: route for route in ROUTES if not route.path.startswith(OIP_PREFIX)}
_OIP = next(route for route in ROUTES if route.path.startswith(OIP_PREFIX))


@dataclass(frozen=True)
class Matched:
    route: Route
    rest: str  # what follows `/v2` on Open Inference Protocol paths; "" elsewhere


@dataclass(frozen=True)
class Refused:
    """FastAPI's answers for a path it has no route for (404) or a method the route lacks (405)."""

    status_code: int
    allow: str | None = None

    @property
    def body(self) -> dict[str, str]:
        return {"detail": "Not Found" if self.status_code == 404 else "Method Not Allowed"}


def route_path(scope: Mapping[str, Any]) -> str:
    """The path below the application's route prefix (`root_path`), whether or not the server
    left the prefix in `path` (Starlette's convention since 0.35 is that it does)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root) :]
    return path or "/"


def match(method: str, path: str) -> Matched | Refused:
    route = _EXACT.get(path)
    rest = ""
    if route is None and (path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")):
        route, rest = _OIP, path[len(OIP_PREFIX) :]
    if route is None:
        return Refused(404)
    if method not in route.methods:  # FastAPI's routes took no HEAD either
        return Refused(405, allow=", ".join(sorted(route.methods)))
    return Matched(route, rest)


def openapi_app() -> FastAPI:
    """A FastAPI app that is never served: its routes are the documented table, for `get_openapi`
    (the request and answer schemas are filled in per default version by `http.build_openapi`)."""
    api = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    for route in ROUTES:
        if not route.documented:
            continue
        endpoint: Callable[..., Awaitable[None]] = _plain
        path = route.path
        if "{path}" in path:
            path, endpoint = path.replace("{path}", "{path:path}"), _with_path
        # Named after the handler: operation ids stay what clients generated from the document know.
        # One FastAPI route per method: FastAPI derives a route's operation id from its first method
        # only, so a route with two methods would give both operations the same id.
        for method in sorted(route.methods):
            api.add_api_route(path, endpoint, methods=[method], summary=route.summary, name=route.handler)
    return api


# Endpoints for the document only (the deployment answers the routes). No docstrings: FastAPI would
# publish them as the operations' descriptions.
async def _plain() -> None:
    pass


async def _with_path(path: str) -> None:
    pass
