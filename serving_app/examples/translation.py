"""The seed guide's translation model: a pyfunc around a transformers seq2seq model (T5 style).

model_config: `lang_from`, `lang_to` (en, de, fr, ro), `input_label` (input column, default `prompt`),
`hfhub_name` (a hub reference, used only when no `hf_model` artifact is logged with the model),
`max_new_tokens`, `min_new_tokens`.
transformers 5 removed the `translation_xx_to_yy` pipelines, so this does what they did: prefix the
T5 task, tokenize, `generate`, decode.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

LANGUAGES = {"en": "English", "de": "German", "fr": "French", "ro": "Romanian"}


class TranslationModel(PythonModel):
    def load_context(self, context: Any) -> None:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        config = context.model_config or {}
        self.lang_from = config.get("lang_from", "en")
        self.lang_to = config.get("lang_to", "de")
        self.input_label = config.get("input_label", "prompt")
        self.max_new_tokens = int(config.get("max_new_tokens", 64))
        self.min_new_tokens = int(config.get("min_new_tokens", 0))
        reference = (context.artifacts or {}).get("hf_model") or config.get("hfhub_name", "google-t5/t5-base")
        self.tokenizer = AutoTokenizer.from_pretrained(reference)
        self.model = AutoModelForSeq2SeqLM.from_pretrained(reference)
        self.model.eval()
        self.prefix = f"translate {LANGUAGES[self.lang_from]} to {LANGUAGES[self.lang_to]}: "

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[dict[str, str]]:
        import torch

        texts = [self.prefix + str(text) for text in model_input[self.input_label].tolist()]
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            generated = self.model.generate(
                **encoded, max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens
            )
        decoded = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
        return [{"translation_text": text} for text in decoded]


mlflow.models.set_model(TranslationModel())
