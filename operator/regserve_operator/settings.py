"""Operator settings, from the environment (prefix REGSERVE_), loaded once at startup and passed down."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from regserve_operator.policy import Policy
from regserve_operator.registry import FACTS_CACHE_SIZE
from regserve_operator.sizing import GiB


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="REGSERVE_", extra="ignore")

    image: str = Field(
        "ghcr.io/regserve/regserve:0.1.0", description="Default Ray image (must have serving_app installed)."
    )
    ray_version: str = "2.60.0"
    tick_seconds: float = Field(
        1.0, gt=0, le=60, description="How often the loop looks for resources that are due (cheap, no I/O)."
    )
    reconcile_workers: int = Field(
        4,
        ge=1,
        le=64,
        description="Resources reconciled at once. Each waits mostly on MLflow and the API server; one slow "
        "registry then holds up this many, not every resource.",
    )
    pass_deadline_seconds: float = Field(
        5.0,
        gt=0,
        le=600,
        description="How long a pass waits for one resource, and a resource for a registry search another "
        "one started. A resource still running then (a slow registry: its calls end within 30 s) goes on "
        "by itself and writes its status when done; the others are not held up.",
    )
    settle_seconds: float = Field(
        10.0, ge=0, description="A rollout counts as done after the app is RUNNING this long after the patch."
    )
    webhook_host: str = "0.0.0.0"
    webhook_port: int = Field(8080, ge=0, le=65535, description="0 disables the webhook receiver.")
    webhook_secret: SecretStr | None = Field(None, description="Shared secret MLflow signs deliveries with.")
    metrics_port: int = Field(9090, ge=0, le=65535, description="0 disables the Prometheus endpoint.")
    probe_serving: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Confirm rollouts by asking the app's /healthz which default answers; auto: when "
        "running in a cluster (the Serve Services' names resolve only there).",
    )
    facts_cache_size: int = Field(
        FACTS_CACHE_SIZE,
        ge=16,
        description="Registry versions whose facts (signature, size, flavors) are kept. Every pass reads "
        "the facts of the version its resource carries: keep this above the number of versions in use, "
        "or each pass costs an MLflow request per resource.",
    )
    image_pins: dict[str, str] = Field(
        default_factory=dict,
        description='Packages pinned in the serving image, as JSON ({"mlflow": "3.17.2"}): versions whose '
        "requirements differ get RequirementsMatch=False (a warning).",
    )

    # Tenant policy (policy.py; the chart's `policy.*` values, also enforced at admission). On by
    # default; a single-team install turns every check off with REGSERVE_POLICY_ENABLED=false.
    policy_enabled: bool = Field(True, description="Enforce the policy_* limits below.")
    policy_tracking_uri_prefixes: list[str] = Field(
        default_factory=list,
        description="JSON list: tracking URIs must start with one of these (at a path boundary); empty: any.",
    )
    policy_images: list[str] = Field(
        default_factory=list,
        description="JSON list: images spec.rayService.image may name; empty: the default image only.",
    )
    policy_service_accounts: list[str] = Field(
        default_factory=list,
        description="JSON list: ServiceAccounts spec.rayService.serviceAccountName may name; empty: none.",
    )
    policy_allow_gpus: bool = Field(False, description="Allow GPU workers (accelerator gpu, or auto sizing).")
    policy_allow_gpu_placement: bool = Field(
        False, description="Allow spec.resources.gpuNodeSelector and gpuTolerations."
    )
    policy_max_replicas: int = Field(
        8,
        ge=1,
        le=512,
        description="Most replicas a resource may ask for (fixed or autoscaling.maxReplicas).",
    )
    policy_max_replica_memory_gib: int = Field(
        32, ge=1, le=4096, description="Most memory one replica may be sized to, in GiB."
    )

    policy_allow_artifact_reads_outside_proxy: bool = Field(
        False,
        description="Let the operator read a version's MLmodel where the registry says its artifacts are "
        "(s3://, gs://, an http store, another host) with the resource's keys, from the operator's network; "
        "off: only through the tracking server's artifact proxy.",
    )

    def policy(self) -> Policy:
        return Policy(
            enabled=self.policy_enabled,
            tracking_uri_prefixes=tuple(self.policy_tracking_uri_prefixes),
            images=tuple(self.policy_images),
            service_accounts=tuple(self.policy_service_accounts),
            allow_gpus=self.policy_allow_gpus,
            allow_gpu_placement=self.policy_allow_gpu_placement,
            max_replicas=self.policy_max_replicas,
            max_replica_memory_bytes=self.policy_max_replica_memory_gib * GiB,
            artifact_reads_outside_proxy=self.policy_allow_artifact_reads_outside_proxy,
        )

    @property
    def probes_serving(self) -> bool:
        if self.probe_serving == "auto":
            return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        return self.probe_serving == "on"
