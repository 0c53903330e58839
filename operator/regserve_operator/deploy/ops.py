"""What the plugin and the CLI verbs do to a resource, with errors a user can act on (`DeployError`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from regserve_operator import conditions as c
from regserve_operator.deploy.flatconfig import ClientOptions, ConfigError, merge, split_config, validated
from regserve_operator.deploy.follow import TimedOut, follow, until_gone
from regserve_operator.deploy.stores import Answer, KubeStore, LocalStore, ResourceStore, StoreError
from regserve_operator.deploy.uris import ModelSelector, Target, UriError, parse_model_uri
from regserve_operator.deploy.verdict import Failed, Succeeded
from regserve_operator.spec import RegisteredModelServingStatus, parse_status

INVOCATIONS = "/invocations"
# The header the serving app pins a version by (Ray Serve's multiplexing header).
VERSION_HEADER = "serve_multiplexed_model_id"
_PAYLOAD_KEYS = frozenset({"dataframe_split", "dataframe_records", "instances", "inputs"})
_DELETE_WAIT_S = 60.0


class DeployError(Exception):
    """An operation that did not do what was asked; `missing` when the resource does not exist."""

    def __init__(self, message: str, *, missing: bool = False, timed_out: bool = False) -> None:
        super().__init__(message)
        self.missing = missing
        self.timed_out = timed_out


@dataclass(frozen=True)
class Done:
    """An operation's end: the resource as it is now, and how its rollout ended (None: not waited)."""

    resource: dict[str, Any]
    verdict: Succeeded | None


def open_store(target: Target) -> ResourceStore:
    try:
        return KubeStore(target.namespace) if target.kind == "kube" else LocalStore(target.namespace)
    except StoreError as error:
        raise DeployError(str(error)) from None


def model_uri_of(spec: Mapping[str, Any]) -> str:
    model = spec.get("model") or {}
    name = model.get("name", "")
    if model.get("alias"):
        return f"models:/{name}@{model['alias']}"
    return f"models:/{name}/{model.get('stage') or model.get('version') or ''}"


def view(found: Mapping[str, Any]) -> dict[str, Any]:
    """A deployment as MLflow's clients show it: `name` first, the rollout in a few plain fields."""
    metadata = found.get("metadata") or {}
    status = parse_status(found.get("status"))
    return {
        "name": metadata.get("name"),
        "namespace": metadata.get("namespace"),
        "model_uri": model_uri_of(found.get("spec") or {}),
        "flavor": "python_function",
        "ready": c.is_true(status.conditions, c.READY),
        "serving_version": status.serving_version,
        "resolved_version": status.resolved_version,
        "phase": status.rollout_phase or ("Idle" if status.rollout_version is None else "Starting"),
        "candidate_version": status.rollout_version,
        "weight": status.rollout_weight,
        "url": status.url,
        "conditions": [
            {"type": cond.type, "status": cond.status, "reason": cond.reason, "message": cond.message}
            for cond in status.conditions or []
        ],
    }


def new_spec(selector: ModelSelector, fields: Mapping[str, Any], tracking_uri: str | None) -> dict[str, Any]:
    base: dict[str, Any] = {"model": selector.to_spec()}
    if tracking_uri:
        base["registry"] = {"trackingUri": tracking_uri}
    spec = merge(base, fields)
    if not (spec.get("registry") or {}).get("trackingUri"):
        raise ConfigError(
            "no tracking URI the cluster can reach: set MLFLOW_TRACKING_URI to your tracking server's "
            "http(s) address or pass -C trackingUri=http://..."
        )
    return validated(spec)


def create(
    store: ResourceStore,
    name: str,
    model_uri: str,
    config: Mapping[str, Any] | None,
    tracking_uri: str | None,
    on_progress: Callable[[str], None] | None = None,
) -> Done:
    try:
        selector = parse_model_uri(model_uri)
        options, fields = split_config(config)
        spec = new_spec(selector, fields, tracking_uri)
    except (UriError, ConfigError) as error:
        raise DeployError(str(error)) from None
    created = _store_call(store.create, name, spec)
    return _finish(store, name, created, options, None, on_progress)


def update(
    store: ResourceStore,
    name: str,
    model_uri: str | None,
    config: Mapping[str, Any] | None,
    on_progress: Callable[[str], None] | None = None,
) -> Done:
    current = resource(store, name)
    try:
        options, fields = split_config(config)
        spec = merge(current.get("spec") or {}, fields)
        if model_uri is not None:
            spec["model"] = parse_model_uri(model_uri).to_spec()
        spec = validated(spec)
    except (UriError, ConfigError) as error:
        raise DeployError(str(error)) from None
    replaced = _store_call(store.replace_spec, name, spec)
    return _finish(store, name, replaced, options, None, on_progress)


def delete(store: ResourceStore, name: str, config: Mapping[str, Any] | None) -> bool:
    """Idempotent: False when there was nothing to delete. Waits (unless `wait=false`) until it is gone."""
    try:
        options, _ = split_config(config)
    except ConfigError as error:
        raise DeployError(str(error)) from None
    deleted = bool(_store_call(store.delete, name))
    if (
        deleted
        and options.wait
        and not until_gone(store, name, timeout_s=min(options.timeout_s, _DELETE_WAIT_S))
    ):
        raise DeployError(
            f"{name} is being deleted but still exists (finalizers) in {store.where}", timed_out=True
        )
    return deleted


def get(store: ResourceStore, name: str) -> dict[str, Any]:
    return view(resource(store, name))


def follow_rollout(
    store: ResourceStore,
    name: str,
    timeout_s: float,
    expected_version: str | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> Done:
    current = resource(store, name)
    options = ClientOptions(wait=True, timeout_s=timeout_s)
    return _finish(store, name, current, options, expected_version, on_progress)


def _finish(
    store: ResourceStore,
    name: str,
    written: dict[str, Any],
    options: ClientOptions,
    expected_version: str | None,
    on_progress: Callable[[str], None] | None,
) -> Done:
    if not options.wait:
        return Done(written, None)
    generation = int((written.get("metadata") or {}).get("generation") or 1)
    try:
        verdict = follow(
            store,
            name,
            generation=generation,
            timeout_s=options.timeout_s,
            expected_version=expected_version,
            on_progress=on_progress,
        )
    except StoreError as error:
        raise DeployError(str(error), missing=error.missing) from None
    if isinstance(verdict, Failed):
        raise DeployError(f"{name}: {verdict.reason}: {verdict.message}")
    if isinstance(verdict, TimedOut):
        raise DeployError(
            f"{name}: no verdict after {options.timeout_s:.0f} s (config timeout=...): {verdict.detail}",
            timed_out=True,
        )
    return Done(resource(store, name), verdict)


def resource(store: ResourceStore, name: str) -> dict[str, Any]:
    """The resource as the store holds it (DeployError if it does not exist)."""
    found = _store_call(store.get, name)
    if found is None:
        raise DeployError(f"no deployment {name} in {store.where}", missing=True)
    return dict(found)


def _store_call(call: Callable[..., Any], *args: Any) -> Any:
    try:
        return call(*args)
    except StoreError as error:
        raise DeployError(str(error), missing=error.missing) from None


# ----------------------------------------------------------------------------------------- scoring


def payload_of(inputs: Any) -> dict[str, Any]:
    """MLflow's scoring payload for what MLflow's own clients pass: a DataFrame, an array, a list, a
    dict of columns or an already formed payload."""
    if isinstance(inputs, Mapping):
        if _PAYLOAD_KEYS & set(inputs):
            return dict(inputs)
        # A dict of columns or tensors (MLflow's own dump_input_data mishandles dicts).
        return dict(json.loads(json.dumps({"inputs": dict(inputs)}, default=_jsonable)))
    from mlflow.utils.proto_json_utils import dump_input_data

    loaded = json.loads(dump_input_data(inputs))
    if not isinstance(loaded, dict):
        raise DeployError(f"cannot send {type(inputs).__name__} as a scoring request")
    return loaded


def _jsonable(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def score(
    store: ResourceStore, name: str, inputs: Any, version: str | None = None
) -> tuple[Answer, RegisteredModelServingStatus]:
    found = resource(store, name)
    status = parse_status(found.get("status"))
    if not status.url:
        raise DeployError(f"{name} has no endpoint yet: {view(found)['conditions']}")
    headers = {VERSION_HEADER: version} if version else {}
    answer = _store_call(store.score, status.url, INVOCATIONS, payload_of(inputs), headers)
    if answer.status != 200:
        raise DeployError(f"{name} answered {answer.status}: {_error_text(answer)}")
    return answer, status


def _error_text(answer: Answer) -> str:
    text = answer.body[:2000].decode("utf-8", "replace")
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])[:2000]
    return text.strip()


# ------------------------------------------------------------------------------- promote, roll back


def previous_version(status: RegisteredModelServingStatus) -> str | None:
    """What a rollback returns to: the serving version while a rollout is in flight (the candidate is
    dropped), else the last version that served before the serving one."""
    if status.rollout_version is not None and status.serving_version is not None:
        return status.serving_version
    for entry in reversed(status.history or []):
        if entry.outcome == "Serving" and entry.version != status.serving_version:
            return entry.version
    return None


def promote(
    store: ResourceStore,
    name: str,
    version: str,
    *,
    tracking_uri: str | None,
    timeout_s: float,
    on_progress: Callable[[str], None] | None = None,
) -> Done:
    """Point the resource's selector at `version` where it lives (the alias or stage in MLflow, or the
    spec's pinned version), then follow the rollout to its verdict."""
    found = resource(store, name)
    model = (found.get("spec") or {}).get("model") or {}
    if model.get("version"):
        spec = merge(found.get("spec") or {}, {"model": {"version": version}})
        replaced = _store_call(store.replace_spec, name, validated(spec))
        return _finish(store, name, replaced, ClientOptions(True, timeout_s), version, on_progress)
    uri = tracking_uri or ((found.get("spec") or {}).get("registry") or {}).get("trackingUri")
    _move_pointer(str(uri), model, version)
    return follow_rollout(store, name, timeout_s, version, on_progress)


def _move_pointer(tracking_uri: str, model: Mapping[str, Any], version: str) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name = str(model.get("name"))
    try:
        if model.get("alias"):
            client.set_registered_model_alias(name, str(model["alias"]), version)
        else:
            client.transition_model_version_stage(name, version, str(model.get("stage")))
    except MlflowException as error:
        raise DeployError(f"moving {name} to version {version} at {tracking_uri}: {error.message}") from None
