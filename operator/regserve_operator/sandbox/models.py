"""Logging example models (from `serving_app.examples`) to a real MLflow server: demo and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import infer_signature

from serving_app.examples import PHRASEBOOK_MODEL, SLOW_ECHO_MODEL


def log_phrasebook(
    tracking_uri: str,
    model_name: str,
    *,
    lang_to: str = "de",
    input_label: str = "prompt",
    fail_on_load: bool = False,
    extra_inputs: dict[str, Any] | None = None,
    input_example: str | None = None,
    training_prompts: list[str] | None = None,
) -> str:
    """Register a phrasebook translator version; returns its version number.

    `input_example`: a prompt logged as the version's MLflow input example (what a smoke test
    predicts); "boom" makes a version that loads but fails its own example. `training_prompts`: logged
    on the version's run as its training dataset (its drift reference), a CSV artifact read back over
    the tracking server's artifact proxy (an http source any replica that reaches the server reads)."""
    mlflow.set_tracking_uri(tracking_uri)
    example = pd.DataFrame({input_label: ["Hello"], **{k: [v] for k, v in (extra_inputs or {}).items()}})
    signature = infer_signature(example, [{"translation_text": "Hallo"}])
    with mlflow.start_run():
        if training_prompts is not None:
            log_training_csv(tracking_uri, pd.DataFrame({input_label: training_prompts}), "prompts.csv")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PHRASEBOOK_MODEL),
            model_config={"lang_to": lang_to, "input_label": input_label, "fail_on_load": fail_on_load},
            signature=signature,
            input_example=pd.DataFrame({input_label: [input_example]}) if input_example is not None else None,
            pip_requirements=["mlflow", "pandas"],
            registered_model_name=model_name,
        )
    return str(info.registered_model_version)


def log_training_csv(tracking_uri: str, frame: pd.DataFrame, name: str) -> None:
    """`frame` as the active run's training dataset: a CSV artifact, its source the artifact proxy's URL."""
    import tempfile
    import urllib.parse

    from mlflow.data.pandas_dataset import from_pandas

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / name
        frame.to_csv(path, index=False)
        mlflow.log_artifact(str(path))
    root = urllib.parse.urlsplit(mlflow.get_artifact_uri()).path.strip("/")
    url = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow-artifacts/artifacts/{root}/{name}"
    mlflow.log_input(from_pandas(frame, source=url, name=name.split(".")[0]), context="training")


def log_slow_echo(tracking_uri: str, model_name: str, *, delay_s: float) -> str:
    """Register a version that echoes its prompt after `delay_s` per request (a replica kept busy by a
    handful of clients: autoscaling tests and benchmarks); returns its version number."""
    mlflow.set_tracking_uri(tracking_uri)
    signature = infer_signature(pd.DataFrame({"prompt": ["hi"]}), [{"echo": "hi"}])
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(SLOW_ECHO_MODEL),
            model_config={"delay_s": delay_s},
            signature=signature,
            pip_requirements=["mlflow", "pandas"],
            registered_model_name=model_name,
        )
    return str(info.registered_model_version)


def log_sklearn_classifier(tracking_uri: str, model_name: str, *, seed: int = 0) -> tuple[str, Any, Any]:
    """Register a scaler + logistic-regression pipeline on 4 float features (tensor in, tensor out).

    Returns the version, sample inputs and the predictions the pipeline itself gives for them.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mlflow.set_tracking_uri(tracking_uri)
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(200, 4))
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).astype(np.int64)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression()).fit(features, labels)
    samples = rng.normal(size=(32, 4))
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            pipeline,
            name="model",
            signature=infer_signature(features, pipeline.predict(features)),
            pip_requirements=["mlflow", "scikit-learn"],
            registered_model_name=model_name,
        )
    return str(info.registered_model_version), samples, pipeline.predict(samples)


def log_tiny_translator(
    tracking_uri: str,
    model_name: str,
    model_dir: Any,
    *,
    lang_to: str = "de",
    input_label: str = "prompt",
    min_new_tokens: int = 0,
) -> str:
    """Register the seed's translation model around a tiny local T5 (logged as the `hf_model` artifact)."""
    from serving_app.examples import TRANSLATION_MODEL

    mlflow.set_tracking_uri(tracking_uri)
    signature = infer_signature(pd.DataFrame({input_label: ["Hello"]}), [{"translation_text": "Hallo"}])
    config = {
        "lang_from": "en",
        "lang_to": lang_to,
        "input_label": input_label,
        "max_new_tokens": 8,
        "min_new_tokens": min_new_tokens,
    }
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(TRANSLATION_MODEL),
            artifacts={"hf_model": str(model_dir)},
            model_config=config,
            signature=signature,
            pip_requirements=["mlflow", "transformers", "torch", "sentencepiece"],
            registered_model_name=model_name,
        )
    return str(info.registered_model_version)
