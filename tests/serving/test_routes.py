"""The replica's route table: matching as FastAPI routed before (404, 405 with Allow, the `/v2` prefix),
paths below the route prefix, and a handler on the deployment for every route. No server."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.openapi.utils import get_openapi

from serving_app import routes
from serving_app.app import ModelServer


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/invocations", ("invocations", "")),
        ("POST", "/serve", ("serve_records", "")),
        ("GET", "/healthz", ("healthz", "")),
        ("GET", "/rollout", ("rollout_report", "")),
        ("GET", "/metadata", ("metadata", "")),
        ("GET", "/openapi.json", ("openapi", "")),
        ("GET", "/docs", ("docs", "")),
        ("POST", "/v2/models/m/infer", ("open_inference", "/models/m/infer")),
        ("GET", "/v2/health/ready", ("open_inference", "/health/ready")),
        ("GET", "/v2", ("open_inference", "")),
        ("GET", "/invocations", (405, "POST")),
        ("POST", "/healthz", (405, "GET")),
        ("HEAD", "/healthz", (405, "GET")),
        ("PUT", "/v2/models/m/infer", (405, "GET, POST")),
        ("POST", "/nowhere", (404, None)),
        ("POST", "/invocations/", (404, None)),
        ("GET", "/v2x", (404, None)),
        ("GET", "/", (404, None)),
    ],
)
def test_match(method: str, path: str, expected: tuple[Any, Any]) -> None:
    found = routes.match(method, path)
    if isinstance(found, routes.Refused):
        assert (found.status_code, found.allow) == expected
        assert found.body == {"detail": "Not Found" if found.status_code == 404 else "Method Not Allowed"}
    else:
        assert (found.route.handler, found.rest) == expected


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ({"path": "/app/invocations", "root_path": "/app"}, "/invocations"),
        ({"path": "/invocations", "root_path": "/app"}, "/invocations"),  # a server that strips it
        ({"path": "/app", "root_path": "/app"}, "/"),
        ({"path": "/application/x", "root_path": "/app"}, "/application/x"),  # not below the prefix
        ({"path": "/invocations"}, "/invocations"),
        ({"path": "/invocations", "root_path": ""}, "/invocations"),
    ],
)
def test_route_path(scope: dict[str, str], expected: str) -> None:
    assert routes.route_path(scope) == expected


def test_every_route_has_a_handler_on_the_deployment() -> None:
    server_class = ModelServer.func_or_class  # type: ignore[attr-defined]
    for route in routes.ROUTES:
        assert callable(getattr(server_class, route.handler, None)), route.handler


def test_document_lists_the_documented_routes_under_their_handlers_names() -> None:
    document = get_openapi(title="t", version="1", routes=routes.openapi_app().routes)
    operations = {
        (path, method.upper()): operation["operationId"]
        for path, methods in document["paths"].items()
        for method, operation in methods.items()
    }
    assert operations[("/invocations", "POST")] == "invocations_invocations_post"
    assert operations[("/serve", "POST")] == "serve_records_serve_post"
    assert operations[("/v2{path}", "POST")].startswith("open_inference_")
    assert {path for path, _ in operations} == {
        "/serve",
        "/invocations",
        "/v2{path}",
        "/healthz",
        "/rollout",
        "/metadata",
    }
    assert all("description" not in op for methods in document["paths"].values() for op in methods.values())
