"""Rollout rules a newcomer meets in local mode, with real MLflow and real Ray.

Promote v2; while its rollout is still being judged (it already answers), move the alias to a version
whose signature is incompatible. The incompatible version is held, and v2 — healthy and answering —
stays: it is not thrown away for the last *settled* version.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook

from tests.reliability.local_harness import Harness
from tests.support.ray_cluster import LocalRay

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HALLO = [{"translation_text": "Hallo"}]
BONJOUR = [{"translation_text": "Bonjour"}]
# Long enough that v2's rollout is still being judged when the alias moves on.
SETTLE_S = 120.0


@pytest.fixture
def harness(mlflow_server: MlflowServer, local_ray: LocalRay, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(
        local_ray,
        tmp_path,
        [{"name": "superseded", "model": "rules_superseded", "uri": mlflow_server.url, "deadline": 600}],
    )
    try:
        yield h
    finally:
        h.close()


def test_answering_version_stays_when_the_alias_moves_to_an_incompatible_one(
    mlflow_server: MlflowServer, harness: Harness
) -> None:
    model, name = "rules_superseded", "superseded"
    client = MlflowClient(mlflow_server.url)
    v1 = log_phrasebook(mlflow_server.url, model, lang_to="de")
    v2 = log_phrasebook(mlflow_server.url, model, lang_to="fr")
    v3 = log_phrasebook(mlflow_server.url, model, lang_to="fr", input_label="text")  # prompt dropped
    client.set_registered_model_alias(model, "champion", v1)
    harness.session.driver.deps.settle_seconds = 1
    harness.run_until(lambda: harness.serving(name, v1), timeout=120, what=f"serving {v1}")
    harness.session.driver.deps.settle_seconds = SETTLE_S

    client.set_registered_model_alias(model, "champion", v2)
    harness.session.driver.model_changed(model)
    harness.run_until(
        lambda: harness.status(name).rollout_version == v2 and harness.answer(name) == BONJOUR,
        timeout=90,
        what=f"{v2} answering while its rollout is judged",
    )

    client.set_registered_model_alias(model, "champion", v3)
    harness.session.driver.model_changed(model)
    harness.run_until(
        lambda: getattr(harness.status(name).rejected, "version", None) == v3, timeout=60, what=f"{v3} held"
    )
    status = harness.status(name)
    assert status.rejected is not None and status.rejected.reason == "Incompatible"
    assert status.last_good_version == v2 and status.serving_version == v2, status
    assert status.rollout_version is None
    assert harness.deployed_default(name) == v2
    assert harness.answer(name) == BONJOUR
    # Gated against what actually serves: the differences name v2's input.
    assert "prompt" in " ".join(status.rejected.differences or [])
