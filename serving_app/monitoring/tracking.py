"""The few calls to an MLflow tracking server's REST API that monitoring makes (find or create a served
version's run, log a window's metrics, upload a file through the artifact proxy), with a bounded client:
the mlflow client retries a server that is down for minutes per call and takes its settings from the
process environment. No pyarrow here: the operator (whose image has none) logs metrics with it."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from serving_app.mlmodel import Deadline, HasStatus, bounded_request

VERSION_TAG = "regserve.model_version"
MODEL_TAG = "regserve.model"
RESOURCE_TAG = "regserve.resource"
PROXIED_SCHEME = "mlflow-artifacts:"
_API = "/api/2.0/mlflow"
CALL_DEADLINE_S = 15.0


class SinkRefused(RuntimeError):
    """The tracking server answered with an error, or cannot take the records (a stable code)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


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
