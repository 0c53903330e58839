"""Operator settings, from the environment (prefix REGSERVE_), loaded once at startup and passed down."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from regserve_operator.registry import FACTS_CACHE_SIZE


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

    @property
    def probes_serving(self) -> bool:
        if self.probe_serving == "auto":
            return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        return self.probe_serving == "on"
