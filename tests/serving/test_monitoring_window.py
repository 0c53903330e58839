"""Per-version window figures: windows aligned to a (fake) clock, requests and errors counted, latency
buckets and quantiles, drift rows kept off the request path within bounds, and replicas' windows summed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pytest

from serving_app.monitoring.drift import Histogram, ReferenceProfile, profile_from_frame
from serving_app.monitoring.window import (
    LATENCY_BOUNDS_MS,
    MAX_DRIFT_ROWS,
    MAX_VERSIONS,
    ProfileState,
    ReplicaWindows,
    latency_bucket,
    quantile_ms,
    settled_window,
    sum_windows,
)

WINDOW_S = 60.0
START = 10 * WINDOW_S + 1.0  # inside window 10
BUCKETS = len(LATENCY_BOUNDS_MS) + 1
PSI_THRESHOLD = 0.2
MIN_ROWS = 10


class Clock:
    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def to_window(self, index: int, offset: float = 1.0) -> None:
        self.now = index * WINDOW_S + offset


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


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    reference = sample(0, 2000)
    return profile_from_frame(reference, predictions=answers(reference))


@pytest.fixture(scope="module")
def other_profile() -> ReferenceProfile:
    return profile_from_frame(sample(99, 500, shift=5.0))


class Profiles:
    """What the replica knows of each version's reference (loading until set)."""

    def __init__(self, known: Mapping[str, ReferenceProfile] | None = None) -> None:
        self.states = {v: ProfileState(p, "training", "run dataset") for v, p in (known or {}).items()}

    def __call__(self, version: str) -> ProfileState:
        return self.states.get(version, ProfileState())


def replica(
    clock: Clock, profiles: Mapping[str, ReferenceProfile] | None = None, *, drift: bool = True
) -> ReplicaWindows:
    return ReplicaWindows(WINDOW_S, Profiles(profiles), drift=drift, clock=clock)


def completed(windows: ReplicaWindows) -> dict[str, Any]:
    wire = windows.completed_wire()
    assert wire is not None
    return wire


def bucket_counts(**at: int) -> list[int]:
    """Latency counts with `at` as {"b<index>": count}."""
    counts = [0] * BUCKETS
    for key, count in at.items():
        counts[int(key[1:])] = count
    return counts


# ------------------------------------------------------------------------------ windows and clock


def test_figures_land_in_the_window_they_were_answered_in() -> None:
    clock = Clock()
    windows = replica(clock)
    windows.record("3", 200, 4.0)
    windows.record("3", 200, 4.0)
    assert windows.completed_wire() is None  # nothing completed yet

    clock.now = 11 * WINDOW_S - 0.001  # still window 10
    windows.record("3", 200, 4.0)
    assert windows.completed_wire() is None

    clock.to_window(11, offset=0.0)  # the boundary belongs to the next window
    windows.record("3", 500, 4.0)
    wire = completed(windows)
    assert (wire["window"], wire["window_s"]) == (10, WINDOW_S)
    assert (wire["versions"]["3"]["requests"], wire["versions"]["3"]["errors"]) == (3, 0)

    clock.to_window(12)
    wire = completed(windows)
    assert wire["window"] == 11
    assert (wire["versions"]["3"]["requests"], wire["versions"]["3"]["errors"]) == (1, 1)


def test_a_window_rolls_on_asking_alone() -> None:
    clock = Clock()
    windows = replica(clock)
    windows.record("3", 200, 4.0)
    clock.to_window(11)
    # No request in window 11: asking for the completed window is what rolls it.
    assert completed(windows)["versions"]["3"]["requests"] == 1
    clock.to_window(12)
    assert completed(windows) == {"window": 11, "window_s": WINDOW_S, "versions": {}}


def test_a_skipped_window_does_not_report_old_figures() -> None:
    """No traffic for more than a window: the last completed window is the empty one just before now,
    never the stale one with traffic (the same wire a replica ticking every second would send)."""
    clock = Clock()
    windows = replica(clock)
    windows.record("3", 200, 4.0)
    clock.to_window(13)
    assert completed(windows) == {"window": 12, "window_s": WINDOW_S, "versions": {}}
    windows.record("3", 200, 4.0)
    clock.to_window(14)
    assert completed(windows)["window"] == 13
    assert completed(windows)["versions"]["3"]["requests"] == 1


STATUSES = [
    pytest.param([200], (1, 0, 0), id="ok"),
    pytest.param([200, 201, 204, 302], (4, 0, 0), id="2xx-3xx-are-no-errors"),
    pytest.param([400, 404, 422, 429, 499], (5, 0, 5), id="4xx-client-errors"),
    pytest.param([500, 502, 503, 504], (4, 4, 0), id="5xx-errors"),
    pytest.param([200, 404, 500, 200, 503], (5, 2, 1), id="mixed"),
]


@pytest.mark.parametrize(("statuses", "expected"), STATUSES)
def test_status_counting(statuses: list[int], expected: tuple[int, int, int]) -> None:
    clock = Clock()
    windows = replica(clock)
    for status in statuses:
        windows.record("3", status, 1.0)
    clock.to_window(11)
    figures = completed(windows)["versions"]["3"]
    assert (figures["requests"], figures["errors"], figures["client_errors"]) == expected


def test_versions_are_bounded() -> None:
    clock = Clock()
    windows = replica(clock)
    for version in range(1, MAX_VERSIONS + 5):
        windows.record(str(version), 200, 1.0)
    windows.record("1", 200, 1.0)  # a version already in the window still counts
    clock.to_window(11)
    versions = completed(windows)["versions"]
    assert sorted(versions, key=int) == [str(v) for v in range(1, MAX_VERSIONS + 1)]
    assert versions["1"]["requests"] == 2


# ------------------------------------------------------------------------------------- latency

BUCKET_CASES = [
    pytest.param(0.0, 0, id="zero"),
    pytest.param(-3.0, 0, id="negative"),
    pytest.param(1.0, 0, id="on-the-first-bound"),
    pytest.param(1.01, 1, id="just-over-the-first-bound"),
    pytest.param(7.0, 3, id="between-5-and-10"),
    pytest.param(250.0, 7, id="on-a-middle-bound"),
    pytest.param(30000.0, len(LATENCY_BOUNDS_MS) - 1, id="on-the-last-bound"),
    pytest.param(30000.5, len(LATENCY_BOUNDS_MS), id="overflow"),
    pytest.param(1e12, len(LATENCY_BOUNDS_MS), id="far-overflow"),
]


@pytest.mark.parametrize(("latency_ms", "bucket"), BUCKET_CASES)
def test_latency_bucket(latency_ms: float, bucket: int) -> None:
    assert latency_bucket(latency_ms) == bucket


QUANTILES = [
    pytest.param([], None, None, id="no-counts"),
    pytest.param([0] * BUCKETS, None, None, id="all-zero"),
    pytest.param(bucket_counts(b0=10), 1.0, 1.0, id="one-bucket"),
    pytest.param(bucket_counts(b2=50, b6=50), 5.0, 100.0, id="two-halves"),
    pytest.param(bucket_counts(b2=51, b6=49), 5.0, 100.0, id="median-in-the-lower"),
    pytest.param(bucket_counts(b2=49, b6=51), 100.0, 100.0, id="median-in-the-upper"),
    pytest.param(bucket_counts(b0=95, b3=5), 1.0, 1.0, id="p95-on-the-edge"),
    pytest.param(bucket_counts(b0=94, b3=6), 1.0, 10.0, id="p95-just-over"),
    pytest.param(bucket_counts(b0=1, b9=1, b14=98), 30000.0, 30000.0, id="overflow-bucket"),
    pytest.param(bucket_counts(b4=90, b14=10), 25.0, 30000.0, id="p95-in-overflow"),
]


@pytest.mark.parametrize(("counts", "p50", "p95"), QUANTILES)
def test_quantile_ms(counts: list[int], p50: float | None, p95: float | None) -> None:
    assert (quantile_ms(counts, 0.5), quantile_ms(counts, 0.95)) == (p50, p95)


def test_latencies_are_counted_into_their_buckets() -> None:
    clock = Clock()
    windows = replica(clock)
    for latency in (0.5, 3.0, 3.0, 40.0, 99999.0):
        windows.record("3", 200, latency)
    clock.to_window(11)
    assert completed(windows)["versions"]["3"]["latency"] == bucket_counts(b0=1, b2=2, b5=1, b14=1)


# ---------------------------------------------------------------------------------- drift rows


def drift_rows(wire: Mapping[str, Any], version: str = "3") -> tuple[int | None, int]:
    figures = wire["versions"][version]
    return (figures["drift"]["rows"] if figures["drift"] else None), figures["skipped_rows"]


FRAME = sample(1, 7)

KEPT = [
    pytest.param(True, 200, FRAME, answers(FRAME), 7, id="2xx-frame-with-answers"),
    pytest.param(True, 200, FRAME, None, None, id="no-answers"),
    pytest.param(True, 404, FRAME, answers(FRAME), None, id="4xx"),
    pytest.param(True, 500, FRAME, answers(FRAME), None, id="5xx"),
    pytest.param(True, 200, FRAME.to_numpy(), answers(FRAME), None, id="ndarray-input"),
    pytest.param(True, 200, FRAME.to_dict("list"), answers(FRAME), None, id="dict-input"),
    pytest.param(True, 200, None, answers(FRAME), None, id="no-input"),
    pytest.param(False, 200, FRAME, answers(FRAME), None, id="drift-off"),
]


@pytest.mark.parametrize(("drift", "status", "model_input", "outputs", "rows"), KEPT)
def test_which_answers_keep_drift_rows(
    profile: ReferenceProfile, drift: bool, status: int, model_input: Any, outputs: Any, rows: int | None
) -> None:
    clock = Clock()
    windows = replica(clock, {"3": profile}, drift=drift)
    windows.record("3", status, 2.0, model_input, outputs)
    windows.count_pending()
    clock.to_window(11)
    assert drift_rows(completed(windows)) == (rows, 0)


def test_kept_rows_are_counted_against_the_profile(profile: ReferenceProfile) -> None:
    clock = Clock()
    windows = replica(clock, {"3": profile})
    first, second = sample(2, 30), sample(3, 50, shift=1.0)
    windows.record("3", 200, 2.0, first, answers(first))
    windows.count_pending()
    windows.record("3", 200, 2.0, second, answers(second))
    # Rows still pending at the boundary are counted into the window they were answered in.
    clock.to_window(11)
    expected = Histogram(profile)
    expected.observe(pd.concat([first, second], ignore_index=True), answers(first) + answers(second))
    figures = completed(windows)["versions"]["3"]
    assert figures["drift"] == expected.to_wire()
    assert figures["profile"] == profile.to_wire()
    assert figures["reference"] == {"kind": "training", "detail": "run dataset"}


def test_drift_rows_are_bounded_per_count(profile: ReferenceProfile) -> None:
    clock = Clock()
    windows = replica(clock, {"3": profile})
    half = sample(4, MAX_DRIFT_ROWS // 2)
    windows.record("3", 200, 2.0, half, answers(half))
    windows.record("3", 200, 2.0, half, answers(half))  # exactly at the bound: kept
    windows.record("3", 200, 2.0, FRAME, answers(FRAME))  # past it: skipped, counted as such
    windows.record("3", 200, 2.0, FRAME, answers(FRAME))
    windows.count_pending()
    clock.to_window(11)
    assert drift_rows(completed(windows)) == (MAX_DRIFT_ROWS, 2 * len(FRAME))
    assert completed(windows)["versions"]["3"]["requests"] == 4  # skipped rows still count as requests


def test_drift_rows_are_bounded_per_window(profile: ReferenceProfile) -> None:
    clock = Clock()
    windows = replica(clock, {"3": profile})
    half = sample(4, MAX_DRIFT_ROWS // 2)
    for _ in range(2):
        windows.record("3", 200, 2.0, half, answers(half))
        windows.count_pending()
    windows.record("3", 200, 2.0, FRAME, answers(FRAME))
    windows.count_pending()
    clock.to_window(11)
    assert drift_rows(completed(windows)) == (MAX_DRIFT_ROWS, len(FRAME))


def test_rows_pending_without_a_profile_are_skipped(profile: ReferenceProfile) -> None:
    clock = Clock()
    profiles = Profiles()
    windows = ReplicaWindows(WINDOW_S, profiles, drift=True, clock=clock)
    early = sample(5, 12)
    windows.record("3", 200, 2.0, early, answers(early))
    windows.count_pending()  # the reference is still loading: these rows cannot be counted
    profiles.states["3"] = ProfileState(profile, "inputExample", "")
    windows.record("3", 200, 2.0, FRAME, answers(FRAME))
    windows.count_pending()
    clock.to_window(11)
    wire = completed(windows)
    assert drift_rows(wire) == (len(FRAME), len(early))
    assert wire["versions"]["3"]["reference"]["kind"] == "inputExample"


def test_a_version_without_a_profile_sends_none(profile: ReferenceProfile) -> None:
    clock = Clock()
    windows = replica(clock, {})
    windows.record("3", 200, 2.0, FRAME, answers(FRAME))
    clock.to_window(11)
    figures = completed(windows)["versions"]["3"]
    assert (figures["profile"], figures["drift"], figures["skipped_rows"]) == (None, None, len(FRAME))
    assert figures["reference"] == {"kind": "loading", "detail": ""}


ODD_ANSWERS = [
    # Answers that do not match the rows: the inputs are still counted, the predictions are not.
    pytest.param(answers(FRAME)[:3], len(FRAME), 0, 0, id="too-few-answers"),
    # Answers no frame can be made of: the rows are skipped (none counted), the figures go on.
    pytest.param([[1.0, 2.0]] * len(FRAME), 0, 0, len(FRAME), id="two-dimensional-answers"),
]


@pytest.mark.parametrize(("outputs", "rows", "prediction_counts", "skipped"), ODD_ANSWERS)
def test_odd_answers_do_not_stop_the_figures(
    profile: ReferenceProfile, outputs: Any, rows: int, prediction_counts: int, skipped: int
) -> None:
    clock = Clock()
    windows = replica(clock, {"3": profile})
    windows.record("3", 200, 2.0, FRAME, outputs)
    windows.count_pending()
    clock.to_window(11)
    figures = completed(windows)["versions"]["3"]
    assert drift_rows(completed(windows)) == (rows, skipped)
    assert sum(figures["drift"]["predictions"]["prediction"]) == prediction_counts
    assert figures["requests"] == 1


# ------------------------------------------------------------------------------------- summing


def observed_wire(profile: ReferenceProfile, frame: pd.DataFrame) -> dict[str, Any]:
    histogram = Histogram(profile)
    histogram.observe(frame, answers(frame))
    return histogram.to_wire()


def part(
    requests: int = 0,
    errors: int = 0,
    client_errors: int = 0,
    latency: list[int] | None = None,
    profile: ReferenceProfile | None = None,
    drift: dict[str, Any] | None = None,
    kind: str = "training",
) -> dict[str, Any]:
    return {
        "requests": requests,
        "errors": errors,
        "client_errors": client_errors,
        "latency": latency if latency is not None else [0] * BUCKETS,
        "skipped_rows": 0,
        "reference": {"kind": kind, "detail": ""},
        "profile": profile.to_wire() if profile is not None else None,
        "drift": drift,
    }


def window_wire(index: int, **versions: dict[str, Any]) -> dict[str, Any]:
    return {"window": index, "window_s": WINDOW_S, "versions": {v[1:]: p for v, p in versions.items()}}


def pushed(replica: str, index: int) -> dict[str, Any]:
    return {**window_wire(index, v3=part(1)), "replica": replica}


GRACE_S = 5.0
END_OF_11 = 12 * WINDOW_S  # window 11 covers [660, 720)
settled_cases = [
    # (name, wires, now, settled window)
    ("nothing pushed", [], END_OF_11, None),
    ("every replica pushed the newest", [pushed("a", 11), pushed("b", 11)], END_OF_11 + 1, 11),
    (
        "one replica still on the one before: that one is answered",
        [pushed("a", 10), pushed("a", 11), pushed("b", 10)],
        END_OF_11 + 1,
        10,
    ),
    (
        "a replica that stopped pushing holds nothing back past the grace",
        [pushed("a", 10), pushed("a", 11), pushed("b", 10)],
        END_OF_11 + GRACE_S,
        11,
    ),
    ("a lone replica's first window", [pushed("a", 11)], END_OF_11 + 1, 11),
    (
        "a replica that missed the window before is not waited for",
        [pushed("a", 10), pushed("a", 11), pushed("b", 9)],
        END_OF_11 + 1,
        11,
    ),
    ("wires without a replica name are a replica each", [window_wire(11), window_wire(10)], END_OF_11, 10),
]


@pytest.mark.parametrize(
    ("wires", "now", "settled"), [c[1:] for c in settled_cases], ids=[c[0] for c in settled_cases]
)
def test_the_window_answered_is_one_every_replica_pushed_or_whose_grace_is_over(
    wires: list[dict[str, Any]], now: float, settled: int | None
) -> None:
    assert settled_window(wires, now=now, grace_s=GRACE_S) == settled


def test_a_settled_window_is_summed_over_the_replicas_that_pushed_it() -> None:
    wires = [pushed("a", 10), pushed("a", 11), pushed("b", 10)]
    index, [figures] = sum_windows(wires, psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS, index=10)
    assert (index, figures.requests) == (10, 2)
    assert sum_windows(wires, psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS, index=None)[0] == 11
    assert sum_windows(wires, psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS, index=3) == (None, [])


def test_sum_of_nothing() -> None:
    assert sum_windows([], psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS) == (None, [])
    no_index: list[dict[str, Any]] = [
        {"window": None, "versions": {"3": part(1)}},
        {"window": "7", "versions": {}},
    ]
    assert sum_windows(no_index, psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS) == (None, [])


def test_the_same_window_is_summed_and_an_older_one_ignored() -> None:
    wires = [
        window_wire(11, v3=part(10, errors=1, client_errors=2, latency=bucket_counts(b2=10))),
        window_wire(11, v3=part(30, errors=3, latency=bucket_counts(b6=30)), v4=part(5)),
        window_wire(10, v3=part(1000, errors=1000, latency=bucket_counts(b14=1000)), v9=part(7)),
    ]
    index, figures = sum_windows(wires, psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS)
    assert index == 11
    assert [f.version for f in figures] == ["3", "4"]
    three = figures[0]
    assert (three.requests, three.errors, three.client_errors) == (40, 4, 2)
    assert (three.p50_ms, three.p95_ms) == (100.0, 100.0)
    assert three.to_wire()["error_rate"] == 0.1


def test_a_latency_list_of_the_wrong_length_is_ignored() -> None:
    wires = [
        window_wire(11, v3=part(10, latency=bucket_counts(b1=10))),
        window_wire(11, v3=part(10, latency=[10] * (BUCKETS - 1))),
        window_wire(11, v3=part(10, latency=[10] * (BUCKETS + 1))),
    ]
    _, [figures] = sum_windows(wires, psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS)
    assert figures.requests == 30
    assert (figures.p50_ms, figures.p95_ms) == (2.0, 2.0)


def test_versions_are_ordered_as_numbers_and_bounded() -> None:
    versions = {f"v{n}": part(1) for n in range(MAX_VERSIONS + 4, 0, -1)}
    _, figures = sum_windows([window_wire(11, **versions)], psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS)
    assert [f.version for f in figures] == [str(n) for n in range(1, MAX_VERSIONS + 1)]


def test_histograms_of_another_profile_are_ignored(
    profile: ReferenceProfile, other_profile: ReferenceProfile
) -> None:
    ours, theirs = sample(6, 40), sample(7, 60)
    wires = [
        window_wire(11, v3=part(1, profile=profile, drift=observed_wire(profile, ours))),
        window_wire(11, v3=part(1, profile=other_profile, drift=observed_wire(other_profile, theirs))),
    ]
    _, [figures] = sum_windows(wires, psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS)
    assert figures.drift is not None
    assert figures.drift.rows == len(ours)


def test_a_version_without_a_profile_has_no_drift_report() -> None:
    wires = [window_wire(11, v3=part(5, kind="none")), window_wire(11, v3=part(5, kind="none"))]
    _, [figures] = sum_windows(wires, psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS)
    assert figures.drift is None
    assert figures.reference == "none"
    assert "drift" not in figures.to_wire()


def test_the_reference_is_told_by_the_replica_that_has_the_profile(profile: ReferenceProfile) -> None:
    wires = [
        window_wire(11, v3=part(5, kind="loading")),
        window_wire(11, v3=part(5, profile=profile, kind="inputExample")),
    ]
    _, [figures] = sum_windows(wires, psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS)
    assert figures.reference == "inputExample"
    assert figures.drift is not None and figures.drift.rows == 0
    assert not figures.drift.enough_rows


VERDICTS = [
    pytest.param(0.0, 0.0, (), id="no-shift"),
    pytest.param(2.0, 2.0, ("x",), id="x-shifted-on-both-replicas"),
]


@pytest.mark.parametrize(("shift_a", "shift_b", "drifted"), VERDICTS)
def test_the_drift_verdict_of_summed_windows(
    profile: ReferenceProfile, shift_a: float, shift_b: float, drifted: tuple[str, ...]
) -> None:
    a, b = sample(8, 400, shift=shift_a), sample(9, 400, shift=shift_b)
    wires = [
        window_wire(11, v3=part(1, profile=profile, drift=observed_wire(profile, a))),
        window_wire(11, v3=part(1, profile=profile, drift=observed_wire(profile, b))),
    ]
    _, [figures] = sum_windows(wires, psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS)
    report = figures.drift
    assert report is not None
    assert (report.rows, report.enough_rows, report.drifted) == (800, True, drifted)
    # x * 2 is what the model answers: a shifted input shifts the predictions with it.
    assert report.predictions_drifted == (("prediction",) if drifted else ())
    wire = figures.to_wire()["drift"]
    assert wire["drifted"] == list(drifted)
    assert list(wire["input_psi"]) == sorted(report.psi, key=lambda n: -report.psi[n])


def test_too_few_rows_give_no_verdict(profile: ReferenceProfile) -> None:
    shifted = sample(10, 5, shift=3.0)
    wires = [window_wire(11, v3=part(1, profile=profile, drift=observed_wire(profile, shifted)))]
    _, [figures] = sum_windows(wires, psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS)
    assert figures.drift is not None
    assert (figures.drift.rows, figures.drift.enough_rows, figures.drift.drifted) == (5, False, ())


def test_replicas_summed_equal_one_replica_seeing_everything(profile: ReferenceProfile) -> None:
    """Two replicas with the same profile, each answering half of the traffic, sum to the figures of
    one replica that answered all of it."""
    frame = sample(11, 600, shift=0.7)
    halves = (frame.iloc[:250].reset_index(drop=True), frame.iloc[250:].reset_index(drop=True))
    clock = Clock()
    whole = replica(clock, {"3": profile})
    parts = [replica(clock, {"3": profile}) for _ in halves]
    whole.record("3", 200, 3.0, frame, answers(frame))
    for windows, half in zip(parts, halves, strict=True):
        for start in range(0, len(half), 50):  # several requests, several counts
            rows = half.iloc[start : start + 50]
            windows.record("3", 200, 3.0, rows, answers(rows))
            windows.count_pending()
    clock.to_window(11)
    _, [one] = sum_windows([completed(whole)], psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS)
    _, [summed] = sum_windows([completed(w) for w in parts], psi_threshold=PSI_THRESHOLD, min_rows=MIN_ROWS)
    assert one.drift is not None and summed.drift is not None
    assert summed.drift.rows == one.drift.rows == len(frame)
    assert summed.drift.psi == one.drift.psi
    assert summed.drift.prediction_psi == one.drift.prediction_psi
    assert summed.drift.drifted == one.drift.drifted
    assert summed.to_wire()["drift"] == one.to_wire()["drift"]
