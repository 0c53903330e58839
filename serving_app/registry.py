"""The serving app's view of the MLflow registry: one model's version facts and loads, and
downloads started ahead of a load, with errors in the app's words.

All of it belongs to a `ModelRegistry` object that the replica's model service owns; nothing here is
module state. Every call is blocking I/O: callers run them off the event loop.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models.signature import ModelSignature

from serving_app.enforced import EnforcedPredict, enforced_predict
from serving_app.errors import RegistryUnavailable, ServingError, UnknownVersion, VersionLoadFailed
from serving_app.inline import PredictTime
from serving_app.mlmodel import (
    MLFLOW_CLIENT_FAIL_FAST,
    NotFound,
    ReadError,
    RegistryAuth,
    SharedTransport,
    Unreachable,
    Unreadable,
    models_uri,
    read_over_rest,
)
from serving_app.mlmodel_client import classify, read_in_process
from serving_app.proxy_download import download_over_rest
from serving_app.timing import step


def configure_process(tracking_uri: str | None) -> str:
    """Point this replica process's mlflow client at the registry, once, when the replica starts;
    returns the tracking URI in effect.

    Model loading (`mlflow.pyfunc.load_model`, and the artifact stores' clients under it) reads the
    tracking URI, credentials and HTTP settings from the process environment only. A replica serves
    one registry, so they are set here at start and never per request: the fail-fast settings as
    defaults (a replica answers 503 quickly when the registry is down instead of retrying for
    minutes), values the pod's environment already has win."""
    for key, value in MLFLOW_CLIENT_FAIL_FAST.items():
        os.environ.setdefault(key, value)
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
        os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri)
    return mlflow.get_tracking_uri()  # without one: MLFLOW_TRACKING_URI, else mlflow's default


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
    predict_time: PredictTime = field(default_factory=PredictTime, repr=False)
    # Predicts input already enforced against `signature` (None: `model.predict` does it all).
    enforced: EnforcedPredict | None = field(default=None, repr=False)
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


class ModelRegistry:
    """One registered model on one tracking server, as a replica reads it."""

    def __init__(self, model_name: str, tracking_uri: str, auth: RegistryAuth, *, prefetch_workers: int = 2):
        self.model_name = model_name
        self.tracking_uri = tracking_uri
        self._auth = auth
        # One pool and TLS context for every gate read and proxied download: a client of its own per
        # version would build a TLS context each time, ~30 ms on a cold load's critical path.
        self._transport = SharedTransport(verify=auth.verify())
        self.prefetches = Prefetches(self._download, workers=prefetch_workers)

    def fetch_facts(self, version: str) -> VersionFacts:
        """Signature and flavors of one version; reads only its MLmodel.

        This gates a version's first pinned request, before its load: against an MLflow server that
        proxies artifacts it is two plain REST calls; the mlflow client (any other store) costs a few
        hundred milliseconds of client-side resolution, as much as the load itself."""
        with self._errors(version):
            found = read_over_rest(
                self.tracking_uri, self.model_name, version, auth=self._auth, transport=self._transport
            )
            if found is None:
                found = read_in_process(self.tracking_uri, self.model_name, version)
        signature = ModelSignature.from_dict(dict(found.signature)) if found.signature else None
        return VersionFacts(version=version, signature=signature, flavors=found.flavors)

    def load(self, version: str) -> LoadedVersion:
        started = time.perf_counter()
        with step("download"):  # what is left of it when it started with the gate
            downloaded = self.prefetches.take(version)
            if downloaded is None:
                with self._errors(version):
                    downloaded = self._download(version)
        try:
            with self._errors(version, downloaded=True), step("load"):
                model = mlflow.pyfunc.load_model(downloaded.path)
        except ServingError:
            shutil.rmtree(downloaded.root, ignore_errors=True)
            raise
        return LoadedVersion(
            version=version,
            model=model,
            signature=model.metadata.signature,
            load_seconds=time.perf_counter() - started,
            local_dir=downloaded.root,
            enforced=enforced_predict(model),
        )

    def close(self) -> None:
        self.prefetches.close()
        self._transport.shutdown()

    def _download(self, version: str) -> Download:
        """The version's files in a directory of their own (deleted with the loaded model). Through
        the tracking server's artifact proxy over the replica's pooled connection when they are
        behind it, else with the mlflow client."""
        root = tempfile.mkdtemp(prefix=f"regserve-v{version}-")
        try:
            proxied = download_over_rest(
                self.tracking_uri,
                self.model_name,
                version,
                Path(root),
                auth=self._auth,
                transport=self._transport,
            )
            if proxied:
                return Download(root=root, path=root)
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=models_uri(self.model_name, version), dst_path=root
            )
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return Download(root=root, path=path)

    @contextmanager
    def _errors(self, version: str, *, downloaded: bool = False) -> Iterator[None]:
        """Any failure to read or load `version` as the error the app answers with. Once its files
        are `downloaded`, nothing the load says makes the version unknown: a missing file is a broken
        version (mlflow reports a missing MLmodel as RESOURCE_DOES_NOT_EXIST)."""
        try:
            yield
        except ServingError:
            raise
        except Exception as error:
            outcome = classify(error, models_uri(self.model_name, version))
            if downloaded and isinstance(outcome, NotFound):
                outcome = Unreadable(str(outcome))
            raise serving_error(outcome, self.model_name, version) from error


def serving_error(error: ReadError, model_name: str, version: str) -> ServingError:
    """The reader's outcome in the app's words (and HTTP status)."""
    if isinstance(error, NotFound):
        return UnknownVersion(f"model {model_name!r} has no version {version}")
    if isinstance(error, Unreachable):
        return RegistryUnavailable(f"model registry unreachable: {error}")
    # Unreadable: the model's files or its own code (load_context, unpickling) fail; it is not absent.
    return VersionLoadFailed(f"version {version} of {model_name!r} failed to load: {error}")


@dataclass(frozen=True)
class Download:
    root: str  # the temporary directory to delete
    path: str  # the model inside it


class Prefetches:
    """Versions' artifacts downloaded while their compatibility is still being checked.

    A first pinned request needs the version's MLmodel (for the 409 gate) and then the whole model;
    fetching them one after the other made a cold load twice a bare `load_model`. The download starts
    with the check and the load waits for it. A version found incompatible is never loaded: its
    download is deleted when it finishes (bandwidth spent once per version and default). Pending
    downloads are only those of requests in flight: each request takes or discards its own."""

    def __init__(self, download: Callable[[str], Download], *, workers: int = 2) -> None:
        self._download = download
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None  # started with the first download
        self._pending: dict[str, Future[Download]] = {}
        self._lock = threading.Lock()

    def start(self, version: str) -> None:
        with self._lock:
            if version in self._pending:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self._workers, thread_name_prefix="regserve-prefetch"
                )
            self._pending[version] = self._pool.submit(self._download, version)

    def take(self, version: str) -> Download | None:
        """The finished download for the load, or None (none started, or it failed: the load proper
        then fetches again and reports the error)."""
        with self._lock:
            future = self._pending.pop(version, None)
        if future is None:
            return None
        try:
            return future.result()
        except Exception:
            return None

    def discard(self, version: str) -> None:
        """Drop `version`'s download: still queued, it never starts; running, its files are deleted
        when it ends."""
        with self._lock:
            future = self._pending.pop(version, None)
        if future is not None and not future.cancel():
            future.add_done_callback(_delete_download)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def versions(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def close(self) -> None:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            pool, self._pool = self._pool, None
        for future in pending:
            future.add_done_callback(_delete_download)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def _delete_download(future: Future[Download]) -> None:
    if not future.cancelled() and future.exception() is None:
        shutil.rmtree(future.result().root, ignore_errors=True)
