"""The replica's core: which version is the default, which versions may answer, and predicting.

Framework-light on purpose (asyncio only): the Ray deployment in `app.py` owns routing and the
multiplexed LRU and hands this class a loader for pinned versions.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlflow.models.signature import ModelSignature

from serving_app.bounded import LruDict
from serving_app.compat import Signature, SignatureDifference, compare_signatures, signature_fingerprint
from serving_app.config import AppArgs, is_version_number
from serving_app.convert import concat_model_inputs, prediction_items, split_items
from serving_app.errors import (
    IncompatibleVersion,
    InvalidVersion,
    NotReady,
    PredictionFailed,
    ServingError,
    TooManyColdLoads,
    VersionLoadFailed,
    VersionNotAllowed,
)
from serving_app.metrics import ServingMetrics
from serving_app.pinning import LoadBucket, PinPolicy, pin_allowed, retry_after_header
from serving_app.registry import LoadedVersion, ModelRegistry, VersionFacts
from serving_app.rollout import RequestRollout
from serving_app.schema import ApiSchema, build_api_schema
from serving_app.timing import start_timing, step

logger = logging.getLogger("ray.serve")

# Versions whose facts, and (version, default) pairs whose verdicts, a replica remembers.
FACTS_CACHE_SIZE = 256
VERDICTS_CACHE_SIZE = 1024


@dataclass(frozen=True)
class DefaultVersion:
    """The default version and everything derived from it once, when it became the default."""

    loaded: LoadedVersion
    api: ApiSchema
    fingerprint: str

    @property
    def version(self) -> str:
        return self.loaded.version


@dataclass
class PredictJob:
    """One request's work: rows for one version, with the request's params."""

    loaded: LoadedVersion
    model_input: Any
    rows: int
    params: dict[str, Any] | None = None
    # The signature the input and params were enforced against; None when predict must enforce them.
    enforced_for: ModelSignature | None = None
    params_key: str = field(init=False)

    def __post_init__(self) -> None:
        self.params_key = json.dumps(self.params, sort_keys=True, default=str) if self.params else ""


@dataclass
class SwitchFailure:
    version: str
    error: str
    at: float
    code: str  # the ServingError's code: lets the operator tell a registry outage from a broken version

    def report(self, *, with_message: bool) -> dict[str, Any]:
        """The failure as `/metadata` (with the message) and `/healthz` (code only) show it."""
        report: dict[str, Any] = {"version": self.version, "code": self.code, "at": self.at}
        if with_message:
            report["error"] = self.error
        return report


class ModelService:
    """Everything a replica keeps (caches, downloads in flight, the default) is this object's, and
    bounded: a client cannot grow it by sending made-up version strings."""

    def __init__(
        self,
        args: AppArgs,
        registry: ModelRegistry,
        load_pinned: Callable[[str], Awaitable[LoadedVersion]],
        metrics: ServingMetrics,
    ):
        self.args = args
        self.metrics = metrics
        self._registry = registry
        self._load_pinned = load_pinned
        self._default: DefaultVersion | None = None
        self._switch_lock = asyncio.Lock()
        self._facts: LruDict[str, VersionFacts] = LruDict(FACTS_CACHE_SIZE)
        # Fetches in flight only (one per version, shared by its concurrent requests), gone once answered.
        self._facts_pending: dict[str, asyncio.Future[VersionFacts]] = {}
        # Keyed by (version, default fingerprint): a verdict holds only against the default it was made for.
        self._verdicts: LruDict[tuple[str, str], list[SignatureDifference]] = LruDict(VERDICTS_CACHE_SIZE)
        self.last_switch_failure: SwitchFailure | None = None
        # The rollout's candidate (docs/rollouts.md), held outside Ray's LRU like the default: a
        # pinned request for another version never evicts it, and the switch to it is not a load.
        self.candidate: LoadedVersion | None = None
        # Successful loads per version on this replica (a prewarmed switch adds none).
        self.version_loads: dict[str, int] = {}
        # What the request being answered was assigned (the deployment sets it per request; each
        # request runs in its own task, so its own context). Per service: no module state.
        self.request_rollout: contextvars.ContextVar[RequestRollout | None] = contextvars.ContextVar(
            f"regserve_request_rollout_{id(self)}", default=None
        )
        # Which versions clients may pin (`user_config.pinning`, applied by reconfigure()).
        self.pin_policy = PinPolicy()
        # Pinned versions in Ray's LRU (added on load, removed on eviction): a pin of one of these is warm.
        self._pinned_loaded: set[str] = set()
        self._cold_loads = LoadBucket.full(
            args.pinned_cold_loads, args.pinned_cold_load_window_s, time.monotonic()
        )
        # Cold pins admitted and not answered yet, per version: concurrent first requests for one
        # version share its token (bounded by the requests in flight).
        self._cold_admitted: dict[str, int] = {}
        self.in_flight = 0
        self.model_calls = 0
        self.largest_batch = 0

    # ------------------------------------------------------------------------------------ default

    @property
    def default(self) -> DefaultVersion:
        if self._default is None:
            raise NotReady("no default version loaded yet")
        return self._default

    @property
    def ready(self) -> bool:
        return self._default is not None

    async def set_default(self, version: str) -> None:
        """Make `version` the default. A failure keeps the old default answering and is recorded."""
        async with self._switch_lock:
            if self._default is not None and self._default.version == version:
                return
            held = (
                self.candidate if self.candidate is not None and self.candidate.version == version else None
            )
            try:
                loaded = held or await self._load_and_count(version)
                api = await asyncio.to_thread(_api_schema_for, loaded)
            except ServingError as error:
                self.last_switch_failure = SwitchFailure(version, error.message, time.time(), error.code)
                self.metrics.default_switches.inc(tags={"outcome": "failed"})
                if self._default is None:
                    raise
                logger.error("default stays %s: version %s failed: %s", self._default.version, version, error)
                return
            if held is not None:
                self.candidate = None  # promoted: the default now, no longer a candidate
            previous = self._default
            self._default = DefaultVersion(
                loaded, api, signature_fingerprint(_mlmodel_form(loaded.signature))
            )
            self._facts.put(version, VersionFacts(version, loaded.signature, ()))
            self.last_switch_failure = None
            self.metrics.default_switches.inc(tags={"outcome": "switched"})
            logger.info("default version %s → %s", previous.version if previous else "(none)", version)

    async def _load_and_count(self, version: str) -> LoadedVersion:
        started = time.perf_counter()
        try:
            loaded = await asyncio.to_thread(self._registry.load, version)
        except ServingError as error:
            self.metrics.loads.inc(tags={"version": version, "outcome": error.code})
            raise
        self.metrics.loads.inc(tags={"version": version, "outcome": "loaded"})
        if version in self.version_loads or len(self.version_loads) < FACTS_CACHE_SIZE:
            self.version_loads[version] = self.version_loads.get(version, 0) + 1
        self.metrics.load_latency.observe((time.perf_counter() - started) * 1000, tags={"version": version})
        return loaded

    async def hold_candidate(self, version: str) -> LoadedVersion:
        """Load `version` as the candidate (or keep the one held); errors are the caller's to record."""
        async with self._switch_lock:
            if self.candidate is not None and self.candidate.version == version:
                return self.candidate
            self.candidate = None
            loaded = await self._load_and_count(version)
            self.candidate = loaded
            return loaded

    def drop_candidate(self) -> None:
        self.candidate = None

    async def load_for_multiplexer(self, version: str) -> LoadedVersion:
        """The body of the deployment's `@serve.multiplexed` loader."""
        loaded = await self._load_and_count(version)
        evictions = self.metrics.evictions
        self._pinned_loaded.add(version)

        def released() -> None:
            self._pinned_loaded.discard(version)
            evictions.inc(tags={"version": version})

        loaded.on_release = released
        return loaded

    def set_pin_policy(self, policy: PinPolicy) -> None:
        """Apply the operator's policy; downloads started for versions it now refuses are dropped
        (their requests, past the gate, are refused before the load)."""
        self.pin_policy = policy
        for version in self._registry.prefetches.versions():
            if not self._pin_allowed(version):
                self._registry.prefetches.discard(version)

    def _pin_allowed(self, version: str) -> bool:
        default = self._default.version if self._default is not None else None
        candidate = self.candidate.version if self.candidate is not None else None
        return pin_allowed(self.pin_policy, version, default=default, candidate=candidate)

    def _check_pin(self, version: str) -> None:
        if not self._pin_allowed(version):
            raise VersionNotAllowed(f"version {version} may not be pinned on this model")

    def _admit_cold_load(self, version: str) -> None:
        """Take a token for a cold load of `version` (a request joining one already admitted takes
        none); TooManyColdLoads when the replica's bucket is empty."""
        if version in self._cold_admitted:
            self._cold_admitted[version] += 1
            return
        wait_s = self._cold_loads.take(time.monotonic())
        if wait_s > 0:
            raise TooManyColdLoads(
                f"this replica loads at most {self.args.pinned_cold_loads} versions it does not hold per "
                f"{self.args.pinned_cold_load_window_s:g}s; retry later or use a version already loaded",
                headers={"Retry-After": retry_after_header(wait_s)},
            )
        self._cold_admitted[version] = 1

    def _cold_load_done(self, version: str) -> None:
        left = self._cold_admitted.get(version, 0) - 1
        if left > 0:
            self._cold_admitted[version] = left
        else:
            self._cold_admitted.pop(version, None)

    # ----------------------------------------------------------------------------------- versions

    async def resolve(self, requested: str | None) -> LoadedVersion:
        """The loaded model that answers a request naming `requested` (None: the default, or the
        candidate when the request was assigned to the canary)."""
        loaded = await self._resolve(requested)
        state = self.request_rollout.get()
        if state is not None:
            state.version = loaded.version
            state.pinned = bool(requested)
        return loaded

    async def _resolve(self, requested: str | None) -> LoadedVersion:
        default = self.default
        if not requested:
            state = self.request_rollout.get()
            if state is not None and state.decision.candidate and self.candidate is not None:
                return self.candidate
            return default.loaded
        if requested == default.version:
            return default.loaded
        if not is_version_number(requested):
            raise InvalidVersion(f"version must be a registry version number, got {requested!r}")
        # Before anything is fetched: a refused version costs the registry nothing.
        self._check_pin(requested)
        held = self.candidate is not None and self.candidate.version == requested
        if held or requested in self._pinned_loaded:
            return await self._resolve_pinned(requested, default)
        known_incompatible = bool(self._verdicts.get((requested, default.fingerprint)))
        if not known_incompatible:
            self._admit_cold_load(requested)
        try:
            return await self._resolve_pinned(requested, default)
        finally:
            if not known_incompatible:
                self._cold_load_done(requested)

    async def _resolve_pinned(self, requested: str, default: DefaultVersion) -> LoadedVersion:
        start_timing()
        if (requested, default.fingerprint) not in self._verdicts:
            # Not judged yet, so most likely not loaded either: download while the signature is checked.
            self._registry.prefetches.start(requested)
        try:
            with step("gate"):
                differences = await self.differences(requested)
            if differences:
                raise IncompatibleVersion(
                    f"version {requested} is not compatible with the default version {default.version}",
                    detail=[
                        {"section": d.section, "field": d.field, "change": d.change, "message": d.detail}
                        for d in differences
                    ],
                )
            if self.candidate is not None and self.candidate.version == requested:
                return self.candidate  # pinned requests are unaffected by a rollout: it is loaded already
            self._check_pin(requested)  # the policy may have changed while the gate ran
            with step("pinned"):  # the multiplexer: a hit, or evicting the least recent and loading
                return await self._load_pinned(requested)
        finally:
            # Refused, or already in the LRU: the download (if any was left) is not needed.
            self._registry.prefetches.discard(requested)

    async def differences(self, version: str) -> list[SignatureDifference]:
        default = self.default
        key = (version, default.fingerprint)
        verdict = self._verdicts.get(key)
        if verdict is None:
            facts = await self._version_facts(version)
            verdict = compare_signatures(
                _mlmodel_form(default.loaded.signature), _mlmodel_form(facts.signature)
            )
            self._verdicts.put(key, verdict)
        return verdict

    async def _version_facts(self, version: str) -> VersionFacts:
        facts = self._facts.get(version)
        if facts is not None:
            return facts
        pending = self._facts_pending.get(version)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch_facts(version))
            self._facts_pending[version] = pending
        # Shielded: a caller that gives up does not cancel the fetch the others wait for.
        return await asyncio.shield(pending)

    async def _fetch_facts(self, version: str) -> VersionFacts:
        try:
            facts = await asyncio.to_thread(self._registry.fetch_facts, version)
        finally:
            self._facts_pending.pop(version, None)
        self._facts.put(version, facts)
        return facts

    # --------------------------------------------------------------------------------- predicting

    async def predict_many(self, jobs: Sequence[PredictJob]) -> list[list[Any] | ServingError]:
        """Predict several jobs, one model call per (version, params) group; errors stay per job."""
        results: list[list[Any] | ServingError] = [[] for _ in jobs]
        groups: dict[tuple[int, str, str], list[int]] = {}
        for index, job in enumerate(jobs):
            key = (id(job.loaded), job.params_key, type(job.model_input).__name__)
            groups.setdefault(key, []).append(index)
        for indexes in groups.values():
            group = [jobs[index] for index in indexes]
            self.metrics.batch_size.observe(len(group), tags={"version": group[0].loaded.version})
            self.model_calls += 1
            self.largest_batch = max(self.largest_batch, len(group))
            try:
                parts = await self._predict_group(group)
            except ServingError as error:
                parts = [error] * len(group)  # type: ignore[list-item]
            for index, part in zip(indexes, parts, strict=True):
                results[index] = part
        return results

    async def _predict_group(self, group: Sequence[PredictJob]) -> list[list[Any]]:
        model_input = concat_model_inputs([job.model_input for job in group])
        loaded = group[0].loaded
        predict = _predict_for(group, loaded)
        try:
            if loaded.predict_time.inline:
                prediction = _timed_predict(loaded, predict, model_input, group[0].params)
            else:
                prediction = await asyncio.to_thread(
                    _timed_predict, loaded, predict, model_input, group[0].params
                )
            items = prediction_items(prediction)
            return split_items(items, [job.rows for job in group])
        except Exception as error:  # the model's own code: report, never crash the replica
            raise PredictionFailed(f"version {loaded.version} failed to predict: {error}") from error

    # ---------------------------------------------------------------------------------- reporting

    def health(self) -> dict[str, Any]:
        """What `/healthz` says: open to probes even with auth on, so no message, only the stable code
        of a failed default switch."""
        body: dict[str, Any] = {"status": "ok" if self._default else "loading"}
        if self._default:
            body["default_version"] = self._default.version
        if self.last_switch_failure:
            body["last_default_switch_failure"] = self.last_switch_failure.report(with_message=False)
        return body

    def metadata(self, loaded_versions: Sequence[str]) -> dict[str, Any]:
        default = self._default
        failure = self.last_switch_failure
        return {
            "model_name": self.args.model_name,
            "default_version": default.version if default else None,
            "signature": _signature_json(default.loaded.signature) if default else None,
            "loaded_versions": sorted(
                {*loaded_versions, *(held.version for held in (default, self.candidate) if held)}, key=int
            ),
            "max_models_per_replica": self.args.max_models_per_replica,
            "batching": {
                "max_batch_size": self.args.max_batch_size,
                "batch_wait_timeout_s": self.args.batch_wait_timeout_s,
                "model_calls": self.model_calls,
                "largest_batch": self.largest_batch,
            },
            "last_default_switch_failure": failure.report(with_message=True) if failure else None,
            "candidate": self.candidate.version if self.candidate else None,
            "version_loads": dict(self.version_loads),
            "pinning": {
                "mode": self.pin_policy.mode,
                "allowed": sorted(self.pin_policy.allowed, key=int),
                "refused": sorted(self.pin_policy.refused, key=int),
            },
        }


def _enforced_for(job: PredictJob, loaded: LoadedVersion) -> bool:
    """Whether the job's input is enforced against `loaded`'s own signature (a pinned version's may
    differ from the default's, against which requests are parsed)."""
    enforced_for = job.enforced_for
    return enforced_for is not None and (enforced_for is loaded.signature or enforced_for == loaded.signature)


def _predict_for(group: Sequence[PredictJob], loaded: LoadedVersion) -> Callable[[Any, Any], Any]:
    """The version's predict without a second enforcement when every job's input had its one, else
    the model's own `predict`."""
    if loaded.enforced is not None and all(_enforced_for(job, loaded) for job in group):
        return loaded.enforced
    return loaded.model.predict


def _timed_predict(
    loaded: LoadedVersion, predict: Callable[[Any, Any], Any], model_input: Any, params: dict[str, Any] | None
) -> Any:
    """`predict`, its time recorded for the version (which decides where its next call runs)."""
    started = time.perf_counter()
    try:
        return predict(model_input, params)
    finally:
        loaded.predict_time.record((time.perf_counter() - started) * 1000)


def _mlmodel_form(signature: ModelSignature | None) -> Signature | None:
    """What `compat` compares: the signature as MLmodel stores it (compat stays free of mlflow)."""
    return signature.to_dict() if signature is not None else None


def _signature_json(signature: ModelSignature | None) -> dict[str, Any] | None:
    """The signature as JSON objects: MLmodel stores its inputs, outputs and params as JSON text."""
    if signature is None:
        return None
    return {
        part: json.loads(text) if isinstance(text, str) else text
        for part, text in signature.to_dict().items()
    }


def _api_schema_for(loaded: LoadedVersion) -> ApiSchema:
    try:
        return build_api_schema(loaded.signature, title="Model")
    except Exception as error:  # an exotic signature must not take the serving default down
        raise VersionLoadFailed(
            f"version {loaded.version}: cannot derive an API from its signature: {error}"
        ) from error
