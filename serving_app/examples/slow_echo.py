"""A model that takes a fixed time per request, so a handful of clients keeps a replica busy.

model_config: `delay_s` (seconds per predict call).
"""

from __future__ import annotations

import time
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class SlowEcho(PythonModel):
    def load_context(self, context: Any) -> None:
        self.delay_s = float((context.model_config or {}).get("delay_s", 0.2))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[dict[str, str]]:
        time.sleep(self.delay_s)  # stands for model compute; the app runs predict off its event loop
        return [{"echo": text} for text in model_input["prompt"].tolist()]


mlflow.models.set_model(SlowEcho())
