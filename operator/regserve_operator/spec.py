"""The RegisteredModelServing resource: pydantic models of its spec and status.

These models are the single source of the CRD's OpenAPI schema (see `crd.py`): bounds, enums and
defaults are declared here once, and the API server enforces them at apply time. Cross-field rules
the API server must check are attached as CEL (`x-kubernetes-validations`).

Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
`manifest` builds a whole resource as clients send it (the demo, the deployments plugin, tests).
"""

from __future__ import annotations

import copy
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from serving_app.config import VERSION_PATTERN
from serving_app.pinning import PinningMode

GROUP = "regserve.io"
VERSION = "v1alpha1"
KIND = "RegisteredModelServing"
PLURAL = "registeredmodelservings"
SINGULAR = "registeredmodelserving"
SHORT_NAMES = ["rms"]


def manifest(
    name: str,
    spec: Mapping[str, Any],
    *,
    namespace: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A RegisteredModelServing as a client sends it. The spec is copied, not validated: the API
    server (or local mode) is the one to judge it, and callers need to send refused ones too."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    if labels is not None:
        metadata["labels"] = dict(labels)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": copy.deepcopy(dict(spec)),
    }


class _PlainDumper(yaml.SafeDumper):
    """Writes a value met twice out twice: files people read and edit carry no `&id001` anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def manifests_yaml(*manifests: Mapping[str, Any]) -> str:
    """Manifests as one multi-document YAML file, as `kubectl apply -f` and `regserve dev -f` read."""
    return yaml.dump_all([dict(m) for m in manifests], Dumper=_PlainDumper, sort_keys=False)


# CEL: exactly one selector. `has()` on an absent optional field is false.
EXACTLY_ONE_SELECTOR = (
    "(has(self.alias) ? 1 : 0) + (has(self.stage) ? 1 : 0) + (has(self.version) ? 1 : 0) == 1"
)


# CEL: a fixed replica count and autoscaling bounds cannot both be set.
REPLICAS_XOR_AUTOSCALING = "!(has(self.replicas) && has(self.autoscaling))"
MIN_NOT_ABOVE_MAX = "self.minReplicas <= self.maxReplicas"

# CEL: canary steps strictly increasing (Kubernetes' list library: `isSorted` is non-decreasing, and
# no value may appear twice).
STEPS_INCREASING = "self.isSorted() && self.all(x, self.filter(y, y == x).size() == 1)"
MAX_CANARY_STEPS = 10

# CEL on the spec (a transition rule: checked on updates only): a resource stays on the cluster it was
# created on. Moving it would leave the RayService it came from carrying it, or orphaned.
PLACEMENT_FIXED = (
    "has(self.placement) == has(oldSelf.placement) && "
    "(!has(self.placement) || self.placement.cluster == oldSelf.placement.cluster)"
)
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Names that end up in log lines and Events: no newline or escape sequence can forge either.
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f]+$"

# CEL (and the same rule in Python): no `user:password@` in the tracking URI. It would travel as plain
# text into the Ray pods' env, the Serve config's args, metric labels and logs; credentials belong in
# the Secret `credentialsSecretRef` names. The rule sits on the `registry` object, not on the string:
# the API server's refusal quotes the value it checked ("Invalid value: ..."), and an object is quoted
# as "object", so the password is not echoed into clients' terminals and audit logs.
NO_USERINFO = "!self.trackingUri.matches('^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@')"
# CEL (and Python): no dot segments, percent-encoding or backslashes in the tracking URI. The cluster
# policy's allowed prefixes compare text; `https://h/team-a/../team-b` starts with `https://h/team-a` and
# reaches /team-b. MLflow's tracking URIs need none of them.
PLAIN_PATH = (
    "!self.trackingUri.matches('://[^/]*/(.*/)?[.][.]?(/|$)') && !self.trackingUri.contains('%') "
    "&& !self.trackingUri.contains('\\\\')"
)
PLAIN_PATH_MESSAGE = (
    "registry.trackingUri must not contain dot segments (/./, /../), percent-encoding or backslashes"
)
_DOT_SEGMENT = re.compile(r"://[^/]*/(.*/)?[.][.]?(/|$)")
NO_USERINFO_MESSAGE = (
    "registry.trackingUri must not carry credentials (user:password@host): put them in the Secret "
    "named by registry.credentialsSecretRef"
)


# Lets the API server fill nested defaults when the whole section is left out.
_DEFAULT_EMPTY: dict[str, Any] = {"default": {}}


def _cel(rule: str, message: str) -> dict[str, Any]:
    return {"x-kubernetes-validations": [{"rule": rule, "message": message}]}


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class ModelSelector(_Model):
    """Which registered model, and which of its versions: exactly one of alias, stage, version."""

    model_config = ConfigDict(
        json_schema_extra=_cel(
            EXACTLY_ONE_SELECTOR, "set exactly one of model.alias, model.stage, model.version"
        )
    )

    name: str = Field(
        min_length=1,
        max_length=256,
        pattern=NO_CONTROL_CHARACTERS,
        description="Registered model name in MLflow.",
    )
    alias: str | None = Field(
        None,
        min_length=1,
        max_length=255,
        pattern=r"^[A-Za-z0-9_\-]+$",
        description="Serve the version this alias points at (recommended).",
    )
    stage: Literal["Staging", "Production", "Archived"] | None = Field(
        None, description="Serve the latest version in this stage (deprecated in MLflow; polled only)."
    )
    version: str | None = Field(None, pattern=VERSION_PATTERN, description="Serve this exact version.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSelector:
        # Same rule as the CEL one, for resources read from files (local mode) rather than the API server.
        if sum(x is not None for x in (self.alias, self.stage, self.version)) != 1:
            raise ValueError("set exactly one of model.alias, model.stage, model.version")
        return self

    def selector_text(self) -> str:
        """Short human form for `kubectl get`: `@champion`, `stage:Production`, `v3`."""
        if self.alias:
            return f"@{self.alias}"
        if self.stage:
            return f"stage:{self.stage}"
        return f"v{self.version}"


class SecretRef(_Model):
    name: str = Field(min_length=1, max_length=253, description="Secret in the resource's namespace.")


class SecretKeyRef(_Model):
    name: str = Field(min_length=1, max_length=253)
    key: str = Field(min_length=1, max_length=253)


class Registry(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": NO_USERINFO, "message": NO_USERINFO_MESSAGE},
                {"rule": PLAIN_PATH, "message": PLAIN_PATH_MESSAGE},
            ]
        }
    )

    tracking_uri: str = Field(
        # No query or fragment: MLflow needs neither, and a token there would show wherever the URI does.
        pattern=r"^https?://[^\s?#]+$",
        max_length=2048,
        description="MLflow tracking server URL, without credentials (those go in credentialsSecretRef).",
    )
    credentials_secret_ref: SecretRef | None = Field(
        None,
        description=(
            "Secret whose keys are environment variable names understood by MLflow and the artifact "
            "store (MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_ACCESS_KEY_ID, ...). The "
            "operator reads it with `get`; Ray pods get it by reference (envFrom), never as literal values."
        ),
    )
    poll_interval_seconds: int = Field(30, ge=2, le=86400, description="Registry polling interval.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_userinfo(cls, uri: str) -> str:
        # Same rule as the CEL one, for resources read from files (local mode).
        if "@" in urllib.parse.urlsplit(uri).netloc:
            raise ValueError(NO_USERINFO_MESSAGE)
        if _DOT_SEGMENT.search(uri) or "%" in uri or "\\" in uri:
            raise ValueError(PLAIN_PATH_MESSAGE)
        return uri


class Batching(_Model):
    max_batch_size: int = Field(1, ge=1, le=1024, description="1 disables batching.")
    batch_wait_timeout_ms: int = Field(10, ge=0, le=10000)


class Auth(_Model):
    """Bearer-token auth on the endpoint; the token comes from a Secret key."""

    token_secret_ref: SecretKeyRef


class Autoscaling(_Model):
    """Ray Serve replica autoscaling (the deployment's `autoscaling_config`); changes apply in place."""

    model_config = ConfigDict(
        json_schema_extra=_cel(MIN_NOT_ABOVE_MAX, "autoscaling.minReplicas must not exceed maxReplicas")
    )

    min_replicas: int = Field(
        1,
        ge=0,
        le=512,
        description=(
            "0 scales the application to no replicas when idle; the first request after that waits for a "
            "replica to start and is then answered (both ingress modes)."
        ),
    )
    max_replicas: int = Field(ge=1, le=512)
    target_ongoing_requests: float = Field(
        2.0, ge=0.1, le=1024, description="Requests in flight per replica that Serve scales towards."
    )
    upscale_delay_seconds: float = Field(30.0, ge=0, le=3600)
    downscale_delay_seconds: float = Field(600.0, ge=0, le=86400)

    @model_validator(mode="after")
    def _min_not_above_max(self) -> Autoscaling:
        # Same rule as the CEL one, for resources read from files (local mode).
        if self.min_replicas > self.max_replicas:
            raise ValueError("autoscaling.minReplicas must not exceed maxReplicas")
        return self


class Serving(_Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            REPLICAS_XOR_AUTOSCALING, "set serving.replicas or serving.autoscaling, not both"
        )
    )

    route_prefix: str | None = Field(
        None,
        pattern=r"^/[A-Za-z0-9._~\-/]*$",
        max_length=256,
        description="HTTP route prefix of the application; defaults to /<metadata.name>.",
    )
    max_models_per_replica: int = Field(2, ge=1, le=64, description="Versions a replica may hold at once.")
    # No schema default: the API server would fill it in and the CEL rule could not tell it was unset.
    replicas: int | None = Field(
        None, ge=1, le=512, description="Fixed replica count; 1 when neither this nor autoscaling is set."
    )
    autoscaling: Autoscaling | None = Field(
        None, description="Scale replicas with load instead of a fixed count (excludes `replicas`)."
    )
    cpus_per_replica: float = Field(1.0, ge=0.05, le=256)
    batching: Batching = Field(default_factory=Batching, json_schema_extra=_DEFAULT_EMPTY)
    ingress_mode: Literal["proxy", "haproxy"] = Field(
        "haproxy",
        description=(
            "haproxy (default): RAY_SERVE_ENABLE_HA_PROXY=1 in the Ray pods, measured 4.4x faster than the "
            "Python proxy at c=1 and stable at c=32 (bench/README.md); requests are not routed to the "
            "replica holding their version. proxy: Ray Serve's Python proxy, which keeps that affinity: "
            "prefer it with several replicas and several versions in traffic."
        ),
    )
    ingress_metrics: bool = Field(
        False,
        description=(
            "HAProxy ingress only: Ray's per-request ingress metrics (serve_num_http_requests, "
            "serve_http_request_latency_ms). Off by default: HAProxy sends a log line per request that Ray's "
            "HAProxy manager parses in Python, about 0.1 ms of a light request at c=1 (bench/README.md), and "
            "the regserve_requests metrics count every answer by route, version and status."
        ),
    )
    auth: Auth | None = None
    pinning: PinningMode = Field(
        "Compatible",
        description=(
            "Which versions a client may pin with the serve-multiplexed-model-id header (or a /v2 version "
            "path). Compatible (default): any version compatible with the default. Promoted: only versions "
            "an alias or the Staging/Production stage of the model points to, and versions that served "
            "this resource. Any: every version, held ones included. None: no pinned requests. In every mode "
            "but Any, versions the operator held or rolled back are refused. A refused pin is answered 403 "
            "version_not_allowed before anything is downloaded."
        ),
    )
    hide_schema_in_errors: bool = Field(False, description="Omit field-level detail from 422 answers.")
    access_log: bool = Field(
        False,
        description=(
            "Ray Serve's access log line per request in the replica's log. Off by default, as in MLServer: "
            "it costs about a tenth of a replica's CPU per light request (bench/README.md), and the "
            "regserve_requests metrics count every answer by route, version and status."
        ),
    )

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> Serving:
        # Same rule as the CEL one, for resources read from files (local mode).
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("set serving.replicas or serving.autoscaling, not both")
        return self

    def replica_bounds(self) -> tuple[int, int]:
        """(fewest, most) replicas Serve may run: equal for a fixed count."""
        if self.autoscaling is not None:
            return self.autoscaling.min_replicas, self.autoscaling.max_replicas
        fixed = self.replicas or 1
        return fixed, fixed


class Toleration(_Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Resources(_Model):
    accelerator: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto: GPU when the model's flavor and size call for it (see sizing)."
    )
    memory_multiplier: float = Field(
        2.0, ge=1.0, le=20.0, description="Replica memory per byte of serialized model."
    )
    gpu_node_selector: dict[str, str] | None = None
    gpu_tolerations: list[Toleration] | None = None


class UpgradeStrategy(_Model):
    type: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] = "NewCluster"


class RayServiceOverrides(_Model):
    """Passthrough settings for the generated RayService."""

    image: str | None = Field(None, max_length=512, description="Ray image with serving_app installed.")
    ray_version: str | None = Field(None, max_length=32)
    upgrade_strategy: UpgradeStrategy | None = None
    service_account_name: str | None = Field(None, max_length=253)
    image_pull_secrets: list[SecretRef] | None = None


class Canary(_Model):
    """Canary: each step sends its share of unpinned requests to the candidate, judged on the app's
    per-version counters."""

    steps: list[int] = Field(
        default_factory=lambda: [10, 50],
        min_length=1,
        max_length=MAX_CANARY_STEPS,
        description="Percent of unpinned requests the candidate answers at each step, strictly increasing.",
        json_schema_extra={
            "default": [10, 50],
            "items": {"type": "integer", "minimum": 1, "maximum": 99},
            **_cel(STEPS_INCREASING, "canary.steps must be strictly increasing"),
        },
    )
    step_seconds: int = Field(60, ge=1, le=86400, description="Least time a step lasts.")
    min_requests: int = Field(
        20, ge=1, le=1_000_000, description="Least candidate requests before a step is judged."
    )
    max_error_rate: float = Field(
        0.01, ge=0.0, le=1.0, description="Share of 5xx candidate answers above which it is rolled back."
    )
    max_latency_ratio: float = Field(
        2.0, ge=1.0, le=100.0, description="Candidate p95 above this times the stable p95 → rolled back."
    )

    @model_validator(mode="after")
    def _steps_increasing(self) -> Canary:
        # Same rules as the CRD's, for resources read from files (local mode).
        if any(not 1 <= x <= 99 for x in self.steps):
            raise ValueError("canary.steps must lie within 1-99")
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise ValueError("canary.steps must be strictly increasing")
        return self


class Shadow(_Model):
    """Shadow: a share of unpinned requests also goes to the candidate; answers are compared."""

    percent: int = Field(100, ge=1, le=100, description="Share of unpinned requests mirrored.")
    duration_seconds: int = Field(300, ge=1, le=86400, description="How long the candidate is shadowed.")
    min_comparisons: int = Field(
        20,
        ge=1,
        le=1_000_000,
        description="Mirrored requests judged (compared or failed) before a verdict; fewer wait.",
    )
    max_disagreement_rate: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=(
            "Promote when the disagreement rate after durationSeconds is within this; unset: report only "
            "(the default stays, the version is recorded with reason ShadowReported)."
        ),
    )


RolloutPhase = Literal["SmokeTest", "Canary", "Shadow", "Switching"]


class Rollout(_Model):
    strategy: Literal["Immediate", "Canary", "Shadow"] = Field(
        "Immediate", description="How traffic moves to a new version once it passed its gates."
    )
    smoke_test: bool = Field(
        True,
        description=(
            "Before any traffic moves, the replicas load the candidate and predict its input example "
            "(or a payload synthesized from its signature); a failure holds the version."
        ),
    )
    canary: Canary = Field(default_factory=Canary, json_schema_extra=_DEFAULT_EMPTY)
    shadow: Shadow = Field(default_factory=Shadow, json_schema_extra=_DEFAULT_EMPTY)
    allow_incompatible_version: str | None = Field(
        None,
        pattern=VERSION_PATTERN,
        description=(
            "Deliberately roll out this version although its signature is incompatible with the serving one "
            "(also retries it after a rollback)."
        ),
    )
    deadline_seconds: int = Field(
        600,
        ge=10,
        le=86400,
        description="A new version must be RUNNING within this time, or it is rolled back.",
    )


DEFAULT_WINDOW_SECONDS = 300
PayloadPart = Literal["inputs", "outputs"]
PAYLOAD_PARTS: tuple[PayloadPart, ...] = ("inputs", "outputs")


class MlflowSink(_Model):
    """Records as Parquet artifacts of one run per served version, in the experiment
    `regserve/<namespace>/<name>` of the resource's own tracking server (its credentials)."""


class HttpSink(_Model):
    url: str = Field(
        pattern=r"^https?://[^\s?#]+(\?[^\s#]*)?$",
        max_length=2048,
        description="Receiver of binary CloudEvents in KServe's payload logger format.",
    )
    headers_secret_ref: SecretKeyRef | None = Field(
        None,
        description=(
            "A key of a Secret in the resource's namespace holding extra request headers, one "
            "`Name: value` per line (an Authorization header, typically). The Ray pods read it by "
            "reference; a key that is not usable turns payload logging off and is reported."
        ),
    )


class PayloadSink(_Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            "has(self.mlflow) != has(self.http)",
            "set exactly one of payloads.sink.mlflow, payloads.sink.http",
        )
    )

    mlflow: MlflowSink | None = None
    http: HttpSink | None = None


class Payloads(_Model):
    """Sampled records of what each version receives and answers (docs/monitoring.md)."""

    sample_rate: float = Field(
        ge=0.0, le=1.0, description="Share of prediction requests logged, decided once per request id."
    )
    include: list[PayloadPart] = Field(
        default_factory=lambda: list(PAYLOAD_PARTS),
        max_length=2,
        description="What a record holds.",
        json_schema_extra={"default": list(PAYLOAD_PARTS)},
    )
    max_record_bytes: int = Field(
        65536,
        ge=1024,
        le=16 * 1024 * 1024,
        description="Inputs and outputs past this are left out of the record, which is marked truncated.",
    )
    sink: PayloadSink = Field(
        default_factory=lambda: PayloadSink(mlflow=MlflowSink()),
        json_schema_extra={"default": {"mlflow": {}}},
    )

    @model_validator(mode="after")
    def _one_sink(self) -> Payloads:
        # Same rule as the CEL one, for resources read from files (local mode).
        if (self.sink.mlflow is None) == (self.sink.http is None):
            raise ValueError("set exactly one of payloads.sink.mlflow, payloads.sink.http")
        return self


class Drift(_Model):
    """Input and prediction drift of live traffic against each version's own reference, per window."""

    reference: Literal["training"] = Field(
        "training",
        description=(
            "The training dataset logged on the version's run (`mlflow.log_input`, context training), "
            "else its input example (a weak reference, said in status)."
        ),
    )
    window_seconds: int = Field(
        300, ge=10, le=86400, description="Figures are computed, and drift judged, once per window."
    )
    min_rows: int = Field(200, ge=1, le=10_000_000, description="Fewer rows in a window give no verdict.")
    psi_threshold: float = Field(
        0.2, gt=0.0, le=10.0, description="A feature whose population stability index is over this drifted."
    )


class Monitoring(_Model):
    payloads: Payloads | None = Field(None, description="Payload logging; unset: off.")
    drift: Drift | None = Field(
        None,
        description=(
            "Per-version figures (requests, error rate, p50/p95 latency) and drift per window, in status, "
            "Prometheus and the version's MLflow run; unset: off."
        ),
    )

    @property
    def enabled(self) -> bool:
        return self.payloads is not None or self.drift is not None

    @property
    def window_seconds(self) -> int:
        return self.drift.window_seconds if self.drift is not None else DEFAULT_WINDOW_SECONDS


class Placement(_Model):
    cluster: str = Field(
        ...,
        pattern=DNS_LABEL,
        max_length=40,  # KubeRay derives Service names (<name>-serve-svc, <name>-head-svc) from it
        description=(
            "Name of a Ray cluster shared with the other resources of this namespace that name it: one "
            "RayService with an application per resource. Fixed once set."
        ),
    )


class RegisteredModelServingSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra=_cel(
            PLACEMENT_FIXED, "spec.placement cannot be added, removed or changed: re-create the resource"
        )
    )

    model: ModelSelector
    registry: Registry
    serving: Serving = Field(default_factory=Serving, json_schema_extra=_DEFAULT_EMPTY)
    resources: Resources = Field(default_factory=Resources, json_schema_extra=_DEFAULT_EMPTY)
    ray_service: RayServiceOverrides = Field(
        default_factory=RayServiceOverrides, json_schema_extra=_DEFAULT_EMPTY
    )
    rollout: Rollout = Field(default_factory=Rollout, json_schema_extra=_DEFAULT_EMPTY)
    paused: bool = Field(False, description="Stop rollouts; the serving version stays as it is.")
    monitoring: Monitoring = Field(default_factory=Monitoring, json_schema_extra=_DEFAULT_EMPTY)
    placement: Placement | None = Field(
        None, description="Share a Ray cluster with other resources (unset: a RayService of its own)."
    )


# ----------------------------------------------------------------------------------------------- status


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


FailureCause = Literal[
    "RegistryUnavailable",
    "LoadFailed",
    "DeployFailed",
    "Timeout",
    "CanaryFailed",
    "ShadowDisagreement",
    "CandidateDeleted",
]
"""Why a rollout failed. RegistryUnavailable: the serving side could not reach the registry to load
the version (not the version's fault: retried with back-off). LoadFailed: the app reported the
version's load as failed. DeployFailed: Ray Serve reported the application failed. Timeout: not
serving within `rollout.deadlineSeconds` (or no report of a stage within it). CanaryFailed: the
candidate's error share or p95 latency over the canary's limits. ShadowDisagreement: its answers
disagreed with the stable version's beyond `shadow.maxDisagreementRate`. CandidateDeleted: the
selector stopped resolving (the version or its alias deleted) while it was canaried or shadowed."""


class VersionRecord(_Model):
    """A version that was held back or rolled back; not retried until the selector moves."""

    version: str
    # SmokeTestFailed: the candidate failed its input example before any traffic moved (held).
    # ShadowReported: shadowed without maxDisagreementRate: the figures are in `message`, the default
    # stayed; tried again when the spec no longer asks for a report-only shadow.
    reason: Literal["Incompatible", "Unreadable", "RolledBack", "SmokeTestFailed", "ShadowReported"]
    # Why a rolled-back version failed; retries and back-off read this, never `message`.
    cause: FailureCause | None = None
    attempts: int | None = None  # rollouts of this version that failed in a row
    message: str = ""
    differences: list[str] | None = None
    at: str | None = None


class Figures(_Model):
    """One version's counters over a stage, summed over every replica (from the app's /rollout)."""

    requests: int = 0
    errors: int = 0
    p95_ms: float | None = None


class ShadowStatus(_Model):
    compared: int = 0
    disagreements: int = 0
    errors: int = 0
    p95_ms: float | None = None


class StageRecord(_Model):
    """One stage of the rollout in `rolloutVersion` (a canary step, the smoke test, the shadow) and its
    figures as last reported."""

    phase: RolloutPhase
    weight: int = 0
    generation: int = 0
    started_at: str
    verdict: Literal["Running", "Passed", "Failed", "Reported"] = "Running"
    stable: Figures | None = None
    candidate: Figures | None = None
    shadow: ShadowStatus | None = None
    message: str = ""


class HistoryEntry(_Model):
    version: str
    outcome: Literal["Serving", "Held", "RolledBack", "Superseded"]
    at: str
    message: str = ""


class Sizing(_Model):
    memory_bytes: int = 0
    gpus: int = 0
    basis: str = ""  # fingerprint of the spec fields sizing depends on (shrink only when they change)


class VersionFigures(_Model):
    """One version's figures in the last completed window, summed over every replica."""

    version: str
    requests: int = 0
    error_rate: float = 0.0  # share answered 5xx
    p50_ms: float | None = None  # the upper bound of the latency bucket holding the median
    p95_ms: float | None = None
    rows: int | None = None  # rows counted for drift
    reference: str | None = None  # training, inputExample (a weak reference), none, loading, unavailable
    reference_note: str | None = None
    input_psi: dict[str, float] | None = None  # the features with the highest PSI
    drifted: list[str] | None = None
    prediction_psi: dict[str, float] | None = None
    predictions_drifted: list[str] | None = None


class PayloadFigures(_Model):
    """Payload records of the last window, summed over replicas."""

    logged: int = 0
    dropped: int = 0  # a replica's queue was full
    sink_error: int = 0  # given up after the sink failed


class MonitoringStatus(_Model):
    window_end: str | None = None  # the end of the last window judged (ISO 8601)
    window_seconds: int | None = None
    versions: list[VersionFigures] | None = None
    payloads: PayloadFigures | None = None


class RegisteredModelServingStatus(_Model):
    model_config = ConfigDict(extra="allow")  # kopf keeps its own bookkeeping in status

    selector: str | None = None
    resolved_version: str | None = None
    serving_version: str | None = None
    last_good_version: str | None = None
    ray_service_name: str | None = None
    url: str | None = None
    model_size_bytes: int | None = None
    sizing: Sizing | None = None
    rejected: VersionRecord | None = None
    rollout_started_at: str | None = None
    rollout_version: str | None = None
    rollout_attempt: int | None = None  # 1 for a first rollout of `rollout_version`, n for its n-th retry
    # Progressive delivery (progressive.py): where the rollout of `rollout_version` is. An operator
    # restarted mid-canary resumes from these.
    rollout_phase: RolloutPhase | None = None
    rollout_step: int | None = None  # the canary step (0-based)
    rollout_weight: int | None = None  # percent of unpinned requests the candidate answers (or shadows)
    rollout_stage_started_at: str | None = None
    rollout_generation: int | None = None  # user_config.candidate.generation last written (never reset)
    rollout_stages: list[StageRecord] | None = None
    # The deployment state tags (tags.py) as last written to the registry: version → value.
    registry_tags: dict[str, str] | None = None
    monitoring: MonitoringStatus | None = None  # spec.monitoring's figures and drift (docs/monitoring.md)
    history: list[HistoryEntry] | None = None
    conditions: list[Condition] | None = None
    observed_generation: int | None = None
    revision: int | None = None  # bumped on every status write: orders our own writes


def parse_spec(raw: Any) -> RegisteredModelServingSpec:
    return RegisteredModelServingSpec.model_validate(dict(raw))


def parse_status(raw: Any) -> RegisteredModelServingStatus:
    return RegisteredModelServingStatus.model_validate(dict(raw or {}))


def status_to_wire(status: RegisteredModelServingStatus) -> dict[str, Any]:
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")
