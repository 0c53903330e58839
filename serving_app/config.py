"""Arguments of the serving application and its runtime `user_config`.

Ray hashes `build_app`'s args into the code version, so any change of them restarts every replica.
The default version therefore travels in `user_config`, which Ray applies in place via `reconfigure()`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving_app.pinning import MAX_POLICY_VERSIONS, REFUSE_ALL, PinningMode, PinPolicy

# A registry version number as MLflow prints it (bounded: a client-sent version string stays short).
VERSION_PATTERN = r"^[1-9][0-9]{0,9}$"
_VERSION_RE = re.compile(VERSION_PATTERN)


def is_version_number(text: str) -> bool:
    return _VERSION_RE.fullmatch(text) is not None  # `$` alone would let a trailing newline in


# What a Serve config names: the operator writes these, the app defines them.
IMPORT_PATH = "serving_app.app:build_app"
DEPLOYMENT_NAME = "ModelServer"


def max_ongoing_requests(max_batch_size: int) -> int:
    """Requests a replica takes at once: a batch can only fill up if that many are let in together
    (Ray's default of 5 would cap every batch at 5)."""
    return max(8, 2 * max_batch_size)


PayloadPart = Literal["inputs", "outputs"]


class CloudEventsSinkArgs(BaseModel):
    """Payload records posted as binary CloudEvents in KServe's logger format."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(pattern=r"^https?://[^\s]+$", max_length=2048)
    headers_env: str | None = Field(
        default=None,
        description="Env var holding extra request headers (`Name: value` lines), from a Secret key.",
    )


class PayloadArgs(BaseModel):
    """Sampled payload records (docs/monitoring.md): to the tracking server by default, or to a
    CloudEvents receiver."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sample_rate: float = Field(ge=0.0, le=1.0)
    include: tuple[PayloadPart, ...] = ("inputs", "outputs")
    max_record_bytes: int = Field(default=65536, ge=1024, le=16 * 1024 * 1024)
    # Where records go: the experiment (`regserve/<namespace>/<name>`) on the tracking server, or
    # a CloudEvents receiver.
    experiment: str = Field(min_length=1, max_length=500)
    cloudevents: CloudEventsSinkArgs | None = None
    namespace: str = Field(default="", max_length=253)
    resource: str = Field(default="", max_length=253)
    # The replica's queue and how often it is written out (the operator leaves the defaults).
    queue_records: int = Field(default=10_000, ge=10, le=1_000_000)
    flush_interval_s: float = Field(default=5.0, gt=0.0, le=300.0)


class DriftArgs(BaseModel):
    """Input and prediction drift against each version's reference (docs/monitoring.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_rows: int = Field(default=200, ge=1, le=10_000_000)
    psi_threshold: float = Field(default=0.2, gt=0.0, le=10.0)


class MonitoringArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    payloads: PayloadArgs | None = None
    drift: DriftArgs | None = None
    # Per-version figures (requests, errors, latency, drift) are kept in windows of this length.
    window_s: float = Field(default=300.0, ge=1.0, le=86400.0)

    @property
    def enabled(self) -> bool:
        return self.payloads is not None or self.drift is not None


class AppArgs(BaseModel):
    """What `serving_app.app:build_app` accepts (the `args` of a Serve config application)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(min_length=1, description="Registered model name in MLflow.")
    default_version: str | None = Field(
        default=None,
        pattern=VERSION_PATTERN,
        description="Version served when a request names none; optional when user_config carries it.",
    )
    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; defaults to the MLFLOW_TRACKING_URI env var."
    )
    max_models_per_replica: int = Field(default=2, ge=1, le=64)
    max_batch_size: int = Field(
        default=1, ge=1, le=1024, description="Largest batch the batcher forms; 1 turns batching off."
    )
    batch_wait_timeout_s: float = Field(default=0.0, ge=0.0, le=10.0)
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    auth_token_env: str | None = Field(
        default=None,
        description="Name of an env var holding a bearer token; when set, requests must present it.",
    )
    expose_schema_in_errors: bool = Field(
        default=True, description="Field-level detail in 422 answers; off hides the schema from callers."
    )
    registry_retry_after_s: int = Field(default=5, ge=1, le=600)
    pinned_cold_loads: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="Loads of pinned versions a replica does not hold, allowed at once and per "
        "`pinned_cold_load_window_s`; past that a cold pinned request is answered 429.",
    )
    pinned_cold_load_window_s: float = Field(default=10.0, gt=0.0, le=3600.0)
    monitoring: MonitoringArgs = Field(default_factory=MonitoringArgs)

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1


def app_args(raw: object) -> AppArgs:
    """`build_app`'s argument as Ray's config path, or a caller in Python, hands it over: the typed
    args, or a mapping validated by `AppArgs`. The error names each bad field and what it needs,
    without echoing the values given."""
    if isinstance(raw, AppArgs):
        return raw
    if not isinstance(raw, Mapping):
        raise TypeError(f"build_app takes AppArgs or a dict of its fields, got {type(raw).__name__}")
    try:
        return AppArgs.model_validate(dict(raw))
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or '(args)'}: {item['msg']}"
            for item in error.errors(include_url=False, include_input=False)
        )
        raise ValueError(f"invalid build_app args: {problems}") from None


def _version_as_text(value: object) -> object:
    # YAML writers turn "3" into 3; a registry version is text.
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


RolloutMode = Literal["smoke", "canary", "shadow"]
# An HTTP header name (RFC 9110 token), bounded.
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$"


class Candidate(BaseModel):
    """A version being rolled out next to the default (docs/rollouts.md): smoke-tested on every
    replica, then answering (canary) or shadowing (shadow) `percent`% of unpinned requests."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(pattern=VERSION_PATTERN)
    mode: RolloutMode
    percent: int = Field(default=0, ge=0, le=100)
    generation: int = Field(ge=0)
    sticky_header: str | None = Field(default=None, pattern=HEADER_NAME_PATTERN)

    _as_text = field_validator("version", mode="before")(_version_as_text)


def _versions_as_text(value: object) -> object:
    return [_version_as_text(item) for item in value] if isinstance(value, list) else value


PolicyVersions = list[Annotated[str, Field(pattern=VERSION_PATTERN)]]


class Pinning(BaseModel):
    """Which versions clients may pin (`serving_app.pinning`): the mode is the owner's
    `spec.serving.pinning`, the lists follow the registry and the operator's rollouts, so they travel
    in `user_config` (applied in place) and not in the args."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: PinningMode = "Compatible"
    allowed: PolicyVersions = Field(default_factory=list, max_length=MAX_POLICY_VERSIONS)
    refused: PolicyVersions = Field(default_factory=list, max_length=MAX_POLICY_VERSIONS)

    _as_text = field_validator("allowed", "refused", mode="before")(_versions_as_text)

    def policy(self) -> PinPolicy:
        return PinPolicy(mode=self.mode, allowed=frozenset(self.allowed), refused=frozenset(self.refused))


class UserConfig(BaseModel):
    """The in-place part of the application's configuration."""

    model_config = ConfigDict(extra="ignore")

    default_version: str | None = Field(default=None, pattern=VERSION_PATTERN)
    candidate: Candidate | None = None
    # Absent (an app deployed by hand, or by an operator from before pinning): today's behaviour.
    pinning: Pinning = Field(default_factory=Pinning)

    _as_text = field_validator("default_version", mode="before")(_version_as_text)

    @model_validator(mode="after")
    def _candidate_is_not_the_default(self) -> UserConfig:
        if self.candidate is not None and self.candidate.version == self.default_version:
            raise ValueError(f"candidate.version {self.candidate.version} is the default version itself")
        return self


def parse_user_config(raw: dict[str, Any] | None) -> tuple[UserConfig, str | None]:
    """`user_config` as the replica applies it: a broken `candidate` or `pinning` never takes the
    default down.

    Returns the config (without the candidate when the candidate part is invalid) and the
    candidate's validation error, if any; an invalid default version still raises. An invalid
    pinning policy becomes one that refuses every pinned request: failing closed."""
    try:
        return UserConfig.model_validate(raw or {}), None
    except ValidationError as error:
        # The only model-wide rule (no location) is the candidate's.
        broken = {str(item["loc"][0]) if item["loc"] else "candidate" for item in error.errors()}
        if not broken <= {"candidate", "pinning"} or not broken <= set(raw or {}):
            raise
        without = {key: value for key, value in (raw or {}).items() if key not in broken}
        if "pinning" in broken:
            without["pinning"] = {"mode": REFUSE_ALL.mode}
        config = UserConfig.model_validate(without)  # raises when the rest is wrong too
        return config, _candidate_errors(error) if "candidate" in broken else None


def pinning_error(raw: dict[str, Any] | None) -> str | None:
    """Why `user_config.pinning` was refused (the replica then refuses every pin), or None."""
    if "pinning" not in (raw or {}):
        return None
    try:
        Pinning.model_validate((raw or {})["pinning"])
    except ValidationError as error:
        return f"invalid pinning: {error.error_count()} error(s), first at " + ".".join(
            str(part) for part in error.errors(include_url=False)[0]["loc"]
        )
    return None


def _candidate_errors(error: ValidationError) -> str:
    parts = []
    for item in error.errors(include_url=False):
        if item["loc"] and item["loc"][0] != "candidate":
            continue
        where = ".".join(str(part) for part in item["loc"]) or "candidate"
        parts.append(f"{where}: {item['msg']}")
    return "invalid candidate: " + "; ".join(parts)


def candidate_generation(raw: dict[str, Any] | None) -> int | None:
    """The generation a (possibly invalid) candidate was written with: the report of a refused
    candidate carries it, so the operator sees its write was taken."""
    candidate = (raw or {}).get("candidate")
    generation = candidate.get("generation") if isinstance(candidate, dict) else None
    return generation if isinstance(generation, int) and not isinstance(generation, bool) else None
