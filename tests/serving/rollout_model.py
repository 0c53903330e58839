"""A test model for rollouts (logged as code): answers `[<lang>] <prompt>` per row, and fails on
the prompts its model_config lists in `fail_on`."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class Replier(PythonModel):
    def load_context(self, context: Any) -> None:
        config = context.model_config or {}
        self.lang = config.get("lang", "de")
        self.fail_on = set(config.get("fail_on", []))

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[dict[str, str]]:
        answers = []
        for text in model_input["prompt"].tolist():
            if text in self.fail_on:
                raise ValueError(f"cannot answer {text!r}")
            answers.append({"translation_text": f"[{self.lang}] {text}"})
        return answers


mlflow.models.set_model(Replier())
