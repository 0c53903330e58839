"""The serving app's view of the MLflow registry: version facts and model loading, errors classified.

Every call here is blocking I/O; callers run them off the event loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException, RestException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)

from serving_app.errors import RegistryUnavailable, UnknownVersion, VersionLoadFailed

# A replica answers 503 fast when the registry is down instead of retrying for minutes (MLflow's
# defaults are 7 retries with exponential backoff). Operators may still override both.
_FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def configure_client(tracking_uri: str | None) -> None:
    for key, value in _FAST_FAIL_ENV.items():
        os.environ.setdefault(key, value)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
    # Loading a model never needs the registry URI to differ from tracking in our deployments.


@dataclass(frozen=True)
class VersionFacts:
    version: str
    signature: ModelSignature | None
    flavors: tuple[str, ...]


@dataclass
class LoadedVersion:
    """A loaded pyfunc model and what it took to load it."""

    version: str
    model: Any
    signature: ModelSignature | None
    load_seconds: float
    on_release: Callable[[], None] | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Drop the model; Ray's multiplexer calls `__del__` when it evicts a version from the LRU."""
        if self._released:
            return
        self._released = True
        self.model = None
        if self.on_release is not None:
            self.on_release()

    def __del__(self) -> None:
        self.release()


def model_uri(model_name: str, version: str) -> str:
    return f"models:/{model_name}/{version}"


def fetch_version_facts(model_name: str, version: str) -> VersionFacts:
    """Signature and flavors of one version; downloads only the MLmodel file."""
    with _registry_errors(model_name, version):
        info = mlflow.models.get_model_info(model_uri(model_name, version))
    return VersionFacts(version=version, signature=info.signature, flavors=tuple(sorted(info.flavors)))


def load_version(model_name: str, version: str) -> LoadedVersion:
    started = time.perf_counter()
    try:
        with _registry_errors(model_name, version):
            model = mlflow.pyfunc.load_model(model_uri(model_name, version))
    except (UnknownVersion, RegistryUnavailable, VersionLoadFailed):
        raise
    except Exception as error:
        # The model's own code failed (load_context, unpickling): the version is broken, not absent.
        raise VersionLoadFailed(f"version {version} of {model_name!r} failed to load: {error}") from error
    return LoadedVersion(
        version=version,
        model=model,
        signature=model.metadata.signature,
        load_seconds=time.perf_counter() - started,
    )


@contextmanager
def _registry_errors(model_name: str, version: str) -> Iterator[None]:
    try:
        yield
    except MlflowException as error:
        raise classify(error, model_name, version) from error
    except OSError as error:
        raise RegistryUnavailable(f"model registry unreachable: {error}") from error


def classify(error: MlflowException, model_name: str, version: str) -> Exception:
    """Map an MLflow client error to what the caller should hear."""
    code = _error_code(error)
    if code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST) or (
        code == ErrorCode.Name(INVALID_PARAMETER_VALUE) and "version" in str(error).lower()
    ):
        return UnknownVersion(f"model {model_name!r} has no version {version}")
    if not isinstance(error, RestException) and _looks_like_connection_failure(error):
        return RegistryUnavailable("model registry unreachable; try again later")
    if isinstance(error, RestException) and code in {"TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR"}:
        return RegistryUnavailable(f"model registry failed: {error.message}")
    return VersionLoadFailed(f"version {version} of {model_name!r} failed to load: {error.message}")


def _error_code(error: MlflowException) -> str:
    code = getattr(error, "error_code", None)
    return str(code) if code is not None else ""


def _looks_like_connection_failure(error: MlflowException) -> bool:
    text = str(error)
    markers = ("Max retries exceeded", "Connection refused", "ConnectionError", "timed out", "Read timed out")
    return any(marker in text for marker in markers)
