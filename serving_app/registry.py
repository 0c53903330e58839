"""The serving app's view of the MLflow registry: version facts and model loading, errors classified.

Every call here is blocking I/O; callers run them off the event loop.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import mlflow
import yaml
from mlflow.exceptions import MlflowException, RestException
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    RESOURCE_DOES_NOT_EXIST,
    ErrorCode,
)
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request, verify_rest_response

from serving_app.errors import RegistryUnavailable, UnknownVersion, VersionLoadFailed

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Where each (server, model, version) keeps its artifacts, as learnt by the facts fetch: registry
# versions are immutable, and loading from this URI skips the `models:/` resolution round trips.
_ARTIFACT_URIS: dict[tuple[str, str, str], str] = {}
_ARTIFACT_URIS_MAX = 1024

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
    local_dir: str | None = field(default=None, repr=False)  # ours to delete with the model
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Drop the model; Ray's multiplexer calls `__del__` when it evicts a version from the LRU."""
        if self._released:
            return
        self._released = True
        self.model = None
        if self.local_dir is not None:
            shutil.rmtree(self.local_dir, ignore_errors=True)
        if self.on_release is not None:
            self.on_release()

    def __del__(self) -> None:
        self.release()


def model_uri(model_name: str, version: str) -> str:
    return f"models:/{model_name}/{version}"


def fetch_version_facts(model_name: str, version: str) -> VersionFacts:
    """Signature and flavors of one version; downloads only the MLmodel file.

    This gates a version's first pinned request, before its load: against an MLflow server that
    proxies artifacts it is two plain REST calls; `get_model_info` (any other store) costs a few
    hundred milliseconds of client-side resolution, as much as the load itself."""
    with _registry_errors(model_name, version):
        mlmodel = _mlmodel_from_artifact_proxy(model_name, version)
        if mlmodel is None:
            info = mlflow.models.get_model_info(model_uri(model_name, version))
            signature, flavors = info.signature, info.flavors
        else:
            model = Model.from_dict(mlmodel)
            signature, flavors = model.signature, model.flavors
    return VersionFacts(version=version, signature=signature, flavors=tuple(sorted(flavors)))


def _mlmodel_from_artifact_proxy(model_name: str, version: str) -> dict[str, Any] | None:
    """The version's MLmodel read through the tracking server's artifact proxy; None when the
    tracking URI is not an HTTP server or the artifacts are not behind its proxy."""
    tracking_uri = mlflow.get_tracking_uri()
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    # MLflow's own credential and TLS rules (token, basic auth, certificates) from the environment.
    creds = get_default_host_creds(tracking_uri)
    endpoint = "/api/2.0/mlflow/model-versions/get-download-uri"
    response = http_request(creds, endpoint, "GET", params={"name": model_name, "version": version})
    artifact_uri = str(verify_rest_response(response, endpoint).json().get("artifact_uri", ""))
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme != "mlflow-artifacts" or parsed.netloc:
        return None
    if len(_ARTIFACT_URIS) >= _ARTIFACT_URIS_MAX:
        _ARTIFACT_URIS.clear()
    _ARTIFACT_URIS[(tracking_uri, model_name, version)] = artifact_uri
    artifacts = urllib.parse.quote(parsed.path.rstrip("/"))
    endpoint = f"/api/2.0/mlflow-artifacts/artifacts{artifacts}/MLmodel"
    response = http_request(creds, endpoint, "GET")
    if response.status_code == 404:
        # The version exists (its download URI resolved): its files are gone, it is not unknown.
        raise VersionLoadFailed(f"version {version} of {model_name!r} has no MLmodel in its artifacts")
    if response.status_code != 200:
        verify_rest_response(response, endpoint)  # raises MLflow's exception for the error answer
    mlmodel = yaml.load(response.text, Loader=_YAML_LOADER)
    if not isinstance(mlmodel, dict):
        raise VersionLoadFailed(f"version {version} of {model_name!r} has no readable MLmodel")
    return mlmodel


def load_version(model_name: str, version: str) -> LoadedVersion:
    started = time.perf_counter()
    prefetched = PREFETCHES.take(model_name, version)
    known_uri = _ARTIFACT_URIS.get((mlflow.get_tracking_uri(), model_name, version))
    source = prefetched.path if prefetched is not None else known_uri or model_uri(model_name, version)
    try:
        with _registry_errors(model_name, version):
            model = mlflow.pyfunc.load_model(source)
    except Exception as error:
        if prefetched is not None:
            shutil.rmtree(prefetched.root, ignore_errors=True)
        if isinstance(error, UnknownVersion | RegistryUnavailable | VersionLoadFailed):
            raise
        # The model's own code failed (load_context, unpickling): the version is broken, not absent.
        raise VersionLoadFailed(f"version {version} of {model_name!r} failed to load: {error}") from error
    return LoadedVersion(
        version=version,
        model=model,
        signature=model.metadata.signature,
        load_seconds=time.perf_counter() - started,
        local_dir=prefetched.root if prefetched is not None else None,
    )


@dataclass(frozen=True)
class Download:
    root: str  # the temporary directory to delete
    path: str  # the model inside it


class Prefetches:
    """Versions' artifacts downloaded while their compatibility is still being checked.

    A first pinned request needs the version's MLmodel (for the 409 gate) and then the whole model;
    fetching them one after the other made a cold load twice a bare `load_model`. The download starts
    with the check and the load waits for it. A version found incompatible is never loaded: its
    download is deleted when it finishes (bandwidth spent once per version and default)."""

    def __init__(self, workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="regserve-prefetch")
        self._pending: dict[tuple[str, str, str], Future[Download]] = {}
        self._lock = threading.Lock()

    def start(self, model_name: str, version: str) -> None:
        key = (mlflow.get_tracking_uri(), model_name, version)
        with self._lock:
            if key not in self._pending:
                self._pending[key] = self._pool.submit(_download, model_name, version)

    def take(self, model_name: str, version: str) -> Download | None:
        """The finished download for the load, or None (none started, or it failed: the load proper
        then fetches again and reports the error)."""
        with self._lock:
            future = self._pending.pop((mlflow.get_tracking_uri(), model_name, version), None)
        if future is None:
            return None
        try:
            return future.result()
        except Exception:
            return None

    def discard(self, model_name: str, version: str) -> None:
        with self._lock:
            future = self._pending.pop((mlflow.get_tracking_uri(), model_name, version), None)
        if future is not None:
            future.add_done_callback(_delete_download)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)


def _download(model_name: str, version: str) -> Download:
    root = tempfile.mkdtemp(prefix=f"regserve-v{version}-")
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=model_uri(model_name, version), dst_path=root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return Download(root=root, path=path)


def _delete_download(future: Future[Download]) -> None:
    if not future.cancelled() and future.exception() is None:
        shutil.rmtree(future.result().root, ignore_errors=True)


PREFETCHES = Prefetches()


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
