"""Session fixtures shared by every test package: a real `mlflow server` and a real local Ray.

The control-plane fixtures (tests/k8s/fixtures.py) are a plugin loaded here, the rootdir conftest, so
that tests/k8s and tests/install share one session plane.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer

from tests import tiers
from tests.support.ray_cluster import LocalRay, start_local_ray, stop_local_ray

pytest_plugins = ["tests.k8s.fixtures"]

TESTS = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything: every collected test is checked
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Stops the run when a test's directory does not match what it needs (tests/tiers.py)."""
    problems = []
    for item in items:
        try:
            where = item.path.resolve().relative_to(TESTS).parts
        except ValueError:  # not under tests/
            continue
        directory = where[0] if len(where) > 1 else ""
        marked, needed = tiers.parts((m.name for m in item.iter_markers()), getattr(item, "fixturenames", ()))
        reason = tiers.misplaced(directory, marked, needed)
        if reason is not None:
            problems.append(f"  {item.nodeid}: {reason}")
    if problems:
        raise pytest.UsageError("tests in the wrong directory (tests/tiers.py):\n" + "\n".join(problems))


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real `mlflow server` (sqlite backend, proxied artifacts, webhooks enabled) for the session."""
    server = MlflowServer(root=tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def local_ray() -> Iterator[LocalRay]:
    """A real Ray cluster (this process is its driver) with Serve on a free port and the dashboard up."""
    cluster = start_local_ray()
    try:
        yield cluster
    finally:
        stop_local_ray()
