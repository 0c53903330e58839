"""A replica's part in a rollout (docs/rollouts.md): applying `user_config.candidate` (load and smoke
test the candidate), assigning each prediction request, counting answers per version, and sending
shadow requests after the stable answer. The decisions are `serving_app.rollout`'s pure functions."""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from serving_app.config import Candidate
from serving_app.counters import ReplicaCounters, RolloutKey, ShadowOutcome, SmokeResult
from serving_app.errors import ServingError
from serving_app.metrics import ServingMetrics
from serving_app.monitoring.monitor import ReplicaMonitor
from serving_app.registry import LoadedVersion
from serving_app.rollout import RequestRollout, ShadowInput, decide
from serving_app.service import ModelService, PredictJob
from serving_app.shadow import ShadowRunner, answers_agree
from serving_app.smoke import run_smoke

logger = logging.getLogger("ray.serve")

Predict = Callable[[PredictJob], Awaitable[list[Any]]]

# The candidate's load and smoke test run in reconfigure(); past this they count as failed.
SMOKE_TIMEOUT_S = 180.0
SMOKE_TIMEOUT_CODE = "smoke_timeout"


class ReplicaRollout:
    def __init__(
        self,
        service: ModelService,
        counters: ReplicaCounters,
        metrics: ServingMetrics,
        *,
        shadows: ShadowRunner | None = None,
    ) -> None:
        self.service = service
        self.counters = counters
        self.metrics = metrics
        self.shadows = shadows or ShadowRunner()
        self.candidate: Candidate | None = None
        self._smoke: SmokeResult | None = None  # the held candidate's result on this replica
        self._smoke_version: str | None = None  # the candidate being (or last) smoke-tested here
        self._smoke_task: asyncio.Future[None] | None = None  # its smoke test, while it runs
        self._random = random.Random()
        self.monitor: ReplicaMonitor | None = None  # set by the deployment when monitoring is on

    @property
    def phase(self) -> str:
        return self.candidate.mode if self.candidate is not None else "none"

    def smoke_passed(self) -> bool:
        return self._smoke is not None and self._smoke.state == "passed"

    # ------------------------------------------------------------------------------ reconfigure

    async def apply(
        self, candidate: Candidate | None, error: str | None = None, *, error_generation: int | None = None
    ) -> None:
        """Take the candidate `user_config` names (or the error that refused it, with the generation
        it was written with). Never raises: outcomes are recorded."""
        if candidate is not None:
            key = RolloutKey(candidate.generation, candidate.version, candidate.mode, candidate.percent)
        else:
            key = RolloutKey(generation=error_generation if error is not None else None)
        self.counters.start(key, time.time())
        if candidate is not None and self.service.ready and candidate.version == self.service.default.version:
            error = f"invalid candidate: version {candidate.version} is the default version itself"
        if error is not None or candidate is None:
            self._drop()
            if error is not None:
                self.counters.record_smoke(SmokeResult.failed("", "invalid_candidate", error))
            return
        if self._smoke_version != candidate.version:
            self._drop()  # another version: no traffic to anything until this one passed here
        self.candidate = candidate
        if self._smoke is not None:
            self.counters.record_smoke(self._smoke)
        elif self._smoke_task is None:
            # In the background: reconfigure() returns at once. Serve reconfigures only running replicas
            # and a starting replica serves nothing until its reconfigure() is done, so a candidate's load
            # must not hold either up. Until the result is in, the candidate answers nothing and the
            # report says pending.
            self._smoke_version = candidate.version
            self._smoke_task = asyncio.ensure_future(self._finish_smoke(candidate.version))

    async def _finish_smoke(self, version: str) -> None:
        result = await self._smoke_test(version)
        if self._smoke_version != version:
            return  # dropped meanwhile
        self._smoke, self._smoke_task = result, None
        if not self.smoke_passed():
            self.service.drop_candidate()  # held back: nothing may answer with it
            logger.error("candidate %s failed its smoke test: %s", version, result.message)
        self.counters.record_smoke(result)

    def _drop(self) -> None:
        self.candidate = None
        self._smoke = None
        self._smoke_version = None
        if self._smoke_task is not None:
            self._smoke_task.cancel()
            self._smoke_task = None
        self.service.drop_candidate()

    async def _smoke_test(self, version: str) -> SmokeResult:
        try:
            return await asyncio.wait_for(self._load_and_smoke(version), SMOKE_TIMEOUT_S)
        except TimeoutError:
            # reconfigure() runs this: a replica stuck in it would never get the config that drops the
            # candidate, and a starting one would not serve the stable version meanwhile.
            return SmokeResult.failed(
                version, SMOKE_TIMEOUT_CODE, f"load and smoke test not done within {SMOKE_TIMEOUT_S:.0f}s"
            )

    async def _load_and_smoke(self, version: str) -> SmokeResult:
        try:
            loaded = await self.service.hold_candidate(version)
        except ServingError as error:
            return SmokeResult.failed(version, error.code, error.message)
        except Exception as error:  # never let the candidate fail reconfigure()
            return SmokeResult.failed(version, "version_load_failed", f"{type(error).__name__}: {error}")
        return await run_smoke(loaded, self.service.args.model_name)

    # ---------------------------------------------------------------------------------- requests

    def begin(self, *, pinned: bool, sticky: Callable[[str], str | None]) -> RequestRollout:
        """The assignment of one prediction request (`sticky` reads a request header)."""
        candidate = self.candidate
        if candidate is None:
            return RequestRollout()
        value = sticky(candidate.sticky_header) if candidate.sticky_header else None
        return RequestRollout(
            decide(
                candidate,
                smoke_passed=self.smoke_passed(),
                pinned=pinned,
                draw=self._random.random(),
                sticky=value,
            )
        )

    async def predict(self, job: PredictJob, predict: Predict) -> list[Any]:
        """`predict(job)`, keeping a copy of the input for the candidate when the request is shadowed,
        and what was asked and answered when the request is sampled for payload logging."""
        state = self.service.request_rollout.get()
        capture = state.payload if state is not None else None
        if capture is not None:
            capture.model_input, capture.rows = job.model_input, job.rows
            capture.signature, capture.model = job.loaded.signature, job.loaded.model
        if state is None or not state.decision.shadow or state.pinned:
            answer = await predict(job)
        elif self.shadows.in_flight >= self.shadows.limit:
            # Over the bound the shadow would be dropped anyway: no copy of the input on the request path.
            state.shadow_dropped = True
            answer = await predict(job)
        else:
            kept = copy.deepcopy(job.model_input)  # the model may change its input in place
            answer = await predict(job)
            state.shadow_input = ShadowInput(kept, job.rows, job.params, answer, capture)
        if capture is not None:
            capture.outputs = answer
        return answer

    def finish(self, state: RequestRollout, status: int, latency_ms: float) -> None:
        """Count the answer for the version that gave it; then start its shadow request, if any."""
        version = state.version
        if version is None:
            return  # refused before a version was chosen (auth, bad version header): nobody's answer
        self.counters.record_request(version, status, latency_ms)
        if self.candidate is not None:
            # Per-version series labelled with the phase: only while a rollout is on (without one the
            # request series already carry the version).
            outcome = "ok" if status < 400 else "client_error" if status < 500 else "server_error"
            tags = {"version": version, "phase": self.phase}
            self.metrics.version_requests.inc(tags={**tags, "outcome": outcome})
            self.metrics.version_latency.observe(latency_ms, tags=tags)
        candidate = self.service.candidate
        if candidate is not None and state.shadow_dropped and status == 200:
            self._count_shadow(candidate.version, "dropped", 0.0)
            return
        if state.shadow_input is None or status != 200 or candidate is None:
            return
        shadow_input = state.shadow_input
        if not self.shadows.submit(lambda: self._compare(candidate, shadow_input)):
            self._count_shadow(candidate.version, "dropped", 0.0)

    async def _compare(self, candidate: LoadedVersion, shadow: ShadowInput) -> None:
        started = time.perf_counter()
        try:
            job = PredictJob(candidate, shadow.model_input, shadow.rows, shadow.params)
            result: Any = (await self.service.predict_many([job]))[0]
        except Exception as error:
            result = error
        latency_ms = (time.perf_counter() - started) * 1000
        if isinstance(result, BaseException):
            outcome: ShadowOutcome = "error"
        else:
            outcome = "agree" if answers_agree(shadow.stable_answer, result) else "disagree"
        self._count_shadow(candidate.version, outcome, latency_ms)
        if shadow.payload is not None and self.monitor is not None:
            failed = isinstance(result, BaseException)
            self.monitor.shadow(
                shadow.payload,
                version=candidate.version,
                outputs=None if failed else result,
                error=failed,
                latency_ms=latency_ms,
                signature=candidate.signature,
            )

    def _count_shadow(self, version: str, outcome: ShadowOutcome, latency_ms: float) -> None:
        self.counters.record_shadow(outcome, latency_ms)
        self.metrics.shadow_comparisons.inc(tags={"version": version, "outcome": outcome})
        if outcome != "dropped":
            self.metrics.shadow_latency.observe(latency_ms, tags={"version": version})
