"""One resource's unexpected error does not stop the reconcile loop for the others (pure, no Ray)."""

from __future__ import annotations

from typing import Any

from regserve_operator.builders import Owner, serving_version_of
from regserve_operator.driver import Driver
from regserve_operator.reconcile import Deps
from regserve_operator.registry import Registry

from tests.operator.fakes import FakeRegistryServer, FakeTarget, signature
from tests.operator.helpers import DEFAULTS, make_spec


class BrokenFor(FakeTarget):
    """A target whose reads fail for one RayService (a bug or a malformed object)."""

    def __init__(self, broken: str) -> None:
        super().__init__()
        self.broken = broken

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        if name == self.broken:
            raise KeyError("status")
        return super().get(namespace, name)


def test_one_failing_resource_does_not_stop_the_others() -> None:
    server = FakeRegistryServer()
    server.add("1", signature(prompt="string"))
    server.aliases["champion"] = "1"
    target = BrokenFor("bad")
    registry = Registry(transport=server.transport(), fetch_facts=server.fetch_facts)
    driver = Driver(Deps(registry=registry, target=target, defaults=DEFAULTS, settle_seconds=0))
    spec = make_spec(registry={"trackingUri": "http://mlflow:5000"})
    bad, good = Owner("bad", "ml", "u1"), Owner("good", "ml", "u2")
    driver.apply(bad, spec)
    driver.apply(good, spec)
    outcomes = driver.run_once()
    assert len(outcomes) == 1  # the failing one produced none, and did not raise
    assert serving_version_of(target.get("ml", "good") or {}) == "1"
    assert driver.status(bad).serving_version is None
    assert not driver.scheduler.due(("ml", "bad"))  # retried after a backoff, not in a hot loop
