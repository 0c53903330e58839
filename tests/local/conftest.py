"""Every `regserve dev` these tests start (in process, or as a process, which inherits the environment)
keeps its session file in this test run's own directory: never in the home directory, never shared
with a `regserve dev` the user or another test run has going."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def own_session_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REGSERVE_DEV_SESSION", str(tmp_path_factory.mktemp("session") / "dev-session.json"))
        yield
