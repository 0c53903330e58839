"""Where a registered version's reference rows come from: the training dataset logged on the run
that made it (`mlflow.log_input(dataset, context="training")`), else the model's input example, a
weak reference (a few rows say little about a distribution).

What is read is bounded in rows, bytes and time, and nothing of a dataset's location is repeated in
what this returns: a source URI may carry credentials (a presigned URL, user:password@host).
"""

from __future__ import annotations

import os
import tempfile
import threading
import urllib.parse
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from serving_app.mlmodel import Unreachable, models_uri
from serving_app.mlmodel_client import classify

MAX_ROWS = 100_000
MAX_BYTES = 50 * 1024 * 1024
MAX_COLUMNS = 1024  # a wider file is read by its first columns (a profile keeps at most 256)
TIMEOUT_S = 120.0  # the whole read, registry and dataset together
HTTP_TIMEOUT_S = 30.0
MAX_DETAIL_CHARS = 300

Kind = Literal["training", "inputExample"]
_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class Reference:
    frame: pd.DataFrame
    kind: Kind
    detail: str


@dataclass(frozen=True)
class NoReference:
    """No reference for this version, and why (said in status; not an outage, asking again is futile)."""

    reason: str


class ReferenceUnavailable(Exception):
    """The registry did not answer (or not in time): nothing is known, asking again later may work."""


def load_reference(
    tracking_uri: str,
    model_name: str,
    version: str,
    *,
    max_rows: int = MAX_ROWS,
    max_bytes: int = MAX_BYTES,
    timeout_s: float = TIMEOUT_S,
) -> Reference | NoReference:
    """The version's reference rows, or why it has none; ReferenceUnavailable when the registry is
    unreachable. Past `timeout_s` the read is abandoned (its thread finishes on its own)."""
    limits = _Limits(max_rows, max_bytes)
    done: Future[Reference | NoReference] = Future()

    def run() -> None:
        try:
            done.set_result(_load(tracking_uri, model_name, version, limits))
        except BaseException as error:
            done.set_exception(error)

    threading.Thread(target=run, name="regserve-reference", daemon=True).start()
    try:
        return done.result(timeout=timeout_s)
    except FutureTimeout:
        raise ReferenceUnavailable(f"reading the reference took longer than {timeout_s:.0f} s") from None


@dataclass(frozen=True)
class _Limits:
    rows: int
    bytes: int


def _load(tracking_uri: str, model_name: str, version: str, limits: _Limits) -> Reference | NoReference:
    import mlflow
    from mlflow.models import Model

    client = mlflow.MlflowClient(tracking_uri, registry_uri=tracking_uri)
    uri = models_uri(model_name, version)
    with tempfile.TemporaryDirectory(prefix="regserve-reference-") as tmp:
        try:
            found = client.get_model_version(model_name, version)
            root = client.get_model_version_download_uri(model_name, version)
        except Exception as error:
            return _unless_unreachable(error, uri, f"model {model_name!r} has no version {version}")
        try:
            mlmodel = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root}/MLmodel", dst_path=tmp, tracking_uri=tracking_uri
            )
            model = Model.load(mlmodel)
        except Exception as error:
            return _unless_unreachable(error, uri, "the version's MLmodel could not be read")
        columns = _signature_columns(model)
        if columns is None:
            return NoReference("the signature's inputs are tensors: there are no columns to compare")
        try:
            run = client.get_run(found.run_id) if found.run_id else None
        except Exception as error:
            _unless_unreachable(error, uri, "")
            run = None
        training = (
            _training(run, columns, limits, Path(tmp))
            if run is not None
            else "the version's run is not available"
        )
        if isinstance(training, Reference):
            return training
        example = _example(model, root, columns, limits, tracking_uri, Path(tmp))
        if isinstance(example, Reference):
            return Reference(example.frame, example.kind, _bounded(f"{example.detail}; {training}"))
        return NoReference(_bounded(f"{training}; {example}"))


def _unless_unreachable(error: Exception, uri: str, reason: str) -> NoReference:
    """`reason` as the answer, unless the error says the registry did not answer."""
    outcome = classify(error, uri)
    if isinstance(outcome, Unreachable):
        raise ReferenceUnavailable(_bounded(str(outcome))) from error
    return NoReference(_bounded(reason))


def _signature_columns(model: Any) -> list[str] | None:
    """The signature's input column names ([] without a signature: every column counts); None for
    tensor inputs."""
    if model.signature is None or model.signature.inputs is None:
        return []
    if model.signature.inputs.is_tensor_spec():
        return None
    return [spec.name for spec in model.signature.inputs.inputs if getattr(spec, "name", None)]


def _training(run: Any, columns: list[str], limits: _Limits, tmp: Path) -> Reference | str:
    """The run's training dataset as a frame, or why not."""
    import mlflow

    inputs = list(run.inputs.dataset_inputs) if run.inputs is not None else []
    if not inputs:
        return "no dataset logged on the version's run"
    tagged = [
        d for d in inputs if any(t.key == "mlflow.data.context" and t.value == "training" for t in d.tags)
    ]
    chosen = (tagged or inputs)[0]
    name = _bounded(str(chosen.dataset.name))[:80]
    try:
        source = mlflow.data.get_source(chosen)
        frame = _read_source(source, limits, tmp / "dataset")
    except Exception as error:
        return f"training dataset {name!r} could not be read ({type(error).__name__})"
    if isinstance(frame, str):
        return f"training dataset {name!r}: {frame}"
    kept = _columns(frame, columns)
    if isinstance(kept, str):
        return f"training dataset {name!r}: {kept}"
    return Reference(kept, "training", f"training dataset {name!r}, {len(kept)} rows")


def _example(
    model: Any, root: str, columns: list[str], limits: _Limits, tracking_uri: str, tmp: Path
) -> Reference | str:
    """The model's input example as a frame, or why not."""
    import mlflow

    info = model.saved_input_example_info
    if not info or not isinstance(info.get("artifact_path"), str):
        return "the model has no input example"
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{root}/{info['artifact_path']}",
            dst_path=str(tmp / "model"),
            tracking_uri=tracking_uri,
        )
        if os.path.getsize(local) > limits.bytes:
            return f"the input example is larger than {limits.bytes} bytes"
        example = model.load_input_example(str(tmp / "model"))
    except Exception as error:
        return f"the input example could not be read ({type(error).__name__})"
    frame = _example_frame(example)
    if frame is None:
        return "the input example has no columns"
    kept = _columns(frame.head(limits.rows), columns)
    if isinstance(kept, str):
        return f"the input example: {kept}"
    return Reference(kept, "inputExample", f"the model's input example, {len(kept)} rows (a weak reference)")


def _example_frame(example: Any) -> pd.DataFrame | None:
    if isinstance(example, pd.DataFrame):
        return example
    if isinstance(example, dict):
        try:
            return pd.DataFrame(example) if example else None
        except ValueError:  # scalars only: one row
            return pd.DataFrame([example])
    if isinstance(example, list) and example and all(isinstance(row, dict) for row in example):
        return pd.DataFrame.from_records(example)
    return None


def _columns(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame | str:
    """The signature's columns of `frame` (a training set also holds its labels)."""
    if not columns:
        return frame if not frame.empty else "no rows"
    present = [c for c in columns if c in frame.columns]
    if not present:
        return "none of the signature's columns"
    if frame.empty:
        return "no rows"
    return frame[present].reset_index(drop=True)


# ---------------------------------------------------------------------------------- dataset files


def _read_source(source: Any, limits: _Limits, tmp: Path) -> pd.DataFrame | str:
    """A CSV or Parquet file named by a dataset source: a local path, an http(s) URL, or an artifact
    store URI. Other sources (tables, code, hubs) are not files to read here."""
    uri = getattr(source, "uri", None) or getattr(source, "url", None)
    if not isinstance(uri, str):
        return f"its source ({type(source).__name__}) is not a file"
    parsed = urllib.parse.urlparse(uri)
    file_format = _FORMATS.get(Path(parsed.path).suffix.lower())
    if file_format is None:
        return "its source is neither a .csv nor a .parquet file"
    path: Path | str
    if parsed.scheme in ("", "file"):
        path = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else uri)
    elif parsed.scheme in ("http", "https"):
        path = _download_http(uri, limits, tmp / f"dataset.{file_format}")
    else:
        path = _download_artifact(uri, limits, tmp)
    if isinstance(path, str):
        return path
    if path.stat().st_size > limits.bytes:
        return f"its file is larger than {limits.bytes} bytes"
    return _read_file(path, file_format, limits.rows)


def _download_http(url: str, limits: _Limits, dest: Path) -> Path | str:
    """The file at `url`, without any of this process's credentials, refused past the byte limit."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    received = 0
    with (
        httpx.Client(timeout=HTTP_TIMEOUT_S, follow_redirects=True, max_redirects=5) as client,
        client.stream("GET", url) as answer,
    ):
        if answer.status_code != 200:
            return f"its URL answered HTTP {answer.status_code}"
        with dest.open("wb") as out:
            for chunk in answer.iter_bytes(1024 * 1024):
                received += len(chunk)
                if received > limits.bytes:
                    return f"its file is larger than {limits.bytes} bytes"
                out.write(chunk)
    return dest


def _download_artifact(uri: str, limits: _Limits, tmp: Path) -> Path | str:
    """A file in an artifact store (s3://, gs://, ...), its size checked in the listing first."""
    import mlflow

    parent, _, name = uri.rstrip("/").rpartition("/")
    listed = {Path(f.path).name: f for f in mlflow.artifacts.list_artifacts(artifact_uri=parent)}
    entry = listed.get(name)
    if entry is None or entry.is_dir:
        return "its file is not in the artifact store"
    if entry.file_size is None or entry.file_size > limits.bytes:
        return f"its file is larger than {limits.bytes} bytes (or of unknown size)"
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp / "artifact")))


def _read_file(path: Path, file_format: str, max_rows: int) -> pd.DataFrame:
    if file_format == "csv":
        header = pd.read_csv(path, nrows=0).columns
        return pd.read_csv(path, nrows=max_rows, usecols=list(header[:MAX_COLUMNS]))
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names[:MAX_COLUMNS]
    batches, rows = [], 0
    for batch in parquet.iter_batches(batch_size=min(max_rows, 65_536), columns=names):
        batches.append(batch)
        rows += batch.num_rows
        if rows >= max_rows:
            break
    if not batches:
        return pd.DataFrame(columns=names)
    return pa.Table.from_batches(batches).slice(0, max_rows).to_pandas()


def _bounded(text: str) -> str:
    return text if len(text) <= MAX_DETAIL_CHARS else text[: MAX_DETAIL_CHARS - 1] + "…"
