from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .mlflow_fixture import MlflowServer, start_mlflow


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = start_mlflow(Path(tmp_path_factory.mktemp("mlflow")))
    try:
        yield server
    finally:
        server.stop()
