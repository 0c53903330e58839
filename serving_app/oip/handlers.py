"""The Open Inference Protocol on a replica: versions resolved as on every other route, requests parsed
by MLflow's scoring code against the default version's signature (as `/invocations` is), predictions
through the deployment's batching, answers and errors in the protocol's form."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata as package_metadata
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from mlflow.exceptions import MlflowException

from serving_app import http
from serving_app.config import AppArgs
from serving_app.errors import InvalidInput, ServingError
from serving_app.invocations import parse_scoring_json
from serving_app.oip.answers import (
    check_requested_outputs,
    error_body,
    infer_response,
    model_metadata,
    output_tensors,
    server_metadata,
)
from serving_app.oip.infer_request import HEADER_LENGTH, decode_request, decompressed, scoring_input
from serving_app.oip.routing import Route, check_model_name, match_route, pinned_version
from serving_app.registry import LoadedVersion
from serving_app.service import ModelService, PredictJob

# A route handler as the deployment's `_answer` runs it: the answer (JSON payload or a ready
# Response) and the version that gave it.
Handler = Callable[[Request], Awaitable[tuple[Any, str]]]
Answer = Callable[[Request, str, Handler], Awaitable[Response]]


class OipHandlers:
    """The `/v2` routes of one replica, over the deployment's model service and predict path."""

    def __init__(
        self,
        args: AppArgs,
        service: ModelService,
        predict: Callable[[PredictJob], Awaitable[list[Any]]],
        loaded_versions: Callable[[], Sequence[str]],
    ):
        self.args = args
        self.service = service
        self.predict = predict
        self.loaded_versions = loaded_versions
        self.server = server_metadata(_package_version())

    async def answer(self, request: Request, path: str, answer: Answer) -> Response:
        """What `<prefix>/v2{path}` answers. Health and server metadata are open, as `/healthz` is;
        the rest goes through `answer` (auth, metrics, error ids) like every other route."""
        try:
            route = match_route(request.method, path)
        except ServingError as error:
            return protocol_error(http.error_response(error, retry_after_s=self.args.registry_retry_after_s))
        if route.action == "live":
            return http.json_response({"live": True})
        if route.action == "ready":
            return http.json_response({"ready": self.service.ready}, 200 if self.service.ready else 503)
        if route.action == "server":
            return http.json_response(self.server)
        handler = {"metadata": self._metadata, "model_ready": self._model_ready, "infer": self._infer}
        response = await answer(
            request, f"v2_{route.action}", lambda request: handler[route.action](request, route)
        )
        return protocol_error(response) if response.status_code >= 400 else response

    async def _metadata(self, request: Request, route: Route) -> tuple[Any, str]:
        loaded = await self._resolve(request, route)
        default = self.service.default.loaded
        # Requests are checked against the default's inputs whichever version answers them.
        loaded_here = {*self.loaded_versions(), loaded.version}
        versions = [loaded.version] if route.version else sorted(loaded_here, key=int)
        metadata = model_metadata(
            self.args.model_name,
            default.signature.inputs if default.signature else None,
            loaded.signature.outputs if loaded.signature else None,
            versions,
        )
        return metadata, loaded.version

    async def _model_ready(self, request: Request, route: Route) -> tuple[Any, str]:
        loaded = await self._resolve(request, route)
        return {"name": self.args.model_name, "ready": True}, loaded.version

    async def _infer(self, request: Request, route: Route) -> tuple[Any, str]:
        check_model_name(str(route.model), self.args.model_name)
        limit = self.args.max_body_bytes
        body = decompressed(
            await http.read_body(request, limit), request.headers.get("content-encoding"), limit
        )
        default = self.service.default.loaded
        loaded = await self._resolve(request, route)
        infer_request = decode_request(body, request.headers.get(HEADER_LENGTH))
        outputs_schema = loaded.signature.outputs if loaded.signature else None
        check_requested_outputs(infer_request, outputs_schema)
        scoring = scoring_input(infer_request, default.signature.inputs if default.signature else None)
        data, params = self._parse(scoring.payload, default)
        items = await self.predict(PredictJob(loaded, data, scoring.rows, params, default.signature))
        content, header_length = infer_response(
            output_tensors(items, outputs_schema),
            infer_request,
            model_name=self.args.model_name,
            version=loaded.version,
        )
        return _infer_answer(content, header_length, loaded.version), loaded.version

    async def _resolve(self, request: Request, route: Route) -> LoadedVersion:
        """The version a model route names (path or header), with the same rules as the header alone:
        400 not a version number, 403 refused by the pinning policy, 404 unknown, 409 incompatible with
        the default, 429 too many cold loads."""
        check_model_name(str(route.model), self.args.model_name)
        return await self.service.resolve(pinned_version(route.version, http.requested_version(request)))

    def _parse(self, payload: dict[str, Any], default: LoadedVersion) -> tuple[Any, Any]:
        try:
            return parse_scoring_json(payload, default)
        except MlflowException as error:
            message = (
                error.message if self.args.expose_schema_in_errors else "request body is not valid input"
            )
            raise InvalidInput(message) from None


def _infer_answer(content: bytes, header_length: int | None, version: str) -> Response:
    headers = {"X-Model-Version": version}
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)


def protocol_error(response: Response) -> Response:
    """An error answer of the app (`{"error": code, "message": ...}`) in the protocol's form, whose
    clients show `error` as the message; headers such as Retry-After stay."""
    try:
        body = json.loads(bytes(response.body))
    except ValueError:
        return response
    headers = {
        key: value
        for key, value in response.headers.items()
        if key.lower() not in ("content-length", "content-type")
    }
    return JSONResponse(error_body(body), status_code=response.status_code, headers=headers)


def _package_version() -> str:
    try:
        return package_metadata.version("regserve")
    except package_metadata.PackageNotFoundError:
        return "unknown"
