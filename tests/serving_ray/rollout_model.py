"""A test model for rollouts (logged as code): answers `[<lang>] <prompt>` per row, fails on the
prompts its model_config lists in `fail_on`, and takes `sleep_s` per predict call."""

from __future__ import annotations

import time
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class Replier(PythonModel):
    def load_context(self, context: Any) -> None:
        config = context.model_config or {}
        self.lang = config.get("lang", "de")
        self.fail_on = set(config.get("fail_on", []))
        self.sleep_s = float(config.get("sleep_s", 0.0))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[dict[str, str]]:
        time.sleep(self.sleep_s)
        answers = []
        for text in model_input["prompt"].tolist():
            if text in self.fail_on:
                raise ValueError(f"cannot answer {text!r}")
            answers.append({"translation_text": f"[{self.lang}] {text}"})
        return answers


mlflow.models.set_model(Replier())
