"""Local mode end to end: MLflow promotion → reconcile → Ray dashboard → the endpoint answers anew.

The operator's reconcile runs against the session's real Ray cluster through its dashboard REST API
(as KubeRay does), with the webhook receiver registered in the real MLflow server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient
from regserve_operator.local import (
    DevSession,
    delete_local_webhook,
    load_resources,
    make_session,
    register_local_webhook,
    status_summary,
    webhook_receiver,
)
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.models import log_phrasebook
from regserve_operator.sandbox.processes import free_port, wait_for
from regserve_operator.spec import manifest, manifests_yaml

from tests.support.ray_cluster import LocalRay

pytestmark = pytest.mark.ray

MODEL = "local_mode_model"


def rms(uri: str) -> dict[str, Any]:
    spec = {
        "model": {"name": MODEL, "alias": "champion"},
        "registry": {"trackingUri": uri, "pollIntervalSeconds": 300},
        "serving": {"routePrefix": "/local-translator", "cpusPerReplica": 0.5},
        "rollout": {"deadlineSeconds": 90},
    }
    return manifest("local-translator", spec)


@pytest.fixture(scope="module")
def session(
    mlflow_server: MlflowServer, local_ray: LocalRay, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DevSession]:
    path = tmp_path_factory.mktemp("local") / "rms.yaml"
    path.write_text(manifests_yaml(rms(mlflow_server.url)))
    lines: list[str] = []
    dev = make_session(
        load_resources(path),
        dashboard_url=local_ray.dashboard_url,
        serve_port=int(httpx.URL(local_ray.serve_url).port or 0),
        out=lines.append,
        log_dir=path.parent,
    )
    dev.lines = lines  # type: ignore[attr-defined]
    yield dev
    dev.target.delete("default", "local-translator")
    dev.cluster.stop()


def ask(local_ray: LocalRay) -> httpx.Response:
    return httpx.post(f"{local_ray.serve_url}/local-translator/serve", json={"prompt": "Hello"}, timeout=60)


def serving_ready(session: DevSession, version: str) -> bool:
    status = session.status("local-translator")
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    # servingVersion is written with the patch; the rollout is over when nothing is in flight.
    return status.serving_version == version and ready and status.rollout_version is None


def run_until_serving(session: DevSession, version: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    session.run(until=lambda: serving_ready(session, version) or time.monotonic() > deadline)
    assert serving_ready(session, version), status_summary(session.status("local-translator"))


def test_promotions_roll_out_and_bad_versions_do_not(
    session: DevSession, mlflow_server: MlflowServer, local_ray: LocalRay
) -> None:
    client = MlflowClient(mlflow_server.url)
    v1 = log_phrasebook(mlflow_server.url, MODEL, lang_to="de")
    v2 = log_phrasebook(mlflow_server.url, MODEL, lang_to="fr")
    incompatible = log_phrasebook(mlflow_server.url, MODEL, input_label="text_to_translate")
    broken = log_phrasebook(mlflow_server.url, MODEL, fail_on_load=True)
    client.set_registered_model_alias(MODEL, "champion", v1)

    secret = "local-mode-test-secret"
    with webhook_receiver(session.driver, free_port(), secret) as url:
        webhook = register_local_webhook(mlflow_server.url, url, secret)
        assert webhook is not None
        run_until_serving(session, v1)
        first = ask(local_ray)
        assert first.status_code == 200, (first.status_code, first.text, session.status("local-translator"))
        assert first.json() == [{"translation_text": "Hallo"}]

        # Promotion: the webhook wakes the resource (the poll interval is 300 s, so only it can).
        client.set_registered_model_alias(MODEL, "champion", v2)
        run_until_serving(session, v2, timeout=120)
        deployed = local_ray.applications()["local-translator"]["deployed_app_config"]
        assert deployed["deployments"][0]["user_config"] == {"default_version": v2}
        assert ask(local_ray).json() == [{"translation_text": "Bonjour"}]

        # An incompatible version is held: the old one keeps serving, the reason is in status.
        client.set_registered_model_alias(MODEL, "champion", incompatible)
        session.run(until=lambda: (session.status("local-translator").rejected or None) is not None)
        status = session.status("local-translator")
        assert status.rejected is not None and status.rejected.version == incompatible
        assert status.serving_version == v2
        conditions = {c.type: c for c in status.conditions or []}
        assert conditions["SignatureCompatible"].status == "False"
        assert "prompt" in (conditions["SignatureCompatible"].message or "")
        assert ask(local_ray).json() == [{"translation_text": "Bonjour"}]

        # A version that fails to load is rolled back to the last good one and not retried.
        client.set_registered_model_alias(MODEL, "champion", broken)
        session.run(
            until=lambda: (
                (session.status("local-translator").rejected or None) is not None
                and session.status("local-translator").rejected.version == broken
            )  # type: ignore[union-attr]
        )
        run_until_serving(session, v2, timeout=120)
        assert ask(local_ray).json() == [{"translation_text": "Bonjour"}]
        deployed = local_ray.applications()["local-translator"]["deployed_app_config"]
        # The held and the rolled-back versions are refused to clients' pins (serving.pinning).
        refused = sorted([broken, incompatible], key=int, reverse=True)
        assert deployed["deployments"][0]["user_config"] == {
            "default_version": v2,
            "pinning": {"mode": "Compatible", "refused": refused},
        }
        for version in refused:
            answers: list[str] = []

            def refused_pin(version: str = version, answers: list[str] = answers) -> bool:
                pinned = httpx.post(
                    f"{local_ray.serve_url}/local-translator/serve",
                    json={"prompt": "Hello"},
                    headers={"serve-multiplexed-model-id": version},
                    timeout=60,
                )
                answers.append(f"{pinned.status_code} {pinned.text[:200]}")
                return pinned.status_code == 403 and pinned.json()["error"] == "version_not_allowed"

            # Serve shows the new config before every replica has applied it.
            try:
                wait_for(refused_pin, timeout=60, message=f"pin of {version} refused")
            except Exception as error:
                raise AssertionError(f"pin of {version}: {answers[-3:]}") from error
        assert delete_local_webhook(webhook)
    assert webhook.webhook_id not in {hook.webhook_id for hook in client.list_webhooks()}
    transcript = "\n".join(session.lines)  # type: ignore[attr-defined]
    assert f"serving version {v2}" in transcript
