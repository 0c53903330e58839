"""The replica's route table: matching as FastAPI routed before (404, 405 with Allow, the `/v2` prefix),
paths below the route prefix, a handler on the deployment for every route, the OpenAPI document's
operations, and the scoring server's `/ping` and `/version` answers next to MLflow's own. No Ray."""

from __future__ import annotations

from typing import Any

import mlflow
import pytest
from fastapi.openapi.utils import get_openapi
from fastapi.testclient import TestClient
from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
from mlflow.models import Model, ModelSignature
from mlflow.pyfunc import PyFuncModel, scoring_server
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from serving_app import http, routes
from serving_app.app import ModelServer
from serving_app.schema import build_api_schema


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("POST", "/invocations", ("invocations", "")),
        ("POST", "/serve", ("serve_records", "")),
        ("GET", "/healthz", ("healthz", "")),
        ("GET", "/rollout", ("rollout_report", "")),
        ("GET", "/monitoring", ("monitoring_report", "")),
        ("GET", "/metadata", ("metadata", "")),
        ("GET", "/openapi.json", ("openapi", "")),
        ("GET", "/docs", ("docs", "")),
        ("GET", "/ping", ("ping", "")),
        ("GET", "/health", ("ping", "")),
        ("GET", "/version", ("mlflow_version", "")),
        ("POST", "/ping", (405, "GET")),
        ("GET", "/ping/", (404, None)),
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
        "/monitoring",
        "/metadata",
        "/ping",
        "/health",
        "/version",
    }
    assert all("description" not in op for methods in document["paths"].values() for op in methods.values())


def served_document() -> dict[str, Any]:
    """The document `/openapi.json` serves, for a default version with a signature and params."""
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "translation_text")]),
        params=ParamSchema([ParamSpec("temperature", "double", 0.5)]),
    )
    return http.build_openapi(
        routes.openapi_app(), build_api_schema(signature), title="m", version="3", root_path="/app"
    )


def test_every_operation_id_is_unique() -> None:
    # Generated clients name a method per operation id: a duplicate breaks them.
    document = served_document()
    ids = [
        operation["operationId"] for methods in document["paths"].values() for operation in methods.values()
    ]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert {document["paths"]["/v2{path}"][method]["operationId"] for method in ("get", "post")} == {
        "open_inference_v2_path__get",
        "open_inference_v2_path__post",
    }


def test_scoring_server_routes_are_documented_with_their_answers() -> None:
    paths = served_document()["paths"]
    for path in ("/ping", "/health"):
        assert set(paths[path]) == {"get"}
        assert set(paths[path]["get"]["responses"]) == {"200", "404"}
    assert set(paths["/version"]["get"]["responses"]) == {"200"}


@pytest.mark.parametrize(("default_answers", "status"), [(True, 200), (False, 404)])
def test_ping_status(default_answers: bool, status: int) -> None:
    assert http.scoring_ping_status(default_answers) == status
    answer = http.scoring_ping(default_answers)
    assert (answer.status_code, answer.body, answer.headers["content-type"]) == (
        status,
        b"\n",
        "application/json",
    )


class Echo:
    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        return data


def test_ping_and_version_answer_as_mlflows_scoring_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same status, body and headers as MLflow's own scoring server app, with a model loaded."""
    # `init` marks the process as a serving environment; restored when the test ends.
    monkeypatch.setenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, "false")
    mlflow_app = scoring_server.init(PyFuncModel(model_meta=Model(), model_impl=Echo()))
    with TestClient(mlflow_app) as mlflow_client:
        expected = {path: mlflow_client.get(path) for path in ("/ping", "/health", "/version")}
    ours = {
        "/ping": http.scoring_ping(True),
        "/health": http.scoring_ping(True),
        "/version": http.scoring_version(),
    }
    for path, theirs in expected.items():
        assert ours[path].status_code == theirs.status_code == 200, path
        assert ours[path].body == theirs.content, path
        assert dict(ours[path].headers) == dict(theirs.headers), path
    assert expected["/version"].text == mlflow.__version__
