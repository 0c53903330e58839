"""What payload logging costs on the request path: the same application and model with payload logging
off, every request logged to MLflow, and every request logged to a CloudEvents receiver.

    .venv/bin/python -m bench.payloads [--rounds 3] [--duration 3] [--models sklearn,sklearn-cols]
        [--no-batched] [--no-in-process] [--profile 5]

(run from the repository root).

One Ray cluster (HAProxy ingress, `--ingress proxy` for the Python proxy) serves, per model, three
regserve applications side by side, one replica each: payload logging off (no `monitoring` args, as
shipped), `sample_rate: 1.0` to the MLflow sink (Parquet files through the tracking server's artifact
proxy, the operator's default) and `sample_rate: 1.0` to a CloudEvents receiver (a loopback HTTP server
in a process of its own, `--receiver-port`, that counts events and answers 202). Writer settings are
the operator's defaults (a 10,000-record queue, written every 1,000 records or 5 s). Models: `sklearn`
(scaler + logistic regression, tensor signature) and `sklearn-cols` (the same fitted on a DataFrame of
named double columns: a column signature, so the Parquet files get one column per input), one row per
request to `/serve`; `--batched` (the default) adds the three applications with `max_batch_size` 32 at
c=32.

Every round measures, per model and concurrency (c=1, c=32), off, mlflow and cloudevents in turn, so they
see the same machine load. A cell is a 1 s warm-up and a measured run from wrk (bench/wrk.py); for a
logged target the cell then waits until its replica's queue is empty, so each cell's records are
written within it and no target's writes land in another's cell. Around each cell the replica's CPU
time and the sink side's (the receiver process, or the tracking server's processes) are read from
/proc, and the replica's `/healthz` `payloads` figures: records logged in the cell against requests
answered in it.

Tables: medians over rounds and same-run ratios against logging off (and each round's own ratio); the
replica's CPU per request and the sink side's per record; after the run each logged application's
`/healthz` figures (logged, dropped, sink_error) against what arrived: Parquet rows (and distinct
request ids) read back from MLflow, events counted by the receiver (a request and a response event per
record). A run where records did not all arrive exits 1, so logging cannot be off unnoticed.

Where the time goes: first, in this process and without Ray (`--no-in-process` skips it), each part's
CPU for the same models: the request path's share (an id, the capture, the record, the queue's
offer), the garbage collector's time per request while each record (and the model input and output it
refers to) waits in the queue for its batch, and each sink's CPU per record written 1,000 at a time.
`--profile S` samples each unbatched replica for S s at c=32 with `py-spy record --gil` (the GIL's
holder: the replica's bottleneck) and buckets the samples. Writes bench/results/payloads.{json,md,png}
and payloads-profile-<app>.{txt,top.txt}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
from regserve_operator.local_ray import IngressMode
from regserve_operator.sandbox.models import log_sklearn_classifier
from regserve_operator.sandbox.processes import (
    free_port,
    session_members,
    start_and_wait,
    stop,
    wait_for,
)

from bench.common import (
    PYTHON,
    RESULTS,
    RayCluster,
    cell,
    check,
    exit_cleanly_on_sigterm,
    load,
    load_cells,
    markdown_table,
    median,
    regserve_app,
    save_json,
    stamp,
    start_mlflow,
    uptime,
)
from bench.profile_replica import bucket_of, replica_pid
from bench.serving import log_sklearn_columns

SINKS = ("off", "mlflow", "cloudevents")
CONCURRENCY = (1, 32)
WARMUP_S = 1.0
DRAIN_TIMEOUT_S = 60.0
THROUGHPUT_TARGET = 0.95  # c=32 req/s with every request logged, ÷ logging off
LATENCY_TARGET = 1.05  # c=1 p50 with every request logged, ÷ logging off

# py-spy buckets, first match wins: the sinks' own frames, then what only payload logging runs.
PROFILE_BUCKETS = (
    ("payload writer and sink", ("serving_app/monitoring/writer.py", "_sink.py", "monitoring/table.py")),
    ("pyarrow", ("pyarrow/",)),
    ("aiohttp (sink's client)", ("aiohttp/",)),
    ("payload capture (request path)", ("serving_app/monitoring/",)),
    ("model predict", ("sklearn/", "_predict_group")),
    ("regserve handler", ("serving_app/",)),
    ("ray serve replica", ("ray/serve/",)),
    ("asyncio/other", ("",)),
)


@dataclass(frozen=True)
class ModelCase:
    key: str
    name: str
    version: str
    body: Any  # one record for /serve


@dataclass(frozen=True)
class Target:
    case: ModelCase
    sink: str
    batch: int
    app: str
    base: str  # the application's URL

    @property
    def logged(self) -> bool:
        return self.sink != "off"


def register(tracking_uri: str, models: Sequence[str]) -> list[ModelCase]:
    cases = []
    if "sklearn" in models:
        version, samples, _ = log_sklearn_classifier(tracking_uri, "bench_payloads")
        cases.append(ModelCase("sklearn", "bench_payloads", version, [float(x) for x in samples[0]]))
    if "sklearn-cols" in models:
        version, record = log_sklearn_columns(tracking_uri, "bench_payloads_cols")
        cases.append(ModelCase("sklearn-cols", "bench_payloads_cols", version, record))
    return cases


def app_name(case: ModelCase, sink: str, batch: int) -> str:
    return f"{'payb' if batch > 1 else 'pay'}-{sink}-{case.key}"


def monitoring(sink: str, app: str, receiver_url: str) -> dict[str, Any]:
    """The application's `monitoring` args as the operator writes them for `sampleRate: 1.0`."""
    if sink == "off":
        return {}
    settings: dict[str, Any] = {
        "sample_rate": 1.0,
        "experiment": f"regserve/bench/{app}",
        "namespace": "bench",
        "resource": app,
    }
    if sink == "cloudevents":
        settings["cloudevents"] = {"url": receiver_url}
    return {"monitoring": {"payloads": settings}}


def plan(cases: Sequence[ModelCase], serve_url: str, *, batched: bool) -> list[Target]:
    batches = (1, 32) if batched else (1,)
    return [
        Target(case, sink, batch, app_name(case, sink, batch), f"{serve_url}/{app_name(case, sink, batch)}")
        for case in cases
        for batch in batches
        for sink in SINKS
    ]


def apps_for(targets: Sequence[Target], tracking_uri: str, receiver_url: str) -> list[dict[str, Any]]:
    return [
        regserve_app(
            t.app,
            t.case.name,
            t.case.version,
            tracking_uri,
            batch=t.batch,
            **monitoring(t.sink, t.app, receiver_url),
        )
        for t in targets
    ]


# ------------------------------------------------------------------------------ the receiver


@dataclass
class EventCounts:
    """Events by resource and type, and each resource's last request and response body (bounded)."""

    events: dict[str, collections.Counter[str]] = field(default_factory=dict)
    last: dict[str, dict[str, str]] = field(default_factory=dict)
    max_resources: int = 64

    def add(self, headers: dict[str, str], body: bytes) -> None:
        resource = headers.get("ce-inferenceservicename", "")[:253]
        if resource not in self.events and len(self.events) >= self.max_resources:
            resource = "(other)"
        kind = headers.get("ce-type", "")[:100]
        self.events.setdefault(resource, collections.Counter())[kind] += 1
        self.last.setdefault(resource, {})[kind] = body[:2000].decode(errors="replace")

    def as_json(self) -> bytes:
        return json.dumps({"events": self.events, "last": self.last}).encode()


MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
_ACCEPTED = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
_REFUSED = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Receiving(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies, nothing more: a receiver that costs the
    shared machine as little as a receiver can, so what is measured is the replica's side."""

    def __init__(self, counts: EventCounts) -> None:
        self.counts = counts
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and self._one_request():
            pass

    def _one_request(self) -> bool:
        assert self.transport is not None
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._refuse()
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY or "transfer-encoding" in headers:
            self._refuse()
            return False
        if len(self.buffer) < end + 4 + length:
            return False
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        if method == "GET" and path == "/counts":
            text = self.counts.as_json()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(text)
                + text
            )
        else:
            self.counts.add(headers, body)
            self.transport.write(_ACCEPTED)
        return True

    def _refuse(self) -> None:
        assert self.transport is not None
        self.transport.write(_REFUSED)
        self.transport.close()
        self.transport = None


def serve_receiver(port: int) -> None:
    """The CloudEvents receiver's process: counts events until it is stopped."""

    async def main() -> None:
        counts = EventCounts()
        server = await asyncio.get_running_loop().create_server(
            lambda: _Receiving(counts), "127.0.0.1", port, backlog=1024
        )
        async with server:
            await server.serve_forever()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
        return
    uvloop.run(main())


@dataclass
class Receiver:
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def counts(self) -> dict[str, Any]:
        return dict(httpx.get(f"http://127.0.0.1:{self.port}/counts", timeout=10).json())

    def start(self) -> Receiver:
        self.process = start_and_wait(
            [PYTHON, "-m", "bench.payloads", "--receiver-port", str(self.port)],
            log=self.workdir / "receiver.log",
            ready=self.counts,
            what="CloudEvents receiver",
            timeout=60,
        )
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


# ------------------------------------------------------------------------------ measuring


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pids: Iterable[int]) -> float:
    """User + system CPU seconds of the processes (all their threads), from /proc."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is the state (the 3rd field)
        ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICKS


def children(pid: int) -> list[int]:
    """The process's live children (a CloudEvents replica's sender process), from /proc."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in task.read_text().split()]
        except OSError:  # gone meanwhile
            continue
    return found


def payload_figures(target: Target) -> dict[str, Any]:
    """The replica's `/healthz` `payloads` (one replica per application, so its figures are the app's)."""
    health = httpx.get(f"{target.base}/healthz", timeout=10).json()
    return dict(health.get("payloads") or {})


def drain(target: Target) -> bool:
    """Wait until the replica's queue is empty: its records are written (or given up, then counted)."""
    try:
        wait_for(
            lambda: payload_figures(target).get("queued") == 0,
            timeout=DRAIN_TIMEOUT_S,
            interval=0.2,
            message=f"{target.app}'s payload queue empty",
        )
    except TimeoutError:
        return False
    return True


@dataclass
class Pids:
    replicas: dict[str, int]
    receiver: int
    tracking_server: int

    def sink_side(self, sink: str) -> list[int]:
        if sink == "cloudevents":
            return [self.receiver]
        return session_members(self.tracking_server)  # `mlflow server` and its workers


def measure_cell(target: Target, concurrency: int, duration: float, pids: Pids) -> dict[str, Any]:
    replica, sink_side = [pids.replicas[target.app]], pids.sink_side(target.sink)
    figures = payload_figures(target) if target.logged else {}
    senders = children(replica[0])  # started by the first write: there since the warm-up of round 1
    cpu_replica, cpu_sink, cpu_senders = cpu_s(replica), cpu_s(sink_side), cpu_s(senders)
    warm, result = load_cells(
        [
            cell(target.base + "/serve", target.case.body, concurrency=concurrency, duration_s=d, warmup_s=0)
            for d in (WARMUP_S, duration)
        ]
    )
    drained = drain(target) if target.logged else True
    after = payload_figures(target) if target.logged else {}
    answered = warm["requests"] + result["requests"]
    logged = after.get("logged", 0) - figures.get("logged", 0)
    return {
        **result,
        "answered": answered,
        "logged": logged,
        "drained": drained,
        "replica_cpu_us_per_request": (cpu_s(replica) - cpu_replica) / max(1, answered) * 1e6,
        "sink_cpu_us_per_record": (cpu_s(sink_side) - cpu_sink) / max(1, logged) * 1e6 if logged else 0.0,
        "sender_cpu_us_per_record": (cpu_s(senders) - cpu_senders) / max(1, logged) * 1e6 if logged else 0.0,
    }


def measure_round(
    targets: Sequence[Target], round_no: int, duration: float, pids: Pids
) -> list[dict[str, Any]]:
    samples = []
    for concurrency in CONCURRENCY:
        for target in targets:  # off, mlflow, cloudevents of one model and batching in turn
            if target.batch > 1 and concurrency == 1:
                continue  # one request at a time never makes a batch
            result = measure_cell(target, concurrency, duration, pids)
            samples.append(
                {
                    "model": target.case.key,
                    "batch": target.batch,
                    "sink": target.sink,
                    "app": target.app,
                    "c": concurrency,
                    "round": round_no,
                    **result,
                }
            )
            print(
                f"  {target.case.key:12} batch={target.batch:<2} c={concurrency:<2} {target.sink:11} "
                f"{result['rps']:6.0f} req/s p50 {result['p50_ms']:6.2f} ms p99 {result['p99_ms']:6.1f} ms "
                f"err {result['errors']} cpu {result['replica_cpu_us_per_request']:5.0f} us/req "
                f"logged {result['logged']}/{result['answered']}",
                flush=True,
            )
    return samples


# ------------------------------------------------------------------------------ what arrived


def mlflow_rows(tracking_uri: str, target: Target, into: Path) -> dict[str, Any]:
    """Parquet rows (and distinct request ids) of the target's run, read back as a dataset."""
    import mlflow
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(f"regserve/bench/{target.app}")
    if experiment is None:
        return {"rows": 0, "request_ids": 0, "files": 0, "note": "no experiment"}
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`regserve.model_version` = '{target.case.version}'"
    )
    if not runs:
        return {"rows": 0, "request_ids": 0, "files": 0, "note": "no run"}
    local = Path(
        mlflow.artifacts.download_artifacts(
            run_id=runs[0].info.run_id,
            artifact_path="payloads",
            tracking_uri=tracking_uri,
            dst_path=str(into / target.app),
        )
    )
    table = pq.read_table(local)
    return {
        "rows": table.num_rows,
        "request_ids": pc.count_distinct(table["request_id"]).as_py(),
        "files": len(list(local.rglob("*.parquet"))),
        "columns": [name for name in table.column_names if name.startswith(("input", "output"))],
        "runs": len(runs),
    }


def arrivals(
    targets: Sequence[Target], tracking_uri: str, receiver: Receiver, workdir: Path
) -> list[dict[str, Any]]:
    """Per logged application: its final `/healthz` figures and what its sink holds."""
    events = receiver.counts()
    rows = []
    for target in targets:
        if not target.logged:
            continue
        drain(target)
        figures = payload_figures(target)
        row: dict[str, Any] = {"app": target.app, "sink": target.sink, **figures}
        if target.sink == "mlflow":
            found = mlflow_rows(tracking_uri, target, workdir / "read-back")
            row.update(found)
            row["arrived"] = found["rows"]
            row["ok"] = found["rows"] == found["request_ids"] == figures.get("logged", -1)
        else:
            kinds = events["events"].get(target.app, {})
            requests_, responses = (
                kinds.get("org.kubeflow.serving.inference.request", 0),
                kinds.get("org.kubeflow.serving.inference.response", 0),
            )
            row.update({"request_events": requests_, "response_events": responses})
            row["arrived"] = min(requests_, responses)
            row["last_request_event"] = (
                events["last"].get(target.app, {}).get("org.kubeflow.serving.inference.request", "")[:200]
            )
            row["ok"] = requests_ == responses == figures.get("logged", -1)
        row["ok"] = bool(row["ok"]) and figures.get("logged", 0) > 0 and not figures.get("dropped", 0)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ in process


def in_process(cases: Sequence[ModelCase], tracking_uri: str, receiver_url: str) -> list[dict[str, Any]]:
    """Per model, in this process and without Ray: the CPU each part of payload logging costs."""
    import gc

    import mlflow

    from serving_app.monitoring.records import settled

    rows = []
    for case in cases:
        loaded = mlflow.pyfunc.load_model(f"models:/{case.name}/{case.version}")
        request = _one_request(case, loaded)
        retained, without = _gc_while_queued(request, retain=True), _gc_while_queued(request, retain=False)
        records = [settled(_record(*request())) for _ in range(1000)]  # as the writer hands them over
        rows.append(
            {
                "model": case.key,
                "gc_tracked_objects": len(gc.get_objects()),
                "capture_us": _capture_us(request),
                "settle_us": _settle_us(request),
                "gc_us_queued": retained - without,
                "mlflow_us": _sink_us(case, "mlflow", records, tracking_uri, receiver_url)[0],
                **dict(
                    zip(
                        ("cloudevents_us", "cloudevents_sender_us"),
                        _sink_us(case, "cloudevents", records, tracking_uri, receiver_url),
                        strict=True,
                    )
                ),
            }
        )
        print(f"  in process {rows[-1]}", flush=True)
    return rows


def _one_request(case: ModelCase, loaded: Any) -> Any:
    """A function answering one request as the replica does: the input as `/serve` builds it, predict."""
    import numpy as np
    import pandas as pd

    signature = loaded.metadata.signature

    def request() -> tuple[Any, list[Any], Any]:
        if isinstance(case.body, dict):
            model_input: Any = pd.DataFrame({k: [float(v)] for k, v in case.body.items()})
        else:
            model_input = np.asarray([case.body], dtype=np.float64)
        return model_input, list(loaded.predict(model_input)), signature

    return request


def _record(model_input: Any, outputs: list[Any], signature: Any) -> Any:
    from serving_app.monitoring.records import PayloadCapture, record_of, request_id

    capture = PayloadCapture(request_id(None), "serve")
    capture.model_input, capture.rows, capture.outputs, capture.signature = model_input, 1, outputs, signature
    return record_of(capture, model="m", version="1", choice="default", status=200, latency_ms=1.0)


def _capture_us(request: Any, n: int = 5000) -> float:
    """The request path's part: an id, the capture, the record, the queue's offer."""
    import time

    from serving_app.monitoring.writer import PayloadLog, WriterLimits

    log = PayloadLog(
        cast(Any, None), lambda _outcome, _n: None, WriterLimits(capacity=n + 1, batch_records=n + 1)
    )
    took = 0.0
    for _ in range(n):
        answered = request()
        started = time.perf_counter()
        log.offer(_record(*answered))
        took += time.perf_counter() - started
    return took / n * 1e6


def _settle_us(request: Any, n: int = 5000) -> float:
    """The writer's settling of a record (off the request path): a DataFrame input to its arrays."""
    import time

    from serving_app.monitoring.records import settled

    records = [_record(*request()) for _ in range(n)]
    started = time.perf_counter()
    for record in records:
        settled(record)
    return (time.perf_counter() - started) / n * 1e6


def _gc_while_queued(request: Any, *, retain: bool, n: int = 5000, batch: int = 1000) -> float:
    """The garbage collector's time per request when each request's record (and the model input and
    output it refers to) waits in the queue for a batch of `batch`, or is dropped at once."""
    import gc
    import time

    spent, started = [0.0], [0.0]

    def timed(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - started[0]

    from serving_app.monitoring.records import settled

    queued: list[Any] = []
    gc.callbacks.append(timed)
    try:
        for _ in range(n):
            record = _record(*request())
            if retain:
                queued.append(settled(record))  # as the writer keeps it once settled
            if len(queued) >= batch:
                queued = []
    finally:
        gc.callbacks.remove(timed)
    return spent[0] / n * 1e6


def _sink_us(
    case: ModelCase, sink: str, records: Sequence[Any], tracking_uri: str, receiver_url: str
) -> tuple[float, float]:
    """The sink's CPU per record over three writes of 1,000 records: this process (every thread), and
    the sink's own processes (the CloudEvents sender)."""
    import resource

    from serving_app.config import PayloadArgs
    from serving_app.monitoring.replica import sink_for

    app = f"in-process-{sink}-{case.key}"
    args = PayloadArgs.model_validate(monitoring(sink, app, receiver_url)["monitoring"]["payloads"])
    writer = sink_for(args, model=case.name, tracking_uri=tracking_uri, writer_id="bench")

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    async def write() -> tuple[float, float]:
        await writer.write(records[:10])  # the run (or the sender process) made first
        senders = children(os.getpid())
        before, before_senders = cpu(), cpu_s(senders)
        for _ in range(3):
            await writer.write(records)
        spent, spent_senders = cpu() - before, cpu_s(senders) - before_senders
        await writer.close()
        return spent / (3 * len(records)) * 1e6, spent_senders / (3 * len(records)) * 1e6

    return asyncio.run(write())


# ------------------------------------------------------------------------------ profile


def profile_replicas(targets: Sequence[Target], seconds: float, pids: Pids) -> dict[str, dict[str, float]]:
    """py-spy samples of the GIL's holder in each unbatched replica at c=32."""
    shares: dict[str, dict[str, float]] = {}
    for target in [t for t in targets if t.batch == 1]:
        result: dict[str, Any] = {}
        driver = threading.Thread(
            target=lambda t=target, r=result: r.update(
                load(t.base + "/serve", t.case.body, concurrency=32, duration_s=seconds + 2, warmup_s=0.5)
            )
        )
        driver.start()
        out = RESULTS / f"payloads-profile-{target.app}.txt"
        stacks = gil_profile(pids.replicas[target.app], seconds, out)
        driver.join()
        if target.logged:
            drain(target)
        key = f"{target.case.key} {target.sink}"
        shares[key] = bucket_shares(stacks)
        shares[key]["rps"] = float(result.get("rps", 0.0))
        write_top_frames(stacks, out.with_suffix(".top.txt"))
        print(f"  profile {key}: {shares[key]}", flush=True)
    return shares


def gil_profile(pid: int, seconds: float, out: Path) -> collections.Counter[str]:
    py_spy = str(Path(PYTHON).parent / "py-spy")
    command = [py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "--gil"]
    subprocess.run([*command, "--format", "raw", "-o", str(out)], capture_output=True, check=True)
    stacks: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        stacks[stack] += int(count)
    return stacks


def bucket_shares(stacks: collections.Counter[str]) -> dict[str, float]:
    total = sum(stacks.values()) or 1
    buckets: collections.Counter[str] = collections.Counter()
    for stack, count in stacks.items():
        buckets[bucket_of(stack, PROFILE_BUCKETS)] += count
    shares = {name: buckets[name] / total * 100 for name, _ in PROFILE_BUCKETS}
    shares["samples"] = float(total)
    return shares


def write_top_frames(stacks: collections.Counter[str], out: Path, top: int = 60) -> None:
    total = sum(stacks.values()) or 1
    frames: collections.Counter[str] = collections.Counter()
    for stack, count in stacks.items():
        for frame in set(stack.split(";")):
            frames[frame] += count
    lines = [f"{count / total * 100:5.1f}%  {frame[:200]}" for frame, count in frames.most_common(top)]
    out.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------ report


def summarise(samples: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int, int, str], list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["model"], s["batch"], s["c"], s["sink"]), []).append(s)
    rows = []
    for (model, batch, c, sink), group in groups.items():
        rows.append(
            {
                "model": model,
                "batch": batch,
                "c": c,
                "sink": sink,
                "rps": median([g["rps"] for g in group]),
                "p50_ms": median([g["p50_ms"] for g in group]),
                "p99_ms": median([g["p99_ms"] for g in group]),
                "replica_cpu_us": median([g["replica_cpu_us_per_request"] for g in group]),
                "sink_cpu_us": median([g["sink_cpu_us_per_record"] for g in group]),
                "sender_cpu_us": median([g.get("sender_cpu_us_per_record", 0.0) for g in group]),
                "errors": sum(g["errors"] for g in group),
                "answered": sum(g["answered"] for g in group),
                "logged": sum(g["logged"] for g in group),
                "drained": all(g["drained"] for g in group),
            }
        )
    return rows


def _logged(row: dict[str, Any]) -> str:
    if row["sink"] == "off":
        return ""
    # A cell whose queue did not empty in time paid for fewer writes than it made: say so.
    return f"{row['logged']}/{row['answered']}" + ("" if row["drained"] else " (queue not emptied)")


def round_ratios(samples: Sequence[dict[str, Any]], row: dict[str, Any], field_: str) -> list[float]:
    """The row's ratio to logging off in each round (each round's own off cell)."""
    cells = {
        (s["round"], s["sink"]): s[field_]
        for s in samples
        if (s["model"], s["batch"], s["c"]) == (row["model"], row["batch"], row["c"])
    }
    rounds = sorted({r for r, _ in cells})
    return [cells[(r, row["sink"])] / cells[(r, "off")] for r in rounds if (r, "off") in cells]


def ratio_table(samples: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    index = {(r["model"], r["batch"], r["c"], r["sink"]): r for r in rows}
    table = []
    for r in rows:
        off = index.get((r["model"], r["batch"], r["c"], "off"))
        per_round = round_ratios(samples, r, "rps" if r["c"] > 1 else "p50_ms")
        table.append(
            [
                r["model"],
                "on" if r["batch"] > 1 else "off",
                r["c"],
                r["sink"],
                r["rps"],
                r["p50_ms"],
                r["p99_ms"],
                r["rps"] / off["rps"] if off else float("nan"),
                r["p50_ms"] / off["p50_ms"] if off else float("nan"),
                ", ".join(f"{x:.2f}" for x in per_round) if r["sink"] != "off" else "",
                r["replica_cpu_us"],
                r["replica_cpu_us"] - off["replica_cpu_us"] if off else float("nan"),
                r["sender_cpu_us"] if r["sink"] == "cloudevents" else "",
                r["sink_cpu_us"] if r["sink"] != "off" else "",
                _logged(r),
                r["errors"],
            ]
        )
    return table


RATIO_HEADERS = [
    "model", "batching", "c", "payloads", "req/s", "p50 ms", "p99 ms", "req/s ÷ off", "p50 ÷ off",
    "per round (c=1: p50, c=32: req/s) ÷ off", "replica CPU µs/request", "µs/request over off",
    "replica's sender process CPU µs/record", "sink side CPU µs/record", "logged/answered", "errors",
]  # fmt: skip


def target_rows(rows: Sequence[dict[str, Any]], arrived: Sequence[dict[str, Any]]) -> list[list[Any]]:
    index = {(r["model"], r["batch"], r["c"], r["sink"]): r for r in rows}
    ok = {sink: all(a["ok"] for a in arrived if a["sink"] == sink) for sink in {a["sink"] for a in arrived}}
    table = []
    for model in sorted({r["model"] for r in rows}):
        for sink in SINKS[1:]:
            throughput = _ratio(index, (model, 1, 32), sink, "rps")
            latency = _ratio(index, (model, 1, 1), sink, "p50_ms")
            table.append(
                [
                    model,
                    sink,
                    throughput,
                    "yes" if throughput >= THROUGHPUT_TARGET else "**no**",
                    latency,
                    "yes" if latency <= LATENCY_TARGET else "**no**",
                    "yes" if ok.get(sink) else "**no**",
                ]
            )
    return table


TARGET_HEADERS = [
    "model", "payloads", "c=32 req/s ÷ off", f"≥ {THROUGHPUT_TARGET}", "c=1 p50 ÷ off", f"≤ {LATENCY_TARGET}",
    "every record arrived",
]  # fmt: skip


def _ratio(
    index: dict[tuple[str, int, int, str], dict[str, Any]], key: tuple[str, int, int], sink: str, f: str
) -> float:
    row, off = index.get((*key, sink)), index.get((*key, "off"))
    return float(row[f] / off[f]) if row and off else float("nan")


def arrival_table(arrived: Sequence[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            a["app"],
            a["sink"],
            a.get("logged", 0),
            a.get("dropped", 0),
            a.get("sink_error", 0),
            a.get("last_error") or "-",
            a.get("arrived", 0),
            a.get("request_ids", "-")
            if a["sink"] == "mlflow"
            else f"{a.get('request_events')} + {a.get('response_events')}",
            a.get("files", "-"),
            "yes" if a["ok"] else "**no**",
        ]
        for a in arrived
    ]


PART_HEADERS = [
    "model", "GC-tracked objects in the process", "request path: id, capture, record, queue µs/request",
    "GC µs/request while records wait in the queue (1,000)", "MLflow sink µs/record (1,000 a write)",
    "CloudEvents sink µs/record", "CloudEvents sender process µs/record",
]  # fmt: skip

ARRIVAL_HEADERS = [
    "application", "sink", "logged (/healthz)", "dropped", "sink_error", "last_error", "records at the sink",
    "distinct request ids / request + response events", "Parquet files", "all arrived, none dropped",
]  # fmt: skip


def report(
    samples: list[dict[str, Any]],
    arrived: list[dict[str, Any]],
    profiles: dict[str, dict[str, float]],
    parts: list[dict[str, Any]],
    args: argparse.Namespace,
    before: str,
) -> bool:
    rows = summarise(samples)
    header = (
        f"payload logging benchmark {stamp()}, {args.ingress} ingress, rounds={args.rounds}, "
        f"{args.duration} s per cell, medians over rounds\nload before: {before}\nload after: {uptime()}\n"
    )
    body = "\n\n".join(
        [
            markdown_table(TARGET_HEADERS, target_rows(rows, arrived)),
            markdown_table(RATIO_HEADERS, ratio_table(samples, rows)),
            "after the run: each logged application's /healthz payloads and what its sink holds\n\n"
            + markdown_table(ARRIVAL_HEADERS, arrival_table(arrived)),
        ]
    )
    if parts:
        body += "\n\nin process, without Ray: CPU of each part of payload logging\n\n" + markdown_table(
            PART_HEADERS,
            [
                [p["model"], p["gc_tracked_objects"], p["capture_us"], p["gc_us_queued"], p["mlflow_us"],
                 p["cloudevents_us"], p["cloudevents_sender_us"]]
                for p in parts
            ],
        )  # fmt: skip
    if profiles:
        names = [name for name, _ in PROFILE_BUCKETS]
        body += "\n\npy-spy --gil, c=32, % of the GIL holder's samples\n\n" + markdown_table(
            ["model, payloads", "req/s", "samples", *names],
            [[sink, p["rps"], int(p["samples"]), *[p[n] for n in names]] for sink, p in profiles.items()],
        )
    print("\n" + header + "\n" + body)
    save_json(
        "payloads",
        {"samples": samples, "rows": rows, "arrived": arrived, "profiles": profiles, "in_process": parts},
    )
    (RESULTS / "payloads.md").write_text(header + "\n" + body + "\n")
    plot(rows)
    return all(a["ok"] for a in arrived) and len(arrived) > 0


def plot(rows: Sequence[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = {(r["model"], r["batch"], r["c"], r["sink"]): r for r in rows}
    groups = sorted({(r["model"], r["batch"], r["c"]) for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(19, 4.5))
    for ax, f, title, line in (
        (axes[0], "rps", "req/s ÷ logging off", THROUGHPUT_TARGET),
        (axes[1], "p50_ms", "p50 ÷ logging off", LATENCY_TARGET),
        (axes[2], "replica_cpu_us", "replica CPU per request ÷ logging off", None),
    ):
        for i, sink in enumerate(SINKS[1:]):
            values = [_ratio(index, g, sink, f) for g in groups]
            ax.bar([x + i * 0.4 for x in range(len(groups))], values, width=0.4, label=sink)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        if line is not None:
            ax.axhline(line, color="red", linestyle="--", linewidth=0.8, label=f"target {line}")
        ax.set_xticks([x + 0.2 for x in range(len(groups))])
        ax.set_xticklabels([f"{m}\n{'batch ' if b > 1 else ''}c={c}" for m, b, c in groups], fontsize=8)
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("payload logging at sample_rate 1.0, same run (medians over rounds)")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "payloads.png", dpi=90)


# ------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds measured per cell")
    parser.add_argument("--models", default="sklearn,sklearn-cols")
    parser.add_argument("--ingress", default="haproxy", choices=["haproxy", "proxy"])
    parser.add_argument(
        "--batched", action=argparse.BooleanOptionalAction, default=True, help="batched apps at c=32"
    )
    parser.add_argument("--profile", type=float, default=0.0, help="py-spy seconds per replica at c=32")
    parser.add_argument(
        "--in-process",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each part's CPU in this process first (30 s)",
    )
    parser.add_argument("--receiver-port", type=int, help=argparse.SUPPRESS)  # the receiver's own process
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.receiver_port:
        serve_receiver(args.receiver_port)
        return
    before = uptime()
    print(f"# payload logging benchmark, {stamp()}\n# load before: {before}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="regserve-bench-payloads-"))
    exit_cleanly_on_sigterm()
    server = start_mlflow(workdir / "mlflow")
    receiver: Receiver | None = None
    cluster: RayCluster | None = None
    samples: list[dict[str, Any]] = []
    try:
        receiver = Receiver(workdir).start()
        cases = register(server.url, args.models.split(","))
        parts = in_process(cases, server.url, receiver.url) if args.in_process else []
        cluster = RayCluster(cast(IngressMode, args.ingress), workdir).start()
        targets = plan(cases, cluster.serve_url, batched=args.batched)
        cluster.deploy(apps_for(targets, server.url, receiver.url), timeout=900)
        for target in targets:
            check(target.base + "/serve", target.case.body)
        pids = Pids(
            {t.app: replica_pid(t.app) for t in targets}, _pid(receiver.process), _pid(server.process)
        )
        for round_no in range(args.rounds):
            print(f"round {round_no + 1}/{args.rounds}; load: {uptime()}", flush=True)
            samples += measure_round(targets, round_no, args.duration, pids)
            save_json("payloads-partial", {"samples": samples})
        profiles = profile_replicas(targets, args.profile, pids) if args.profile > 0 else {}
        arrived = arrivals(targets, server.url, receiver, workdir)
    finally:
        if cluster is not None:
            cluster.stop()
        if receiver is not None:
            receiver.stop()
        server.stop()
    if not report(samples, arrived, profiles, parts, args, before):
        print("\nCHECK FAILED: not every logged record arrived at its sink (see the table above)")
        sys.exit(1)


def _pid(process: subprocess.Popen[bytes] | None) -> int:
    assert process is not None
    return process.pid


if __name__ == "__main__":
    main()
