"""A replica's payload logging as the deployment sees it: the request id and sampling decision when a
prediction request arrives, the record when it is answered (and when its shadow is), the writer task
in the background. Built from `AppArgs.monitoring.payloads`; absent, nothing of this runs."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import httpx

from serving_app.config import PayloadArgs
from serving_app.metrics import Counter
from serving_app.mlmodel import RegistryAuth
from serving_app.monitoring.cloudevents_format import SinkHeadersInvalid, parse_headers
from serving_app.monitoring.cloudevents_sink import CloudEventsSink
from serving_app.monitoring.mlflow_sink import MlflowPayloadSink
from serving_app.monitoring.records import (
    Choice,
    PayloadCapture,
    record_of,
    settled,
)
from serving_app.monitoring.writer import PayloadLog, PayloadSink, WriterLimits

logger = logging.getLogger("ray.serve")


def writer_id(replica_id: str) -> str:
    """A file-name-safe, short id for the replica's payload files."""
    readable = re.sub(r"[^A-Za-z0-9-]", "", replica_id)[:24]
    return readable or hashlib.blake2b(replica_id.encode(), digest_size=6).hexdigest()


class SinkUnavailable(RuntimeError):
    pass


class SinkHeadersMissing(RuntimeError):
    pass


class ReplicaPayloads:
    def __init__(
        self,
        args: PayloadArgs,
        model: str,
        sink: PayloadSink,
        counter: Counter,
        limits: WriterLimits | None = None,
    ) -> None:
        self.args = args
        self.model = model
        self.log = PayloadLog(
            sink, lambda outcome, n: counter.inc(n, tags={"outcome": outcome}), limits, settle=settled
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.log.run())

    async def stop(self) -> None:
        self.log.stop()
        if self._task is not None:
            await self._task
        await self.log.sink.close()

    def figures(self) -> dict[str, Any]:
        """The replica's payload log for `/healthz`: queued now, totals by outcome, the sink's last error."""
        return {"queued": self.log.queued, **dict(self.log.totals), "last_error": self.log.last_error}

    def finish(
        self, capture: PayloadCapture, *, version: str | None, choice: Choice, status: int, latency_ms: float
    ) -> None:
        self.log.offer(
            record_of(
                capture,
                model=self.model,
                version=version,
                choice=choice,
                status=status,
                latency_ms=latency_ms,
            )
        )

    def shadow(
        self,
        capture: PayloadCapture,
        *,
        version: str,
        outputs: list[Any] | None,
        error: bool,
        latency_ms: float,
        signature: Any,
    ) -> None:
        """The candidate's shadow answer, beside the stable one under the same request id (with the
        candidate's own signature: its run's files have its columns)."""
        shadow = PayloadCapture(
            capture.request_id,
            capture.route,
            capture.started_at,
            capture.model_input,
            capture.rows,
            outputs,
            signature,
            "prediction_failed" if error else None,
        )
        self.finish(
            shadow, version=version, choice="shadow", status=500 if error else 200, latency_ms=latency_ms
        )


def sink_for(
    args: PayloadArgs,
    *,
    model: str,
    tracking_uri: str | None,
    writer_id: str,
    environ: Callable[[str], str | None] = os.environ.get,
) -> PayloadSink:
    """The sink `args` name. Raises `SinkHeadersInvalid` for a headers Secret that is not usable."""
    if args.cloudevents is not None:
        headers_text = None
        if args.cloudevents.headers_env:
            headers_text = environ(args.cloudevents.headers_env)
            if not headers_text:  # the Secret or its key is missing (the pod's env takes it as optional)
                raise SinkHeadersMissing("the sink's headers Secret key is missing or empty")
        return CloudEventsSink(
            args.cloudevents.url,
            headers=parse_headers(headers_text),
            source=f"/regserve/{args.namespace}/{args.resource}",
            resource=args.resource,
            namespace=args.namespace,
            include=args.include,
        )

    if not tracking_uri:
        raise SinkUnavailable("no tracking URI for the MLflow sink")

    def client() -> httpx.Client:
        return RegistryAuth.from_environment(os.environ).client(tracking_uri)

    return MlflowPayloadSink(
        client,
        experiment=args.experiment,
        model=model,
        resource=f"{args.namespace}/{args.resource}",
        writer_id=writer_id,
        inputs="inputs" in args.include,
        outputs="outputs" in args.include,
        max_record_bytes=args.max_record_bytes,
        version_tag=f"regserve.io/{args.namespace}/{args.resource}/payloads" if args.resource else None,
    )


def replica_payloads(
    args: PayloadArgs | None, *, model: str, tracking_uri: str | None, writer_id: str, counter: Counter
) -> tuple[ReplicaPayloads | None, str | None]:
    """The replica's payload logging, or (None, why) when it cannot run: serving goes on without it."""
    if args is None or args.sample_rate <= 0:
        return None, None
    try:
        sink = sink_for(args, model=model, tracking_uri=tracking_uri, writer_id=writer_id)
    except SinkHeadersMissing as error:
        logger.error("payload logging is off: %s", error)
        return None, "sink_headers_missing"
    except SinkHeadersInvalid as error:
        logger.error("payload logging is off: the sink's headers are not usable (%s)", error)
        return None, "sink_headers_invalid"
    except SinkUnavailable as error:
        logger.error("payload logging is off: %s", error)
        return None, "sink_unavailable"
    limits = WriterLimits(capacity=args.queue_records, flush_interval_s=args.flush_interval_s)
    return ReplicaPayloads(args, model, sink, counter, limits), None
