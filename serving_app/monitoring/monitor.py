"""A replica's monitoring as the deployment sees it (`AppArgs.monitoring`): every prediction request's
id, and at its answer the window figures (and drift rows) of the answering version plus, when the
request is sampled, its payload record. In the background: the payload writer, the drift counting, the
reference profiles, and the completed windows pushed to the board to be summed over replicas."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, Protocol

from serving_app.config import MonitoringArgs
from serving_app.metrics import ServingMetrics
from serving_app.monitoring.profiles import VersionProfiles
from serving_app.monitoring.records import Choice, PayloadCapture, request_id, sampled
from serving_app.monitoring.replica import ReplicaPayloads, replica_payloads, writer_id
from serving_app.monitoring.window import ReplicaWindows, settled_window, sum_windows

logger = logging.getLogger("ray.serve")

MAX_SIGNATURES = 64
PAYLOAD_OUTCOMES = ("logged", "dropped", "sink_error")
TICK_S = 1.0  # drift rows are counted, and a completed window pushed, this often
SETTLE_GRACE_S = 3 * TICK_S + 2.0  # every live replica has pushed a window this long after its end


class WindowBoard(Protocol):
    async def push_window(self, wire: dict[str, Any]) -> None: ...

    async def windows(self) -> list[dict[str, Any]]: ...


class ReplicaMonitor:
    def __init__(
        self,
        args: MonitoringArgs,
        *,
        payloads: ReplicaPayloads | None,
        profiles: VersionProfiles,
        board: WindowBoard,
        payloads_problem: str | None = None,
    ) -> None:
        self.args = args
        self.payloads = payloads
        self.payloads_problem = payloads_problem
        self.profiles = profiles
        self.windows = ReplicaWindows(args.window_s, profiles.state, drift=args.drift is not None)
        self.board = board
        self._pushed_window: int | None = None
        self._signatures: dict[str, Any] = {}  # version -> its signature, as its answers showed it
        self._pushed_totals: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.payloads is not None:
            self.payloads.start()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.payloads is not None:
            await self.payloads.stop()

    # ------------------------------------------------------------------------------- requests

    def begin(self, sent_id: str | None, route: str) -> PayloadCapture:
        rid = request_id(sent_id)
        rate = self.payloads.args.sample_rate if self.payloads is not None else 0.0
        return PayloadCapture(rid, route, sampled=sampled(rid, rate))

    def finish(
        self, capture: PayloadCapture, *, version: str | None, choice: Choice, status: int, latency_ms: float
    ) -> None:
        if version is not None:
            # A request refused before predict knows no signature: its version's, so every file of a
            # version has the same columns.
            if capture.signature is None:
                capture.signature = self._signatures.get(version)
            elif version in self._signatures or len(self._signatures) < MAX_SIGNATURES:
                self._signatures[version] = capture.signature
            self.windows.record(version, status, latency_ms, capture.model_input, capture.outputs)
            if self.args.drift is not None and capture.model is not None:
                self.profiles.want(version, capture.model)
        if capture.sampled and self.payloads is not None:
            self.payloads.finish(
                capture, version=version, choice=choice, status=status, latency_ms=latency_ms
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
        """The candidate's shadow answer: its figures, and its record beside the stable one."""
        self.windows.record(version, 500 if error else 200, latency_ms, capture.model_input, outputs)
        if capture.sampled and self.payloads is not None:
            self.payloads.shadow(
                capture,
                version=version,
                outputs=outputs,
                error=error,
                latency_ms=latency_ms,
                signature=signature,
            )

    # ------------------------------------------------------------------------------- reports

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = {"problem": self.payloads_problem}
        if self.payloads is not None:
            body.update(self.payloads.figures())
        return body

    def _payload_window(self) -> dict[str, Any] | None:
        """What happened to payload records since the last push, and the sink's state now."""
        if self.payloads is None and self.payloads_problem is None:
            return None
        totals = dict(self.payloads.log.totals) if self.payloads is not None else {}
        since = {k: totals.get(k, 0) - self._pushed_totals.get(k, 0) for k in PAYLOAD_OUTCOMES}
        self._pushed_totals = totals
        last_error = self.payloads.log.last_error if self.payloads is not None else None
        return {**since, "problem": self.payloads_problem, "last_error": last_error}

    async def report(self) -> dict[str, Any]:
        """The newest completed window summed over every replica (this one's alone without the board)."""
        own = self.windows.completed_wire()
        try:
            wires = await self.board.windows()
        except Exception as error:
            logger.warning("monitoring board unavailable, answering this replica's figures: %s", error)
            wires = [own] if own is not None else []
        drift = self.args.drift
        index, figures = sum_windows(
            wires,
            psi_threshold=drift.psi_threshold if drift else 0.2,
            min_rows=drift.min_rows if drift else 1,
            index=settled_window(wires, now=time.time(), grace_s=SETTLE_GRACE_S),
        )
        window_s = self.args.window_s
        return {
            "window_s": window_s,
            "window_end": (index + 1) * window_s if index is not None else None,
            "replicas": sum(1 for wire in wires if wire.get("window") == index),
            "drift": drift is not None,
            "versions": {f.version: f.to_wire() for f in figures},
            "payloads": payload_summary([w.get("payloads") for w in wires if w.get("window") == index]),
        }

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self.windows.count_pending()
                wire = self.windows.completed_wire()
                if wire is not None and wire["window"] != self._pushed_window:
                    await self.board.push_window({**wire, "payloads": self._payload_window()})
                    self._pushed_window = wire["window"]
            except Exception as error:  # figures are best effort: serving never depends on them
                logger.warning("monitoring tick failed: %s", type(error).__name__)


def replica_monitor(
    args: MonitoringArgs,
    *,
    model: str,
    tracking_uri: str | None,
    replica_id: str,
    metrics: ServingMetrics,
    board: WindowBoard,
) -> ReplicaMonitor | None:
    """The replica's monitoring as `args` asks; None when it asks for none. Serving goes on without
    payload logging when its sink cannot be built (said in `/healthz`)."""
    if not args.enabled:
        return None
    payloads, problem = replica_payloads(
        args.payloads,
        model=model,
        tracking_uri=tracking_uri,
        writer_id=writer_id(replica_id),
        counter=metrics.payloads,
    )
    return ReplicaMonitor(
        args,
        payloads=payloads,
        profiles=VersionProfiles(tracking_uri, model),
        board=board,
        payloads_problem=problem,
    )


def payload_summary(parts: list[Any]) -> dict[str, Any] | None:
    """The replicas' payload figures of one window, summed; the problems and errors named once each."""
    parts = [part for part in parts if isinstance(part, dict)]
    if not parts:
        return None
    summary: dict[str, Any] = {k: sum(int(part.get(k) or 0) for part in parts) for k in PAYLOAD_OUTCOMES}
    summary["problems"] = sorted({str(p["problem"]) for p in parts if p.get("problem")})
    summary["errors"] = sorted({str(p["last_error"]) for p in parts if p.get("last_error")})
    return summary
