"""A model with columns and its training dataset, and clients sending it traffic: what the monitoring
tests (serving, local mode, the Kubernetes plane) share. The model scores `2*x + y` and labels the
colour (tests/serving_ray/payload_model.py)."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
from mlflow.data.pandas_dataset import from_pandas
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema

MODEL = "drift_model"
MODEL_CODE = Path(__file__).parents[1] / "serving_ray" / "payload_model.py"


def rows(count: int, *, shift: float = 0.0, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "x": rng.normal(shift, 1.0, count),
            "y": rng.normal(0.0, 1.0, count),
            "color": rng.choice(["red", "blue"], count),
        }
    )


def log_with_training_data(tracking_uri: str, data_dir: Path, model: str = MODEL) -> str:
    mlflow.set_tracking_uri(tracking_uri)
    training = rows(2000, seed=1)
    path = data_dir / "train.csv"
    training.to_csv(path, index=False)
    signature = ModelSignature(
        inputs=Schema([ColSpec("double", "x"), ColSpec("double", "y"), ColSpec("string", "color")]),
        outputs=Schema([ColSpec("double", "score"), ColSpec("string", "label")]),
    )
    with mlflow.start_run():
        mlflow.log_input(from_pandas(training, source=str(path), name="train"), context="training")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            signature=signature,
            pip_requirements=["mlflow", "pandas"],
            registered_model_name=model,
        )
    return str(info.registered_model_version)


class Traffic:
    """Clients sending 20-row requests until stopped; `shift` moves x's mean."""

    def __init__(self, url: str, shift: float = 0.0) -> None:
        self.url = url
        self.shift = shift
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seed = 100
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                seed += 1
                body = rows(20, shift=self.shift, seed=seed).to_dict(orient="records")
                if client.post(f"{self.url}/serve", json=body).status_code != 200:
                    self.failures += 1

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
