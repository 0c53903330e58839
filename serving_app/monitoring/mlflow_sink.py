"""The MLflow sink: payload records as Parquet artifacts of one run per served version, in one
experiment per resource (`regserve/<namespace>/<name>`), written through the tracking server's
artifact proxy with the replica's own credentials (those it reads the registry with).

It speaks MLflow's REST API with the replica's bounded client (`RegistryAuth.client`) rather than the
mlflow client: that one retries a server that is down for minutes per call, and takes its settings
from the process environment. Files go under `payloads/date=YYYY-MM-DD/hour=HH/` (Hive partitioning:
pandas, DuckDB and Spark read the directory as one dataset). Replicas of one application find each
version's run by its tag; two replicas creating it at once both keep the older run (by start time,
then id), and the other is deleted."""

from __future__ import annotations

import asyncio
import datetime
import io
import itertools
import logging
import time
import urllib.parse
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pyarrow.parquet as pq

from serving_app.mlmodel import Deadline, HasStatus, bounded_request
from serving_app.monitoring.records import PayloadRecord
from serving_app.monitoring.table import payload_table

logger = logging.getLogger("ray.serve")

VERSION_TAG = "regserve.model_version"
MODEL_TAG = "regserve.model"
RESOURCE_TAG = "regserve.resource"
PAYLOADS_DIR = "payloads"
PROXIED_SCHEME = "mlflow-artifacts:"
_API = "/api/2.0/mlflow"
CALL_DEADLINE_S = 15.0


class SinkRefused(RuntimeError):
    """The tracking server answered with an error, or cannot take the records (a stable code)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def partition(at: float) -> str:
    moment = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
    return f"{PAYLOADS_DIR}/date={moment:%Y-%m-%d}/hour={moment:%H}"


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    start_time: int
    artifact_uri: str

    @classmethod
    def of(cls, run: dict[str, Any]) -> RunInfo:
        info = run.get("info") or {}
        return cls(
            str(info.get("run_id", "")), int(info.get("start_time") or 0), str(info.get("artifact_uri", ""))
        )


def oldest(runs: Sequence[RunInfo]) -> RunInfo:
    return min(runs, key=lambda run: (run.start_time, run.run_id))


def proxied_path(artifact_uri: str, relative: str) -> str:
    """The artifact proxy's path for `relative` under a run's `mlflow-artifacts:` root."""
    if not artifact_uri.startswith(PROXIED_SCHEME):
        raise SinkRefused("artifacts_not_proxied")  # the server does not take uploads for this store
    root = urllib.parse.urlsplit(artifact_uri).path.strip("/")
    return f"/api/2.0/mlflow-artifacts/artifacts/{urllib.parse.quote(f'{root}/{relative}')}"


class TrackingRest:
    """The few tracking-server calls the sink makes."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def _call(
        self, method: str, path: str, *, params: Mapping[str, Any] | None = None, json: Any = None
    ) -> dict[str, Any]:
        # Bounded in time and size: a tracking server that trickles or floods gets nowhere.
        answer = bounded_request(
            self.client,
            method,
            path,
            label=path,
            deadline=Deadline.after(CALL_DEADLINE_S),
            params=params,
            body=json,
        )
        return self._parsed(answer)

    @staticmethod
    def _parsed(answer: HasStatus) -> dict[str, Any]:
        if answer.status_code >= 400:
            try:
                code = str(answer.json().get("error_code") or answer.status_code)
            except (ValueError, AttributeError):
                code = str(answer.status_code)
            raise SinkRefused(code[:64])
        try:
            parsed = answer.json()
        except ValueError:  # an empty answer (an upload's)
            return {}
        return dict(parsed) if isinstance(parsed, dict) else {}

    def experiment_id(self, name: str, tags: dict[str, str]) -> str:
        try:
            found = self._call("GET", f"{_API}/experiments/get-by-name", params={"experiment_name": name})
            return str(found["experiment"]["experiment_id"])
        except SinkRefused as error:
            if error.code != "RESOURCE_DOES_NOT_EXIST":
                raise
        body = {"name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        try:
            return str(self._call("POST", f"{_API}/experiments/create", json=body)["experiment_id"])
        except SinkRefused as error:
            if error.code != "RESOURCE_ALREADY_EXISTS":
                raise
        # Another replica created it meanwhile.
        found = self._call("GET", f"{_API}/experiments/get-by-name", params={"experiment_name": name})
        return str(found["experiment"]["experiment_id"])

    def runs_tagged(self, experiment_id: str, key: str, value: str) -> list[RunInfo]:
        # `value` is a registry version number (digits only: `config.VERSION_PATTERN`).
        body = {"experiment_ids": [experiment_id], "filter": f"tags.`{key}` = '{value}'", "max_results": 20}
        return [
            RunInfo.of(run) for run in self._call("POST", f"{_API}/runs/search", json=body).get("runs", [])
        ]

    def create_run(self, experiment_id: str, name: str, tags: dict[str, str]) -> RunInfo:
        body = {
            "experiment_id": experiment_id,
            "run_name": name,
            "start_time": int(time.time() * 1000),
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        return RunInfo.of(self._call("POST", f"{_API}/runs/create", json=body)["run"])

    def delete_run(self, run_id: str) -> None:
        self._call("POST", f"{_API}/runs/delete", json={"run_id": run_id})

    def set_version_tag(self, model: str, version: str, key: str, value: str) -> None:
        body = {"name": model, "version": version, "key": key, "value": value}
        self._call("POST", f"{_API}/model-versions/set-tag", json=body)

    def log_batch(self, run_id: str, metrics: Mapping[str, float], timestamp_ms: int, step: int) -> None:
        body = {
            "run_id": run_id,
            "metrics": [
                {"key": key, "value": value, "timestamp": timestamp_ms, "step": step}
                for key, value in metrics.items()
            ],
        }
        self._call("POST", f"{_API}/runs/log-batch", json=body)

    def upload(self, path: str, content: bytes) -> None:
        answer = self.client.request(
            "PUT", path, content=content, headers={"Content-Type": "application/octet-stream"}
        )
        self._parsed(answer)


def version_run(rest: TrackingRest, experiment_id: str, model: str, resource: str, version: str) -> RunInfo:
    """The run of one served version in the resource's experiment, found by its tag or created. Two
    processes creating it at once both end up with the older run; the other is deleted."""
    runs = rest.runs_tagged(experiment_id, VERSION_TAG, version)
    if runs:
        return oldest(runs)
    created = rest.create_run(
        experiment_id, f"{model} v{version}", {VERSION_TAG: version, MODEL_TAG: model, RESOURCE_TAG: resource}
    )
    chosen = oldest(rest.runs_tagged(experiment_id, VERSION_TAG, version) or [created])
    if chosen.run_id != created.run_id:
        rest.delete_run(created.run_id)
    return chosen


class MlflowPayloadSink:
    def __init__(
        self,
        client_factory: Callable[[], httpx.Client],
        *,
        experiment: str,
        model: str,
        resource: str,
        writer_id: str,
        inputs: bool,
        outputs: bool,
        max_record_bytes: int,
        version_tag: str | None = None,
    ) -> None:
        self._client_factory = client_factory
        self._rest: TrackingRest | None = None
        self.experiment = experiment
        self.model = model
        self.resource = resource
        self.writer_id = writer_id
        self.inputs = inputs
        self.outputs = outputs
        self.max_record_bytes = max_record_bytes
        self.version_tag = version_tag  # the model version's tag naming its payload run, if any
        self._experiment_id: str | None = None
        self._runs: dict[str, RunInfo] = {}
        self._sequence = itertools.count()
        # The client blocks: one thread of its own, never the replica's loop.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="regserve-payloads")

    async def write(self, records: Sequence[PayloadRecord]) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._write, list(records))

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._rest is not None:
            self._rest.client.close()

    # --------------------------------------------------------------------------------- blocking

    @property
    def rest(self) -> TrackingRest:
        if self._rest is None:
            self._rest = TrackingRest(self._client_factory())
        return self._rest

    def _write(self, records: list[PayloadRecord]) -> None:
        groups: dict[tuple[str, str], list[PayloadRecord]] = defaultdict(list)
        for record in records:
            if record.version is not None:  # refused before a version was chosen: no run to hold it
                groups[(record.version, partition(record.at))].append(record)
        for (version, where), group in groups.items():
            table = payload_table(
                group, inputs=self.inputs, outputs=self.outputs, max_record_bytes=self.max_record_bytes
            )
            buffer = io.BytesIO()
            pq.write_table(table, buffer)
            name = f"{self.writer_id}-{next(self._sequence):06d}-{uuid.uuid4().hex[:8]}.parquet"
            run = self.run(version)
            self.rest.upload(proxied_path(run.artifact_uri, f"{where}/{name}"), buffer.getvalue())

    def run(self, version: str) -> RunInfo:
        """The version's run, found or created."""
        if version not in self._runs:
            self._runs[version] = self._find_or_create_run(version)
        return self._runs[version]

    def _find_or_create_run(self, version: str) -> RunInfo:
        if self._experiment_id is None:
            self._experiment_id = self.rest.experiment_id(self.experiment, {RESOURCE_TAG: self.resource})
        chosen = version_run(self.rest, self._experiment_id, self.model, self.resource, version)
        if self.version_tag is not None:
            try:
                self.rest.set_version_tag(self.model, version, self.version_tag, f"runs:/{chosen.run_id}")
            except (SinkRefused, httpx.HTTPError) as error:  # a convenience: records still go to the run
                logger.warning(
                    "could not tag version %s with its payload run (%s)", version, type(error).__name__
                )
        return chosen
