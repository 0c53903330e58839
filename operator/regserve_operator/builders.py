"""The desired KubeRay RayService for a RegisteredModelServing. Pure: everything comes in as arguments.

Invariants the rollout relies on:
- `args` of the Serve application depend only on the resource's spec, never on the version: Ray hashes
  args into the code version and would restart every replica on any change.
- The version travels only in the deployment's `user_config`, so a promotion changes `serveConfigV2`
  alone and KubeRay applies it to the running cluster (`reconfigure()` in place).
- Replica autoscaling lives in the deployment's options (`autoscaling_config`), which Serve changes
  in place; worker pod bounds are left out of the cluster hash, as KubeRay leaves them out of its
  own, so neither makes a new RayCluster.
- Credentials reach the pods by reference (`envFrom` the Secret the resource names, `secretKeyRef`
  for the endpoint token), never as literal values.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml

from regserve_operator import spec as s
from regserve_operator.sizing import GPU_RESOURCE, ReplicaSize, WorkerBounds, size_worker_bounds
from serving_app.config import DEPLOYMENT_NAME, IMPORT_PATH, AppArgs, max_ongoing_requests

# libyaml when present: serveConfigV2 is parsed and dumped on every reconcile (10x faster than pure Python).
FAST_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
FAST_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

# Name of the Serve deployment `build_app` creates; the version override targets it.
AUTH_TOKEN_ENV = "REGSERVE_AUTH_TOKEN"
# The payload sink's extra headers (`spec.monitoring.payloads.sink.http.headersSecretRef`), by reference.
PAYLOAD_HEADERS_ENV = "REGSERVE_PAYLOAD_HEADERS"
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
HAPROXY_METRICS_ENV = "RAY_SERVE_HAPROXY_METRICS_ENABLED"
# The replica runs the app on its own event loop, not on a second loop in another thread: one hop less
# per request (bench/README.md). The app never blocks its loop (predicts and loads run in threads).
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
SERVE_PORT = 8000
MANAGED_BY = "regserve"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "regserve.io/serving"
LABEL_MODEL = "regserve.io/model"
# On a RayService shared by the resources naming `spec.placement.cluster`: that name.
LABEL_CLUSTER = "regserve.io/cluster"
WORKER_GROUP = "serve"
# Fields of a worker group the autoscaler moves and KubeRay (v1.6.2,
# GenerateHashWithoutReplicasAndWorkersToDelete) leaves out of the hash that decides on a new cluster.
WORKER_BOUNDS_FIELDS = ("replicas", "minReplicas", "maxReplicas")
# The autoscaler runs as a sidecar of the head pod: these are added to the head's own resources.
AUTOSCALER_RESOURCES = {
    "requests": {"cpu": "200m", "memory": "512Mi"},
    "limits": {"cpu": "500m", "memory": "512Mi"},
}
# Worker pods idle this long are removed; Serve has already stopped their replicas by then.
AUTOSCALER_IDLE_TIMEOUT_S = 60
# Ray pods run as the `ray` user of the rayproject/ray images (uid 1000, group `users` 100), which the
# Dockerfile's serving target keeps. A numeric uid lets the kubelet check runAsNonRoot before starting.
RAY_UID = 1000
RAY_GID = 100
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RAY_UID,
    "runAsGroup": RAY_GID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}
# The root filesystem is read-only: Ray writes its sessions, logs and spilled objects under /tmp/ray,
# HAProxy its config and socket under /tmp/haproxy-serve, MLflow downloads artifacts to a temp dir, and
# libraries that cache under $HOME (Hugging Face, matplotlib) write there: all of it goes to an emptyDir.
TMP_VOLUME = "tmp"
TMP_PATH = "/tmp"
# No pod mounts its ServiceAccount token: tenant model code runs in the Ray containers, and the
# autoscaler's account may patch the RayCluster. The head of an autoscaling cluster gets the files a
# kubelet would project as kube-api-access in a volume of its own, mounted only into KubeRay's
# autoscaler sidecar, where Ray's KubeRay node provider reads them.
API_ACCESS_VOLUME = "autoscaler-api-access"
SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
API_ACCESS_TOKEN_SECONDS = 3607  # what Kubernetes asks for its own kube-api-access volume
# Hash of the cluster shape we last wrote (rayClusterConfig without worker bounds): detects our own
# removals (e.g. a dropped nodeSelector), which a subset comparison against the server's defaulted
# copy cannot see.
ANNOTATION_CLUSTER_HASH = "regserve.io/cluster-config-hash"


@dataclass(frozen=True)
class Owner:
    """The RegisteredModelServing the RayService belongs to."""

    name: str
    namespace: str
    uid: str
    api_version: str = f"{s.GROUP}/{s.VERSION}"
    kind: str = s.KIND


@dataclass(frozen=True)
class BuildDefaults:
    """Operator-wide defaults (from settings) that a spec may override."""

    image: str
    ray_version: str


def route_prefix(owner_name: str, serving: s.Serving) -> str:
    return serving.route_prefix or f"/{owner_name}"


def monitoring_experiment(owner: Owner) -> str:
    """The MLflow experiment of a resource's payloads and window metrics."""
    return f"regserve/{owner.namespace}/{owner.name}"


def monitoring_args(owner: Owner, monitoring: s.Monitoring) -> dict[str, Any]:
    args: dict[str, Any] = {"window_s": float(monitoring.window_seconds)}
    if monitoring.payloads is not None:
        args["payloads"] = payload_args(owner, monitoring.payloads)
    if monitoring.drift is not None:
        args["drift"] = {
            "min_rows": monitoring.drift.min_rows,
            "psi_threshold": monitoring.drift.psi_threshold,
        }
    return args


def payload_args(owner: Owner, payloads: s.Payloads) -> dict[str, Any]:
    sink: dict[str, Any] = {}
    if payloads.sink.http is not None:
        headers = {"headers_env": PAYLOAD_HEADERS_ENV} if payloads.sink.http.headers_secret_ref else {}
        sink["cloudevents"] = {"url": payloads.sink.http.url, **headers}
    return {
        "sample_rate": payloads.sample_rate,
        "include": list(payloads.include),
        "max_record_bytes": payloads.max_record_bytes,
        "experiment": monitoring_experiment(owner),
        "namespace": owner.namespace,
        "resource": owner.name,
        **sink,
    }


def app_args(spec: s.RegisteredModelServingSpec, owner: Owner | None = None) -> dict[str, Any]:
    """`build_app` args: fixed per resource (never the version), validated by the app's own model."""
    serving = spec.serving
    fields: dict[str, Any] = {
        "model_name": spec.model.name,
        "tracking_uri": spec.registry.tracking_uri,
        "max_models_per_replica": serving.max_models_per_replica,
        "max_batch_size": serving.batching.max_batch_size,
        "batch_wait_timeout_s": serving.batching.batch_wait_timeout_ms / 1000.0,
    }
    if serving.auth:
        fields["auth_token_env"] = AUTH_TOKEN_ENV
    if serving.hide_schema_in_errors:
        fields["expose_schema_in_errors"] = False
    if owner is not None and spec.monitoring.enabled:
        fields["monitoring"] = monitoring_args(owner, spec.monitoring)
    return AppArgs(**fields).model_dump(exclude_unset=True)


def autoscaling_config(autoscaling: s.Autoscaling) -> dict[str, Any]:
    """Ray Serve's `autoscaling_config` for the spec's `serving.autoscaling`."""
    return {
        "min_replicas": autoscaling.min_replicas,
        "max_replicas": autoscaling.max_replicas,
        "target_ongoing_requests": autoscaling.target_ongoing_requests,
        "upscale_delay_s": autoscaling.upscale_delay_seconds,
        "downscale_delay_s": autoscaling.downscale_delay_seconds,
    }


def replica_options(serving: s.Serving) -> dict[str, Any]:
    """`num_replicas` for a fixed count, `autoscaling_config` otherwise: both are deployment options
    Serve applies to the running deployment without restarting its replicas."""
    if serving.autoscaling is not None:
        return {"autoscaling_config": autoscaling_config(serving.autoscaling)}
    fewest, _ = serving.replica_bounds()
    return {"num_replicas": fewest}


def replica_process_options(actor_options: dict[str, Any], *, access_log: bool) -> dict[str, Any]:
    """The replica's actor options with its env, and Serve's access log: deployment fields every
    regserve application has (tests and benchmarks deploy theirs with these too)."""
    return {
        "ray_actor_options": {**actor_options, "runtime_env": {"env_vars": REPLICA_ENV}},
        "logging_config": {"enable_access_log": access_log},
    }


def build_serve_config(
    owner: Owner,
    spec: s.RegisteredModelServingSpec,
    version: str,
    size: ReplicaSize,
    candidate: dict[str, Any] | None = None,
    pinning: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The Serve config (what `serve deploy` takes): one application, version in user_config only; a
    candidate being smoke-tested, canaried or shadowed travels there too (docs/rollouts.md), and so
    does the pinning policy (`regserve_operator.pinning`), whose lists follow the registry."""
    user_config: dict[str, Any] = {"default_version": version}
    if candidate is not None:
        user_config["candidate"] = candidate
    if pinning is not None:
        user_config["pinning"] = pinning
    return {
        "applications": [
            {
                "name": owner.name,
                "route_prefix": route_prefix(owner.name, spec.serving),
                "import_path": IMPORT_PATH,
                "args": app_args(spec, owner),
                "deployments": [
                    {
                        "name": DEPLOYMENT_NAME,
                        **replica_options(spec.serving),
                        "max_ongoing_requests": max_ongoing_requests(spec.serving.batching.max_batch_size),
                        "user_config": user_config,
                        **replica_process_options(size.actor_options(), access_log=spec.serving.access_log),
                    }
                ],
            }
        ]
    }


def serve_config_yaml(config: dict[str, Any]) -> str:
    return yaml.dump(config, Dumper=FAST_DUMPER, sort_keys=True)


def labels(owner: Owner, spec: s.RegisteredModelServingSpec) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_NAME: "regserve",
        LABEL_INSTANCE: owner.name,
        # Label values are limited to 63 chars of a restricted alphabet; the model name may not fit.
        LABEL_MODEL: _label_value(spec.model.name),
    }


def _label_value(text: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:63]
    return cleaned.strip("-_.") or "model"


def owner_reference(owner: Owner, *, controller: bool = True) -> dict[str, Any]:
    """A shared RayService has every member as an owner (Kubernetes deletes it with the last one),
    and an object may have one controller only: there, none is."""
    return {
        "apiVersion": owner.api_version,
        "kind": owner.kind,
        "name": owner.name,
        "uid": owner.uid,
        "controller": controller,
        "blockOwnerDeletion": True,
    }


def _env(spec: s.RegisteredModelServingSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "MLFLOW_TRACKING_URI", "value": spec.registry.tracking_uri}]
    if spec.serving.ingress_mode == "haproxy":
        # Read by the Ray processes at import time, so it belongs in the pod env, not the operator's.
        env.append({"name": HAPROXY_ENV, "value": "1"})
        env.append({"name": HAPROXY_METRICS_ENV, "value": "1" if spec.serving.ingress_metrics else "0"})
    if spec.serving.auth:
        ref = spec.serving.auth.token_secret_ref
        env.append(
            {"name": AUTH_TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        )
    if (headers := payload_headers_ref(spec)) is not None:
        # Optional: a missing Secret or key turns payload logging off (PayloadsLogged says so) and
        # leaves the pods starting and serving.
        env.append(
            {
                "name": PAYLOAD_HEADERS_ENV,
                "valueFrom": {"secretKeyRef": {"name": headers.name, "key": headers.key, "optional": True}},
            }
        )
    return env


def payload_headers_ref(spec: s.RegisteredModelServingSpec) -> s.SecretKeyRef | None:
    payloads = spec.monitoring.payloads
    if payloads is None or payloads.sink.http is None:
        return None
    return payloads.sink.http.headers_secret_ref


def _env_from(spec: s.RegisteredModelServingSpec) -> list[dict[str, Any]]:
    ref = spec.registry.credentials_secret_ref
    return [{"secretRef": {"name": ref.name}}] if ref else []


def _container(
    name: str, image: str, spec: s.RegisteredModelServingSpec, resources: dict[str, Any]
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        # $HOME of the image is on the read-only root.
        "env": [*_env(spec), {"name": "HOME", "value": TMP_PATH}],
        "resources": resources,
        "securityContext": _copy(CONTAINER_SECURITY_CONTEXT),
        "volumeMounts": [{"name": TMP_VOLUME, "mountPath": TMP_PATH}],
    }
    env_from = _env_from(spec)
    if env_from:
        container["envFrom"] = env_from
    return container


def _pod_metadata() -> dict[str, Any]:
    """Ray pods carry the managed-by label: the chart's NetworkPolicy selects them by it."""
    return {"labels": {LABEL_MANAGED_BY: MANAGED_BY}}


def _copy(value: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(value))  # nested: callers may change what they get


def _api_access_volume() -> dict[str, Any]:
    """Kubernetes' own kube-api-access volume, under another name: the admission plugin adds that one
    to every container, this one is mounted where the pod says."""
    return {
        "name": API_ACCESS_VOLUME,
        "projected": {
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": API_ACCESS_TOKEN_SECONDS}},
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
            ],
        },
    }


def _pod_spec(
    spec: s.RegisteredModelServingSpec, container: dict[str, Any], *, api_access: bool = False
) -> dict[str, Any]:
    """`api_access`: the head of an autoscaling cluster carries the autoscaler sidecar's API access
    volume; no container of ours mounts it."""
    volumes: list[dict[str, Any]] = [{"name": TMP_VOLUME, "emptyDir": {}}]
    if api_access:
        volumes.append(_api_access_volume())
    pod: dict[str, Any] = {
        "containers": [container],
        "automountServiceAccountToken": False,
        "securityContext": _copy(POD_SECURITY_CONTEXT),
        "volumes": volumes,
    }
    overrides = spec.ray_service
    if overrides.service_account_name:
        pod["serviceAccountName"] = overrides.service_account_name
    if overrides.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": ref.name} for ref in overrides.image_pull_secrets]
    return pod


def build_cluster_config(
    spec: s.RegisteredModelServingSpec,
    size: ReplicaSize,
    defaults: BuildDefaults,
    bounds: WorkerBounds | None = None,
) -> dict[str, Any]:
    """The RayCluster: head, and one worker group of pods shaped by `size`, bounded by `bounds`
    (default: this resource's replica bounds; a shared cluster passes those of all its members)."""
    image = spec.ray_service.image or defaults.image
    head_resources = {
        "requests": {"cpu": "500m", "memory": "2Gi"},
        "limits": {"cpu": "1", "memory": "2Gi"},
    }
    head = _container("ray-head", image, spec, head_resources)
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": SERVE_PORT, "name": "serve"},
    ]
    worker_limits: dict[str, Any] = {"cpu": str(size.pod_cpus), "memory": str(size.pod_memory_bytes)}
    if size.gpus:
        worker_limits[GPU_RESOURCE] = str(size.gpus)
    worker = _container(
        "ray-worker", image, spec, {"requests": dict(worker_limits), "limits": dict(worker_limits)}
    )
    worker_pod = _pod_spec(spec, worker)
    if size.node_selector:
        worker_pod["nodeSelector"] = dict(size.node_selector)
    if size.tolerations:
        worker_pod["tolerations"] = [dict(t) for t in size.tolerations]
    bounds = bounds or size_worker_bounds(size, *spec.serving.replica_bounds())
    cluster: dict[str, Any] = {
        "rayVersion": spec.ray_service.ray_version or defaults.ray_version,
        # Ray's own control plane (dashboard, jobs API, GCS) is open unless token authentication is on,
        # and an open dashboard runs anyone's code on the cluster. KubeRay (>= 1.5.1, Ray >= 2.52) makes
        # a Secret with a random token and gives it to every Ray container and to its own dashboard calls.
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # Replicas go to the workers, whose pods are sized for them; the head runs Serve's controller.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": {
                "metadata": _pod_metadata(),
                "spec": _pod_spec(spec, head, api_access=spec.serving.autoscaling is not None),
            },
        },
        "workerGroupSpecs": [
            {
                "groupName": WORKER_GROUP,
                "replicas": bounds.fewest,
                "minReplicas": bounds.fewest,
                "maxReplicas": bounds.most,
                "rayStartParams": {},
                "template": {"metadata": _pod_metadata(), "spec": worker_pod},
            }
        ],
    }
    if spec.serving.autoscaling is not None:
        # Serve asks for replicas, the Ray autoscaler asks KubeRay for the pods to hold them. Fixed
        # replica counts keep the sidecar off the head; switching between the two is a new cluster.
        cluster["enableInTreeAutoscaling"] = True
        cluster["autoscalerOptions"] = {
            "upscalingMode": "Default",
            "idleTimeoutSeconds": AUTOSCALER_IDLE_TIMEOUT_S,
            "resources": {part: dict(values) for part, values in AUTOSCALER_RESOURCES.items()},
            # KubeRay builds the sidecar's container. Its root stays writable: KubeRay mounts only
            # /tmp/ray into it and sets its environment itself.
            "securityContext": {**_copy(CONTAINER_SECURITY_CONTEXT), "readOnlyRootFilesystem": False},
            # KubeRay appends these to the sidecar's own mounts: it alone gets the token.
            "volumeMounts": [
                {"name": API_ACCESS_VOLUME, "mountPath": SERVICE_ACCOUNT_PATH, "readOnly": True}
            ],
        }
    return cluster


def cluster_shape(cluster: dict[str, Any]) -> dict[str, Any]:
    """The cluster config without worker bounds: what must not change for the RayCluster to stay."""
    shape = dict(cluster)
    shape["workerGroupSpecs"] = [
        {key: value for key, value in group.items() if key not in WORKER_BOUNDS_FIELDS}
        for group in cluster.get("workerGroupSpecs") or []
    ]
    return shape


def build_rayservice(
    owner: Owner,
    spec: s.RegisteredModelServingSpec,
    version: str,
    size: ReplicaSize,
    defaults: BuildDefaults,
    candidate: dict[str, Any] | None = None,
    pinning: dict[str, Any] | None = None,
) -> dict[str, Any]:
    cluster = build_cluster_config(spec, size, defaults)
    body: dict[str, Any] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {
            "name": rayservice_name(owner.name, spec),
            "namespace": owner.namespace,
            "labels": labels(owner, spec),
            "annotations": {ANNOTATION_CLUSTER_HASH: config_hash(cluster_shape(cluster))},
            "ownerReferences": [owner_reference(owner)],
        },
        "spec": {
            "serveConfigV2": serve_config_yaml(
                build_serve_config(owner, spec, version, size, candidate, pinning)
            ),
            "rayClusterConfig": cluster,
        },
    }
    if spec.ray_service.upgrade_strategy is not None:
        body["spec"]["upgradeStrategy"] = spec.ray_service.upgrade_strategy.model_dump(mode="json")
    return body


def config_hash(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rayservice_name(owner_name: str, spec: s.RegisteredModelServingSpec | None = None) -> str:
    """The resource's own name, or the cluster it shares (`spec.placement.cluster`)."""
    if spec is not None and spec.placement is not None:
        return spec.placement.cluster
    return owner_name


def serving_version_of(rayservice: dict[str, Any], app: str | None = None) -> str | None:
    """The default version a RayService's serveConfigV2 carries for `app` (default: its first
    application; None when unreadable)."""
    version = user_config_of(rayservice, app).get("default_version")
    return None if version is None else str(version)


def candidate_of(rayservice: dict[str, Any], app: str | None = None) -> dict[str, Any] | None:
    """The candidate a RayService's serveConfigV2 carries for `app`, as written (None: none)."""
    candidate = user_config_of(rayservice, app).get("candidate")
    return candidate if isinstance(candidate, dict) else None


def user_config_of(rayservice: dict[str, Any], app: str | None = None) -> dict[str, Any]:
    """The deployment's user_config in a RayService's serveConfigV2 for application `app` (default:
    the first), {} when unreadable or absent."""
    text = (rayservice.get("spec") or {}).get("serveConfigV2")
    if not text:
        return {}
    try:
        config = yaml.load(text, Loader=FAST_LOADER)
        for application in config.get("applications", []):
            if app is not None and application.get("name") != app:
                continue
            for deployment in application.get("deployments", []):
                if deployment.get("name") == DEPLOYMENT_NAME:
                    user_config = deployment.get("user_config") or {}
                    return user_config if isinstance(user_config, dict) else {}
    except (yaml.YAMLError, AttributeError):
        return {}
    return {}
