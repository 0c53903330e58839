"""Rollouts on real replicas (docs/rollouts.md, the app side): a real mlflow server, real Ray Serve
with 2 replicas of one application, `user_config.candidate` changed in place as the operator does,
and the figures read back from `GET /rollout` (summed over both replicas by the board actor)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pandas as pd
import pytest
import ray
from mlflow.models import infer_signature
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.processes import wait_for

from serving_app.board import BOARD_NAME, BOARD_NAMESPACE
from tests.serving.conftest import app_config
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "rollout_model"
APP = "rollouts"
MODEL_CODE = Path(__file__).with_name("rollout_model.py")
STICKY = "X-Regserve-Sticky"


def log_replier(
    tracking_uri: str,
    *,
    lang: str,
    fail_on: tuple[str, ...] = (),
    example: str | None = None,
    sleep_s: float = 0.0,
) -> str:
    mlflow.set_tracking_uri(tracking_uri)
    signature = infer_signature(pd.DataFrame({"prompt": ["Hello"]}), [{"translation_text": "x"}])
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            model_config={"lang": lang, "fail_on": list(fail_on), "sleep_s": sleep_s},
            signature=signature,
            input_example=pd.DataFrame({"prompt": [example]}) if example is not None else None,
            pip_requirements=["mlflow", "pandas"],
            registered_model_name=MODEL,
        )
    return str(info.registered_model_version)


@dataclass
class Rollouts:
    url: str
    local_ray: LocalRay
    tracking_uri: str
    config: dict[str, Any]
    stable: str  # answers "[de] ..."
    same: str  # answers as the stable one does
    french: str  # answers "[fr] ...": disagrees with the stable one
    broken_example: str  # fails on its own input example ("boom")
    fails_hello: str  # passes its smoke test (synthesized payload) but fails on "Hello"
    slow: str  # answers as the stable one does, after 4 s
    generation: int = 0

    def configure(self, candidate: dict[str, Any] | None, *, default: str | None = None) -> dict[str, Any]:
        """Apply `candidate` in place (a new generation) and wait until both replicas report on it."""
        user_config: dict[str, Any] = {"default_version": default or self.stable}
        if candidate is not None:
            self.generation += 1
            user_config["candidate"] = {"generation": self.generation, **candidate}
        self.config["deployments"][0]["user_config"] = user_config
        self.local_ray.deploy(self.config)
        return wait_for_report(self.url, generation=self.generation if candidate else None)


def rollout(url: str) -> dict[str, Any]:
    response = httpx.get(f"{url}/rollout", timeout=30)
    response.raise_for_status()  # while polling: "not yet"
    return dict(response.json())


def wait_for_report(url: str, *, generation: int | None, timeout: float = 120) -> dict[str, Any]:
    found: dict[str, Any] = {}

    def reported() -> bool:
        found.update(rollout(url))
        if found["generation"] != generation or found["replicas"] != 2:
            return False
        smoke = found["smoke"]
        # "failed" is reported as soon as one replica fails; wait for both results here.
        return (
            generation is None
            or smoke["replicas_passed"] + smoke["replicas_failed"] == 2
            or (smoke["code"] == "invalid_candidate")
        )

    wait_for(reported, timeout=timeout, interval=0.25, message=f"/rollout on generation {generation}")
    return found


def wait_for_counts(url: str, predicate: Any, *, timeout: float = 30) -> dict[str, Any]:
    """Poll /rollout until `predicate(report)` holds (replicas push every 0.5 s)."""
    found: dict[str, Any] = {}

    def holds() -> bool:
        found.clear()
        found.update(rollout(url))
        return bool(predicate(found))

    wait_for(holds, timeout=timeout, interval=0.25, message="the rollout counters")
    return found


def ask(client: httpx.Client, url: str, prompt: str = "Hello", headers: dict[str, str] | None = None) -> Any:
    return client.post(f"{url}/serve", json={"prompt": prompt}, headers=headers or {})


def concurrently(work: Any, *, threads: int = 4, each: int = 50) -> list[httpx.Response]:
    """`work(client)` run `each` times in each of `threads` threads: the concurrent client."""
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def run() -> None:
        with httpx.Client(timeout=60) as client:
            for _ in range(each):
                response = work(client)
                with lock:
                    answers.append(response)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return answers


@pytest.fixture(scope="module")
def rollouts(mlflow_server: MlflowServer, local_ray: LocalRay) -> Iterator[Rollouts]:
    uri = mlflow_server.url
    stable = log_replier(uri, lang="de")
    same = log_replier(uri, lang="de")
    french = log_replier(uri, lang="fr", example="Hello")
    broken_example = log_replier(uri, lang="fr", fail_on=("boom",), example="boom")
    fails_hello = log_replier(uri, lang="fr", fail_on=("Hello",))
    slow = log_replier(uri, lang="de", sleep_s=4.0)
    config = app_config(APP, model_name=MODEL, tracking_uri=uri, default_version=stable)
    config["deployments"][0]["num_replicas"] = 2
    with deployed_app(local_ray, config) as url:
        wait_for_report(url, generation=None)
        yield Rollouts(url, local_ray, uri, config, stable, same, french, broken_example, fails_hello, slow)


def test_no_candidate_reports_the_default_only(rollouts: Rollouts) -> None:
    with httpx.Client(timeout=60) as client:
        answer = ask(client, rollouts.url)
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == rollouts.stable
    report = wait_for_counts(rollouts.url, lambda r: rollouts.stable in r["versions"])
    assert report["candidate"] is None and report["smoke"]["state"] is None
    assert set(report["versions"]) == {rollouts.stable}


def test_smoke_failure_is_reported_and_the_candidate_never_answers(rollouts: Rollouts) -> None:
    report = rollouts.configure({"version": rollouts.broken_example, "mode": "smoke"})
    smoke = report["smoke"]
    assert smoke["state"] == "failed", report
    assert (smoke["replicas_failed"], smoke["replicas_passed"]) == (2, 0)
    assert smoke["code"] == "prediction_failed"
    assert "cannot answer 'boom'" in smoke["message"] and len(smoke["message"]) <= 500
    # Even told to canary it at 100 %, a replica where it failed sends nothing its way.
    report = rollouts.configure({"version": rollouts.broken_example, "mode": "canary", "percent": 100})
    assert report["smoke"]["state"] == "failed"
    answers = concurrently(lambda client: ask(client, rollouts.url), threads=2, each=20)
    assert Counter(a.headers["X-Model-Version"] for a in answers) == {rollouts.stable: 40}
    assert all(a.json() == [{"translation_text": "[de] Hello"}] for a in answers)
    report = wait_for_counts(
        rollouts.url, lambda r: r["versions"].get(rollouts.stable, {}).get("requests") == 40
    )
    assert set(report["versions"]) == {rollouts.stable}


def test_smoke_pass_prewarms_and_answers_nothing(rollouts: Rollouts) -> None:
    report = rollouts.configure({"version": rollouts.french, "mode": "smoke"})
    assert report["smoke"] == {
        "state": "passed",
        "replicas_passed": 2,
        "replicas_failed": 0,
        "code": None,
        "message": None,
    }
    with httpx.Client(timeout=60) as client:
        answers = [ask(client, rollouts.url) for _ in range(20)]
        # Prewarmed on every replica: each holds the default and the candidate.
        loaded = {tuple(client.get(f"{rollouts.url}/metadata").json()["loaded_versions"]) for _ in range(10)}
    assert {a.headers["X-Model-Version"] for a in answers} == {rollouts.stable}
    assert loaded == {(rollouts.stable, rollouts.french)}


def test_canary_split_sticky_and_pinned(rollouts: Rollouts) -> None:
    rollouts.configure({"version": rollouts.french, "mode": "canary", "percent": 30, "sticky_header": STICKY})
    unpinned = concurrently(lambda client: ask(client, rollouts.url), threads=4, each=75)
    versions = Counter(a.headers["X-Model-Version"] for a in unpinned)
    assert set(versions) == {rollouts.stable, rollouts.french}
    assert 0.2 < versions[rollouts.french] / len(unpinned) < 0.4, versions
    # Each answer is the named version's own.
    expected = {rollouts.stable: "[de] Hello", rollouts.french: "[fr] Hello"}
    assert all(a.json() == [{"translation_text": expected[a.headers["X-Model-Version"]]}] for a in unpinned)
    with httpx.Client(timeout=60) as client:
        pinned = [
            ask(client, rollouts.url, headers={"serve-multiplexed-model-id": rollouts.stable})
            for _ in range(30)
        ]
        sticky = {
            user: {
                ask(client, rollouts.url, headers={STICKY: user}).headers["X-Model-Version"] for _ in range(6)
            }
            for user in (f"user-{index}" for index in range(20))
        }
        # The other prediction routes resolve versions through the same place.
        scoring = [
            client.post(f"{rollouts.url}/invocations", json={"dataframe_records": [{"prompt": "Hello"}]})
            for _ in range(30)
        ]
        infer_body = {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["Hello"]}]}
        infer = [client.post(f"{rollouts.url}/v2/models/{MODEL}/infer", json=infer_body) for _ in range(30)]
    assert {a.headers["X-Model-Version"] for a in pinned} == {rollouts.stable}
    for answers in (scoring, infer):
        assert {a.status_code for a in answers} == {200}
        assert {a.headers["X-Model-Version"] for a in answers} == {rollouts.stable, rollouts.french}
    assert all(len(seen) == 1 for seen in sticky.values()), sticky  # one version per caller
    assert {next(iter(seen)) for seen in sticky.values()} == {rollouts.stable, rollouts.french}
    # The figures are summed over both replicas: every answer the clients got is counted once.
    total = len(unpinned) + len(pinned) + 6 * len(sticky) + len(scoring) + len(infer)
    report = wait_for_counts(
        rollouts.url, lambda r: sum(v["requests"] for v in r["versions"].values()) == total
    )
    others = [a for a in (*scoring, *infer) if a.headers["X-Model-Version"] == rollouts.french]
    assert report["versions"][rollouts.french]["requests"] == versions[rollouts.french] + len(others) + sum(
        6 for seen in sticky.values() if seen == {rollouts.french}
    )
    assert report["versions"][rollouts.french]["errors"] == 0
    assert report["versions"][rollouts.stable]["p95_ms"] > 0
    # Both replicas answered part of it, and the board holds one snapshot of each.
    board = ray.get_actor(BOARD_NAME, namespace=BOARD_NAMESPACE)
    per_replica = [sum(v.requests for v in s.versions.values()) for s in ray.get(board.snapshots.remote(APP))]
    assert len(per_replica) == 2 and all(count > 0 for count in per_replica), per_replica


def test_canary_failures_are_the_candidates(rollouts: Rollouts) -> None:
    report = rollouts.configure({"version": rollouts.fails_hello, "mode": "canary", "percent": 50})
    assert report["smoke"]["state"] == "passed"  # its synthesized payload is not "Hello"
    answers = concurrently(lambda client: ask(client, rollouts.url), threads=4, each=25)
    by_status = Counter((a.status_code, a.headers.get("X-Model-Version")) for a in answers)
    assert set(by_status) == {(200, rollouts.stable), (500, rollouts.fails_hello)}, by_status
    failed = by_status[(500, rollouts.fails_hello)]
    report = wait_for_counts(
        rollouts.url, lambda r: sum(v["requests"] for v in r["versions"].values()) == 100
    )
    assert report["versions"][rollouts.fails_hello] == {
        "requests": failed,
        "errors": failed,
        "p95_ms": report["versions"][rollouts.fails_hello]["p95_ms"],
    }
    assert report["versions"][rollouts.stable]["errors"] == 0
    # A caller's bad request is a 4xx, counted as a request of the version it reached, not an error.
    with httpx.Client(timeout=60) as client:
        bad = [client.post(f"{rollouts.url}/serve", json={"nope": 1}) for _ in range(10)]
    assert {a.status_code for a in bad} == {422}
    report = wait_for_counts(
        rollouts.url, lambda r: sum(v["requests"] for v in r["versions"].values()) == 110
    )
    assert sum(v["errors"] for v in report["versions"].values()) == failed


@pytest.mark.parametrize(("candidate", "agrees"), [("french", False), ("same", True)])
def test_shadow_compares_after_the_stable_answer(rollouts: Rollouts, candidate: str, agrees: bool) -> None:
    version = getattr(rollouts, candidate)
    rollouts.configure({"version": version, "mode": "shadow", "percent": 100})
    with httpx.Client(timeout=60) as client:
        answers = [ask(client, rollouts.url) for _ in range(30)]
    # The stable version answers every one of them.
    assert {a.headers["X-Model-Version"] for a in answers} == {rollouts.stable}
    assert all(a.json() == [{"translation_text": "[de] Hello"}] for a in answers)

    def settled(report: dict[str, Any]) -> bool:
        shadow = report["shadow"]
        return bool(shadow["compared"] + shadow["errors"] + shadow["dropped"] == 30)

    report = wait_for_counts(rollouts.url, settled)
    shadow = report["shadow"]
    assert shadow["errors"] == 0 and shadow["compared"] > 0
    if agrees:
        assert shadow["agreements"] == shadow["compared"] and shadow["disagreements"] == 0
    else:
        assert shadow["disagreements"] == shadow["compared"] and shadow["agreements"] == 0
    assert shadow["p95_ms"] is not None
    assert set(report["versions"]) == {rollouts.stable}  # shadow requests are not answers


def test_an_invalid_candidate_is_reported_and_the_default_keeps_answering(rollouts: Rollouts) -> None:
    report = rollouts.configure({"version": rollouts.french, "mode": "blue"})
    # Refused: its generation is reported (the write was taken) with why; the default answers.
    assert report["candidate"] is None
    assert report["smoke"]["state"] == "failed" and report["smoke"]["code"] == "invalid_candidate"
    assert "candidate.mode" in report["smoke"]["message"]
    with httpx.Client(timeout=60) as client:
        assert ask(client, rollouts.url).headers["X-Model-Version"] == rollouts.stable


def test_a_slow_shadow_never_delays_the_stable_answer(rollouts: Rollouts) -> None:
    rollouts.configure({"version": rollouts.slow, "mode": "shadow", "percent": 100})
    took = []
    with httpx.Client(timeout=60) as client:
        for _ in range(30):
            started = time.perf_counter()
            answer = ask(client, rollouts.url)
            took.append(time.perf_counter() - started)
            assert answer.status_code == 200 and answer.headers["X-Model-Version"] == rollouts.stable
    # Any answer that waited for the candidate would take its 4 s.
    assert max(took) < 3.0, took

    def settled(report: dict[str, Any]) -> bool:
        shadow = report["shadow"]
        return bool(shadow["compared"] + shadow["errors"] + shadow["dropped"] == 30)

    shadow = wait_for_counts(rollouts.url, settled)["shadow"]
    # At most 4 in flight per replica: the rest were dropped and counted, not queued.
    assert 0 < shadow["compared"] <= 30 - shadow["dropped"] and shadow["dropped"] > 0, shadow
    assert shadow["agreements"] == shadow["compared"] and shadow["p95_ms"] >= 3000


def test_metrics_carry_the_rollout_phase(rollouts: Rollouts, local_ray: LocalRay) -> None:
    wanted = [
        ("regserve_version_requests", {"version": rollouts.french, "phase": "canary", "outcome": "ok"}),
        (
            "regserve_version_requests",
            {"version": rollouts.fails_hello, "phase": "canary", "outcome": "server_error"},
        ),
        ("regserve_version_requests", {"version": rollouts.stable, "phase": "shadow", "outcome": "ok"}),
        ("regserve_version_latency_ms_bucket", {"version": rollouts.french, "phase": "canary"}),
        ("regserve_shadow_comparisons", {"version": rollouts.french, "outcome": "disagree"}),
        ("regserve_shadow_comparisons", {"version": rollouts.slow, "outcome": "dropped"}),
    ]

    def missing() -> list[Any]:
        lines = httpx.get(local_ray.metrics_url, timeout=10).text.splitlines()
        return [
            (name, labels)
            for name, labels in wanted
            if not any(
                line.startswith(f"ray_{name}")
                and all(f'{key}="{value}"' in line for key, value in labels.items())
                for line in lines
            )
        ]

    # Ray's exporter publishes every few seconds: wait until every series is there (or fail).
    wait_for(lambda: not missing(), timeout=90, interval=1, message="rollout series on Ray's exporter")
    assert missing() == []


def test_switch_after_the_smoke_test_is_not_a_load(rollouts: Rollouts) -> None:
    fresh = log_replier(rollouts.tracking_uri, lang="it")
    report = rollouts.configure({"version": fresh, "mode": "smoke"})
    assert report["smoke"]["state"] == "passed"

    def seen(client: httpx.Client) -> set[tuple[Any, ...]]:
        """(default, candidate, loads of `fresh`) as the replicas answering /metadata say."""
        found = set()
        for _ in range(12):
            body = client.get(f"{rollouts.url}/metadata").json()
            found.add((body["default_version"], body["candidate"], body["version_loads"].get(fresh)))
        return found

    with httpx.Client(timeout=60) as client:
        assert seen(client) == {(rollouts.stable, fresh, 1)}  # loaded once on each replica
        rollouts.configure(None, default=fresh)  # the operator's switch: default moves, candidate gone
        assert seen(client) == {(fresh, None, 1)}  # the held candidate became the default: no load
        answers = [ask(client, rollouts.url) for _ in range(10)]
    assert {a.headers["X-Model-Version"] for a in answers} == {fresh}
    assert all(a.json() == [{"translation_text": "[it] Hello"}] for a in answers)
