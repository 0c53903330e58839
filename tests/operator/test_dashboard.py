"""The chart's Grafana dashboard for rollouts: its queries name series the operator and the app really
export, with their labels, and the optional ConfigMap carries it for the Grafana sidecar."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from regserve_operator import metrics

from tests.install.support import docs, helm_template, of_kind

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "regserve" / "dashboards" / "rollouts.json"
APP_METRICS = (ROOT / "serving_app" / "metrics.py").read_text()


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]


def test_every_panel_queries_something_and_ids_are_unique() -> None:
    panels = _dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert all(p["targets"] and all(t["expr"].strip() for t in p["targets"]) for p in panels)
    titles = " ".join(p["title"] for p in panels)
    for wanted in ("phase", "weight", "Requests", "5xx", "p95", "Input drift", "Prediction drift"):
        assert wanted in titles


def test_queries_name_exported_series_with_their_labels() -> None:
    operator_series = {
        "regserve_rollout_phase": metrics.ROLLOUT_PHASE,
        "regserve_rollout_weight_percent": metrics.ROLLOUT_WEIGHT,
        "regserve_drift_psi": metrics.DRIFT_PSI,
        "regserve_window_requests": metrics.WINDOW_REQUESTS,
    }
    seen_operator, seen_app = set(), set()
    for expr in _exprs():
        for name, gauge in operator_series.items():
            for labels in re.findall(rf"{name}\{{([^}}]*)\}}", expr):
                seen_operator.add(name)
                used = set(re.findall(r"(\w+)!?=~?", labels))
                assert used <= set(gauge._labelnames), (name, used)
        for app_name in re.findall(r"ray_(regserve_\w+?)(?:_bucket|\(_total\)\?)", expr):
            seen_app.add(app_name)
            assert f'"{app_name}"' in APP_METRICS, app_name
    assert seen_operator == set(operator_series)
    assert {
        "regserve_version_requests",
        "regserve_version_latency_ms",
        "regserve_shadow_comparisons",
    } <= seen_app


def test_the_configmap_is_optional_and_carries_the_dashboard(helm_binary: Path) -> None:
    assert not of_kind(docs(helm_template(helm_binary)), "ConfigMap")
    rendered = docs(helm_template(helm_binary, "grafana.dashboard.enabled=true"))
    (configmap,) = of_kind(rendered, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["regserve-rollouts.json"]) == _dashboard()
