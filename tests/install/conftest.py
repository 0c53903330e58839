"""Control-plane fixtures for the install tests, scoped to this package.

tests/k8s/conftest.py defines the same fixtures session-scoped. pytest keys fixtures by the conftest that
declares them, so importing those here would give this directory its own *session* plane, alive until
the end of a run that also collects tests/k8s: two control planes at once on a 2-core machine. Here the
plane is package-scoped instead: it starts for the first install test and stops after the last one,
before tests/k8s starts its own. The fixtures keep the names and behaviour documented in
tests/k8s/conftest.py (kube_tools, helm_binary and kube_namespace are imported as they are).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests.k8s import plane
from tests.k8s.conftest import helm_binary, kube_namespace, kube_tools

__all__ = ["helm_binary", "kube_namespace", "kube_tools"]


@pytest.fixture(scope="package")
def kube_plane(request: pytest.FixtureRequest, kube_tools: plane.Tools) -> Iterator[plane.ControlPlane]:
    try:
        started = plane.ControlPlane(tools=kube_tools).start()
    except plane.PlaneError as exc:
        pytest.fail(f"control plane failed to start: {exc}", pytrace=False)
    yield started
    keep = request.session.testsfailed > 0
    started.stop(keep_logs=keep)
    if keep:
        print(f"\ncontrol plane logs kept in {started.log_dir}")


@pytest.fixture(scope="package")
def admin_kubeconfig(kube_plane: plane.ControlPlane) -> Path:
    return kube_plane.admin_kubeconfig


@pytest.fixture(scope="package")
def kube_api(kube_plane: plane.ControlPlane) -> Iterator[client.ApiClient]:
    with kube_plane.api_client() as api:
        yield api


@pytest.fixture(scope="package")
def mint_kubeconfig(kube_plane: plane.ControlPlane) -> plane.MintKubeconfig:
    def mint(namespace: str, service_account: str, *, expiration_seconds: int = 3600) -> Path:
        return kube_plane.mint_kubeconfig(namespace, service_account, expiration_seconds=expiration_seconds)

    return mint
