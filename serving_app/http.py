"""HTTP plumbing shared by the routes: body limits, auth, error answers and the OpenAPI document."""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from mlflow.utils.proto_json_utils import NumpyEncoder
from mlflow.version import VERSION as MLFLOW_VERSION
from pydantic import ValidationError

from serving_app.errors import BodyTooLarge, InvalidInput, ServingError, Unauthorized, UnsupportedMediaType
from serving_app.schema import ApiSchema

logger = logging.getLogger("ray.serve")

VERSION_HEADER = "serve_multiplexed_model_id"


# Built once: `json.dumps` with arguments builds an encoder per call.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def json_response(payload: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    try:
        body = _COMPACT_JSON.encode(payload)
    except (TypeError, ValueError):
        body = json.dumps(payload, cls=NumpyEncoder, separators=(",", ":"))
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


# MLflow's scoring server (`mlflow/pyfunc/scoring_server`) answers `/ping` and `/health` with a
# newline, labelled JSON, 200 when its model is loaded and 404 when not; `/version` with its version as
# bare text, labelled JSON too. Clients and probes built for `mlflow models serve` read exactly that.
SCORING_PING_BODY = "\n"
SCORING_MEDIA_TYPE = "application/json"


def scoring_ping_status(default_answers: bool) -> int:
    """The scoring server's `/ping` status: `default_answers` is whether this replica holds a default
    version that predicts (loaded, its API derived), the state the replica's own health check reads."""
    return 200 if default_answers else 404


def scoring_ping(default_answers: bool) -> Response:
    return Response(
        SCORING_PING_BODY, status_code=scoring_ping_status(default_answers), media_type=SCORING_MEDIA_TYPE
    )


def scoring_version() -> Response:
    return Response(MLFLOW_VERSION, status_code=200, media_type=SCORING_MEDIA_TYPE)


def error_response(error: ServingError, *, retry_after_s: int) -> Response:
    headers = dict(error.headers)
    if error.status_code == 503:
        headers.setdefault("Retry-After", str(retry_after_s))
    return JSONResponse(error.body(), status_code=error.status_code, headers=headers)


def internal_error(error: BaseException) -> Response:
    """A 500 whose id ties the caller's answer to the replica's log line."""
    error_id = uuid.uuid4().hex[:16]
    logger.error("error %s: %s", error_id, error, exc_info=error)
    body = {"error": "internal_error", "message": "the server failed to answer", "error_id": error_id}
    return JSONResponse(body, status_code=500)


def with_error_id(error: ServingError) -> ServingError:
    if error.status_code >= 500 and "error_id" not in (error.detail or {}):
        error_id = uuid.uuid4().hex[:16]
        logger.error("error %s: %s", error_id, error.message, exc_info=error)
        error.detail = {"error_id": error_id}
    return error


def redact(error: ServingError) -> None:
    """Strip what could reveal the model's schema: field lists, and the model's own exception text
    (which may quote inputs or columns); the error id still ties the answer to the replica's log."""
    if error.status_code in (409, 422):
        error.detail = None
    elif error.status_code >= 500 and error.code != "registry_unavailable":
        error.message = "the model failed to answer; quote the error_id to the operator"


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "application/json")
    mime = content_type.split(";")[0].strip().lower()
    if mime != "application/json" and not mime.endswith("+json"):
        raise UnsupportedMediaType(f"expected application/json, got {content_type!r}")


def check_token(request: Request, expected: str | None) -> None:
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


def validation_failure(error: ValidationError, *, expose_fields: bool) -> InvalidInput:
    if not expose_fields:
        return InvalidInput("request body does not match the model's input schema")
    detail = [
        {"loc": list(item["loc"]), "msg": item["msg"], "type": item["type"]}
        for item in error.errors(include_url=False, include_input=False)
    ]
    return InvalidInput("request body does not match the model's input schema", detail=detail)


def requested_version(request: Request) -> str | None:
    # Ray's proxy accepts both spellings; ingress-nginx drops underscored headers by default.
    return request.headers.get(VERSION_HEADER) or request.headers.get("serve-multiplexed-model-id") or None


# -------------------------------------------------------------------------------------------- OpenAPI


def build_openapi(
    app: FastAPI, api: ApiSchema, *, title: str, version: str, root_path: str
) -> dict[str, Any]:
    """The OpenAPI document with the default version's signature as the request and answer schemas."""
    document = get_openapi(
        title=title,
        version=version,
        description=f"Serving version {version} by default. Pin another version with the "
        f"`serve-multiplexed-model-id` header.",
        routes=app.routes,
    )
    if root_path:
        document["servers"] = [{"url": root_path}]
    components = document.setdefault("components", {}).setdefault("schemas", {})
    request_schema = _hoist(api.request_json_schema(), components)
    answer_schema = _hoist(api.response_json_schema(), components)
    serve = document["paths"].get("/serve", {}).get("post")
    if serve is not None:
        serve["requestBody"] = {"required": True, "content": {"application/json": {"schema": request_schema}}}
        serve["responses"]["200"] = {
            "description": "One answer per input record.",
            "content": {"application/json": {"schema": answer_schema}},
        }
        serve["parameters"] = [_version_header_parameter(), *_params_parameters(api)]
    invocations = document["paths"].get("/invocations", {}).get("post")
    if invocations is not None:
        invocations["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _scoring_schema()}},
        }
        invocations["parameters"] = [_version_header_parameter()]
    for path in ("/ping", "/health"):
        if (ping := document["paths"].get(path, {}).get("get")) is not None:
            ping["responses"] = {
                "200": {"description": "The default version answers on this replica (body: a newline)."},
                "404": {"description": "No default version loaded yet (body: a newline)."},
            }
    if (mlflow_version := document["paths"].get("/version", {}).get("get")) is not None:
        # No schema: the body is the bare version text, labelled JSON as MLflow labels it.
        mlflow_version["responses"] = {"200": {"description": "The MLflow version serving, e.g. `3.1.0`."}}
    return document


def _hoist(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    components.update(schema.pop("$defs", {}))
    return schema


def _version_header_parameter() -> dict[str, Any]:
    return {
        "name": "serve-multiplexed-model-id",
        "in": "header",
        "required": False,
        "description": "Registry version to answer with; the default version when absent.",
        "schema": {"type": "string", "pattern": "^[1-9][0-9]*$"},
    }


def _params_parameters(api: ApiSchema) -> list[dict[str, Any]]:
    if api.params_type is None:
        return []
    properties = api.params_adapter.json_schema().get("properties", {}) if api.params_adapter else {}
    return [
        {
            "name": name,
            "in": "query",
            "required": False,
            "schema": {**schema, "default": api.params_defaults.get(name)},
        }
        for name, schema in properties.items()
    ]


def _scoring_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "MLflow's scoring protocol: exactly one of the input keys, optional params.",
        "properties": {
            "dataframe_split": {"type": "object"},
            "dataframe_records": {"type": "array", "items": {"type": "object"}},
            "instances": {},
            "inputs": {},
            "params": {"type": "object"},
        },
    }
