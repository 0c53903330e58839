"""`spec.rollout`'s bounds and the canary steps' CEL rule as the real API server applies them."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from regserve_operator.spec import manifest

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = "regserve.io", "v1alpha1", "registeredmodelservings"


def _create(kube_api: client.ApiClient, namespace: str, rollout: dict[str, Any]) -> dict[str, Any]:
    body = manifest(
        "rollout-rules",
        {
            "model": {"name": "m", "alias": "champion"},
            "registry": {"trackingUri": "http://mlflow:5000"},
            "rollout": rollout,
        },
    )
    created: dict[str, Any] = client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, dry_run="All"
    )
    return created


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        ({"canary": {"steps": [50, 10]}}, "canary.steps must be strictly increasing"),
        ({"canary": {"steps": [10, 10, 50]}}, "canary.steps must be strictly increasing"),
        ({"canary": {"steps": [0, 50]}}, "should be greater than or equal to 1"),
        ({"canary": {"steps": [10, 100]}}, "should be less than or equal to 99"),
        ({"canary": {"steps": []}}, "should have at least 1 items"),
        ({"canary": {"maxErrorRate": 1.5}}, "maxErrorRate"),
        ({"canary": {"maxLatencyRatio": 0.5}}, "maxLatencyRatio"),
        ({"canary": {"minRequests": 0}}, "minRequests"),
        ({"shadow": {"percent": 0}}, "percent"),
        ({"shadow": {"maxDisagreementRate": -0.1}}, "maxDisagreementRate"),
        ({"strategy": "BlueGreen"}, "Unsupported value"),
    ],
)
def test_refused(
    kube_api: client.ApiClient, kube_namespace: str, rollout: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as refused:
        _create(kube_api, kube_namespace, rollout)
    assert refused.value.status == 422
    assert message in str(refused.value.body)


def test_defaults_filled_by_the_server(kube_api: client.ApiClient, kube_namespace: str) -> None:
    stored = _create(kube_api, kube_namespace, {"strategy": "Canary"})["spec"]["rollout"]
    assert stored["smokeTest"] is True
    assert stored["canary"] == {
        "steps": [10, 50],
        "stepSeconds": 60,
        "minRequests": 20,
        "maxErrorRate": 0.01,
        "maxLatencyRatio": 2.0,
    }
    assert stored["shadow"] == {"percent": 100, "durationSeconds": 300, "minComparisons": 20}


def test_increasing_steps_accepted(kube_api: client.ApiClient, kube_namespace: str) -> None:
    stored = _create(kube_api, kube_namespace, {"strategy": "Canary", "canary": {"steps": [1, 5, 25, 99]}})
    assert stored["spec"]["rollout"]["canary"]["steps"] == [1, 5, 25, 99]
