"""The kube target without a cluster: the Secret read (passing apiserver refusals are asked again, real
ones are not), and RayServices read from the watch's copy with stale copies corrected by the writes."""

from __future__ import annotations

import base64
import copy
from typing import Any

import jsonpatch
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from regserve_operator.builders import build_rayservice, serving_version_of
from regserve_operator.plan import make_plan
from regserve_operator.ports import CredentialsUnavailable
from regserve_operator.sizing import size_replica
from regserve_operator.targets.kube import CREDENTIAL_RETRY_PAUSES_S, KubeTarget, decode_secret_data
from regserve_operator.targets.kube_cache import RayServiceCache

from .helpers import DEFAULTS, OWNER, make_spec


class SecretsAnswering:
    """CoreV1Api's `read_namespaced_secret`, answering from a script of statuses (200 = the Secret)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.calls = 0

    def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        status = self.statuses[min(self.calls, len(self.statuses) - 1)]
        self.calls += 1
        if status != 200:
            raise ApiException(status=status, reason="Refused")
        token = base64.b64encode(b"s3cret").decode()
        return client.V1Secret(data={"MLFLOW_TRACKING_TOKEN": token})


@pytest.mark.parametrize(
    "statuses, calls, ok",
    [
        ([200], 1, True),
        ([403, 403, 200], 3, True),  # a restarted apiserver loading its roles
        ([503, 429, 500, 200], 4, True),
        ([403], 1 + len(CREDENTIAL_RETRY_PAUSES_S), False),  # RBAC really missing: reported after the pauses
        ([404], 1, False),  # no such Secret: reported at once
        ([401], 1, False),
    ],
)
def test_read_credentials_retries_only_passing_refusals(statuses: list[int], calls: int, ok: bool) -> None:
    pauses: list[float] = []
    target = KubeTarget(client.ApiClient(client.Configuration()), sleep=pauses.append)
    secrets = SecretsAnswering(statuses)
    target._core = secrets  # type: ignore[assignment]
    if ok:
        assert target.read_credentials("ml", "mlflow-auth") == {"MLFLOW_TRACKING_TOKEN": "s3cret"}
    else:
        with pytest.raises(CredentialsUnavailable) as raised:
            target.read_credentials("ml", "mlflow-auth")
        assert "s3cret" not in str(raised.value) and f"HTTP {statuses[-1]}" in str(raised.value)
    assert secrets.calls == calls
    assert pauses == list(CREDENTIAL_RETRY_PAUSES_S[: calls - 1])


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    "data, decoded, problem",
    [
        ({"MLFLOW_TRACKING_TOKEN": _b64(b"s3cret")}, {"MLFLOW_TRACKING_TOKEN": "s3cret"}, None),
        (
            {"MLFLOW_TRACKING_PASSWORD": _b64("pässwörd".encode())},
            {"MLFLOW_TRACKING_PASSWORD": "pässwörd"},
            None,
        ),
        ({}, {}, None),
        # Latin-1 text, a DER blob: not UTF-8; the key is named, the value never.
        (
            {"MLFLOW_TRACKING_PASSWORD": _b64("pässwörd".encode("latin-1"))},
            None,
            "'MLFLOW_TRACKING_PASSWORD'",
        ),
        ({"OK": _b64(b"fine"), "keystore.p12": _b64(b"\x30\x82\xff\xfe s3cret")}, None, "'keystore.p12'"),
        # Not base64 at all (the API server never sends that, a hand-made object might): nothing repeated.
        ({"weird key\n": "!!!"}, None, "a key"),
    ],
)
def test_secret_values_that_are_not_utf8_make_credentials_unavailable(
    data: dict[str, str], decoded: dict[str, str] | None, problem: str | None
) -> None:
    if problem is None:
        assert decode_secret_data("ml/auth", data) == decoded
        return
    with pytest.raises(CredentialsUnavailable) as raised:
        decode_secret_data("ml/auth", data)
    message = str(raised.value)
    assert problem in message and "ml/auth" in message and "s3cret" not in message and "\n" not in message


class RayServicesAnswering:
    """CustomObjectsApi for RayServices: one stored object, a write refused as stale when asked to."""

    def __init__(self, stored: dict[str, Any] | None, refuse_next_write: bool = False) -> None:
        self.stored = stored
        self.refuse_next_write = refuse_next_write
        self.reads = 0

    def get_namespaced_custom_object(self, *_: Any) -> Any:
        self.reads += 1
        if self.stored is None:
            raise ApiException(status=404, reason="NotFound")
        return copy.deepcopy(self.stored)

    def create_namespaced_custom_object(self, *args: Any) -> Any:
        body = args[-1]
        if self.stored is not None:
            raise ApiException(status=409, reason="AlreadyExists")
        self.stored = {**copy.deepcopy(body), "status": {}}
        self.stored["metadata"]["resourceVersion"] = "1"
        return copy.deepcopy(self.stored)

    def patch_namespaced_custom_object(self, *args: Any, **_: Any) -> Any:
        if self.refuse_next_write:
            self.refuse_next_write = False
            raise ApiException(status=422, reason="Invalid")
        assert self.stored is not None
        self.stored = jsonpatch.apply_patch(self.stored, args[-1])
        self.stored["metadata"]["resourceVersion"] = str(int(self.stored["metadata"]["resourceVersion"]) + 1)
        return copy.deepcopy(self.stored)


def _desired(version: str) -> dict[str, Any]:
    spec = make_spec()
    size = size_replica(
        model_size_bytes=0, flavors=(), serving=spec.serving, resources=spec.resources, previous=None
    )
    return build_rayservice(OWNER, spec, version, size, DEFAULTS)


def _target(api: RayServicesAnswering) -> tuple[KubeTarget, RayServiceCache]:
    cache = RayServiceCache()
    target = KubeTarget(client.ApiClient(client.Configuration()), cache=cache)
    target._custom = api  # type: ignore[assignment]
    return target, cache


KEY = (OWNER.namespace, "translator")


def test_reads_come_from_the_watch_copy_when_there_is_one() -> None:
    api = RayServicesAnswering(None)
    target, cache = _target(api)
    assert target.get(*KEY) is None and api.reads == 1  # nothing kept: asked
    target.apply(make_plan(_desired("1"), None))
    reads = api.reads
    kept = target.get(*KEY)  # the create's answer went in
    assert kept is not None and serving_version_of(kept) == "1" and api.reads == reads
    kept["spec"] = {}  # a copy: changing it changes nothing kept
    assert serving_version_of(target.get(*KEY) or {}) == "1"
    cache.gone(KEY)  # the watch saw it deleted
    assert target.get(*KEY) is not None and api.reads == reads + 1


def test_a_stale_copy_is_corrected_by_the_write_it_misled() -> None:
    tests = [
        # (name, what the copy says, what the API server has)
        ("created behind the copy's back", None, "1"),
        ("patched since the copy", "1", "2"),
    ]
    for name, copied, stored in tests:
        api = RayServicesAnswering(None)
        target, cache = _target(api)
        target.apply(make_plan(_desired(stored), None))
        assert api.stored is not None
        if copied is None:
            cache.gone(KEY)
        else:
            stale = copy.deepcopy(api.stored)
            stale["spec"]["serveConfigV2"] = _desired(copied)["spec"]["serveConfigV2"]
            stale["metadata"]["resourceVersion"] = "0"
            cache.saw(stale)
        api.refuse_next_write = copied is not None  # the resourceVersion test fails on the stale copy
        target.apply(make_plan(_desired("3"), cache.get(KEY)))
        assert serving_version_of(api.stored) == "3", name
        assert serving_version_of(target.get(*KEY) or {}) == "3", name
