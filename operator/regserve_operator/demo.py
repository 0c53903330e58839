"""`regserve demo`: the whole loop on this machine — MLflow, promotion, rollout, serving.

It starts a real `mlflow server` (sqlite, webhooks on), registers the seed's translation model
(three versions around a tiny, randomly initialised local T5: en→de, en→fr, and one whose input is
renamed), an sklearn classifier and a phrasebook translator whose answers name their language, points
the `champion` aliases at the first versions, then runs local mode (`regserve dev`) on all three. It
promotes once by itself, shows an incompatible version being held back, runs a canary of the
phrasebook (a client's answers from each version per step, as it happens) and a version refused by
its smoke test, and then leaves the floor to you: move the alias in the MLflow UI or with the client
and watch the rollout. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from regserve_operator.local import (
    DevSession,
    LocalWebhook,
    delete_local_webhook,
    load_resources,
    make_session,
    register_local_webhook,
    webhook_receiver,
)
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.processes import free_port
from regserve_operator.spec import manifest, manifests_yaml

TRANSLATOR = "translation_model"
CLASSIFIER = "demo_classifier"
PHRASEBOOK = "demo_phrasebook"


def demo_resources(tracking_uri: str) -> list[dict[str, Any]]:
    """The demo's three resources, each following its model's `champion` alias."""

    def following(model: str, **fields: Any) -> dict[str, Any]:
        registry = {"trackingUri": tracking_uri, "pollIntervalSeconds": 30}
        return {"model": {"name": model, "alias": "champion"}, "registry": registry, **fields}

    return [
        manifest(
            "translator",
            following(
                TRANSLATOR,
                serving={"routePrefix": "/translator", "cpusPerReplica": 0.5, "maxModelsPerReplica": 2},
                rollout={"deadlineSeconds": 180},
            ),
        ),
        manifest(
            "classifier",
            following(
                CLASSIFIER,
                serving={
                    "routePrefix": "/classifier",
                    "cpusPerReplica": 0.5,
                    "batching": {"maxBatchSize": 16, "batchWaitTimeoutMs": 5},
                },
            ),
        ),
        manifest(
            "phrasebook",
            following(
                PHRASEBOOK,
                serving={"routePrefix": "/phrasebook", "cpusPerReplica": 0.5},
                # Short steps for a demo; latency is left unjudged (maxLatencyRatio at its bound): on a
                # busy laptop the p95 of a few dozen requests differs by several times between
                # identical models.
                rollout={
                    "strategy": "Canary",
                    "canary": {
                        "steps": [25, 50],
                        "stepSeconds": 3,
                        "minRequests": 5,
                        "maxErrorRate": 0.05,
                        "maxLatencyRatio": 100,
                    },
                    "deadlineSeconds": 180,
                },
            ),
        ),
    ]


@dataclass
class DemoModels:
    de: str
    fr: str
    renamed_input: str
    classifier: str
    samples: list[list[float]]
    phrase_de: str
    phrase_fr: str
    phrase_broken: str


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(text: str) -> None:
    say()
    say(f"=== {text} " + "=" * max(3, 72 - len(text)))


def register_models(tracking_uri: str, workdir: Path) -> DemoModels:
    from mlflow import MlflowClient

    from regserve_operator.sandbox.models import (
        log_phrasebook,
        log_sklearn_classifier,
        log_tiny_translator,
    )
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
    phrase_de = log_phrasebook(tracking_uri, PHRASEBOOK, lang_to="de", input_example="Hello")
    phrase_fr = log_phrasebook(tracking_uri, PHRASEBOOK, lang_to="fr", input_example="Hello")
    # Loads fine, but its own input example is a prompt it cannot translate: the smoke test fails.
    broken = log_phrasebook(tracking_uri, PHRASEBOOK, lang_to="fr", input_example="boom")
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias(TRANSLATOR, "champion", de)
    client.set_registered_model_alias(CLASSIFIER, "champion", classifier)
    client.set_registered_model_alias(PHRASEBOOK, "champion", phrase_de)
    say(f"registered {TRANSLATOR} v{de} (en→de), v{fr} (en→fr), v{renamed} (input renamed: incompatible)")
    say(f"registered {CLASSIFIER} v{classifier} (scaler + logistic regression, 4 features)")
    say(
        f"registered {PHRASEBOOK} v{phrase_de} (answers in German), v{phrase_fr} (in French), "
        f"v{broken} (fails its own input example); rolled out by canary"
    )
    say(
        f"aliases: {TRANSLATOR}@champion → v{de}, {CLASSIFIER}@champion → v{classifier}, "
        f"{PHRASEBOOK}@champion → v{phrase_de}"
    )
    return DemoModels(
        de,
        fr,
        renamed,
        classifier,
        [list(map(float, row)) for row in samples[:2]],
        phrase_de,
        phrase_fr,
        broken,
    )


def is_ready(status: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


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


@dataclass
class Answer:
    label: str  # the rollout stage status showed when the request was sent
    segment: int  # bumped on every change of label
    version: str | None
    status: int
    text: str


class Traffic:
    """A client sending unpinned requests in a loop, each answer labelled with the stage it was sent in."""

    def __init__(self, url: str, prompt: str = "Hello") -> None:
        self.url, self.prompt = url, prompt
        self.label = ""
        self.segment = 0
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                label, segment = self.label, self.segment
                try:
                    response = http.post(self.url, json={"prompt": self.prompt})
                except httpx.HTTPError as exc:
                    self.answers.append(Answer(label, segment, None, 0, type(exc).__name__))
                else:
                    text = response.text
                    with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                        text = response.json()[0]["translation_text"]
                    self.answers.append(
                        Answer(
                            label,
                            segment,
                            response.headers.get("x-model-version"),
                            response.status_code,
                            text,
                        )
                    )
                time.sleep(0.02)

    def during(self, label: str) -> list[Answer]:
        return [a for a in list(self.answers) if a.label == label]

    def relabel(self, label: str) -> None:
        self.label, self.segment = label, self.segment + 1

    def show_current(self) -> None:
        """The answers the client got since the label last changed."""
        current = [a for a in list(self.answers) if a.segment == self.segment]
        say(f"  {self.label:<24} {shares(current)}")


def stage_label(status: Any) -> str:
    if status.rollout_version is None:
        return f"serving v{status.serving_version}"
    weight = f" {status.rollout_weight}%" if status.rollout_phase == "Canary" else ""
    return f"{status.rollout_phase or 'Pending'}{weight} (v{status.rollout_version})"


def shares(answers: Sequence[Answer]) -> str:
    """`v1 "Hallo" 72% · v2 "Bonjour" 28%` over the answers given."""
    counts: dict[tuple[str | None, int, str], int] = {}
    for a in answers:
        key = (a.version, a.status, a.text[:40])
        counts[key] = counts.get(key, 0) + 1
    total = max(1, len(answers))
    parts = [
        f"v{version} {text!r} {100 * n / total:.0f}%" + ("" if code == 200 else f" (HTTP {code})")
        for (version, code, text), n in sorted(counts.items(), key=lambda kv: -kv[1])
    ]
    return f"{len(answers):3d} answers: " + " · ".join(parts)


def follow_rollout(
    session: DevSession, name: str, traffic: Traffic, done: Callable[[Any], bool], timeout: float
) -> list[str]:
    """Drive the operator until `done(status)`, printing each stage and the answers the client got
    during the previous one as it changes; returns the stage labels in order."""
    deadline = time.monotonic() + timeout
    labels: list[str] = []
    # Stages finished before (an earlier rollout's) are not shown again.
    reported = {(s.phase, s.generation) for s in session.status(name).rollout_stages or []}

    def show_finished_stages(status: Any) -> None:
        for stage in status.rollout_stages or []:
            key = (stage.phase, stage.generation)
            if stage.verdict == "Running" or key in reported:
                continue
            reported.add(key)
            figures = ""
            if stage.candidate is not None and stage.stable is not None:
                figures = (
                    f": stable {stage.stable.requests} requests / {stage.stable.errors} errors, "
                    f"candidate {stage.candidate.requests} / {stage.candidate.errors}"
                )
            weight = f" {stage.weight}%" if stage.phase == "Canary" else ""
            say(f"    operator: {stage.phase}{weight} {stage.verdict}{figures}")

    def step() -> bool:
        status = session.status(name)
        label = stage_label(status)
        if label != traffic.label:
            if traffic.label:
                traffic.show_current()
            show_finished_stages(status)
            traffic.relabel(label)
            labels.append(label)
        return done(status) or time.monotonic() > deadline

    session.run(until=step, tick_s=0.25)
    return labels


def share_of(answers: Sequence[Answer], version: str) -> float:
    return sum(a.version == version for a in answers) / max(1, len(answers))


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
    ok &= wait_serving(session, "phrasebook", models.phrase_de, timeout=600)
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

    ok &= run_canary(session, models, tracking_uri, serve_url)
    return bool(ok)


def run_canary(session: DevSession, models: DemoModels, tracking_uri: str, serve_url: str) -> bool:
    """A canary promotion watched by a client, then a version refused by its smoke test."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    old, new, broken = models.phrase_de, models.phrase_fr, models.phrase_broken
    ok = True
    banner(f"canary: {PHRASEBOOK}@champion → v{new} (steps 25% and 50%, 3 s each)")
    say(f"a client sends {{'prompt': 'Hello'}} to {serve_url}/phrasebook/serve in a loop;")
    say("each line: the stage the operator was in, and the answers the client got meanwhile")
    with Traffic(f"{serve_url}/phrasebook/serve") as traffic:
        time.sleep(1.0)
        client.set_registered_model_alias(PHRASEBOOK, "champion", new)
        served = follow_rollout(
            session,
            "phrasebook",
            traffic,
            lambda st: st.rollout_version is None and st.serving_version == new and is_ready(st),
            timeout=240,
        )
        time.sleep(1.5)
        traffic.show_current()
    answers = traffic.answers
    failed = [a for a in answers if a.status != 200]
    if failed:
        say(f"MISSTEP: {len(failed)} requests failed during the canary, e.g. {failed[0]}")
        ok = False
    for weight in (25, 50):
        label = f"Canary {weight}% (v{new})"
        during = traffic.during(label)
        share = share_of(during, new)
        if label not in served or len(during) < 5 or not weight / 100 - 0.2 <= share <= weight / 100 + 0.2:
            say(
                f"MISSTEP: at the {weight}% step the client got {share:.0%} from v{new} "
                f"({len(during)} answers)"
            )
            ok = False
    after = traffic.during(f"serving v{new}")
    if not after or any(a.version != new for a in after):
        say(f"MISSTEP: after the promotion not every answer came from v{new}: {shares(after)}")
        ok = False
    wrong = [
        a
        for a in answers
        if a.version in (old, new) and a.text != ("Hallo" if a.version == old else "Bonjour")
    ]
    if wrong:
        say(f"MISSTEP: an answer that is not its version's own: {wrong[0]}")
        ok = False

    banner(f"smoke test: champion → v{broken} (loads, but fails its own input example)")
    with Traffic(f"{serve_url}/phrasebook/serve") as traffic:
        client.set_registered_model_alias(PHRASEBOOK, "champion", broken)
        follow_rollout(
            session,
            "phrasebook",
            traffic,
            lambda st: st.rejected is not None and st.rejected.version == broken,
            timeout=180,
        )
        time.sleep(1.0)
        traffic.show_current()
    status = session.status("phrasebook")
    rejected = status.rejected
    if rejected is None or rejected.version != broken or rejected.reason != "SmokeTestFailed":
        say(f"MISSTEP: v{broken} was not held for its smoke test: {rejected}")
        ok = False
    else:
        say(f"held: v{broken} {rejected.reason}: {rejected.message}")
    tag = (status.registry_tags or {}).get(broken)
    if tag:
        say(f"registry tag on v{broken}: {tag}")
    answered_by = {a.version for a in traffic.answers}
    say(
        f"still serving v{status.serving_version}; "
        f"versions that answered meanwhile: {', '.join(sorted(map(str, answered_by)))}"
    )
    if status.serving_version != new or answered_by != {new} or any(a.status != 200 for a in traffic.answers):
        say(f"MISSTEP: v{new} did not keep answering alone while v{broken} was smoke-tested")
        ok = False
    client.set_registered_model_alias(PHRASEBOOK, "champion", new)
    # Let MLflow's webhook for that move arrive before anything stops (a delivery still in flight
    # when the receiver closes holds its shutdown up).
    settle = time.monotonic() + 3
    session.run(until=lambda: time.monotonic() > settle)
    return ok


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
        canary:     move {PHRASEBOOK}@champion (v{models.phrase_de}: Hallo, v{models.phrase_fr}: Bonjour), \
watch {serve_url}/phrasebook/rollout
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
        resources_file = workdir / "regserve-demo.yaml"
        resources_file.write_text(manifests_yaml(*demo_resources(server.url)))
        say(f"resources: {resources_file}")

        banner("Ray + regserve (local mode)")
        session = make_session(
            load_resources(resources_file),
            dashboard_url=f"http://127.0.0.1:{args.dashboard_port}",
            serve_port=args.serve_port,
            log_dir=workdir,
        )
        cleanups.insert(0, session.cluster.stop)
        serve_url = f"http://127.0.0.1:{args.serve_port}"
        secret = "demo-" + str(free_port())
        with webhook_receiver(session.driver, free_port(), secret) as url:
            webhook = register_local_webhook(server.url, url, secret)
            if webhook is not None:
                say(f"MLflow posts registry events to {url}; polling every 30 s stays as the fallback")
                # Before the server stops (cleanups run in order: the cluster, this, then MLflow).
                cleanups.insert(1, functools.partial(_delete_quietly, webhook))
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


def _delete_quietly(webhook: LocalWebhook) -> None:
    delete_local_webhook(webhook)  # says so itself when it cannot


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
