"""Predicting on input that is already enforced against the model's signature.

`PyFuncModel.predict` enforces the signature on every call, then calls the flavour's predict. The
scoring paths here enforce once themselves, before predict: `fastparse` builds exactly what
enforcement gives, MLflow's parser path runs MLflow's own enforcement (`invocations.parse_scoring_json`)
and `/serve` runs it on the records' model input (`invocations.enforce_signature`). What
`PyFuncModel.predict` does around the flavour's predict (enforcing again, an `inspect.signature` of the
flavour's predict, the prediction context) costs 30-40 µs a call, an eighth of the one-row sklearn
pipeline's 260-280 µs.

`EnforcedPredict` is the rest of `PyFuncModel.predict`: the same prediction context (so traces
still name the model) and the same call of the flavour's predict. Models for which `predict` does more
than enforce and call (signatures from type hints, type hints from an input example, dependency
schemas, the feature store's own enforcement) get None and keep `predict`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlflow.models.dependencies_schemas import _get_dependencies_schema_from_model
from mlflow.pyfunc import PyFuncModel
from mlflow.pyfunc.context import Context, set_prediction_context

# Its enforcement differs from the one the scoring paths run (`_enforce_schema(..., flavor)`).
_FEATURE_STORE_LOADER = "databricks.feature_store.mlflow_model"


@dataclass(frozen=True)
class EnforcedPredict:
    predict_fn: Callable[..., Any]
    takes_params: bool
    model_id: str | None

    def __call__(self, data: Any, params: dict[str, Any] | None) -> Any:
        context = Context(model_id=self.model_id) if self.model_id else Context()
        with set_prediction_context(context):
            if self.takes_params:
                return self.predict_fn(data, params=params)
            return self.predict_fn(data)


def enforced_predict(model: Any) -> EnforcedPredict | None:
    """The predict for enforced input, or None when only `model.predict` gives the model's answer."""
    if not isinstance(model, PyFuncModel):
        return None
    meta = model.metadata
    if (
        meta._is_signature_from_type_hint()
        or meta._is_type_hint_from_example()
        or _get_dependencies_schema_from_model(model._model_meta)
        or model.loader_module == _FEATURE_STORE_LOADER
    ):
        return None
    predict_fn = model._predict_fn
    params = inspect.signature(predict_fn).parameters.get("params")
    takes_params = params is not None and params.kind != inspect.Parameter.VAR_KEYWORD
    return EnforcedPredict(predict_fn, takes_params, model.model_id)
