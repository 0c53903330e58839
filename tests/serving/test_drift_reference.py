"""A version's drift reference read from a real `mlflow server`: its run's training dataset, else its
input example, else why there is none."""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.data.pandas_dataset import from_pandas
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema, TensorSpec
from regserve_operator.sandbox.mlflow_server import MlflowServer

from serving_app.mlmodel import MLFLOW_CLIENT_FAIL_FAST
from serving_app.monitoring.reference import NoReference, Reference, ReferenceUnavailable, load_reference
from tests.operator.mlflow_fixture import MODELS, free_port

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("double", "x"), ColSpec("string", "colour")]),
    outputs=Schema([ColSpec("string", "echo")]),
)


@pytest.fixture
def tracking(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    previous = mlflow.get_tracking_uri()
    for key, value in MLFLOW_CLIENT_FAIL_FAST.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(mlflow_server.url)
    try:
        yield mlflow_server.url
    finally:
        mlflow.set_tracking_uri(previous)


def training_rows(rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(7)
    return pd.DataFrame(
        {
            "x": rng.normal(size=rows),
            "colour": rng.choice(["red", "green", "blue"], size=rows),
            "label": rng.integers(0, 2, size=rows),
        }
    )


def register(
    model_name: str,
    *,
    signature: ModelSignature = SIGNATURE,
    datasets: tuple[tuple[Any, str], ...] = (),
    input_example: pd.DataFrame | None = None,
) -> str:
    """A tiny echo pyfunc registered as `model_name`, with `datasets` (dataset, context) logged on its run."""
    with mlflow.start_run():
        for dataset, context in datasets:
            mlflow.log_input(dataset, context=context)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODELS / "echo_model.py"),
            signature=signature,
            input_example=input_example,
            pip_requirements=["mlflow==3.17.2", "pandas"],
            registered_model_name=model_name,
        )
    return str(info.registered_model_version)


def test_the_training_dataset_is_the_reference(tracking: str, tmp_path: Path) -> None:
    rows = training_rows(500)
    train_csv, eval_csv = tmp_path / "train.csv", tmp_path / "eval.csv"
    rows.to_csv(train_csv, index=False)
    rows.head(10).to_csv(eval_csv, index=False)
    version = register(
        "drift_ref_training",
        datasets=(
            (from_pandas(rows.head(10), source=str(eval_csv), name="eval"), "eval"),
            (from_pandas(rows, source=str(train_csv), name="train"), "training"),
        ),
    )

    found = load_reference(tracking, "drift_ref_training", version)

    assert isinstance(found, Reference), found
    assert found.kind == "training"
    assert "'train'" in found.detail and "500 rows" in found.detail
    assert str(tmp_path) not in found.detail  # a source's location is never repeated
    # The signature's columns only: the label is no input.
    pd.testing.assert_frame_equal(found.frame, rows[["x", "colour"]], check_dtype=False)


def test_rows_read_are_bounded(tracking: str, tmp_path: Path) -> None:
    rows = training_rows(300)
    path = tmp_path / "train.parquet"
    rows.to_parquet(path)
    version = register("drift_ref_bounded", datasets=((from_pandas(rows, source=str(path)), "training"),))

    found = load_reference(tracking, "drift_ref_bounded", version, max_rows=120)
    assert isinstance(found, Reference) and found.kind == "training"
    assert len(found.frame) == 120
    too_big = load_reference(tracking, "drift_ref_bounded", version, max_bytes=100)
    assert isinstance(too_big, NoReference)
    assert "larger than 100 bytes" in too_big.reason


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[str]:
    """An HTTP server on loopback serving `tmp_path`."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_a_dataset_behind_an_http_url_is_read_within_bounds(
    tracking: str, tmp_path: Path, file_server: str
) -> None:
    rows = training_rows(200)
    rows.to_csv(tmp_path / "train.csv", index=False)
    url = f"{file_server}/train.csv?signature=secret"
    version = register("drift_ref_http", datasets=((from_pandas(rows, source=url), "training"),))

    found = load_reference(tracking, "drift_ref_http", version)
    assert isinstance(found, Reference) and found.kind == "training", found
    assert len(found.frame) == 200 and "secret" not in found.detail
    too_big = load_reference(tracking, "drift_ref_http", version, max_bytes=1000)
    assert isinstance(too_big, NoReference) and "larger than 1000 bytes" in too_big.reason


def test_without_a_dataset_the_input_example_is_a_weak_reference(tracking: str) -> None:
    example = training_rows(5)[["x", "colour"]]
    version = register("drift_ref_example", input_example=example)

    found = load_reference(tracking, "drift_ref_example", version)

    assert isinstance(found, Reference), found
    assert found.kind == "inputExample"
    assert "weak" in found.detail and "no dataset logged" in found.detail
    pd.testing.assert_frame_equal(found.frame, example, check_dtype=False)


def test_an_unreadable_dataset_falls_back_to_the_input_example(tracking: str, tmp_path: Path) -> None:
    rows = training_rows(50)
    gone = tmp_path / "gone.csv"
    rows.to_csv(gone, index=False)
    example = rows.head(3)[["x", "colour"]]
    version = register(
        "drift_ref_gone",
        datasets=((from_pandas(rows, source=str(gone)), "training"),),
        input_example=example,
    )
    gone.unlink()

    found = load_reference(tracking, "drift_ref_gone", version)

    assert isinstance(found, Reference) and found.kind == "inputExample"
    assert "could not be read" in found.detail


CASES = [
    pytest.param("drift_ref_none", SIGNATURE, "no dataset logged", id="neither-dataset-nor-example"),
    pytest.param(
        "drift_ref_tensor",
        ModelSignature(inputs=Schema([TensorSpec(np.dtype("float64"), (-1, 4))])),
        "tensors",
        id="tensor-signature",
    ),
]


@pytest.mark.parametrize("model_name, signature, reason", CASES)
def test_versions_without_a_reference_say_why(
    tracking: str, model_name: str, signature: ModelSignature, reason: str
) -> None:
    version = register(model_name, signature=signature)
    found = load_reference(tracking, model_name, version)
    assert isinstance(found, NoReference)
    assert reason in found.reason


def test_an_unknown_version_has_no_reference(tracking: str) -> None:
    found = load_reference(tracking, "drift_ref_no_such_model", "3")
    assert isinstance(found, NoReference)
    assert "has no version 3" in found.reason


def test_an_unreachable_registry_raises(tracking: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(ReferenceUnavailable):
        load_reference(f"http://127.0.0.1:{free_port()}", "any_model", "1", timeout_s=60)


def test_a_training_csv_read_back_over_the_artifact_proxy(tracking: str) -> None:
    """The sandbox's way (`log_training_csv`): the dataset is an artifact of the run, its source the
    tracking server's artifact proxy URL, which any replica reaching the server can read."""
    from regserve_operator.sandbox.models import log_training_csv

    rows = training_rows(300)
    with mlflow.start_run():
        log_training_csv(tracking, rows, "train.csv")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODELS / "echo_model.py"),
            signature=SIGNATURE,
            pip_requirements=["mlflow==3.17.2", "pandas"],
            registered_model_name="drift_ref_proxy",
        )
    found = load_reference(tracking, "drift_ref_proxy", str(info.registered_model_version))
    assert isinstance(found, Reference) and found.kind == "training"
    assert len(found.frame) == 300 and list(found.frame.columns) == ["x", "colour"]
