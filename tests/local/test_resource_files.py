"""`regserve dev -f a.yaml -f b.yaml`: every resource of every file, one local cluster for all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from regserve_operator import local
from regserve_operator.spec import manifest, manifests_yaml

SPEC = {"model": {"name": "m", "alias": "champion"}, "registry": {"trackingUri": "http://127.0.0.1:5000"}}


def _write(path: Path, *names: str) -> Path:
    path.write_text(manifests_yaml(*(manifest(name, SPEC) for name in names)))
    return path


def test_every_resource_of_every_file(tmp_path: Path) -> None:
    first = _write(tmp_path / "a.yaml", "one", "two")
    second = _write(tmp_path / "b.yaml", "three")
    resources = local.load_resource_files([first, second])
    assert [r.owner.name for r in resources] == ["one", "two", "three"]
    assert len({r.owner.uid for r in resources}) == 3


def test_a_name_defined_twice_is_refused(tmp_path: Path) -> None:
    first = _write(tmp_path / "a.yaml", "one")
    second = _write(tmp_path / "b.yaml", "one")
    with pytest.raises(SystemExit, match="default/one is defined more than once"):
        local.load_resource_files([first, second])


class _Started(Exception):
    pass


def test_dev_takes_several_files_into_one_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sessions: list[list[str]] = []

    def make_session(resources: list[local.Resource], **_: Any) -> None:
        sessions.append([r.owner.name for r in resources])
        raise _Started

    monkeypatch.setattr(local, "make_session", make_session)
    first = _write(tmp_path / "a.yaml", "one")
    second = _write(tmp_path / "b.yaml", "two")
    with pytest.raises(_Started):
        local.main(["-f", str(first), "-f", str(second)])
    assert sessions == [["one", "two"]]
