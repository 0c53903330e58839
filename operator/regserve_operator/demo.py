"""`regserve demo`: the whole loop on this machine — MLflow, promotion, rollout, serving.

It starts a real `mlflow server` (sqlite, webhooks on), registers the seed's translation model
(three versions around a tiny, randomly initialised local T5: en→de, en→fr, and one whose input is
renamed) and an sklearn classifier, points the `champion` aliases at the first versions, then runs
local mode (`regserve dev`) on both. It promotes once by itself, shows an incompatible version being
held back, and then leaves the floor to you: move the alias in the MLflow UI or with the client and
watch the rollout. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from regserve_operator.local import (
    DevSession,
    load_resources,
    make_session,
    register_local_webhook,
    webhook_receiver,
)
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.processes import free_port

TRANSLATOR = "translation_model"
CLASSIFIER = "demo_classifier"

RESOURCES = """\
apiVersion: regserve.io/v1alpha1
kind: RegisteredModelServing
metadata: {{name: translator}}
spec:
  model: {{name: {translator}, alias: champion}}
  registry: {{trackingUri: "{uri}", pollIntervalSeconds: 30}}
  serving: {{routePrefix: /translator, cpusPerReplica: 0.5, maxModelsPerReplica: 2}}
  rollout: {{deadlineSeconds: 180}}
---
apiVersion: regserve.io/v1alpha1
kind: RegisteredModelServing
metadata: {{name: classifier}}
spec:
  model: {{name: {classifier}, alias: champion}}
  registry: {{trackingUri: "{uri}", pollIntervalSeconds: 30}}
  serving:
    routePrefix: /classifier
    cpusPerReplica: 0.5
    batching: {{maxBatchSize: 16, batchWaitTimeoutMs: 5}}
"""


@dataclass
class DemoModels:
    de: str
    fr: str
    renamed_input: str
    classifier: str
    samples: list[list[float]]


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    say()
    say(f"=== {text} " + "=" * max(3, 72 - len(text)))


def register_models(tracking_uri: str, workdir: Path) -> DemoModels:
    from mlflow import MlflowClient

    from regserve_operator.sandbox.models import log_sklearn_classifier, log_tiny_translator
    from serving_app.examples.tiny_t5 import build_tiny_t5

    say("building a tiny T5 (random weights: the answers are gibberish, the code path is real) ...")
    t5 = build_tiny_t5(workdir / "tiny-t5")
    # min_new_tokens keeps random weights from answering with an empty string.
    de = log_tiny_translator(tracking_uri, TRANSLATOR, t5, lang_to="de", min_new_tokens=3)
    fr = log_tiny_translator(tracking_uri, TRANSLATOR, t5, lang_to="fr", min_new_tokens=3)
    renamed = log_tiny_translator(
        tracking_uri, TRANSLATOR, t5, input_label="text_to_translate", min_new_tokens=3
    )
    classifier, samples, _ = log_sklearn_classifier(tracking_uri, CLASSIFIER)
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias(TRANSLATOR, "champion", de)
    client.set_registered_model_alias(CLASSIFIER, "champion", classifier)
    say(f"registered {TRANSLATOR} v{de} (en→de), v{fr} (en→fr), v{renamed} (input renamed: incompatible)")
    say(f"registered {CLASSIFIER} v{classifier} (scaler + logistic regression, 4 features)")
    say(f"aliases: {TRANSLATOR}@champion → v{de}, {CLASSIFIER}@champion → v{classifier}")
    return DemoModels(de, fr, renamed, classifier, [list(map(float, row)) for row in samples[:2]])


def wait_serving(session: DevSession, name: str, version: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout

    def done() -> bool:
        status = session.status(name)
        ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
        settled = ready and status.rollout_version is None and status.serving_version == version
        return settled or time.monotonic() > deadline

    session.run(until=done)
    return session.status(name).serving_version == version and time.monotonic() <= deadline


def wait_held(session: DevSession, name: str, version: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout

    def done() -> bool:
        rejected = session.status(name).rejected
        return (rejected is not None and rejected.version == version) or time.monotonic() > deadline

    session.run(until=done)
    rejected = session.status(name).rejected
    return rejected is not None and rejected.version == version


def show_request(url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    header_flags = "".join(f" -H '{k}: {v}'" for k, v in (headers or {}).items())
    say(f"$ curl -s {url} -H 'content-type: application/json'{header_flags} -d '{json.dumps(body)}'")
    response = httpx.post(url, json=body, headers=headers, timeout=120)
    version = response.headers.get("x-model-version", "?")
    say(f"  {response.status_code} (version {version}) {response.text[:300]}")
    return response


def run_script(session: DevSession, models: DemoModels, tracking_uri: str, serve_url: str) -> bool:
    """The guided part; returns whether every step did what it should."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    ok = True
    banner("first rollout")
    ok &= wait_serving(session, "translator", models.de, timeout=600)
    ok &= wait_serving(session, "classifier", models.classifier, timeout=600)
    banner("serving")
    prompt = {"prompt": "The weather is lovely today"}
    ok &= show_request(f"{serve_url}/translator/serve", prompt).status_code == 200
    ok &= show_request(
        f"{serve_url}/translator/serve", prompt, {"serve-multiplexed-model-id": models.fr}
    ).is_success
    ok &= show_request(f"{serve_url}/classifier/serve", models.samples).status_code == 200
    show_request(
        f"{serve_url}/translator/serve", prompt, {"serve-multiplexed-model-id": models.renamed_input}
    )
    say(f"OpenAPI docs from the signature: {serve_url}/translator/docs")

    banner(f"promotion: {TRANSLATOR}@champion → v{models.fr}")
    started = time.monotonic()
    client.set_registered_model_alias(TRANSLATOR, "champion", models.fr)
    ok &= wait_serving(session, "translator", models.fr, timeout=300)
    say(
        f"rolled out in {time.monotonic() - started:.1f} s (webhook → reconcile → Serve config → reconfigure)"
    )
    ok &= show_request(f"{serve_url}/translator/serve", prompt).headers.get("x-model-version") == models.fr

    banner(f"promotion of an incompatible version: champion → v{models.renamed_input}")
    client.set_registered_model_alias(TRANSLATOR, "champion", models.renamed_input)
    ok &= wait_held(session, "translator", models.renamed_input, timeout=120)
    status = session.status("translator")
    rejected = status.rejected
    if rejected is not None:
        say(f"held back: {rejected.message}; {'; '.join(rejected.differences or [])}")
    say(f"still serving v{status.serving_version}")
    client.set_registered_model_alias(TRANSLATOR, "champion", models.fr)
    return bool(ok)


def invite(tracking_uri: str, serve_url: str, models: DemoModels) -> None:
    banner("your turn")
    say(
        textwrap.dedent(f"""\
        MLflow UI:  {tracking_uri}   (Models → {TRANSLATOR} → set the 'champion' alias on another version)
        or:         .venv/bin/python -c "import mlflow; mlflow.MlflowClient('{tracking_uri}').\\
set_registered_model_alias('{TRANSLATOR}', 'champion', '{models.de}')"
        endpoint:   curl -s {serve_url}/translator/serve -H 'content-type: application/json' \\
                      -d '{{"prompt": "Hello"}}'
        metadata:   curl -s {serve_url}/translator/metadata
        Each rollout is printed here as it happens. Ctrl-C stops everything this demo started.""")
    )


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="regserve demo", description="the whole loop on this machine")
    parser.add_argument("--workdir", type=Path, default=Path(".demo"), help="scratch space (recreated)")
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--serve-port", type=int, default=8000)
    parser.add_argument("--scripted", action="store_true", help="run the guided part, then exit (for tests)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    workdir = args.workdir.resolve()
    mlflow_port = args.mlflow_port if args.mlflow_port and _port_free(args.mlflow_port) else free_port()
    server = MlflowServer(root=workdir / "mlflow", port=mlflow_port)
    cleanups: list[Callable[[], None]] = [server.stop]
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        banner("MLflow")
        server.start()
        say(f"mlflow server at {server.url} (sqlite in {workdir / 'mlflow'}, webhooks enabled)")
        models = register_models(server.url, workdir)
        manifest = workdir / "regserve-demo.yaml"
        manifest.write_text(RESOURCES.format(translator=TRANSLATOR, classifier=CLASSIFIER, uri=server.url))
        say(f"resources: {manifest}")

        banner("Ray + regserve (local mode)")
        session = make_session(
            load_resources(manifest),
            dashboard_url=f"http://127.0.0.1:{args.dashboard_port}",
            serve_port=args.serve_port,
            log_dir=workdir,
        )
        cleanups.insert(0, session.cluster.stop)
        serve_url = f"http://127.0.0.1:{args.serve_port}"
        secret = "demo-" + str(free_port())
        with webhook_receiver(session.driver, free_port(), secret) as url:
            if register_local_webhook(server.url, url, secret):
                say(f"MLflow posts registry events to {url}; polling every 30 s stays as the fallback")
            ok = run_script(session, models, server.url, serve_url)
            banner("result")
            say("every step did what it should" if ok else "some step did NOT do what it should (see above)")
            if args.scripted:
                return 0 if ok else 1
            invite(server.url, serve_url, models)
            session.run()
    except KeyboardInterrupt:
        say("\nstopping ...")
    finally:
        for cleanup in cleanups:
            with contextlib.suppress(Exception):
                cleanup()
    return 0


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
