"""Drift on real replicas (docs/monitoring.md): a version logged with its training dataset, real Ray
Serve with two replicas, and `GET /monitoring` summing their windows. Unshifted traffic drifts in no
window; a client shifting one feature makes that feature (and the prediction it moves) drift within one
window, and nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.processes import wait_for

from tests.serving.conftest import app_config
from tests.support.monitored import MODEL, Traffic, log_with_training_data
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = [pytest.mark.ray, pytest.mark.slow]

WINDOW_S = 4.0


def monitoring(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/monitoring", timeout=10).json())


def judged_window(url: str, version: str, after: float) -> dict[str, Any] | None:
    """The version's figures of a window that ended after `after` and had enough rows for a verdict."""
    report = monitoring(url)
    figures = report["versions"].get(version)
    if report["window_end"] is None or report["window_end"] <= after or figures is None:
        return None
    drift = figures.get("drift") or {}
    return (
        {**figures, "window_end": report["window_end"], "replicas": report["replicas"]}
        if drift.get("enough_rows")
        else None
    )


@pytest.fixture(scope="module")
def version(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> str:
    return log_with_training_data(mlflow_server.url, tmp_path_factory.mktemp("drift-data"))


@pytest.fixture(scope="module")
def url(mlflow_server: MlflowServer, local_ray: LocalRay, version: str) -> Iterator[str]:
    config = app_config(
        "drift",
        model_name=MODEL,
        tracking_uri=mlflow_server.url,
        default_version=version,
        monitoring={"window_s": WINDOW_S, "drift": {"min_rows": 100, "psi_threshold": 0.2}},
    )
    config["deployments"][0]["num_replicas"] = 2
    with deployed_app(local_ray, config) as deployed:
        yield deployed


def test_unshifted_traffic_drifts_in_no_window_and_a_shifted_feature_does_within_one(
    url: str, version: str
) -> None:
    with Traffic(url) as traffic:
        first = wait_for(
            lambda: judged_window(url, version, 0.0),
            timeout=90,
            interval=0.5,
            message="a window with enough rows",
        )
        assert first["reference"] == "training"
        quiet = [first]
        while len(quiet) < 3:
            quiet.append(
                wait_for(
                    lambda: judged_window(url, version, quiet[-1]["window_end"]),
                    timeout=30,
                    interval=0.5,
                    message="the next window",
                )
            )
        for figures in quiet:
            assert figures["drift"]["drifted"] == [], figures
            assert figures["drift"]["predictions_drifted"] == [], figures
            assert figures["requests"] > 0 and figures["error_rate"] == 0.0
            assert figures["p50_ms"] is not None and figures["p95_ms"] >= figures["p50_ms"]

        traffic.shift = 2.0
        shifted_from = quiet[-1]["window_end"] + WINDOW_S  # the first window wholly after the shift
        shifted = wait_for(
            lambda: judged_window(url, version, shifted_from),
            timeout=30,
            interval=0.5,
            message="a window of shifted traffic",
        )
    assert shifted["drift"]["drifted"] == ["x"], shifted
    assert shifted["drift"]["input_psi"]["x"] > 0.2 > shifted["drift"]["input_psi"]["y"]
    assert "score" in shifted["drift"]["predictions_drifted"]
    assert shifted["replicas"] == 2, "both replicas' windows summed"
    assert traffic.failures == 0
