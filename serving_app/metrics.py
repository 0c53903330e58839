"""Application metrics, exported by Ray's metrics agent next to Serve's own (deployment/replica tags added).

Serve already reports `serve_multiplexed_model_load_latency_ms` and friends; these add what only the
app knows: answers by version and status, default switches, evictions and batch sizes.

The series every request records go through a `RecordBuffer`: Ray's record costs about 12 µs a call
(tag checks, then the C++ metric), and a light request records three: made before its answer leaves,
they would delay it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger("ray.serve")

_LATENCY_BUCKETS_MS = [1.0, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
_LOAD_BUCKETS_MS = [50.0, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000]
_BATCH_BUCKETS = [1.0, 2, 4, 8, 16, 32, 64, 128, 256]


class Counter(Protocol):
    def inc(self, value: float = ..., tags: dict[str, str] = ...) -> Any: ...


class Histogram(Protocol):
    def observe(self, value: float, tags: dict[str, str] = ...) -> Any: ...


@dataclass
class ServingMetrics:
    requests: Counter
    latency: Histogram
    loads: Counter
    load_latency: Histogram
    evictions: Counter
    default_switches: Counter
    batch_size: Histogram
    # Rollouts (docs/rollouts.md): `phase` is the candidate's mode (smoke, canary, shadow) or "none".
    # (defaults: metrics built by hand, e.g. in tests, need not name them)
    version_requests: Counter = field(default_factory=lambda: _Null())
    version_latency: Histogram = field(default_factory=lambda: _Null())
    shadow_comparisons: Counter = field(default_factory=lambda: _Null())
    shadow_latency: Histogram = field(default_factory=lambda: _Null())
    # Payload records (serving_app.monitoring) by outcome: logged, dropped (queue full), sink_error.
    payloads: Counter = field(default_factory=lambda: _Null())

    @classmethod
    def create(cls) -> ServingMetrics:
        # Buffered: the series recorded on the request path, on the replica's loop. The others are
        # rare and recorded from threads too (an evicted version's release): written at once.
        buffer = RecordBuffer()
        return cls(
            requests=BufferedCounter(
                _counter(
                    "regserve_requests",
                    description="Requests answered, by route, version and HTTP status.",
                    tag_keys=("route", "version", "status"),
                ),
                buffer,
            ),
            latency=BufferedHistogram(
                _histogram(
                    "regserve_request_latency_ms",
                    description="Time to answer a request, by route and version.",
                    boundaries=_LATENCY_BUCKETS_MS,
                    tag_keys=("route", "version"),
                ),
                buffer,
            ),
            loads=_counter(
                "regserve_version_loads",
                description="Model version loads by outcome (loaded or an error code).",
                tag_keys=("version", "outcome"),
            ),
            load_latency=_histogram(
                "regserve_version_load_latency_ms",
                description="Time to load a model version from the registry.",
                boundaries=_LOAD_BUCKETS_MS,
                tag_keys=("version",),
            ),
            evictions=_counter(
                "regserve_version_evictions",
                description="Versions dropped from a replica's LRU.",
                tag_keys=("version",),
            ),
            default_switches=_counter(
                "regserve_default_switches",
                description="Attempts to switch the default version, by outcome.",
                tag_keys=("outcome",),
            ),
            batch_size=BufferedHistogram(
                _histogram(
                    "regserve_batch_size",
                    description="Requests per model call.",
                    boundaries=_BATCH_BUCKETS,
                    tag_keys=("version",),
                ),
                buffer,
            ),
            version_requests=BufferedCounter(
                _counter(
                    "regserve_version_requests",
                    description="Prediction requests by answering version, rollout phase and outcome "
                    "(ok, client_error, server_error).",
                    tag_keys=("version", "phase", "outcome"),
                ),
                buffer,
            ),
            version_latency=BufferedHistogram(
                _histogram(
                    "regserve_version_latency_ms",
                    description=(
                        "Time to answer a prediction request, by answering version and rollout phase."
                    ),
                    boundaries=_LATENCY_BUCKETS_MS,
                    tag_keys=("version", "phase"),
                ),
                buffer,
            ),
            shadow_comparisons=_counter(
                "regserve_shadow_comparisons",
                description="Shadow requests to the candidate by outcome (agree, disagree, error, dropped).",
                tag_keys=("version", "outcome"),
            ),
            shadow_latency=_histogram(
                "regserve_shadow_latency_ms",
                description="The candidate's predict time on shadow requests.",
                boundaries=_LATENCY_BUCKETS_MS,
                tag_keys=("version",),
            ),
            payloads=_counter(
                "regserve_payloads",
                description="Payload records by outcome: logged, dropped (the replica's queue was full), "
                "sink_error (the sink refused them past the retries).",
                tag_keys=("outcome",),
            ),
        )

    @classmethod
    def discard(cls) -> ServingMetrics:
        """Metrics that record nothing, for running the service outside a Ray replica."""
        null = _Null()
        return cls(null, null, null, null, null, null, null, null, null, null, null)  # one per series


def _counter(name: str, *, description: str, tag_keys: tuple[str, ...]) -> Counter:
    from ray.serve import metrics

    # Ray's stub types tag_keys as a 1-tuple; any tuple of names works.
    return metrics.Counter(name, description=description, tag_keys=tag_keys)  # type: ignore[arg-type]


def _histogram(
    name: str, *, description: str, boundaries: list[float], tag_keys: tuple[str, ...]
) -> Histogram:
    from ray.serve import metrics

    return metrics.Histogram(
        name,
        description=description,
        boundaries=boundaries,
        tag_keys=tag_keys,  # type: ignore[arg-type]
    )


class _Null:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        pass

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass


class RecordBuffer:
    """Metric records held until the event loop's next turn, then written to Ray together.

    The task answering a request ends (its answer sent) before the loop turns, so the records cost the
    request nothing; increments of one counter with the same tags in that turn become one record. Off
    the loop (no running loop in this thread) a record is written at once.
    """

    def __init__(self) -> None:
        self._counts: dict[
            tuple[int, tuple[tuple[str, str], ...]], tuple[Counter, dict[str, str], float]
        ] = {}
        self._observations: list[tuple[Histogram, float, dict[str, str]]] = []
        self._scheduled = False

    def count(self, counter: Counter, value: float, tags: dict[str, str] | None) -> None:
        key = (id(counter), tuple(tags.items()) if tags else ())
        held = self._counts.get(key)
        self._counts[key] = (counter, tags or {}, value + (held[2] if held else 0.0))
        self._schedule()

    def observe(self, histogram: Histogram, value: float, tags: dict[str, str] | None) -> None:
        self._observations.append((histogram, value, tags or {}))
        self._schedule()

    def _schedule(self) -> None:
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        counts, self._counts = self._counts, {}
        observations, self._observations = self._observations, []
        for counter, tags, total in counts.values():
            try:
                counter.inc(total, tags=dict(tags))
            except Exception as error:  # a metric must never take a request (or the loop) down
                log.warning("dropped a metric record: %s", error)
        for histogram, value, observed_tags in observations:
            try:
                histogram.observe(value, tags=observed_tags)
            except Exception as error:
                log.warning("dropped a metric record: %s", error)


@dataclass(frozen=True)
class BufferedCounter:
    counter: Counter
    buffer: RecordBuffer

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.buffer.count(self.counter, value, tags)


@dataclass(frozen=True)
class BufferedHistogram:
    histogram: Histogram
    buffer: RecordBuffer

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.buffer.observe(self.histogram, value, tags)
