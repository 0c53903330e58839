"""The third ingress design, measured before building it: a thin ingress deployment that forwards each
request through a handle to a multiplexed model deployment.

Why it is a candidate: with HAProxy in front, requests reach replicas blindly (no version affinity);
behind a handle, Serve's router sends a request to a replica that already holds its version, at the
price of one extra hop (ingress replica → model replica). Kept as bare as `bench/bare_app.py` (no
validation, no metrics) so that `thin ÷ bare` in the same ingress mode is the cost of the hop alone.

Import path for a Serve config: `bench.thin_app:build` (args: model_name, default_version,
max_batch_size, batch_wait_timeout_s, max_models_per_replica, model_replicas).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from bench.bare_app import predict_payloads
from serving_app.config import max_ongoing_requests

VERSION_HEADER = "serve-multiplexed-model-id"


def build(args: dict[str, Any]) -> Application:
    model_name = str(args["model_name"])
    default_version = str(args["default_version"])
    max_batch_size = int(args.get("max_batch_size", 1))
    wait_s = float(args.get("batch_wait_timeout_s", 0.005))
    slots = int(args.get("max_models_per_replica", 2))
    model_replicas = int(args.get("model_replicas", 1))

    @serve.deployment(
        name="Model",
        num_replicas=model_replicas,
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=max_ongoing_requests(max_batch_size),
    )
    class Model:
        def __init__(self) -> None:
            self.in_flight = 0

        @serve.multiplexed(max_num_models_per_replica=slots)
        async def _model(self, version: str) -> Any:
            import mlflow

            return await asyncio.to_thread(mlflow.pyfunc.load_model, f"models:/{model_name}/{version}")

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s)
        async def _batched(self, payloads: list[dict[str, Any]]) -> list[list[Any]]:
            # Batches are measured with one version only: a mixed batch would predict with one model.
            model = await self._model(serve.get_multiplexed_model_id())
            return await asyncio.to_thread(predict_payloads, model, payloads)

        async def predict(self, body: bytes) -> list[Any]:
            payload = json.loads(body)
            self.in_flight += 1
            try:
                if max_batch_size > 1 and self.in_flight > 1:
                    return await self._batched(payload)  # type: ignore[no-any-return]
                model = await self._model(serve.get_multiplexed_model_id())
                return (await asyncio.to_thread(predict_payloads, model, [payload]))[0]
            finally:
                self.in_flight -= 1

    @serve.deployment(
        name="ThinIngress",
        ray_actor_options={"num_cpus": 0.5},
        # It only waits on the model replicas: let in what all of them together can take.
        max_ongoing_requests=max_ongoing_requests(max_batch_size) * model_replicas,
    )
    class ThinIngress:
        def __init__(self, model: DeploymentHandle) -> None:
            self.model = model

        async def __call__(self, request: Request) -> Response:
            version = request.headers.get(VERSION_HEADER) or default_version
            body = await request.body()
            handle = self.model.options(multiplexed_model_id=version)
            predictions = await handle.predict.remote(body)
            return JSONResponse({"predictions": predictions}, headers={"X-Model-Version": version})

    return ThinIngress.bind(Model.bind())  # type: ignore[attr-defined]
