"""Fixtures for tests against the real control plane (``tests/k8s/plane.py``), for the whole test suite.

A pytest plugin, loaded once by ``tests/conftest.py``: tests/k8s and tests/install share one session
plane (started on first use, stopped at the end), so a run never starts a second one.

How to use them:

- Mark the test ``@pytest.mark.k8s`` (tests that use ``kube_plane``, directly or through another
  fixture, get the marker automatically too, so ``-m "not k8s"`` always deselects them).
- ``kube_api`` is a ``kubernetes.client.ApiClient`` as cluster admin: wrap it, e.g.
  ``client.CoreV1Api(kube_api)``, ``client.CustomObjectsApi(kube_api)``.
- ``kube_namespace`` is a fresh namespace per test (deleted afterwards, without waiting).
- ``mint_kubeconfig(namespace, service_account)`` creates the ServiceAccount if needed, requests a token
  for it (TokenRequest API) and returns the path of a kubeconfig that authenticates as it: give that to
  the code under test (``KUBECONFIG=...``) so it runs with exactly the RBAC you granted, nothing more.
- ``kuberay_namespace`` is the only namespace the KubeRay operator watches; create RayServices there to
  have KubeRay reconcile them. In any other namespace RayService status is yours to write.
- Fake nodes: ``plane.CPU_NODE`` and ``plane.GPU_NODE`` (``nvidia.com/gpu`` capacity 4, label
  ``plane.GPU_PRODUCT_LABEL``, taint ``plane.GPU_TAINT``); pods bound to them turn Running (KWOK).
- ``admin_kubeconfig`` is the path of an admin kubeconfig, for subprocesses; ``helm_binary`` the pinned helm.
- CRDs from ``crds/*.yaml`` and KubeRay's CRDs are installed once at session start. The plane is shared:
  a test that changes something cluster-wide (a CRD, a ClusterRole) puts it back or gives it a unique name.

If the binaries are missing the tests are skipped, unless ``CI=true``, where that is an error. Component
logs are appended to the report of a failing ``k8s`` test and kept on disk when any test failed.
Poll with deadlines (``plane.wait_for``), never sleep to synchronise.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from kubernetes import client

    from tests.k8s import plane

# Every session loads this plugin, most never start the plane: `tests.k8s.plane` (and the kubernetes
# client, about a second to import) is imported by the fixtures that need it, not here.

_PLANE_KEY = pytest.StashKey["plane.ControlPlane"]()
_STARTUP_KEY = pytest.StashKey[str]()
_KEPT_KEY = pytest.StashKey[str]()


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _tools_or_skip() -> plane.Tools:
    from tests.k8s import plane

    try:
        return plane.find_tools()
    except plane.ToolsMissing as exc:
        if _in_ci():
            pytest.fail(f"{exc} (CI=true: a missing tool is an error, not a skip)", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def kube_tools() -> plane.Tools:
    """Paths of the pinned binaries (skip, or fail under CI=true, when ``make tools`` has not run)."""
    return _tools_or_skip()


@pytest.fixture(scope="session")
def helm_binary(kube_tools: plane.Tools) -> Path:
    """The pinned helm binary."""
    return kube_tools.helm


@pytest.fixture(scope="session")
def kube_plane(request: pytest.FixtureRequest, kube_tools: plane.Tools) -> Iterator[plane.ControlPlane]:
    """The running control plane, shared by the whole session (started on first use)."""
    from tests.k8s import plane

    try:
        started = plane.ControlPlane(tools=kube_tools).start()
    except plane.NetworkUnavailable as exc:
        # The plane must own its address ranges (root, network namespaces) or cluster traffic would
        # leave the machine.
        if _in_ci():
            pytest.fail(f"{exc} (CI=true: the control plane cannot run here)", pytrace=False)
        pytest.skip(f"control plane needs network namespaces: {exc}")
    except plane.PlaneError as exc:
        pytest.fail(f"control plane failed to start: {exc}", pytrace=False)
    request.config.stash[_PLANE_KEY] = started
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in started.timings.items())
    request.config.stash[_STARTUP_KEY] = timings
    yield started
    keep = request.session.testsfailed > 0
    started.stop(keep_logs=keep)
    if keep:
        request.config.stash[_KEPT_KEY] = str(started.log_dir)


@pytest.fixture(scope="session")
def admin_kubeconfig(kube_plane: plane.ControlPlane) -> Path:
    """Path of a kubeconfig for the cluster admin (system:masters), CA embedded."""
    return kube_plane.admin_kubeconfig


@pytest.fixture(scope="session")
def kube_api(kube_plane: plane.ControlPlane) -> Iterator[client.ApiClient]:
    """A ``kubernetes.client.ApiClient`` authenticated as the cluster admin."""
    with kube_plane.api_client() as api:
        yield api


@pytest.fixture(scope="session")
def kuberay_namespace(kube_plane: plane.ControlPlane) -> str:
    """The one namespace the KubeRay operator watches (shared: give your objects unique names)."""
    return kube_plane.kuberay_namespace


@pytest.fixture
def kube_namespace(kube_api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace for this test; deleted afterwards without waiting for it to go."""
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    name = f"t-{uuid.uuid4().hex[:10]}"
    labels = {"regserve.io/test": "true"}
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
    yield name
    core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture(scope="session")
def mint_kubeconfig(kube_plane: plane.ControlPlane) -> plane.MintKubeconfig:
    """``mint_kubeconfig(namespace, service_account, *, expiration_seconds=3600) -> Path``.

    Creates the ServiceAccount if it does not exist, asks the TokenRequest API for a token and writes a
    kubeconfig authenticating as ``system:serviceaccount:<namespace>:<service_account>``. It carries no
    permissions beyond what RBAC grants that account (bind roles before or after minting: RBAC is
    evaluated per request). Session-scoped, so session fixtures (a long-running operator) can use it too.
    """

    def mint(namespace: str, service_account: str, *, expiration_seconds: int = 3600) -> Path:
        return kube_plane.mint_kubeconfig(namespace, service_account, expiration_seconds=expiration_seconds)

    return mint


# --------------------------------------------------------------------------------------------------
# Hooks: auto-marking, logs on failure, startup timings in the summary


@pytest.hookimpl(tryfirst=True)  # before the mark plugin applies -m, so "not k8s" sees the marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "kube_plane" in getattr(item, "fixturenames", ()) and item.get_closest_marker("k8s") is None:
            item.add_marker(pytest.mark.k8s)


@pytest.hookimpl(trylast=True)  # after -m deselection: only tests that will run count
def pytest_collection_finish(session: pytest.Session) -> None:
    """Starts installing the pods' serving environment in the background as soon as a ``kuberay`` test
    is going to run: cold, it takes minutes, and the tests before it need not wait."""
    if any(item.get_closest_marker("kuberay") for item in session.items):
        import threading

        from tests.k8s import serving_env

        def install() -> None:
            # A failure is reported by the pods that need the environment (the runner retries it).
            with contextlib.suppress(Exception):
                serving_env.install(log=Path(serving_env.cache_root()) / "install.log")

        if not serving_env.ready():
            threading.Thread(target=install, name="serving-env-install", daemon=True).start()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A component that died mid-session fails the next test at once, with its log, instead of a timeout."""
    started = item.config.stash.get(_PLANE_KEY, None)
    if started is not None and "kube_plane" in getattr(item, "fixturenames", ()):
        from tests.k8s import plane

        try:
            started.check_alive()
        except plane.PlaneError as exc:
            pytest.fail(str(exc), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    started = item.config.stash.get(_PLANE_KEY, None)
    if report.failed and started is not None and "kube_plane" in getattr(item, "fixturenames", ()):
        report.sections.append(("control plane logs", started.log_tails(lines=30)))
    return report


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    timings = config.stash.get(_STARTUP_KEY, None)
    if timings:
        terminalreporter.write_line(f"control plane startup: {timings}")
    kept = config.stash.get(_KEPT_KEY, None)
    if kept:
        terminalreporter.write_line(f"control plane logs kept in {kept}")
