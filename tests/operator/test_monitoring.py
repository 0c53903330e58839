"""spec.monitoring on the operator's side: the app's `/monitoring` body parsed and bounded (a tenant's
app wrote it), and the judgement of a new window (status figures, the InputDrift condition, metrics)."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from regserve_operator import metrics
from regserve_operator.monitoring import (
    MAX_FEATURES,
    MAX_NAME,
    MAX_VERSIONS,
    Judgement,
    WindowFigures,
    WindowReport,
    judge,
    parse_monitoring,
    probe_monitoring,
    window_end_text,
)
from regserve_operator.spec import Monitoring, MonitoringStatus, VersionFigures

from serving_app.config import DriftArgs, MonitoringArgs
from serving_app.monitoring.drift import ReferenceProfile, profile_from_frame
from serving_app.monitoring.monitor import ReplicaMonitor
from serving_app.monitoring.profiles import VersionProfiles
from serving_app.monitoring.window import ProfileState, ReplicaWindows

WINDOW_S = 60.0
DRIFT = Monitoring.model_validate({"drift": {"windowSeconds": 60, "minRows": 10, "psiThreshold": 0.2}})
PAYLOADS_ONLY = Monitoring.model_validate({"payloads": {"sampleRate": 0.1}})
TENSORS = "the signature's inputs are tensors: there are no columns to compare"


# ---------------------------------------------------------------------- the app's body, for real


def sample(seed: int, rows: int, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "x": rng.normal(loc=shift, size=rows),
            "colour": rng.choice(["red", "green", "blue"], size=rows, p=[0.5, 0.3, 0.2]),
        }
    )


def answers(frame: pd.DataFrame) -> list[float]:
    return [float(v) for v in frame["x"] * 2.0]


class Clock:
    def __init__(self) -> None:
        self.now = 10 * WINDOW_S + 1.0

    def __call__(self) -> float:
        return self.now


class Board:
    def __init__(self, wires: list[dict[str, Any]]) -> None:
        self.wires = wires

    async def push_window(self, wire: dict[str, Any]) -> None:
        self.wires.append(wire)

    async def windows(self) -> list[dict[str, Any]]:
        return self.wires


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    reference = sample(0, 2000)
    return profile_from_frame(reference, predictions=answers(reference))


def replica_wires(profile: ReferenceProfile) -> list[dict[str, Any]]:
    """Two replicas' completed window 10: version 3 drifted in x (and so in its predictions), version 4
    with a tensor signature (no reference), both with errors and latencies."""
    states = {
        "3": ProfileState(profile, "training", "dataset on the run"),
        "4": ProfileState(None, "none", TENSORS),
    }
    clock = Clock()
    replicas = [
        ReplicaWindows(WINDOW_S, lambda v: states.get(v, ProfileState()), drift=True, clock=clock)
        for _ in range(2)
    ]
    for seed, windows in enumerate(replicas):
        shifted = sample(seed + 1, 200, shift=2.0)
        windows.record("3", 200, 4.0, shifted, answers(shifted))
        windows.record("3", 503, 30.0)
        windows.record("3", 404, 2.0)
        windows.record("4", 200, 700.0, np.zeros((3, 2)), [0.0, 0.0, 0.0])
        windows.count_pending()
    clock.now += WINDOW_S
    wires = [w.completed_wire() for w in replicas]
    assert all(wire is not None for wire in wires)
    return [wire for wire in wires if wire is not None]


def app_body(profile: ReferenceProfile) -> dict[str, Any]:
    """What `GET /monitoring` answers, made by the app's own code and sent through JSON."""
    args = MonitoringArgs(drift=DriftArgs(min_rows=10, psi_threshold=0.2), window_s=WINDOW_S)
    monitor = ReplicaMonitor(
        args, payloads=None, profiles=VersionProfiles(None, "model"), board=Board(replica_wires(profile))
    )
    report = asyncio.run(monitor.report())
    return json.loads(json.dumps({"enabled": True, **report}))


def test_the_apps_body_round_trips(profile: ReferenceProfile) -> None:
    body = app_body(profile)
    report = parse_monitoring(body)
    assert report is not None
    assert (report.window_end, report.window_seconds) == (11 * WINDOW_S, WINDOW_S)
    three, four = report.versions
    assert (three.version, three.requests, three.errors) == ("3", 6, 2)
    assert three.error_rate == pytest.approx(2 / 6)
    assert (three.p50_ms, three.p95_ms) == (5.0, 50.0)
    assert (three.reference, three.reference_note) == ("training", "dataset on the run")
    assert (three.rows, three.enough_rows) == (400, True)
    assert three.drifted == ("x",)
    assert three.predictions_drifted == ("prediction",)
    sent = body["versions"]["3"]["drift"]
    assert dict(three.input_psi) == sent["input_psi"]
    assert dict(three.prediction_psi) == sent["prediction_psi"]
    assert list(three.input_psi) == ["x", "colour"]  # highest first
    assert (four.version, four.requests, four.errors) == ("4", 2, 0)
    assert (four.p50_ms, four.p95_ms) == (1000.0, 1000.0)
    assert (four.reference, four.reference_note, four.rows) == ("none", TENSORS, None)

    judgement = judge(DRIFT, None, report, ("3", "4"))
    assert judgement is not None and judgement.condition is not None
    assert (judgement.condition.status, judgement.condition.reason) == ("True", "Drifted")
    assert judgement.condition.message.startswith("version 3: x (PSI ")
    assert [m.step for m in judgement.metrics] == [10, 10]


def test_probe_monitoring_reads_the_apps_body(profile: ReferenceProfile) -> None:
    body = app_body(profile)

    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/app/monitoring"
        return httpx.Response(200, json=body)

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        report = probe_monitoring("http://serve/app/", client=client)
    assert report == parse_monitoring(body)


# ----------------------------------------------------------------------- hostile or broken bodies


def body(**fields: Any) -> dict[str, Any]:
    return {"enabled": True, "window_end": 660.0, "window_s": 60.0, "versions": {}, **fields}


REFUSED = [
    pytest.param(None, id="none"),
    pytest.param([], id="list"),
    pytest.param("enabled", id="text"),
    pytest.param(42, id="number"),
    pytest.param({}, id="empty"),
    pytest.param({"enabled": False}, id="disabled"),
    pytest.param(body(enabled=False), id="disabled-with-figures"),
    pytest.param(body(enabled=None), id="enabled-null"),
    pytest.param(body(window_end=None), id="no-window-yet"),
    pytest.param(body(window_end="660"), id="window-end-text"),
    pytest.param(body(window_end=True), id="window-end-bool"),
    pytest.param(body(window_end=math.nan), id="window-end-nan"),
    pytest.param(body(window_s=math.inf), id="window-s-inf"),
    pytest.param(body(window_s=[60]), id="window-s-list"),
    pytest.param(body(versions=None), id="versions-null"),
    pytest.param(body(versions=[{"3": {}}]), id="versions-list"),
    pytest.param(body(versions="3"), id="versions-text"),
]


@pytest.mark.parametrize("raw", REFUSED)
def test_bodies_refused(raw: Any) -> None:
    assert parse_monitoring(raw) is None


def versions_kept(versions: dict[Any, Any]) -> list[str]:
    report = parse_monitoring(body(versions=versions))
    assert report is not None
    return [f.version for f in report.versions]


VERSIONS = [
    pytest.param({"3": {}}, ["3"], id="digits"),
    pytest.param({"0012": {}}, ["0012"], id="leading-zeros"),
    pytest.param({"1234567890": {}}, ["1234567890"], id="ten-digits"),
    pytest.param({"12345678901": {}}, [], id="eleven-digits"),
    pytest.param({"9" * 10_000: {}}, [], id="overlong"),
    pytest.param({"v3": {}}, [], id="prefixed"),
    pytest.param({"3a": {}}, [], id="suffixed"),
    pytest.param({"-3": {}}, [], id="negative"),
    pytest.param({"3.0": {}}, [], id="decimal"),
    pytest.param({" 3": {}}, [], id="space"),
    pytest.param({"": {}}, [], id="empty"),
    pytest.param({"3": None}, [], id="figures-null"),
    pytest.param({"3": [1, 2]}, [], id="figures-list"),
    pytest.param({"3": "many"}, [], id="figures-text"),
    pytest.param({"v1": {}, "2": {}, "x": 1, "4": {}}, ["2", "4"], id="mixed"),
    pytest.param(
        {"²": {}},
        [],
        id="superscript-digit",
    ),
    pytest.param(
        {"٣": {}},
        [],
        id="arabic-indic-digit",
    ),
]


@pytest.mark.parametrize(("versions", "kept"), VERSIONS)
def test_which_versions_are_kept(versions: dict[Any, Any], kept: list[str]) -> None:
    assert versions_kept(versions) == kept


def test_more_versions_than_the_bound_are_cut() -> None:
    versions = {str(n): {"requests": n} for n in range(1, MAX_VERSIONS + 10)}
    assert versions_kept(versions) == [str(n) for n in range(1, MAX_VERSIONS + 1)]


def one_version(raw: dict[str, Any]) -> WindowFigures:
    report = parse_monitoring(body(versions={"3": raw}))
    assert report is not None
    [figures] = report.versions
    return figures


COUNTS = [
    pytest.param(12, 12, id="whole"),
    pytest.param(12.9, 12, id="fraction-cut"),
    pytest.param(0, 0, id="zero"),
    pytest.param(-5, 0, id="negative"),
    pytest.param(math.nan, 0, id="nan"),
    pytest.param(math.inf, 0, id="inf"),
    pytest.param(-math.inf, 0, id="minus-inf"),
    pytest.param(True, 0, id="bool"),
    pytest.param("12", 0, id="text"),
    pytest.param(None, 0, id="null"),
    pytest.param([12], 0, id="list"),
]


@pytest.mark.parametrize(("value", "expected"), COUNTS)
def test_counts(value: Any, expected: int) -> None:
    figures = one_version({"requests": value, "errors": value, "drift": {"rows": value}})
    assert (figures.requests, figures.errors, figures.rows) == (expected, expected, expected)


LATENCIES = [
    pytest.param(25, 25.0, id="whole"),
    pytest.param(2.5, 2.5, id="fraction"),
    pytest.param(0, 0.0, id="zero"),
    pytest.param(math.nan, None, id="nan"),
    pytest.param(math.inf, None, id="inf"),
    pytest.param(True, None, id="bool"),
    pytest.param("25", None, id="text"),
    pytest.param(None, None, id="null"),
    pytest.param(
        -25,
        None,
        id="negative",
    ),
]


@pytest.mark.parametrize(("value", "expected"), LATENCIES)
def test_latencies(value: Any, expected: float | None) -> None:
    figures = one_version({"p50_ms": value, "p95_ms": value})
    assert (figures.p50_ms, figures.p95_ms) == (expected, expected)


def test_psi_maps_keep_only_non_negative_finite_numbers() -> None:
    psi = {"a": -0.1, "b": math.nan, "c": math.inf, "d": True, "e": "0.5", "f": None, "g": 0.5, "h": 0}
    figures = one_version({"drift": {"rows": 50, "input_psi": psi, "prediction_psi": psi}})
    assert dict(figures.input_psi) == dict(figures.prediction_psi) == {"g": 0.5, "h": 0.0}


def test_feature_lists_and_psi_maps_are_cut() -> None:
    long_names = [f"{n:03d}" + "n" * 1000 for n in range(3 * MAX_FEATURES)]
    psi = {name: float(n) for n, name in enumerate(long_names)}
    names = [1, None, {"a": 1}, *long_names]  # what is no name is dropped, then the list is cut
    figures = one_version(
        {
            "reference": "r" * 1000,
            "reference_detail": "d" * 10_000,
            "drift": {
                "rows": 50,
                "enough_rows": True,
                "input_psi": psi,
                "drifted": names,
                "prediction_psi": psi,
                "predictions_drifted": names,
            },
        }
    )
    assert (len(figures.reference), len(figures.reference_note)) == (40, 300)
    for listed in (figures.drifted, figures.predictions_drifted):
        assert len(listed) == MAX_FEATURES
        assert all(len(name) == MAX_NAME for name in listed)
        assert listed[0].startswith("000")
    for mapped in (figures.input_psi, figures.prediction_psi):
        assert len(mapped) == MAX_FEATURES
        assert all(len(name) == MAX_NAME for name in mapped)
        highest = range(3 * MAX_FEATURES - 1, 2 * MAX_FEATURES - 1, -1)
        assert list(mapped.values()) == [float(n) for n in highest]


ENOUGH_ROWS = [
    pytest.param(True, True, id="true"),
    pytest.param(False, False, id="false"),
    pytest.param(1, False, id="one"),
    pytest.param("true", False, id="text"),
    pytest.param(None, False, id="null"),
]


@pytest.mark.parametrize(("value", "expected"), ENOUGH_ROWS)
def test_enough_rows_is_true_only_when_said_so(value: Any, expected: bool) -> None:
    assert one_version({"drift": {"rows": 5, "enough_rows": value}}).enough_rows is expected


@pytest.mark.parametrize("drift", [None, [], "x", 3, True], ids=["null", "list", "text", "number", "bool"])
def test_drift_that_is_no_object_is_no_drift(drift: Any) -> None:
    figures = one_version({"requests": 1, "drift": drift})
    assert (figures.rows, figures.enough_rows) == (None, False)
    assert (figures.input_psi, figures.drifted) == ({}, ())


def test_other_figures_fall_back() -> None:
    figures = one_version({"reference": None, "reference_detail": 42})
    assert (figures.reference, figures.reference_note) == ("none", "42")


def refused_or_judged_sanely(raw: dict[str, Any]) -> None:
    report = parse_monitoring(raw)
    if report is None:
        return
    judgement = judge(DRIFT, None, report, ("3",))
    assert judgement is not None
    assert judgement.status.window_seconds is not None and judgement.status.window_seconds >= 1
    assert all(0 <= m.step < 2**63 for m in judgement.metrics)


HEADERS = [
    pytest.param(body(), id="plain"),
    pytest.param(
        body(window_s=0),
        id="window-s-zero",
    ),
    pytest.param(
        body(window_s=-60),
        id="window-s-negative",
    ),
    pytest.param(
        body(window_s=1e-300),
        id="window-s-tiny",
    ),
    pytest.param(
        body(window_end=1e20),
        id="window-end-far-future",
    ),
    pytest.param(
        body(window_end=-1e15),
        id="window-end-far-past",
    ),
]


@pytest.mark.parametrize("raw", HEADERS)
def test_a_hostile_window_header_is_refused_or_judged_sanely(raw: dict[str, Any]) -> None:
    """Expected: a window length outside what an app writes (1..86400 s) or an end that is no date is
    refused by parse_monitoring, since judge() runs inside the decision of every pass."""
    raw["versions"] = {"3": {"requests": 4}}
    refused_or_judged_sanely(raw)


def test_a_deeply_nested_body_is_refused() -> None:
    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"[" * 200_000, headers={"content-type": "application/json"})

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        assert probe_monitoring("http://serve/app", client=client) is None


@pytest.mark.parametrize(
    ("status", "content"),
    [
        pytest.param(200, b"not json", id="not-json"),
        pytest.param(200, b'{"enabled": false}', id="disabled"),
        pytest.param(404, b'{"enabled": true}', id="not-found"),
        pytest.param(503, b"", id="unavailable"),
    ],
)
def test_probe_monitoring_without_a_window(status: int, content: bytes) -> None:
    def answer(_request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, content=content)

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        assert probe_monitoring("http://serve/app", client=client) is None


# ------------------------------------------------------------------------------------- judgement

END = 11 * WINDOW_S  # window 10 ends here


def figures(
    version: str = "3",
    *,
    requests: int = 100,
    errors: int = 0,
    rows: int | None = 400,
    enough_rows: bool = True,
    drifted: tuple[str, ...] = (),
    input_psi: dict[str, float] | None = None,
    predictions_drifted: tuple[str, ...] = (),
    prediction_psi: dict[str, float] | None = None,
    reference: str = "training",
    note: str = "",
) -> WindowFigures:
    return WindowFigures(
        version=version,
        requests=requests,
        errors=errors,
        p50_ms=5.0,
        p95_ms=100.0,
        reference=reference,
        reference_note=note,
        rows=rows,
        enough_rows=enough_rows,
        input_psi=input_psi if input_psi is not None else {"x": 0.01, "colour": 0.002},
        drifted=drifted,
        prediction_psi=prediction_psi or {},
        predictions_drifted=predictions_drifted,
    )


def window(*versions: WindowFigures, end: float = END) -> WindowReport:
    return WindowReport(end, WINDOW_S, versions)


X_DRIFTED = figures(drifted=("x",), input_psi={"x": 1.234, "colour": 0.01})
NO_REFERENCE = figures(rows=None, enough_rows=False, input_psi={}, reference="none", note=TENSORS)
TOO_FEW = figures(rows=5, enough_rows=False)

CONDITIONS = [
    pytest.param(window(X_DRIFTED), ("3",), "True", "Drifted", ["version 3: x (PSI 1.23)"], id="drifted"),
    pytest.param(
        window(replace(X_DRIFTED, reference="inputExample")),
        ("3",),
        "True",
        "Drifted",
        ["version 3 against its input example (a weak reference): x (PSI 1.23)"],
        id="drifted-against-a-weak-reference",
    ),
    pytest.param(
        window(figures(predictions_drifted=("prediction",), prediction_psi={"prediction": 0.9})),
        ("3",),
        "True",
        "Drifted",
        ["version 3: prediction prediction (PSI 0.90)"],
        id="predictions-drifted",
    ),
    pytest.param(
        window(
            figures(
                drifted=tuple(f"f{n}" for n in range(8)),
                input_psi={f"f{n}": 1.0 - n / 10 for n in range(8)},
            )
        ),
        ("3",),
        "True",
        "Drifted",
        ["f0 (PSI 1.00)", "f4 (PSI 0.60)"],
        id="five-features-named",
    ),
    pytest.param(
        window(X_DRIFTED, replace(X_DRIFTED, version="4", drifted=("colour",))),
        ("3", "4"),
        "True",
        "Drifted",
        ["version 3: x (PSI 1.23); version 4: colour (PSI 0.01)"],
        id="serving-and-candidate-drifted",
    ),
    pytest.param(
        window(X_DRIFTED, figures("4")),
        ("3", "4"),
        "True",
        "Drifted",
        ["version 3: x"],
        id="one-of-two-drifted",
    ),
    pytest.param(
        window(replace(X_DRIFTED, enough_rows=False)),
        ("3",),
        "Unknown",
        "NotEnoughRows",
        ["too few rows"],
        id="drifted-names-without-enough-rows-are-no-verdict",
    ),
    pytest.param(
        window(figures()),
        ("3",),
        "False",
        "NoDrift",
        ["no feature over the threshold in 1 version(s)"],
        id="no-drift",
    ),
    pytest.param(
        window(figures(), figures("4")),
        ("3", "4"),
        "False",
        "NoDrift",
        ["in 2 version(s)"],
        id="no-drift-in-two",
    ),
    pytest.param(
        window(figures(), TOO_FEW),
        ("3",),
        "False",
        "NoDrift",
        ["in 1 version(s)"],
        id="no-drift-where-there-are-rows",
    ),
    pytest.param(
        window(NO_REFERENCE),
        ("3",),
        "Unknown",
        "NoReference",
        [f"version 3: {TENSORS}"],
        id="tensor-signature",
    ),
    pytest.param(
        window(replace(NO_REFERENCE, reference="loading", reference_note="")),
        ("3",),
        "Unknown",
        "NoReference",
        ["version 3: loading"],
        id="reference-loading",
    ),
    pytest.param(
        window(NO_REFERENCE, replace(TOO_FEW, version="1"), replace(X_DRIFTED, version="2")),
        ("3",),
        "Unknown",
        "NoReference",
        [f"version 3: {TENSORS}"],
        id="no-reference-the-other-versions-not-judged",
    ),
    pytest.param(window(TOO_FEW), ("3",), "Unknown", "NotEnoughRows", ["too few rows"], id="not-enough-rows"),
    pytest.param(
        window(NO_REFERENCE, replace(TOO_FEW, version="4")),
        ("3", "4"),
        "Unknown",
        "NotEnoughRows",
        ["too few rows"],
        id="one-without-reference-one-with-too-few",
    ),
    pytest.param(
        window(figures("3"), replace(X_DRIFTED, version="1")),
        ("3",),
        "False",
        "NoDrift",
        ["in 1 version(s)"],
        id="pinned-old-version-drifting",
    ),
    pytest.param(
        window(replace(X_DRIFTED, version="1")),
        ("3", "4"),
        "Unknown",
        "NotEnoughRows",
        [],
        id="only-a-pinned-version-answered",
    ),
    pytest.param(window(), ("3",), "Unknown", "NotEnoughRows", [], id="no-traffic"),
]


@pytest.mark.parametrize(("report", "judged", "status", "reason", "said"), CONDITIONS)
def test_the_input_drift_condition(
    report: WindowReport, judged: tuple[str, ...], status: str, reason: str, said: list[str]
) -> None:
    judgement = judge(DRIFT, None, report, judged)
    assert judgement is not None and judgement.condition is not None
    condition = judgement.condition
    assert (condition.status, condition.reason) == (status, reason)
    for text in said:
        assert text in condition.message
    if reason == "Drifted":
        assert "f5" not in condition.message  # five features named at most
    assert len(condition.message) <= 2000


def status_at(end: float) -> MonitoringStatus:
    return MonitoringStatus(window_end=window_end_text(end), window_seconds=int(WINDOW_S))


SAME_WINDOW = [
    pytest.param(None, window(X_DRIFTED), True, id="first-window"),
    pytest.param(status_at(END - WINDOW_S), window(X_DRIFTED), True, id="a-newer-window"),
    pytest.param(status_at(END), window(X_DRIFTED), False, id="the-same-window"),
    pytest.param(MonitoringStatus(), window(X_DRIFTED), True, id="status-without-a-window"),
    pytest.param(None, None, False, id="no-report"),
    pytest.param(status_at(END), None, False, id="no-report-after-one"),
]


@pytest.mark.parametrize(("previous", "report", "written"), SAME_WINDOW)
def test_only_a_new_window_is_judged(
    previous: MonitoringStatus | None, report: WindowReport | None, written: bool
) -> None:
    assert (judge(DRIFT, previous, report, ("3",)) is not None) is written


def test_the_same_window_twice_writes_nothing() -> None:
    first = judge(DRIFT, None, window(X_DRIFTED), ("3",))
    assert first is not None
    assert judge(DRIFT, first.status, window(X_DRIFTED), ("3",)) is None
    assert judge(DRIFT, first.status, window(X_DRIFTED, end=END + WINDOW_S), ("3",)) is not None


def judged(monitoring: Monitoring, report: WindowReport, versions: tuple[str, ...] = ("3",)) -> Judgement:
    judgement = judge(monitoring, None, report, versions)
    assert judgement is not None
    return judgement


def test_without_drift_asked_figures_and_metrics_but_no_condition() -> None:
    judgement = judged(PAYLOADS_ONLY, window(X_DRIFTED))
    assert judgement.condition is None
    assert judgement.status.versions is not None and judgement.status.versions[0].requests == 100
    assert [m.version for m in judgement.metrics] == ["3"]


def test_status_figures() -> None:
    judgement = judged(
        DRIFT,
        window(
            replace(X_DRIFTED, errors=3, input_psi={"x": 1.23456789, "colour": 0.000049}),
            replace(NO_REFERENCE, version="4", requests=7),
        ),
    )
    status = judgement.status
    assert (status.window_end, status.window_seconds) == ("1970-01-01T00:11:00Z", 60)
    assert status.versions is not None
    three, four = status.versions
    assert (three.version, three.requests, three.error_rate, three.p50_ms, three.p95_ms) == (
        "3",
        100,
        0.03,
        5.0,
        100.0,
    )
    assert (three.rows, three.reference, three.reference_note) == (400, "training", None)
    assert (three.input_psi, three.drifted) == ({"x": 1.2346, "colour": 0.0}, ["x"])
    assert (three.prediction_psi, three.predictions_drifted) == (None, None)
    assert (four.version, four.requests, four.rows, four.reference_note) == ("4", 7, None, TENSORS)
    assert (four.input_psi, four.drifted) == (None, None)


def test_a_window_without_versions() -> None:
    status = judged(DRIFT, window()).status
    assert status.versions is None
    assert status.window_end == window_end_text(END)


def test_metrics() -> None:
    weird = "a:b c/d.é*?" + "z" * 300
    report = window(
        replace(
            X_DRIFTED,
            errors=5,
            input_psi={"x": 1.5, weird: 0.3},
            prediction_psi={"prediction": 0.25},
        ),
        replace(NO_REFERENCE, version="4"),
        figures("5", requests=0),
    )
    judgement = judged(DRIFT, report)
    assert [m.version for m in judgement.metrics] == ["3", "4"]  # no requests, nothing to log
    three, four = judgement.metrics
    assert (three.step, three.timestamp_ms) == (10, int(END * 1000))
    sanitised = "psi." + ("a_b c/d.é_" + "_" + "z" * 300)[:100]
    assert dict(three.metrics) == {
        "requests": 100.0,
        "error_rate": 0.05,
        "latency_p50_ms": 5.0,
        "latency_p95_ms": 100.0,
        "drift_rows": 400.0,
        "psi.x": 1.5,
        sanitised: 0.3,
        "prediction_psi.prediction": 0.25,
    }
    assert dict(four.metrics) == {
        "requests": 100.0,
        "error_rate": 0.0,
        "latency_p50_ms": 5.0,
        "latency_p95_ms": 100.0,
    }


STEPS = [
    pytest.param(60.0, 60.0, 0, id="window-0"),
    pytest.param(11 * 60.0, 60.0, 10, id="window-10"),
    pytest.param(1_700_000_100.0, 300.0, 5_666_666, id="a-real-date"),
]


@pytest.mark.parametrize(("end", "length", "step"), STEPS)
def test_the_step_is_the_windows_number(end: float, length: float, step: int) -> None:
    judgement = judged(PAYLOADS_ONLY, WindowReport(end, length, (figures(),)))
    assert [m.step for m in judgement.metrics] == [step]
    assert judgement.metrics[0].timestamp_ms == int(end * 1000)


PAYLOAD_CASES = [
    pytest.param(None, ("Unknown", "NoFigures"), id="no-figures"),
    pytest.param(
        {"logged": 40, "dropped": 0, "sink_error": 0, "problems": [], "errors": []},
        ("True", "Logging"),
        id="logging",
    ),
    pytest.param(
        {"logged": 0, "dropped": 3, "sink_error": 10, "problems": [], "errors": ["ClientConnectorError"]},
        ("False", "SinkFailing"),
        id="sink-failing",
    ),
    pytest.param(
        {"logged": 0, "problems": ["sink_headers_missing"], "errors": []},
        ("False", "SinkHeadersMissing"),
        id="headers-missing",
    ),
    pytest.param(
        {"logged": 0, "problems": ["sink_headers_invalid"], "errors": ["SinkRefused"]},
        ("False", "SinkHeadersInvalid"),
        id="a-problem-before-an-error",
    ),
    pytest.param(
        {"logged": 1, "problems": ["not a code!"], "errors": ["also not\\na code"]},
        ("True", "Logging"),
        id="hostile-codes-dropped",
    ),
]


@pytest.mark.parametrize(("payloads", "expected"), PAYLOAD_CASES)
def test_payloads_logged_condition(payloads: dict[str, Any] | None, expected: tuple[str, str]) -> None:
    raw = body(versions={"3": {"requests": 4}})
    if payloads is not None:
        raw["payloads"] = payloads
    report = parse_monitoring(raw)
    assert report is not None
    spec = Monitoring.model_validate({"payloads": {"sampleRate": 0.5}})
    judgement = judge(spec, None, report, ("3",))
    assert judgement is not None and judgement.payloads is not None
    assert (judgement.payloads.status, judgement.payloads.reason) == expected
    assert judgement.condition is None, "no drift asked: InputDrift is left alone"
    if payloads is not None and expected[0] != "Unknown":
        assert judgement.status.payloads is not None
        assert judgement.status.payloads.logged == payloads["logged"]


def test_payload_summary_sums_replicas_and_names_each_problem_once() -> None:
    from serving_app.monitoring.monitor import payload_summary

    parts = [
        {"logged": 3, "dropped": 1, "sink_error": 0, "problem": None, "last_error": "SinkRefused"},
        {"logged": 2, "dropped": 0, "sink_error": 5, "problem": "sink_headers_missing", "last_error": None},
        {
            "logged": 1,
            "dropped": 0,
            "sink_error": 0,
            "problem": "sink_headers_missing",
            "last_error": "SinkRefused",
        },
        None,
    ]
    assert payload_summary(parts) == {
        "logged": 6,
        "dropped": 1,
        "sink_error": 5,
        "problems": ["sink_headers_missing"],
        "errors": ["SinkRefused"],
    }
    assert payload_summary([None]) is None


# ---------------------------------------------------------------------------------- Prometheus


def gauge_values(gauge: Any) -> dict[tuple[str, ...], float]:
    """The gauge's series by (resource, version[, feature])."""
    return {
        tuple(s.labels[k] for k in ("resource", "version", "feature") if k in s.labels): s.value
        for m in gauge.collect()
        for s in m.samples
    }


def test_a_resources_window_series_replace_its_last_ones_and_leave_others_alone() -> None:
    def status(*versions: VersionFigures) -> MonitoringStatus:
        return MonitoringStatus(versions=list(versions))

    metrics.record_monitoring("team-b", "other", status(VersionFigures(version="9", requests=1)))
    metrics.record_monitoring(
        "team-a",
        "iris",
        status(
            VersionFigures(version="3", requests=40, input_psi={"x": 0.3}, prediction_psi={"score": 0.1}),
            VersionFigures(version="4", requests=2, input_psi={"y": 0.01}),
        ),
    )
    assert gauge_values(metrics.DRIFT_PSI)[("iris", "3", "prediction.score")] == 0.1
    metrics.record_monitoring("team-a", "iris", status(VersionFigures(version="4", requests=5)))
    requests = gauge_values(metrics.WINDOW_REQUESTS)
    assert {k: v for k, v in requests.items() if k[0] == "iris"} == {("iris", "4"): 5}
    assert requests[("other", "9")] == 1
    assert not [k for k in gauge_values(metrics.DRIFT_PSI) if k[0] == "iris"]
    metrics.record_monitoring("team-a", "iris", None)
    metrics.record_monitoring("team-b", "other", None)
    assert not [k for k in gauge_values(metrics.WINDOW_REQUESTS) if k[0] in ("iris", "other")]
