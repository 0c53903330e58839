from __future__ import annotations

from typing import Any

import pytest
import yaml
from regserve_operator import builders as b
from regserve_operator.sizing import GiB, size_replica

from serving_app.config import AppArgs, UserConfig
from serving_app.pinning import PinPolicy

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


def test_ray_token_authentication_is_on() -> None:
    cluster = _build(make_spec())["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}


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


def test_pinning_lives_only_in_user_config_and_the_app_reads_it() -> None:
    """The mode and its lists change in place: never in the args (a change there restarts replicas)."""
    spec = make_spec(serving={"pinning": "Promoted"})
    pinning = {"mode": "Promoted", "allowed": ["4", "2"], "refused": ["3"]}
    body = b.build_rayservice(OWNER, spec, "2", _size(spec), DEFAULTS, None, pinning)
    (deployment,) = _app(body)["deployments"]
    assert _app(body)["args"] == _app(_build(make_spec(), "2"))["args"]
    config = UserConfig.model_validate(deployment["user_config"])
    assert config.pinning.policy() == PinPolicy("Promoted", frozenset({"2", "4"}), frozenset({"3"}))
    assert "pinning" not in _app(_build(spec))["deployments"][0]["user_config"]  # None: the app's default


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
            "value" not in e
            or e["name"] in ("MLFLOW_TRACKING_URI", b.HAPROXY_ENV, b.HAPROXY_METRICS_ENV, "HOME")
            for e in container["env"]
        )
    assert _app(body)["args"]["auth_token_env"] == b.AUTH_TOKEN_ENV


@pytest.mark.parametrize(
    ("serving", "haproxy", "haproxy_metrics"),
    [
        ({}, "1", "0"),
        ({"ingressMode": "proxy"}, None, None),
        ({"ingressMode": "haproxy"}, "1", "0"),
        ({"ingressMetrics": True}, "1", "1"),
        # The Python proxy records them whatever the setting.
        ({"ingressMode": "proxy", "ingressMetrics": True}, None, None),
    ],
)
def test_ingress_env(serving: dict[str, Any], haproxy: str | None, haproxy_metrics: str | None) -> None:
    body = _build(make_spec(serving=serving))
    for group in [
        body["spec"]["rayClusterConfig"]["headGroupSpec"],
        body["spec"]["rayClusterConfig"]["workerGroupSpecs"][0],
    ]:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env.get(b.HAPROXY_ENV) == haproxy
        assert env.get(b.HAPROXY_METRICS_ENV) == haproxy_metrics


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
        ({}, lambda body: _app(body)["deployments"][0]["logging_config"] == {"enable_access_log": False}),
        (
            {},
            lambda body: (
                _app(body)["deployments"][0]["ray_actor_options"]["runtime_env"]
                == {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}
            ),
        ),
        (
            {"serving": {"accessLog": True}},
            lambda body: _app(body)["deployments"][0]["logging_config"] == {"enable_access_log": True},
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


def _deployment(body: dict[str, Any]) -> dict[str, Any]:
    (deployment,) = _app(body)["deployments"]
    return deployment


def _worker_group(body: dict[str, Any]) -> dict[str, Any]:
    (group,) = body["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group


@pytest.mark.parametrize(
    ("serving", "replica_options"),
    [
        ({}, {"num_replicas": 1}),
        ({"replicas": 3}, {"num_replicas": 3}),
        (
            {"autoscaling": {"maxReplicas": 8}},
            {
                "autoscaling_config": {
                    "min_replicas": 1,
                    "max_replicas": 8,
                    "target_ongoing_requests": 2.0,
                    "upscale_delay_s": 30.0,
                    "downscale_delay_s": 600.0,
                }
            },
        ),
        (
            {
                "autoscaling": {
                    "minReplicas": 0,
                    "maxReplicas": 2,
                    "targetOngoingRequests": 1,
                    "upscaleDelaySeconds": 0.5,
                    "downscaleDelaySeconds": 5,
                }
            },
            {
                "autoscaling_config": {
                    "min_replicas": 0,
                    "max_replicas": 2,
                    "target_ongoing_requests": 1.0,
                    "upscale_delay_s": 0.5,
                    "downscale_delay_s": 5.0,
                }
            },
        ),
    ],
)
def test_replica_options(serving: dict[str, Any], replica_options: dict[str, Any]) -> None:
    deployment = _deployment(_build(make_spec(serving=serving)))
    assert {k: v for k, v in deployment.items() if k in ("num_replicas", "autoscaling_config")} == (
        replica_options
    )


def test_ray_serve_accepts_the_autoscaling_config() -> None:
    from ray.serve.config import AutoscalingConfig

    spec = make_spec(serving={"autoscaling": {"minReplicas": 0, "maxReplicas": 3}})
    config = AutoscalingConfig(**_deployment(_build(spec))["autoscaling_config"])
    assert (config.min_replicas, config.max_replicas) == (0, 3)


@pytest.mark.parametrize(
    ("serving", "worker_bounds", "autoscaler"),
    [
        ({}, (1, 1, 1), False),
        ({"replicas": 4}, (4, 4, 4), False),
        ({"autoscaling": {"minReplicas": 2, "maxReplicas": 8}}, (2, 2, 8), True),
        ({"autoscaling": {"minReplicas": 0, "maxReplicas": 3}}, (0, 0, 3), True),
        # Half a CPU per replica still needs a pod each: the pod's memory holds one replica.
        ({"cpusPerReplica": 0.5, "autoscaling": {"maxReplicas": 4}}, (1, 1, 4), True),
    ],
)
def test_worker_group_bounds_and_autoscaler(
    serving: dict[str, Any], worker_bounds: tuple[int, int, int], autoscaler: bool
) -> None:
    cluster = _build(make_spec(serving=serving))["spec"]["rayClusterConfig"]
    group = _worker_group({"spec": {"rayClusterConfig": cluster}})
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == worker_bounds
    assert cluster.get("enableInTreeAutoscaling", False) is autoscaler
    if autoscaler:
        options = cluster["autoscalerOptions"]
        assert options["resources"] == b.AUTOSCALER_RESOURCES
        assert options["idleTimeoutSeconds"] == b.AUTOSCALER_IDLE_TIMEOUT_S
    else:
        assert "autoscalerOptions" not in cluster


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ({"autoscaling": {"maxReplicas": 2}}, {"autoscaling": {"maxReplicas": 8}}),
        (
            {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}},
            {"autoscaling": {"minReplicas": 0, "maxReplicas": 4}},
        ),
        (
            {"autoscaling": {"maxReplicas": 4, "targetOngoingRequests": 2}},
            {"autoscaling": {"maxReplicas": 4, "targetOngoingRequests": 8, "downscaleDelaySeconds": 5}},
        ),
        ({"replicas": 1}, {"replicas": 5}),
    ],
)
def test_autoscaling_changes_stay_in_place(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Neither the app's args (a change restarts every replica) nor the cluster shape (a change makes
    KubeRay build a new RayCluster) move; only deployment options and worker bounds do."""
    old, new = _build(make_spec(serving=before)), _build(make_spec(serving=after))
    assert _app(old)["args"] == _app(new)["args"]
    assert _deployment(old)["user_config"] == _deployment(new)["user_config"]
    assert (
        old["metadata"]["annotations"][b.ANNOTATION_CLUSTER_HASH]
        == new["metadata"]["annotations"][b.ANNOTATION_CLUSTER_HASH]
    )
    assert b.cluster_shape(old["spec"]["rayClusterConfig"]) == b.cluster_shape(
        new["spec"]["rayClusterConfig"]
    )


def test_turning_autoscaling_on_changes_the_cluster_shape() -> None:
    fixed = _build(make_spec(serving={"replicas": 2}))
    scaled = _build(make_spec(serving={"autoscaling": {"minReplicas": 2, "maxReplicas": 2}}))
    assert (
        fixed["metadata"]["annotations"][b.ANNOTATION_CLUSTER_HASH]
        != scaled["metadata"]["annotations"][b.ANNOTATION_CLUSTER_HASH]
    )


@pytest.mark.parametrize(
    ("serving", "head_token"),
    [({}, False), ({"replicas": 3}, False), ({"autoscaling": {"maxReplicas": 4}}, True)],
)
def test_ray_pods_are_hardened(serving: dict[str, Any], head_token: bool) -> None:
    cluster = _build(make_spec(serving=serving))["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]
    for template in (cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]):
        assert template["metadata"]["labels"] == {
            b.LABEL_MANAGED_BY: "regserve"
        }  # NetworkPolicy selects these
    for pod, token in ((head, head_token), (worker, False)):
        # No container of ours gets a ServiceAccount token: replicas run tenant code.
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 100,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        assert pod["volumes"][0] == {"name": "tmp", "emptyDir": {}}
        assert [v["name"] for v in pod["volumes"][1:]] == (["autoscaler-api-access"] if token else [])
        (container,) = pod["containers"]
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        }
        assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
        assert {"name": "HOME", "value": "/tmp"} in container["env"]
    if head_token:
        sidecar = cluster["autoscalerOptions"]["securityContext"]
        assert sidecar["allowPrivilegeEscalation"] is False and sidecar["capabilities"] == {"drop": ["ALL"]}
        # The sidecar alone mounts it, where Ray's KubeRay node provider reads token and CA.
        assert cluster["autoscalerOptions"]["volumeMounts"] == [
            {
                "name": "autoscaler-api-access",
                "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                "readOnly": True,
            }
        ]
    else:
        assert "autoscalerOptions" not in cluster


def test_autoscaler_api_access_is_what_kubernetes_projects_as_kube_api_access() -> None:
    cluster = _build(make_spec(serving={"autoscaling": {"maxReplicas": 4}}))["spec"]["rayClusterConfig"]
    volumes = {v["name"]: v for v in cluster["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert volumes["autoscaler-api-access"] == {
        "name": "autoscaler-api-access",
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [
                            {
                                "path": "namespace",
                                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                            }
                        ]
                    }
                },
            ]
        },
    }


def test_hardening_survives_callers_changing_the_pods() -> None:
    first = _build(make_spec())["spec"]["rayClusterConfig"]
    first["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    first["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"][
        "drop"
    ].clear()
    again = _build(make_spec())["spec"]["rayClusterConfig"]
    assert again["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsUser"] == 1000
    worker = again["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize(
    ("monitoring", "payloads", "headers_env"),
    [
        ({}, None, None),
        (
            {"payloads": {"sampleRate": 0.1}},
            {
                "sample_rate": 0.1,
                "include": ["inputs", "outputs"],
                "max_record_bytes": 65536,
                "experiment": "regserve/ml/translator",
                "namespace": "ml",
                "resource": "translator",
            },
            None,
        ),
        (
            {
                "payloads": {
                    "sampleRate": 1,
                    "include": ["outputs"],
                    "sink": {"http": {"url": "http://receiver.ml/events"}},
                }
            },
            {
                "sample_rate": 1.0,
                "include": ["outputs"],
                "max_record_bytes": 65536,
                "experiment": "regserve/ml/translator",
                "namespace": "ml",
                "resource": "translator",
                "cloudevents": {"url": "http://receiver.ml/events"},
            },
            None,
        ),
        (
            {
                "payloads": {
                    "sampleRate": 0.5,
                    "sink": {
                        "http": {
                            "url": "https://receiver.ml/events",
                            "headersSecretRef": {"name": "sink", "key": "headers"},
                        }
                    },
                }
            },
            {
                "sample_rate": 0.5,
                "include": ["inputs", "outputs"],
                "max_record_bytes": 65536,
                "experiment": "regserve/ml/translator",
                "namespace": "ml",
                "resource": "translator",
                "cloudevents": {"url": "https://receiver.ml/events", "headers_env": b.PAYLOAD_HEADERS_ENV},
            },
            {
                "name": b.PAYLOAD_HEADERS_ENV,
                "valueFrom": {"secretKeyRef": {"name": "sink", "key": "headers", "optional": True}},
            },
        ),
    ],
    ids=["off", "mlflow-sink", "cloudevents", "cloudevents-with-headers"],
)
def test_payload_logging_reaches_the_app_and_the_pods(
    monitoring: dict[str, Any], payloads: dict[str, Any] | None, headers_env: dict[str, Any] | None
) -> None:
    body = _build(make_spec(monitoring=monitoring))
    args = _app(body)["args"]
    assert args.get("monitoring", {}).get("payloads") == payloads
    AppArgs.model_validate(args)  # the app takes what the operator writes
    (container,) = body["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    written = [e for e in container["env"] if e["name"] == b.PAYLOAD_HEADERS_ENV]
    assert written == ([headers_env] if headers_env else [])
