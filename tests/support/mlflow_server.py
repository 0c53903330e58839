"""The real `mlflow server` launcher (in the package because `regserve demo` uses it too)."""

from regserve_operator.sandbox.mlflow_server import MlflowServer

__all__ = ["MlflowServer"]
