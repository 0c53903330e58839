from __future__ import annotations

import pytest
from regserve_operator import cli
from regserve_operator.crd import crd_yaml
from regserve_operator.rbac import rbac_yaml


def test_crd_command_prints_the_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["crd"]) == 0
    assert capsys.readouterr().out == crd_yaml()


def test_rbac_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["rbac", "--namespace", "ops"]) == 0
    assert capsys.readouterr().out == rbac_yaml("ops")


def test_run_needs_a_scope() -> None:
    with pytest.raises(SystemExit):
        cli.main(["run"])


def test_dev_and_demo_delegate_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, list[str]]] = []

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def main(self, argv: list[str]) -> int:
            seen.append((self.name, argv))
            return 0

    monkeypatch.setattr(cli.importlib, "import_module", lambda name: Fake(name))
    assert cli.main(["dev", "-f", "rms.yaml"]) == 0
    assert cli.main(["demo"]) == 0
    assert seen == [("regserve_operator.local", ["-f", "rms.yaml"]), ("regserve_operator.demo", [])]


def test_webhook_register_needs_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGSERVE_WEBHOOK_SECRET", raising=False)
    with pytest.raises(SystemExit, match="REGSERVE_WEBHOOK_SECRET"):
        cli.main(["webhook", "register", "--tracking-uri", "http://127.0.0.1:9", "--url", "http://x/webhook"])
