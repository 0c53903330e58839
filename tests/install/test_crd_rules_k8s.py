"""The CRD's cross-field rules (CEL) as the real API server applies them to RegisteredModelServings."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from regserve_operator.spec import manifest

pytestmark = pytest.mark.k8s

GROUP, VERSION, PLURAL = "regserve.io", "v1alpha1", "registeredmodelservings"


def _resource(serving: dict[str, Any]) -> dict[str, Any]:
    return manifest(
        "cel",
        {
            "model": {"name": "m", "alias": "champion"},
            "registry": {"trackingUri": "http://mlflow:5000"},
            "serving": serving,
        },
    )


def _create(kube_api: client.ApiClient, namespace: str, serving: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, _resource(serving), dry_run="All"
    )
    return created


@pytest.mark.parametrize(
    ("serving", "message"),
    [
        (
            {"replicas": 2, "autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
            "set serving.replicas or serving.autoscaling, not both",
        ),
        ({"autoscaling": {"minReplicas": 5, "maxReplicas": 4}}, "minReplicas must not exceed maxReplicas"),
        ({"autoscaling": {"minReplicas": 1}}, "maxReplicas: Required value"),
        ({"pinning": "Sometimes"}, "spec.serving.pinning: Unsupported value"),
    ],
)
def test_refused(
    kube_api: client.ApiClient, kube_namespace: str, serving: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as refused:
        _create(kube_api, kube_namespace, serving)
    assert refused.value.status == 422
    assert message in str(refused.value.body)


@pytest.mark.parametrize(
    "serving",
    [
        {},
        {"replicas": 3},
        {"autoscaling": {"minReplicas": 0, "maxReplicas": 2}},
        {"autoscaling": {"maxReplicas": 8}},
        {"pinning": "Promoted"},
    ],
)
def test_accepted_without_an_implicit_replica_count(
    kube_api: client.ApiClient, kube_namespace: str, serving: dict[str, Any]
) -> None:
    stored = _create(kube_api, kube_namespace, serving)["spec"]["serving"]
    # The server fills defaults; a default `replicas` would make every autoscaling resource refused.
    assert stored.get("replicas") == serving.get("replicas")
    if "autoscaling" in serving:
        assert stored["autoscaling"]["minReplicas"] == serving["autoscaling"].get("minReplicas", 1)
    assert stored["pinning"] == serving.get("pinning", "Compatible")  # today's behaviour unless asked


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ({"cluster": "Shared_CPU"}, "spec.placement.cluster in body should match"),
        ({"cluster": "a" * 41}, "spec.placement.cluster: Too long"),
        ({}, "spec.placement.cluster: Required value"),
    ],
)
def test_placement_refused(
    kube_api: client.ApiClient, kube_namespace: str, placement: dict[str, Any], message: str
) -> None:
    body = _resource({})
    body["spec"]["placement"] = placement
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
            GROUP, VERSION, kube_namespace, PLURAL, body, dry_run="All"
        )
    assert refused.value.status == 422
    assert message in str(refused.value.body), refused.value.body


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"cluster": "pool-a"}, {"cluster": "pool-b"}),
        ({"cluster": "pool-a"}, None),
        (None, {"cluster": "pool-a"}),
    ],
)
def test_placement_is_fixed_once_created(
    kube_api: client.ApiClient,
    kube_namespace: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    api = client.CustomObjectsApi(kube_api)
    body = _resource({})
    body["metadata"]["name"] = "placed"
    if before is not None:
        body["spec"]["placement"] = before
    created = api.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, body)
    try:
        changed = dict(created)
        changed["spec"] = {k: v for k, v in created["spec"].items() if k != "placement"}
        if after is not None:
            changed["spec"]["placement"] = after
        with pytest.raises(ApiException) as refused:
            api.replace_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "placed", changed)
        assert refused.value.status == 422
        assert "spec.placement cannot be added, removed or changed" in str(refused.value.body)
        changed["spec"]["paused"] = True  # any other change still goes through
        changed["spec"].pop("placement", None)
        if before is not None:
            changed["spec"]["placement"] = before
        api.replace_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "placed", changed)
    finally:
        api.delete_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "placed")


@pytest.mark.parametrize(
    ("uri", "refused"),
    [
        ("https://user:secret@mlflow:5000", "must not carry credentials"),
        ("http://token@mlflow", "must not carry credentials"),
        ("http://mlflow/team-a/../team-b", "must not contain dot segments"),
        ("http://mlflow/team-a/%2E%2E/team-b", "must not contain dot segments"),
        ("http://mlflow:5000/path@with-at", None),
        ("http://mlflow.ml.svc:5000", None),
    ],
)
def test_tracking_uri_with_credentials_refused(
    kube_api: client.ApiClient, kube_namespace: str, uri: str, refused: str | None
) -> None:
    body = _resource({})
    body["spec"]["registry"]["trackingUri"] = uri
    api = client.CustomObjectsApi(kube_api)
    if not refused:
        api.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, body, dry_run="All")
        return
    with pytest.raises(ApiException) as error:
        api.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, body, dry_run="All")
    assert error.value.status == 422
    assert refused in str(error.value.body)
    assert "secret" not in str(error.value.body).replace("Secret", "")  # the refusal does not echo it


def _monitored(payloads: dict[str, Any]) -> dict[str, Any]:
    resource = _resource({})
    resource["spec"]["monitoring"] = {"payloads": payloads}
    return resource


@pytest.mark.parametrize(
    ("payloads", "message"),
    [
        ({"sampleRate": 1.5}, "should be less than or equal to 1"),
        ({"sampleRate": -0.1}, "should be greater than or equal to 0"),
        # An unknown sink is pruned by the API server, which leaves none.
        (
            {"sampleRate": 0.1, "sink": {"kafka": {}}},
            "set exactly one of payloads.sink.mlflow, payloads.sink.http",
        ),
        ({"sampleRate": 0.1, "sink": {}}, "set exactly one of payloads.sink.mlflow, payloads.sink.http"),
        (
            {"sampleRate": 0.1, "sink": {"mlflow": {}, "http": {"url": "http://receiver"}}},
            "set exactly one of payloads.sink.mlflow, payloads.sink.http",
        ),
        (
            {"sampleRate": 0.1, "sink": {"http": {"url": "ftp://receiver"}}},
            "spec.monitoring.payloads.sink.http.url",
        ),
        ({"sampleRate": 0.1, "include": ["headers"]}, "Unsupported value"),
        ({"sampleRate": 0.1, "maxRecordBytes": 10}, "should be greater than or equal to 1024"),
    ],
)
def test_payload_logging_refused(
    kube_api: client.ApiClient, kube_namespace: str, payloads: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
            GROUP, VERSION, kube_namespace, PLURAL, _monitored(payloads), dry_run="All"
        )
    assert refused.value.status in (400, 422)
    assert message in str(refused.value.body)


def test_payload_logging_defaults_to_the_mlflow_sink(kube_api: client.ApiClient, kube_namespace: str) -> None:
    created = client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        GROUP, VERSION, kube_namespace, PLURAL, _monitored({"sampleRate": 0.25}), dry_run="All"
    )
    payloads = created["spec"]["monitoring"]["payloads"]
    assert payloads == {
        "sampleRate": 0.25,
        "include": ["inputs", "outputs"],
        "maxRecordBytes": 65536,
        "sink": {"mlflow": {}},
    }


@pytest.mark.parametrize(
    ("drift", "message"),
    [
        ({"psiThreshold": 0}, "should be greater than 0"),
        ({"windowSeconds": 5}, "should be greater than or equal to 10"),
        ({"minRows": 0}, "should be greater than or equal to 1"),
        ({"reference": "production"}, "Unsupported value"),
    ],
)
def test_drift_refused(
    kube_api: client.ApiClient, kube_namespace: str, drift: dict[str, Any], message: str
) -> None:
    resource = _resource({})
    resource["spec"]["monitoring"] = {"drift": drift}
    with pytest.raises(ApiException) as refused:
        client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
            GROUP, VERSION, kube_namespace, PLURAL, resource, dry_run="All"
        )
    assert refused.value.status == 422
    assert message in str(refused.value.body)


def test_drift_defaults(kube_api: client.ApiClient, kube_namespace: str) -> None:
    resource = _resource({})
    resource["spec"]["monitoring"] = {"drift": {}}
    created = client.CustomObjectsApi(kube_api).create_namespaced_custom_object(
        GROUP, VERSION, kube_namespace, PLURAL, resource, dry_run="All"
    )
    assert created["spec"]["monitoring"]["drift"] == {
        "reference": "training",
        "windowSeconds": 300,
        "minRows": 200,
        "psiThreshold": 0.2,
    }
