"""A bare Ray Serve deployment of an MLflow pyfunc model: what a user writes by hand in a few lines.

The baseline for "what do regserve's features cost": no signature validation, no multiplexing,
no metrics; JSON `{"inputs": [[...], ...]}` or `{"records": [...]}` in, predictions out.
Import path for a Serve config: `bench.bare_app:build`
(args: model_uri, max_batch_size, batch_wait_timeout_s).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import JSONResponse

from serving_app.config import max_ongoing_requests


def _frame(payload: dict[str, Any]) -> Any:
    import numpy as np
    import pandas as pd

    if "records" in payload:
        return pd.DataFrame(payload["records"])
    return np.asarray(payload["inputs"], dtype=np.float64)


def _items(predictions: Any) -> list[Any]:
    if hasattr(predictions, "tolist"):
        return list(predictions.tolist())
    return list(predictions)


def predict_payloads(model: Any, payloads: list[dict[str, Any]]) -> list[list[Any]]:
    """One model call for several requests' payloads; each gets its own slice of the predictions."""
    import numpy as np
    import pandas as pd

    frames = [_frame(p) for p in payloads]
    sizes = [len(f) for f in frames]
    if isinstance(frames[0], pd.DataFrame):
        joined: Any = pd.concat(frames, ignore_index=True)
    else:
        joined = np.concatenate(frames)
    items = _items(model.predict(joined))
    out, start = [], 0
    for size in sizes:
        out.append(items[start : start + size])
        start += size
    return out


def build(args: dict[str, Any]) -> Application:
    model_uri = str(args["model_uri"])
    max_batch_size = int(args.get("max_batch_size", 1))
    wait_s = float(args.get("batch_wait_timeout_s", 0.0))

    @serve.deployment(
        name="Bare",
        ray_actor_options={"num_cpus": 0.5},
        max_ongoing_requests=max_ongoing_requests(max_batch_size),
    )
    class Bare:
        def __init__(self) -> None:
            import mlflow

            self.model = mlflow.pyfunc.load_model(model_uri)
            self.in_flight = 0

        def _predict(self, payloads: list[dict[str, Any]]) -> list[list[Any]]:
            return predict_payloads(self.model, payloads)

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=wait_s)
        async def _batched(self, payloads: list[dict[str, Any]]) -> list[list[Any]]:
            return await asyncio.to_thread(self._predict, payloads)

        async def __call__(self, request: Request) -> JSONResponse:
            payload = await request.json()
            self.in_flight += 1
            try:
                if max_batch_size > 1 and self.in_flight > 1:
                    result = await self._batched(payload)
                else:
                    result = (await asyncio.to_thread(self._predict, [payload]))[0]
            finally:
                self.in_flight -= 1
            return JSONResponse({"predictions": result})

    return Bare.bind()  # type: ignore[attr-defined]
