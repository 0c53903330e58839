from __future__ import annotations

from typing import Any

import pytest
import yaml
from regserve_operator import builders as b
from regserve_operator.sizing import GiB, size_replica

from serving_app.config import AppArgs, UserConfig

from .helpers import DEFAULTS, OWNER, make_spec


def _size(spec: Any, model_bytes: int = 0, flavors: tuple[str, ...] = ()) -> Any:
    return size_replica(
        model_size_bytes=model_bytes,
        flavors=flavors,
        serving=spec.serving,
        resources=spec.resources,
        previous=None,
    )


def _build(spec: Any, version: str = "3", model_bytes: int = 0) -> dict[str, Any]:
    return b.build_rayservice(OWNER, spec, version, _size(spec, model_bytes), DEFAULTS)


def _app(body: dict[str, Any]) -> dict[str, Any]:
    config = yaml.safe_load(body["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    return app


def test_rayservice_shape() -> None:
    spec = make_spec()
    body = _build(spec)
    assert body["apiVersion"] == "ray.io/v1" and body["kind"] == "RayService"
    assert body["metadata"]["name"] == "translator" and body["metadata"]["namespace"] == "ml"
    (ref,) = body["metadata"]["ownerReferences"]
    assert ref == {
        "apiVersion": "regserve.io/v1alpha1",
        "kind": "RegisteredModelServing",
        "name": "translator",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert body["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "regserve"
    assert isinstance(body["spec"]["serveConfigV2"], str)
    app = _app(body)
    assert app["import_path"] == "serving_app.app:build_app"
    assert app["route_prefix"] == "/translator"
    (dep,) = app["deployments"]
    assert dep["name"] == b.DEPLOYMENT_NAME
    assert UserConfig.model_validate(dep["user_config"]).default_version == "3"
    AppArgs.model_validate(app["args"])  # the serving app accepts exactly these args
    cluster = body["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "regserve/ray:test"
    assert cluster["workerGroupSpecs"][0]["replicas"] == 1


def test_version_lives_only_in_user_config() -> None:
    spec = make_spec()
    one, two = _build(spec, "3"), _build(spec, "4")
    assert _app(one)["args"] == _app(two)["args"]
    assert "default_version" not in _app(one)["args"]
    assert one["spec"]["rayClusterConfig"] == two["spec"]["rayClusterConfig"]
    assert one["metadata"] == two["metadata"]
    assert set(_app(one)["args"]) == {
        "model_name",
        "tracking_uri",
        "max_models_per_replica",
        "max_batch_size",
        "batch_wait_timeout_s",
    }


def test_credentials_by_reference_only() -> None:
    spec = make_spec(serving={"auth": {"tokenSecretRef": {"name": "endpoint", "key": "token"}}})
    body = _build(spec)
    for group in [
        body["spec"]["rayClusterConfig"]["headGroupSpec"],
        *body["spec"]["rayClusterConfig"]["workerGroupSpecs"],
    ]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "mlflow-auth"}}]
        token = next(e for e in container["env"] if e["name"] == b.AUTH_TOKEN_ENV)
        assert token == {
            "name": b.AUTH_TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": "endpoint", "key": "token"}},
        }
        assert all(
            "value" not in e or e["name"] in ("MLFLOW_TRACKING_URI", b.HAPROXY_ENV) for e in container["env"]
        )
    assert _app(body)["args"]["auth_token_env"] == b.AUTH_TOKEN_ENV


@pytest.mark.parametrize(
    ("serving", "env_has_haproxy"),
    [({}, True), ({"ingressMode": "proxy"}, False), ({"ingressMode": "haproxy"}, True)],
)
def test_ingress_mode_env(serving: dict[str, Any], env_has_haproxy: bool) -> None:
    body = _build(make_spec(serving=serving))
    for group in [
        body["spec"]["rayClusterConfig"]["headGroupSpec"],
        body["spec"]["rayClusterConfig"]["workerGroupSpecs"][0],
    ]:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert (env.get(b.HAPROXY_ENV) == "1") is env_has_haproxy


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        ({"serving": {"routePrefix": "/t"}}, lambda body: _app(body)["route_prefix"] == "/t"),
        (
            {"serving": {"replicas": 3}},
            lambda body: (
                body["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 3
                and _app(body)["deployments"][0]["num_replicas"] == 3
            ),
        ),
        (
            {"serving": {"batching": {"maxBatchSize": 32, "batchWaitTimeoutMs": 5}}},
            lambda body: (
                (_app(body)["args"]["max_batch_size"], _app(body)["args"]["batch_wait_timeout_s"])
                == (32, 0.005)
            ),
        ),
        (
            {"serving": {"hideSchemaInErrors": True}},
            lambda body: _app(body)["args"]["expose_schema_in_errors"] is False,
        ),
        (
            {"rayService": {"upgradeStrategy": {"type": "NewClusterWithIncrementalUpgrade"}}},
            lambda body: body["spec"]["upgradeStrategy"] == {"type": "NewClusterWithIncrementalUpgrade"},
        ),
        ({}, lambda body: "upgradeStrategy" not in body["spec"]),
        (
            {"rayService": {"image": "me/ray:1", "rayVersion": "2.60.0"}},
            lambda body: (
                body["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
                    "image"
                ]
                == "me/ray:1"
            ),
        ),
        (
            {"resources": {"accelerator": "gpu"}},
            lambda body: (
                body["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
                    "resources"
                ]["limits"]["nvidia.com/gpu"]
                == "1"
                and "nodeSelector"
                in body["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
                and _app(body)["deployments"][0]["ray_actor_options"]["num_gpus"] == 1
            ),
        ),
    ],
)
def test_spec_fields_reach_the_rayservice(overrides: dict[str, Any], check: Any) -> None:
    assert check(_build(make_spec(**overrides)))


def test_worker_memory_matches_actor_memory() -> None:
    spec = make_spec()
    body = _build(spec, model_bytes=GiB)
    worker = body["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    actor = _app(body)["deployments"][0]["ray_actor_options"]
    assert int(worker["resources"]["limits"]["memory"]) > actor["memory"]


def test_serving_version_of_roundtrip() -> None:
    assert b.serving_version_of(_build(make_spec(), "12")) == "12"
    assert b.serving_version_of({"spec": {}}) is None
    assert b.serving_version_of({"spec": {"serveConfigV2": ":::"}}) is None


def test_long_model_name_label_is_valid() -> None:
    body = _build(make_spec(model={"name": "a/b c" + "x" * 80, "alias": "champion"}))
    value = body["metadata"]["labels"][b.LABEL_MODEL]
    assert len(value) <= 63 and all(c.isalnum() or c in "-_." for c in value)
