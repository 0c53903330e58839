"""The replica's core: which version is the default, which versions may answer, and predicting.

Framework-light on purpose (asyncio only): the Ray deployment in `app.py` owns routing and the
multiplexed LRU and hands this class a loader for pinned versions.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlflow.models.signature import ModelSignature

from serving_app import registry
from serving_app.compat import Signature, SignatureDifference, compare_signatures, signature_fingerprint
from serving_app.config import AppArgs
from serving_app.convert import concat_model_inputs, prediction_items, split_items
from serving_app.errors import (
    IncompatibleVersion,
    InvalidVersion,
    NotReady,
    PredictionFailed,
    RegistryUnavailable,
    ServingError,
    UnknownVersion,
    VersionLoadFailed,
)
from serving_app.metrics import ServingMetrics
from serving_app.registry import LoadedVersion, VersionFacts
from serving_app.schema import ApiSchema, build_api_schema

logger = logging.getLogger("ray.serve")

_VERSION_RE = re.compile(r"^[1-9][0-9]{0,9}$")


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
    params_key: str = field(init=False)

    def __post_init__(self) -> None:
        self.params_key = json.dumps(self.params, sort_keys=True, default=str) if self.params else ""


@dataclass
class SwitchFailure:
    version: str
    error: str
    at: float
    code: str  # the ServingError's code: lets the operator tell a registry outage from a broken version


class ModelService:
    def __init__(
        self,
        args: AppArgs,
        load_pinned: Callable[[str], Awaitable[LoadedVersion]],
        metrics: ServingMetrics,
        *,
        fetch_facts: Callable[[str, str], VersionFacts] = registry.fetch_version_facts,
        load_version: Callable[[str, str], LoadedVersion] = registry.load_version,
        prefetches: registry.Prefetches = registry.PREFETCHES,
    ):
        self.args = args
        self.metrics = metrics
        self._load_pinned = load_pinned
        self._fetch_facts = fetch_facts
        self._load_version = load_version
        self._prefetches = prefetches
        self._default: DefaultVersion | None = None
        self._switch_lock = asyncio.Lock()
        self._facts: dict[str, VersionFacts] = {}
        self._facts_locks: dict[str, asyncio.Lock] = {}
        # Keyed by (version, default fingerprint): a verdict holds only against the default it was made for.
        self._verdicts: dict[tuple[str, str], list[SignatureDifference]] = {}
        self.last_switch_failure: SwitchFailure | None = None
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
            try:
                loaded = await self._load_and_count(version)
                api = await asyncio.to_thread(_api_schema_for, loaded)
            except ServingError as error:
                self.last_switch_failure = SwitchFailure(version, error.message, time.time(), error.code)
                self.metrics.default_switches.inc(tags={"outcome": "failed"})
                if self._default is None:
                    raise
                logger.error("default stays %s: version %s failed: %s", self._default.version, version, error)
                return
            previous = self._default
            self._default = DefaultVersion(
                loaded, api, signature_fingerprint(_mlmodel_form(loaded.signature))
            )
            self._facts[version] = VersionFacts(version, loaded.signature, ())
            self.last_switch_failure = None
            self.metrics.default_switches.inc(tags={"outcome": "switched"})
            logger.info("default version %s → %s", previous.version if previous else "(none)", version)

    async def _load_and_count(self, version: str) -> LoadedVersion:
        started = time.perf_counter()
        try:
            loaded = await asyncio.to_thread(self._load_version, self.args.model_name, version)
        except ServingError as error:
            self.metrics.loads.inc(tags={"version": version, "outcome": error.code})
            raise
        self.metrics.loads.inc(tags={"version": version, "outcome": "loaded"})
        self.metrics.load_latency.observe((time.perf_counter() - started) * 1000, tags={"version": version})
        return loaded

    async def load_for_multiplexer(self, version: str) -> LoadedVersion:
        """The body of the deployment's `@serve.multiplexed` loader."""
        loaded = await self._load_and_count(version)
        evictions = self.metrics.evictions
        loaded.on_release = lambda: evictions.inc(tags={"version": version})
        return loaded

    # ----------------------------------------------------------------------------------- versions

    async def resolve(self, requested: str | None) -> LoadedVersion:
        """The loaded model that answers a request naming `requested` (None: the default)."""
        default = self.default
        if not requested or requested == default.version:
            return default.loaded
        if not _VERSION_RE.match(requested):
            raise InvalidVersion(f"version must be a registry version number, got {requested!r}")
        if (requested, default.fingerprint) not in self._verdicts:
            # Not judged yet, so most likely not loaded either: download while the signature is checked.
            self._prefetches.start(self.args.model_name, requested)
        try:
            differences = await self.differences(requested)
            if differences:
                raise IncompatibleVersion(
                    f"version {requested} is not compatible with the default version {default.version}",
                    detail=[
                        {"section": d.section, "field": d.field, "change": d.change, "message": d.detail}
                        for d in differences
                    ],
                )
            return await self._load_pinned(requested)
        finally:
            # Refused, or already in the LRU: the download (if any was left) is not needed.
            self._prefetches.discard(self.args.model_name, requested)

    async def differences(self, version: str) -> list[SignatureDifference]:
        default = self.default
        key = (version, default.fingerprint)
        if key not in self._verdicts:
            facts = await self._version_facts(version)
            self._verdicts[key] = compare_signatures(
                _mlmodel_form(default.loaded.signature), _mlmodel_form(facts.signature)
            )
        return self._verdicts[key]

    async def _version_facts(self, version: str) -> VersionFacts:
        if version in self._facts:
            return self._facts[version]
        lock = self._facts_locks.setdefault(version, asyncio.Lock())
        async with lock:
            if version not in self._facts:
                try:
                    facts = await asyncio.to_thread(self._fetch_facts, self.args.model_name, version)
                except (UnknownVersion, RegistryUnavailable):
                    raise
                self._facts[version] = facts
        return self._facts[version]

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
        try:
            prediction = await asyncio.to_thread(loaded.model.predict, model_input, group[0].params)
            items = prediction_items(prediction)
            return split_items(items, [job.rows for job in group])
        except Exception as error:  # the model's own code: report, never crash the replica
            raise PredictionFailed(f"version {loaded.version} failed to predict: {error}") from error

    # ---------------------------------------------------------------------------------- reporting

    def metadata(self, loaded_versions: Sequence[str]) -> dict[str, Any]:
        default = self._default
        failure = self.last_switch_failure
        return {
            "model_name": self.args.model_name,
            "default_version": default.version if default else None,
            "signature": default.loaded.signature.to_dict() if default and default.loaded.signature else None,
            "loaded_versions": sorted({*loaded_versions, *([default.version] if default else [])}, key=int),
            "max_models_per_replica": self.args.max_models_per_replica,
            "batching": {
                "max_batch_size": self.args.max_batch_size,
                "batch_wait_timeout_s": self.args.batch_wait_timeout_s,
                "model_calls": self.model_calls,
                "largest_batch": self.largest_batch,
            },
            "last_default_switch_failure": (
                {"version": failure.version, "error": failure.error, "code": failure.code, "at": failure.at}
                if failure
                else None
            ),
        }


def _mlmodel_form(signature: ModelSignature | None) -> Signature | None:
    """What `compat` compares: the signature as MLmodel stores it (compat stays free of mlflow)."""
    return signature.to_dict() if signature is not None else None


def _api_schema_for(loaded: LoadedVersion) -> ApiSchema:
    try:
        return build_api_schema(loaded.signature, title="Model")
    except Exception as error:  # an exotic signature must not take the serving default down
        raise VersionLoadFailed(
            f"version {loaded.version}: cannot derive an API from its signature: {error}"
        ) from error
