"""Predicting enforced input without enforcing it again gives what `PyFuncModel.predict` gives.

Real pyfunc models, saved and loaded by MLflow: one that hands back exactly what its predict received
(input and params), for every signature and body of the fast-parser table that parses, through the
route's parser (the fast path or MLflow's); and the sklearn flavour's own predict.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow import pyfunc
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

from serving_app import fastparse
from serving_app.convert import normalise_records, records_to_model_input
from serving_app.enforced import EnforcedPredict, enforced_predict
from serving_app.invocations import enforce_signature, parse_invocation
from serving_app.registry import LoadedVersion
from serving_app.schema import build_api_schema
from serving_app.service import PredictJob, _predict_for
from tests.serving.test_fastparse import CASES, SIGNATURES, assert_same

WITH_PARAMS = ModelSignature(
    inputs=Schema([ColSpec(DataType.double, "a")]),
    params=ParamSchema([ParamSpec("k", DataType.long, 1), ParamSpec("mode", DataType.string, "fast")]),
)
# Named, so saving skips MLflow's requirements inference (a subprocess that imports the model, seconds
# per save): these models are loaded here, never installed anywhere.
REQUIREMENTS = ["mlflow"]


class Echo(pyfunc.PythonModel):  # type: ignore[misc]
    """Answers with what it was given, so a test sees the model's input itself."""

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        return {"input": model_input, "params": params}


@pytest.fixture(scope="module")
def echo_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("echo")
    models: dict[str, Any] = {}
    for name, signature in {**SIGNATURES, "params": WITH_PARAMS}.items():
        pyfunc.save_model(
            str(root / name), python_model=Echo(), signature=signature, pip_requirements=REQUIREMENTS
        )
        models[name] = pyfunc.load_model(str(root / name))
    return models


def _loaded(model: Any) -> LoadedVersion:
    return LoadedVersion("1", model, model.metadata.signature, 0.0, enforced=enforced_predict(model))


def _assert_same_call(direct: Any, through_predict: Any) -> None:
    assert direct["params"] == through_predict["params"]
    assert_same(direct["input"], through_predict["input"])


@pytest.mark.parametrize(("name", "body", "fast"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_the_model_gets_what_predict_would_give_it(
    echo_models: dict[str, Any], name: str, body: Any, fast: bool
) -> None:
    model = echo_models[name]
    version = _loaded(model)
    assert version.enforced is not None
    try:
        parsed = parse_invocation(
            json.dumps(body).encode(), "application/json", version, fastparse.plan_for(version.signature)
        )
    except MlflowException:
        return  # refused before any predict (test_fastparse checks it is refused as MLflow refuses it)
    assert parsed.enforced
    _assert_same_call(version.enforced(parsed.data, parsed.params), model.predict(parsed.data, parsed.params))


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_records": [{"a": 1.0}]},  # the params' defaults filled in
        {"dataframe_records": [{"a": 1}], "params": {"k": 7}},
        {"dataframe_split": {"columns": ["a"], "data": [[2.5]]}, "params": {"k": 2, "mode": "slow"}},
    ],
)
def test_params_are_enforced_once_as_predict_would(echo_models: dict[str, Any], body: Any) -> None:
    model = echo_models["params"]
    version = _loaded(model)
    parsed = parse_invocation(json.dumps(body).encode(), "application/json", version, None)
    assert parsed.params is not None and "mode" in parsed.params
    assert version.enforced is not None
    _assert_same_call(version.enforced(parsed.data, parsed.params), model.predict(parsed.data, parsed.params))


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("f64x4", [[0.5, -1.25, 3.0, 2.0]]),
        ("f64x4", [[1, 2, 3, 4], [0.5, 0.25, 0.125, 0]]),
        ("f32x4", [0.1, 0.2, 0.3, 0.4]),
        ("i32x4", [[1, 2, 3, 4]]),
        ("mixed", {"a": 1.5, "f": 2.25, "n": 3, "i": 4, "t": True, "s": "x"}),
        ("mixed", [{"a": 1, "f": 2, "n": 3, "i": 4, "t": False, "s": ""}] * 2),
        ("prompt", [{"prompt": "Hello"}, {"prompt": "world"}]),
    ],
)
def test_serve_records_get_what_predict_would_give_them(
    echo_models: dict[str, Any], name: str, body: Any
) -> None:
    """`/serve`: the records' model input, enforced once before predict."""
    model = echo_models[name]
    version = _loaded(model)
    assert version.enforced is not None
    api = build_api_schema(version.signature)
    records = normalise_records(api.request_adapter.validate_python(body), api.input_shape)
    model_input = records_to_model_input(records, api.input_shape)
    data, params = enforce_signature(model_input, None, version)
    _assert_same_call(version.enforced(data, params), model.predict(model_input, None))


def test_csv_bodies_are_left_to_predict(echo_models: dict[str, Any]) -> None:
    version = _loaded(echo_models["mixed"])
    parsed = parse_invocation(b"a,f,n,i,t,s\n1.5,2.5,3,4,true,x\n", "text/csv", version, None)
    assert not parsed.enforced


def test_the_sklearn_flavour_predicts_the_same(tmp_path: Path) -> None:
    from mlflow import sklearn as mlflow_sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    features = rng.normal(size=(64, 4))
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(features, features[:, 0] > 0)
    mlflow_sklearn.save_model(
        pipeline, str(tmp_path / "m"), signature=infer_signature(features), pip_requirements=REQUIREMENTS
    )
    model = pyfunc.load_model(str(tmp_path / "m"))
    version = _loaded(model)
    assert version.enforced is not None
    rows = rng.normal(size=(5, 4)).tolist()
    body = json.dumps({"inputs": rows}).encode()
    parsed = parse_invocation(body, "application/json", version, fastparse.plan_for(version.signature))
    np.testing.assert_array_equal(version.enforced(parsed.data, None), model.predict(parsed.data))


class Hinted(pyfunc.PythonModel):  # type: ignore[misc]
    def predict(self, model_input: list[str], params: dict[str, Any] | None = None) -> list[str]:
        return model_input


def test_models_whose_predict_does_more_keep_predict(tmp_path: Path) -> None:
    pyfunc.save_model(str(tmp_path / "hinted"), python_model=Hinted(), pip_requirements=REQUIREMENTS)
    assert enforced_predict(pyfunc.load_model(str(tmp_path / "hinted"))) is None
    assert enforced_predict(types.SimpleNamespace(predict=lambda data, params=None: data)) is None


SIGNATURE = SIGNATURES["f64x4"]
EQUAL_SIGNATURE = ModelSignature.from_dict(SIGNATURE.to_dict())
OTHER_SIGNATURE = SIGNATURES["f32x4"]


@pytest.mark.parametrize(
    ("jobs_enforced_for", "version_signature", "has_enforced", "skips_enforcement"),
    [
        ([None], SIGNATURE, True, False),  # CSV bodies, shadows
        ([SIGNATURE], SIGNATURE, True, True),  # the default version
        ([EQUAL_SIGNATURE], SIGNATURE, True, True),  # a pinned version with the default's signature
        ([SIGNATURE], OTHER_SIGNATURE, True, False),  # a compatible pinned version with another signature
        ([SIGNATURE], SIGNATURE, False, False),  # a model whose predict does more than enforce
        ([SIGNATURE, SIGNATURE], SIGNATURE, True, True),  # a batch of enforced inputs
        ([SIGNATURE, None], SIGNATURE, True, False),  # a batch with one input left to predict
    ],
)
def test_when_enforcement_is_skipped(
    jobs_enforced_for: list[ModelSignature | None],
    version_signature: ModelSignature,
    has_enforced: bool,
    skips_enforcement: bool,
) -> None:
    enforced = EnforcedPredict(lambda data: data, takes_params=False, model_id=None) if has_enforced else None
    model = types.SimpleNamespace(predict=lambda data, params=None: data)
    version = LoadedVersion("2", model, version_signature, 0.0, enforced=enforced)
    jobs = [PredictJob(version, pd.DataFrame(), 1, None, signature) for signature in jobs_enforced_for]
    predict = _predict_for(jobs, version)
    assert (predict is enforced) is skips_enforcement
    assert skips_enforcement or predict == model.predict
