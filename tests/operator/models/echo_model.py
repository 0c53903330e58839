"""A tiny pyfunc logged as code: echoes its first column as text."""

import mlflow
import pandas as pd


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None):  # type: ignore[no-untyped-def]
        first = model_input.columns[0]
        return pd.DataFrame({"echo": model_input[first].astype(str)})


mlflow.models.set_model(Echo())
