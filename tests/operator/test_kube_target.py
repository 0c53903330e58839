"""The kube target's Secret read: passing apiserver refusals are asked again, real ones are not."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from regserve_operator.ports import CredentialsUnavailable
from regserve_operator.targets.kube import CREDENTIAL_RETRY_PAUSES_S, KubeTarget


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
