"""A test model for payload logging (logged as code): `score = 2*x + y`, and `label` the colour in
capitals, per row; fails on rows whose colour is `boom`."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class Scorer(PythonModel):
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        if (model_input["color"] == "boom").any():
            raise ValueError("boom")
        return [
            {"score": 2.0 * x + y, "label": color.upper()}
            for x, y, color in zip(model_input["x"], model_input["y"], model_input["color"], strict=True)
        ]


mlflow.models.set_model(Scorer())
