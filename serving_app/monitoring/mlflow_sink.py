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
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx
import pyarrow.parquet as pq

from serving_app.monitoring.records import PayloadRecord
from serving_app.monitoring.table import payload_table
from serving_app.monitoring.tracking import (
    RESOURCE_TAG,
    RunInfo,
    SinkRefused,
    TrackingRest,
    proxied_path,
    version_run,
)

logger = logging.getLogger("ray.serve")
PAYLOADS_DIR = "payloads"


def partition(at: float) -> str:
    moment = datetime.datetime.fromtimestamp(at, tz=datetime.UTC)
    return f"{PAYLOADS_DIR}/date={moment:%Y-%m-%d}/hour={moment:%H}"


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
