"""Payload logging on real replicas (docs/monitoring.md): a real mlflow server and real Ray Serve; the
records read back from MLflow with pandas, or received as CloudEvents by a receiver of our own."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pandas as pd
import pytest
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, Schema
from regserve_operator.sandbox.mlflow_server import MlflowServer
from regserve_operator.sandbox.processes import wait_for

from serving_app.monitoring.records import sampled
from tests.operator.counting_proxy import CountingProxy
from tests.serving.conftest import app_config
from tests.support.event_receiver import EventReceiver
from tests.support.ray_cluster import LocalRay, deployed_app

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MODEL = "payload_model"
MODEL_CODE = Path(__file__).with_name("payload_model.py")
EXPERIMENT = "regserve/tests/payloads"


def log_scorer(tracking_uri: str) -> str:
    mlflow.set_tracking_uri(tracking_uri)
    signature = ModelSignature(
        inputs=Schema([ColSpec("double", "x"), ColSpec("double", "y"), ColSpec("string", "color")]),
        outputs=Schema([ColSpec("double", "score"), ColSpec("string", "label")]),
    )
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            signature=signature,
            input_example=pd.DataFrame({"x": [1.0], "y": [2.0], "color": ["red"]}),
            pip_requirements=["mlflow", "pandas"],
            registered_model_name=MODEL,
        )
    return str(info.registered_model_version)


@pytest.fixture(scope="module")
def versions(mlflow_server: MlflowServer) -> tuple[str, str]:
    return log_scorer(mlflow_server.url), log_scorer(mlflow_server.url)


def payload_app(
    name: str, tracking_uri: str, version: str, experiment: str, **payloads: Any
) -> dict[str, Any]:
    settings = {
        "sample_rate": 1.0,
        "experiment": experiment,
        "namespace": "tests",
        "resource": name,
        "flush_interval_s": 0.5,
        **payloads,
    }
    return app_config(
        name,
        model_name=MODEL,
        tracking_uri=tracking_uri,
        default_version=version,
        monitoring={"payloads": settings},
    )


def rows(i: int, count: int = 2) -> list[dict[str, Any]]:
    return [{"x": float(i), "y": float(j) / 4, "color": ["red", "blue"][j % 2]} for j in range(count)]


def ask(
    url: str, records: list[dict[str, Any]], request_id: str | None = None, **headers: str
) -> httpx.Response:
    sent = {"X-Request-Id": request_id} if request_id else {}
    return httpx.post(f"{url}/serve", json=records, headers={**sent, **headers}, timeout=60)


def sampled_id(prefix: str, rate: float) -> str:
    return next(f"{prefix}-{i}" for i in itertools.count() if sampled(f"{prefix}-{i}", rate))


def read_payloads(tracking_uri: str, experiment: str, version: str, into: Path) -> pd.DataFrame:
    """Every record of `version` in `experiment`, as pandas reads the partitioned Parquet files."""
    client = mlflow.MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return pd.DataFrame()
    runs = client.search_runs(
        [found.experiment_id], filter_string=f"tags.`regserve.model_version` = '{version}'"
    )
    if not runs:
        return pd.DataFrame()
    assert len(runs) == 1, "one run per version"
    if not client.list_artifacts(runs[0].info.run_id, "payloads"):
        return pd.DataFrame()
    target = into / f"{version}-{len(list(into.iterdir()))}"
    local = mlflow.artifacts.download_artifacts(
        run_id=runs[0].info.run_id, artifact_path="payloads", tracking_uri=tracking_uri, dst_path=str(target)
    )
    return pd.read_parquet(local)


def healthz(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/healthz", timeout=10).json())


def test_sampled_records_read_back_from_mlflow_are_what_clients_sent_and_got(
    mlflow_server: MlflowServer, local_ray: LocalRay, versions: tuple[str, str], tmp_path: Path
) -> None:
    rate = 0.5
    v1, _ = versions
    experiment = f"{EXPERIMENT}/sampled"
    config = payload_app("payloads-sampled", mlflow_server.url, v1, experiment, sample_rate=rate)
    with deployed_app(local_ray, config) as url:
        sent: dict[str, tuple[list[dict[str, Any]], list[Any]]] = {}
        for i in range(40):
            answer = ask(url, rows(i), f"req-{i}")
            assert answer.status_code == 200, answer.text
            assert answer.headers["X-Request-Id"] == f"req-{i}"
            sent[f"req-{i}"] = (rows(i), answer.json())
        boom, bad = sampled_id("boom", rate), sampled_id("bad", rate)
        assert ask(url, [{"x": 1.0, "y": 1.0, "color": "boom"}], boom).status_code == 500
        assert ask(url, [{"x": "not a number", "y": 1.0, "color": "red"}], bad).status_code == 422
        generated = ask(url, rows(99))  # Ray's proxy gives it an id and echoes it: the record has it
        assert generated.headers["X-Request-Id"]

        expected = {rid for rid in sent if sampled(rid, rate)} | {boom, bad}
        if sampled(generated.headers["X-Request-Id"], rate):
            expected.add(generated.headers["X-Request-Id"])
        assert 5 < len(expected) < 40, "the ids split by the sampling rate"

        frame = pd.DataFrame()

        def logged() -> bool:
            nonlocal frame
            frame = read_payloads(mlflow_server.url, experiment, v1, tmp_path)
            return not frame.empty and set(frame["request_id"]) == expected

        wait_for(logged, timeout=60, message="every sampled request's record in MLflow", interval=1)

    ok = frame[frame["status"] == 200]
    assert set(ok["version"]) == {v1} and set(ok["choice"]) == {"default"} and set(ok["route"]) == {"serve"}
    assert not ok["truncated"].any()
    for rid, group in ok.groupby("request_id"):
        if rid not in sent:
            continue
        records, answer = sent[str(rid)]
        group = group.sort_values("row")
        assert group["row"].tolist() == [0, 1]
        assert group["input_x"].tolist() == [r["x"] for r in records]
        assert group["input_color"].tolist() == [r["color"] for r in records]
        assert group["output_score"].tolist() == [a["score"] for a in answer]
        assert group["output_label"].tolist() == [a["label"] for a in answer]
        assert (group["latency_ms"] > 0).all()
    failed = frame.set_index("request_id")
    assert failed.loc[boom, "status"] == 500 and failed.loc[boom, "error_code"] == "prediction_failed"
    assert failed.loc[boom, "input_color"] == "boom", "a request that parsed is logged with its inputs"
    assert failed.loc[bad, "status"] == 422 and failed.loc[bad, "error_code"] == "invalid_input"
    assert pd.isna(failed.loc[bad, "input_x"]), "no inputs for a request that did not parse"
    assert frame["time"].dt.tz is not None


def test_shadow_and_canary_answers_go_to_each_versions_own_run(
    mlflow_server: MlflowServer, local_ray: LocalRay, versions: tuple[str, str], tmp_path: Path
) -> None:
    v1, v2 = versions
    experiment = f"{EXPERIMENT}/rollout"
    config = payload_app("payloads-rollout", mlflow_server.url, v1, experiment)
    user_config = config["deployments"][0]["user_config"]
    user_config["candidate"] = {"version": v2, "mode": "shadow", "percent": 100, "generation": 1}
    with deployed_app(local_ray, config) as url:
        wait_for(lambda: ask(url, rows(0)).status_code == 200, timeout=60, message="serving")
        wait_for(
            lambda: httpx.get(f"{url}/rollout", timeout=10).json().get("smoke", {}).get("state") == "passed",
            timeout=120,
            message="the candidate's smoke test passed",
        )
        shadowed = [f"shadow-{i}" for i in range(5)]
        for rid in shadowed:
            assert ask(url, rows(1), rid).status_code == 200

        stable, shadow = pd.DataFrame(), pd.DataFrame()

        def both_logged() -> bool:
            nonlocal stable, shadow
            stable = read_payloads(mlflow_server.url, experiment, v1, tmp_path)
            shadow = read_payloads(mlflow_server.url, experiment, v2, tmp_path)
            return all(not f.empty and set(shadowed) <= set(f["request_id"]) for f in (stable, shadow))

        wait_for(both_logged, timeout=60, message="each version's answer in its own run", interval=1)
        assert set(shadow[shadow["request_id"].isin(shadowed)]["choice"]) == {"shadow"}
        assert set(stable[stable["request_id"].isin(shadowed)]["choice"]) == {"default"}

        canary = copy.deepcopy(config)
        canary["deployments"][0]["user_config"]["candidate"] = {
            "version": v2,
            "mode": "canary",
            "percent": 100,
            "generation": 2,
        }
        local_ray.deploy(canary)
        wait_for(
            lambda: ask(url, rows(2)).headers.get("X-Model-Version") == v2, timeout=60, message="canary on"
        )
        answered = ask(url, rows(2), "canary-1")
        assert answered.headers["X-Model-Version"] == v2

        def canary_logged() -> bool:
            frame = read_payloads(mlflow_server.url, experiment, v2, tmp_path)
            return "canary-1" in set(frame.get("request_id", []))

        wait_for(canary_logged, timeout=60, message="the canary's record in its version's run", interval=1)
        frame = read_payloads(mlflow_server.url, experiment, v2, tmp_path)
        assert set(frame[frame["request_id"] == "canary-1"]["choice"]) == {"canary"}


def event_senders() -> list[int]:
    """Live CloudEvents sender processes on this machine (`serving_app.monitoring.event_sender`)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0] if command else "Z"
        except OSError:  # gone meanwhile
            continue
        if b"serving_app.monitoring.event_sender" in command and state != "Z":
            found.append(int(entry.name))
    return found


def test_records_reach_a_cloudevents_receiver_in_kserves_format(
    mlflow_server: MlflowServer, local_ray: LocalRay, versions: tuple[str, str]
) -> None:
    v1, _ = versions
    with EventReceiver() as receiver:
        config = payload_app(
            "payloads-events",
            mlflow_server.url,
            v1,
            "unused",
            cloudevents={"url": receiver.url, "headers_env": "PAYLOAD_HEADERS"},
        )
        env = config["deployments"][0]["ray_actor_options"]["runtime_env"]["env_vars"]
        env["PAYLOAD_HEADERS"] = "Authorization: Bearer sink-token\nX-Tenant: tests"
        with deployed_app(local_ray, config) as url:
            answer = ask(url, rows(3), "event-1")
            assert answer.status_code == 200
            wait_for(
                lambda: len(receiver.of("event-1")) == 2, timeout=30, message="request and response events"
            )
            assert len(event_senders()) == 1, "the replica posts through one sender process"
        # The application's replica is gone: its sender exited with it.
        wait_for(lambda: not event_senders(), timeout=30, message="the sender process gone")

    events = receiver.of("event-1")
    request, response = (
        events["org.kubeflow.serving.inference.request"],
        events["org.kubeflow.serving.inference.response"],
    )
    for headers, _ in (request, response):
        assert headers["ce-specversion"] == "1.0"
        assert headers["ce-inferenceservicename"] == "payloads-events"
        assert headers["ce-namespace"] == "tests"
        assert headers["ce-component"] == "predictor" and headers["ce-endpoint"] == "default"
        assert headers["ce-modelversion"] == v1 and headers["ce-statuscode"] == "200"
        assert headers["authorization"] == "Bearer sink-token" and headers["x-tenant"] == "tests"
        assert headers["content-type"] == "application/json"
    assert request[1] == {"dataframe_records": rows(3)}
    assert response[1] == {"predictions": answer.json()}


def test_a_sink_that_is_down_never_delays_answers_and_logging_resumes(
    mlflow_server: MlflowServer, local_ray: LocalRay, versions: tuple[str, str], tmp_path: Path
) -> None:
    v1, _ = versions
    experiment = f"{EXPERIMENT}/down"
    capacity = 50
    with CountingProxy(mlflow_server.url) as proxy:
        config = payload_app("payloads-down", proxy.url, v1, experiment, queue_records=capacity)
        with deployed_app(local_ray, config) as url:
            assert ask(url, rows(0), "before").status_code == 200
            wait_for(
                lambda: healthz(url)["payloads"].get("logged", 0) >= 1, timeout=60, message="first record"
            )
            proxy.down = True
            for i in range(300):
                assert ask(url, rows(i), f"down-{i}").status_code == 200
                if i % 50 == 0:
                    assert healthz(url)["payloads"]["queued"] <= capacity
            figures = healthz(url)["payloads"]
            # Every record is accounted for: written, queued, dropped when the queue was full, or given up.
            assert figures["dropped"] > 0, figures
            outcomes = ("logged", "queued", "dropped", "sink_error")
            assert sum(figures.get(k, 0) for k in outcomes) == 301, figures
            assert figures["queued"] <= capacity
            assert figures["last_error"] == "SinkRefused", "the sink's failure is reported"
            proxy.down = False
            seen: set[str] = set()
            asked = itertools.count()

            def resumed() -> bool:
                # The queue may still be full of records given up on meanwhile: ask until one is taken.
                nonlocal seen
                assert ask(url, rows(0), f"after-{next(asked)}").status_code == 200
                frame = read_payloads(mlflow_server.url, experiment, v1, tmp_path)
                seen = set(frame.get("request_id", []))
                return any(rid.startswith("after-") for rid in seen)

            wait_for(resumed, timeout=90, message="logging resumed once the sink is back", interval=1)
            assert "before" in seen
