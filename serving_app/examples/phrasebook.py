"""A deterministic stand-in for the translation model: same signature, exact answers, instant load.

model_config: `lang_to` (de | fr), `input_label` (the input column), `fail_on_load` (a broken version).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

PHRASES = {
    "de": {"The weather is lovely today": "Das Wetter ist heute schön", "Hello": "Hallo"},
    "fr": {"The weather is lovely today": "Il fait beau aujourd'hui", "Hello": "Bonjour"},
}


class PhrasebookTranslator(PythonModel):
    def load_context(self, context: Any) -> None:
        config = context.model_config or {}
        if config.get("fail_on_load"):
            raise RuntimeError("this version is broken on purpose")
        self.lang_to = config.get("lang_to", "de")
        self.input_label = config.get("input_label", "prompt")

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[dict[str, str]]:
        answers = []
        for text in model_input[self.input_label].tolist():
            if text == "boom":
                raise ValueError("cannot translate 'boom'")
            translated = PHRASES.get(self.lang_to, {}).get(text, f"[{self.lang_to}] {text}")
            answers.append({"translation_text": translated})
        return answers


mlflow.models.set_model(PhrasebookTranslator())
