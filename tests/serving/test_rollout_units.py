"""Pure parts of rollouts (docs/rollouts.md, the app side): the traffic split, the counters'
histograms and their sum over replicas, shadow answer comparison, smoke payloads from a signature,
and the candidate part of `user_config`."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pytest
from mlflow import pyfunc
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Map, Object, Property, Schema, TensorSpec

from serving_app.board import RolloutBoard
from serving_app.config import Candidate, parse_user_config
from serving_app.counters import (
    BUCKETS_MS,
    ReplicaCounters,
    RolloutKey,
    SmokeResult,
    bucket_index,
    empty_histogram,
    merge_histograms,
    percentile_ms,
    rollout_report,
)
from serving_app.rollout import STABLE, Decision, decide, in_share, sticky_point
from serving_app.shadow import answers_agree
from serving_app.smoke import synthesize_input


def candidate(mode: str, percent: int = 10, sticky: str | None = None) -> Candidate:
    return Candidate.model_validate(
        {"version": "3", "mode": mode, "percent": percent, "generation": 1, "sticky_header": sticky}
    )


# ------------------------------------------------------------------------------ traffic split

decide_cases = [
    # (candidate, smoke passed, pinned, draw, expected)
    (None, True, False, 0.0, STABLE),
    (candidate("smoke", 100), True, False, 0.0, STABLE),
    (candidate("canary", 10), True, False, 0.05, Decision(candidate=True)),
    (candidate("canary", 10), True, False, 0.10, STABLE),
    (candidate("canary", 10), True, True, 0.05, STABLE),  # pinned: never touched
    (candidate("canary", 10), False, False, 0.05, STABLE),  # smoke not passed here
    (candidate("canary", 0), True, False, 0.0, STABLE),
    (candidate("canary", 100), True, False, 0.999, Decision(candidate=True)),
    (candidate("shadow", 50), True, False, 0.49, Decision(shadow=True)),
    (candidate("shadow", 50), True, False, 0.50, STABLE),
    (candidate("shadow", 50), True, True, 0.0, STABLE),
]


@pytest.mark.parametrize(("chosen", "smoke_passed", "pinned", "draw", "expected"), decide_cases)
def test_decide(
    chosen: Candidate | None, smoke_passed: bool, pinned: bool, draw: float, expected: Decision
) -> None:
    assert decide(chosen, smoke_passed=smoke_passed, pinned=pinned, draw=draw) == expected


share_cases = [
    # (percent, draw, expected)
    (10, 0.0, True),
    (10, 0.0999, True),
    (10, 0.1, False),
    (0, 0.0, False),
    (100, 0.9999, True),
    (1, 0.005, True),
]


@pytest.mark.parametrize(("percent", "draw", "expected"), share_cases)
def test_in_share_by_draw(percent: int, draw: float, expected: bool) -> None:
    assert in_share(percent, draw=draw) is expected


def test_sticky_assignment_ignores_the_draw_and_is_stable() -> None:
    callers = [f"user-{index}" for index in range(2000)]
    first = [in_share(20, draw=0.0, sticky=caller, salt="3") for caller in callers]
    again = [in_share(20, draw=0.99, sticky=caller, salt="3") for caller in callers]
    assert first == again
    assert 0.16 < sum(first) / len(first) < 0.24  # about the share
    # A larger share keeps everyone who was in the smaller one.
    wider = [in_share(50, draw=0.5, sticky=caller, salt="3") for caller in callers]
    assert all(w for f, w in zip(first, wider, strict=True) if f)
    # Points are fixed values (not the per-process salted hash()).
    assert sticky_point("user-1", "3") == sticky_point("user-1", "3")
    assert sticky_point("user-1", "3") != sticky_point("user-1", "4")


def test_random_split_is_about_the_share() -> None:
    import random

    rng = random.Random(7)
    chosen = candidate("canary", 30)
    decisions = Counter(
        decide(chosen, smoke_passed=True, pinned=False, draw=rng.random()).candidate for _ in range(10_000)
    )
    assert 0.28 < decisions[True] / 10_000 < 0.32


# ------------------------------------------------------------------------- histograms and p95


def histogram_of(*latencies: float) -> list[int]:
    histogram = empty_histogram()
    for latency in latencies:
        histogram[bucket_index(latency)] += 1
    return histogram


bucket_cases = [
    (0.0, 0),
    (0.5, 0),  # upper bounds are inclusive
    (0.51, 1),
    (7.5, BUCKETS_MS.index(7.5)),
    (60000, len(BUCKETS_MS) - 1),
    (60001, len(BUCKETS_MS)),  # overflow bucket
]


@pytest.mark.parametrize(("latency", "index"), bucket_cases)
def test_bucket_index(latency: float, index: int) -> None:
    assert bucket_index(latency) == index


percentile_cases = [
    # (latencies, quantile, expected p)
    ((), 0.95, None),
    ((3.0,), 0.95, 2.95),  # one value in (2, 3]: interpolated at 95 % of the bucket
    ((1.0,) * 95 + (100.0,) * 5, 0.95, 1.0),
    ((1.0,) * 90 + (100.0,) * 10, 0.95, 87.5),  # half way into the (75, 100] bucket
    ((100000.0,) * 3, 0.95, 60000),  # past the last bound: the last bound
    ((10.0,) * 100, 0.5, 8.75),
]


@pytest.mark.parametrize(("latencies", "quantile", "expected"), percentile_cases)
def test_percentile(latencies: tuple[float, ...], quantile: float, expected: float | None) -> None:
    assert percentile_ms(histogram_of(*latencies), quantile) == expected


merge_cases = [
    # (per-replica latencies, merged p95): the p95 of the union, not an average of p95s
    ([(1.0,) * 50, (100.0,) * 50], 97.5),  # rank 95 is 45 of the 50 in (75, 100]
    ([(1.0,) * 99, (100.0,)], 0.98),  # rank 95 of the 99 in (0.5, 1]
    ([(), (20.0,) * 10], 19.75),
]


@pytest.mark.parametrize(("replicas", "expected"), merge_cases)
def test_merged_histogram_p95(replicas: list[tuple[float, ...]], expected: float) -> None:
    merged = merge_histograms(histogram_of(*latencies) for latencies in replicas)
    assert sum(merged) == sum(len(latencies) for latencies in replicas)
    assert percentile_ms(merged) == expected


def test_merge_refuses_foreign_histograms() -> None:
    with pytest.raises(ValueError, match="buckets"):
        merge_histograms([[1, 2, 3]])


# ----------------------------------------------------------------------------- the report


def replica(name: str, key: RolloutKey, at: float, smoke: SmokeResult | None, **requests: int) -> Any:
    counters = ReplicaCounters(name)
    counters.start(key, at)
    counters.record_smoke(smoke)
    for version, count in requests.items():
        for index in range(count):
            counters.record_request(version.lstrip("v"), 500 if index == 0 else 200, 5.0)
    return counters


KEY = RolloutKey(7, "3", "canary", 10)
OLD = RolloutKey(6, "3", "smoke", 0)
PASSED = SmokeResult("3", "passed")
FAILED = SmokeResult.failed("3", "prediction_failed", "x" * 900)


def test_report_sums_the_current_generation_over_replicas() -> None:
    a = replica("a", KEY, 10.0, PASSED, v2=10, v3=2)
    b = replica("b", KEY, 11.0, PASSED, v2=20)
    a.record_shadow("agree", 4.0)
    b.record_shadow("disagree", 6.0)
    b.record_shadow("dropped", 0.0)
    report = rollout_report([a.snapshot(), b.snapshot()])
    assert report["generation"] == 7 and report["candidate"] == "3" and report["mode"] == "canary"
    assert report["percent"] == 10 and report["replicas"] == 2
    assert report["versions"] == {
        "2": {"requests": 30, "errors": 2, "p95_ms": 4.95},  # all in (4, 5]
        "3": {"requests": 2, "errors": 1, "p95_ms": 4.95},
    }
    assert report["smoke"] == {
        "state": "passed",
        "replicas_passed": 2,
        "replicas_failed": 0,
        "code": None,
        "message": None,
    }
    shadow = report["shadow"]
    assert (shadow["compared"], shadow["agreements"], shadow["disagreements"]) == (2, 1, 1)
    assert (shadow["errors"], shadow["dropped"]) == (0, 1)
    json.dumps(report)  # plain JSON


smoke_cases = [
    # (replicas as (key, configured_at, smoke), expected state, replicas counted)
    ([(KEY, 2.0, PASSED), (OLD, 1.0, PASSED)], "pending", 1),  # one still on the old generation
    ([(KEY, 2.0, PASSED), (KEY, 2.0, None)], "pending", 2),  # one without a result yet
    ([(KEY, 2.0, PASSED), (KEY, 2.0, FAILED)], "failed", 2),  # any failure fails it
    ([(KEY, 2.0, FAILED), (OLD, 1.0, None)], "failed", 1),
    ([(KEY, 2.0, PASSED), (KEY, 3.0, PASSED)], "passed", 2),
    ([(RolloutKey(), 2.0, None)], None, 1),  # no candidate
    ([], None, 0),
]


@pytest.mark.parametrize(("replicas", "state", "counted"), smoke_cases)
def test_smoke_state(replicas: list[tuple[RolloutKey, float, Any]], state: str | None, counted: int) -> None:
    snapshots = [replica(f"r{i}", key, at, smoke).snapshot() for i, (key, at, smoke) in enumerate(replicas)]
    report = rollout_report(snapshots)
    assert report["smoke"]["state"] == state
    assert report["replicas"] == counted
    if state == "failed":
        assert report["smoke"]["code"] == "prediction_failed"
        assert len(report["smoke"]["message"]) == 500


def test_counters_restart_with_a_new_generation() -> None:
    counters = replica("a", OLD, 1.0, PASSED, v2=5)
    counters.start(KEY, 2.0)
    assert counters.snapshot().versions == {} and counters.smoke is None
    counters.start(KEY, 3.0)  # the same key again (a reconfigure of something else) keeps them
    counters.record_request("2", 200, 1.0)
    counters.start(KEY, 4.0)
    assert counters.snapshot().versions["2"].requests == 1


def test_board_drops_replicas_that_stopped_pushing() -> None:
    board = RolloutBoard(stale_after_s=0.0)
    board.push("app", replica("a", KEY, 1.0, PASSED, v2=1).snapshot())
    assert board.report("app")["replicas"] == 0
    fresh = RolloutBoard(stale_after_s=60.0)
    fresh.push("app", replica("a", KEY, 1.0, PASSED, v2=1).snapshot())
    fresh.push("app", replica("a", KEY, 1.0, PASSED, v2=3).snapshot())  # the latest snapshot replaces
    fresh.push("app", replica("b", KEY, 1.0, PASSED, v2=2).snapshot())
    fresh.push("other", replica("c", KEY, 1.0, PASSED, v2=50).snapshot())  # another application's
    assert fresh.report("app")["versions"]["2"]["requests"] == 5
    assert fresh.report("other")["versions"]["2"]["requests"] == 50
    fresh.forget("app", "b")
    assert fresh.report("app")["replicas"] == 1
    assert fresh.report("nobody")["replicas"] == 0


def test_board_keeps_each_replicas_last_two_windows_once_each() -> None:
    board = RolloutBoard()
    for index in (7, 8, 9, 9):  # the last push retried
        board.push_window("app", "a", {"window": index, "window_s": 60.0, "versions": {}})
    board.push_window("app", "b", {"window": 8, "window_s": 60.0, "versions": {}})
    kept = sorted((w["replica"], w["window"]) for w in board.windows("app"))
    assert kept == [("a", 8), ("a", 9), ("b", 8)]
    assert board.windows("other") == []


# ------------------------------------------------------------------------ shadow comparison

agree_cases = [
    ([{"translation_text": "Hallo"}], [{"translation_text": "Hallo"}], True),
    ([{"translation_text": "Hallo"}], [{"translation_text": "Bonjour"}], False),
    ([1.0, 2.0], [1.0000005, 2.0], True),  # within 1e-6 relative
    ([1.0, 2.0], [1.00001, 2.0], False),
    ([0.0], [0.0], True),
    ([0.0], [1e-300], False),  # relative: nothing is close to 0 but 0
    ([1], [1.0], True),  # ints and floats compare as numbers
    ([True], [1], False),  # booleans are not numbers
    ([True], [True], True),
    ([None], [None], True),
    ([None], [0], False),
    ({"a": 1, "b": [1, 2]}, {"b": [1, 2], "a": 1}, True),
    ({"a": 1}, {"a": 1, "b": 2}, False),
    ([1, 2], [1, 2, 3], False),
    ([[1, 2]], [[1, 2]], True),
    (["1"], [1], False),
]


@pytest.mark.parametrize(("stable", "candidate_answer", "expected"), agree_cases)
def test_answers_agree(stable: Any, candidate_answer: Any, expected: bool) -> None:
    assert answers_agree(stable, candidate_answer) is expected


# ----------------------------------------------------------------------- smoke payloads


synthesis_cases = [
    # (inputs schema, expected type, expected keys or shape)
    (Schema([ColSpec("string", "prompt")]), pd.DataFrame, ["prompt"]),
    (
        Schema(
            [
                ColSpec("boolean", "b"),
                ColSpec("integer", "i"),
                ColSpec("long", "l"),
                ColSpec("float", "f"),
                ColSpec("double", "d"),
                ColSpec("binary", "bin"),
                ColSpec("datetime", "when"),
                ColSpec("string", "optional", required=False),
            ]
        ),
        pd.DataFrame,
        ["b", "i", "l", "f", "d", "bin", "when", "optional"],
    ),
    (
        Schema(
            [
                ColSpec(Array(DataType.long), "ids"),
                ColSpec(Object([Property("x", DataType.double), Property("tag", DataType.string)]), "obj"),
                ColSpec(Map(DataType.long), "counts"),
                ColSpec(AnyType(), "anything"),
            ]
        ),
        pd.DataFrame,
        ["ids", "obj", "counts", "anything"],
    ),
    (Schema([ColSpec("double"), ColSpec("double")]), pd.DataFrame, [0, 1]),
    (Schema([TensorSpec(np.dtype("float64"), (-1, 4))]), np.ndarray, (1, 4)),
    (Schema([TensorSpec(np.dtype("int32"), (-1, 2, 3))]), np.ndarray, (1, 2, 3)),
    (
        Schema(
            [
                TensorSpec(np.dtype("float32"), (-1, 3), "pixels"),
                TensorSpec(np.dtype("object"), (-1,), "label"),
            ]
        ),
        dict,
        ["pixels", "label"],
    ),
]


@pytest.mark.parametrize(("inputs", "kind", "layout"), synthesis_cases)
def test_synthesized_payload_passes_mlflows_own_enforcement(inputs: Schema, kind: type, layout: Any) -> None:
    payload = synthesize_input(inputs)
    assert isinstance(payload, kind)
    if isinstance(payload, pd.DataFrame):
        assert list(payload.columns) == layout and len(payload) == 1
    elif isinstance(payload, np.ndarray):
        assert payload.shape == layout
    else:
        assert list(payload) == layout
    # What predict() runs first: a payload off the signature would fail here, not in the model.
    signature = ModelSignature(inputs=inputs)
    pyfunc._validate_prediction_input(payload, None, signature.inputs, None)


# --------------------------------------------------------------------------- user_config

config_cases = [
    # (raw user_config, expected candidate (version, mode, percent) or None, error fragment or None)
    ({"default_version": "2"}, None, None),
    (
        {"default_version": 2, "candidate": {"version": 3, "mode": "canary", "percent": 10, "generation": 7}},
        ("3", "canary", 10),
        None,
    ),
    (
        {"default_version": "2", "candidate": {"version": "3", "mode": "smoke", "generation": 1}},
        ("3", "smoke", 0),
        None,
    ),
    (
        {"default_version": "2", "candidate": {"version": "3", "mode": "blue", "generation": 1}},
        None,
        "candidate.mode",
    ),
    (
        {
            "default_version": "2",
            "candidate": {"version": "3", "mode": "canary", "percent": 101, "generation": 1},
        },
        None,
        "candidate.percent",
    ),
    ({"default_version": "2", "candidate": {"version": "3", "mode": "canary"}}, None, "candidate.generation"),
    (
        {"default_version": "2", "candidate": {"version": "2", "mode": "canary", "generation": 1}},
        None,
        "is the default version itself",
    ),
    (
        {
            "default_version": "2",
            "candidate": {"version": "3", "mode": "canary", "generation": 1, "sticky_header": "bad header"},
        },
        None,
        "candidate.sticky_header",
    ),
    (
        {
            "default_version": "2",
            "candidate": {"version": "3", "mode": "canary", "generation": 1, "weight": 5},
        },
        None,
        "candidate.weight",
    ),
]


@pytest.mark.parametrize(("raw", "expected", "error"), config_cases)
def test_user_config_candidate(raw: dict[str, Any], expected: Any, error: str | None) -> None:
    config, problem = parse_user_config(raw)
    assert config.default_version == "2"  # a broken candidate never takes the default with it
    got = config.candidate
    assert (got.version, got.mode, got.percent) == expected if got else expected is None
    if error is None:
        assert problem is None
    else:
        assert problem is not None and error in problem


def test_an_invalid_default_still_fails() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        parse_user_config(
            {"default_version": "x", "candidate": {"version": "3", "mode": "smoke", "generation": 1}}
        )
