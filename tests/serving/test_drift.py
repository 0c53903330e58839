"""Drift figures: reference bins, mergeable histograms, their wire forms, and PSI verdicts."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

from serving_app.monitoring.drift import (
    MAX_FEATURES,
    PREDICTION,
    FeatureBins,
    Histogram,
    ReferenceProfile,
    drift_report,
    profile_from_frame,
    psi,
)

ROWS = 5000


def sample(
    seed: int, rows: int = ROWS, shift: float = 0.0, colours: tuple[float, ...] = (0.5, 0.3, 0.2)
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "x": rng.normal(loc=shift, size=rows),
            "y": rng.exponential(size=rows),
            "colour": rng.choice(["red", "green", "blue"], size=rows, p=list(colours)),
            "flag": rng.choice([True, False], size=rows),
        }
    )


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    return profile_from_frame(sample(0), predictions=np.random.default_rng(1).normal(size=ROWS))


def observed(profile: ReferenceProfile, frame: pd.DataFrame, predictions: Any = None) -> Histogram:
    histogram = Histogram(profile)
    histogram.observe(frame, predictions)
    return histogram


# ------------------------------------------------------------------------------------ verdicts

VERDICTS = [
    pytest.param(sample(2), (), id="identical-distribution"),
    pytest.param(sample(3, shift=2.0), ("x",), id="numeric-shift-2-sd"),
    pytest.param(sample(4, colours=(0.1, 0.2, 0.7)), ("colour",), id="categorical-shift"),
    pytest.param(sample(5).assign(colour="purple"), ("colour",), id="unseen-category"),
    pytest.param(sample(6).assign(x=np.nan), ("x",), id="all-missing"),
]


@pytest.mark.parametrize("live, drifted", VERDICTS)
def test_psi_flags_only_the_features_that_moved(
    profile: ReferenceProfile, live: pd.DataFrame, drifted: tuple[str, ...]
) -> None:
    report = drift_report(profile, observed(profile, live), threshold=0.2, min_rows=200)
    assert report.enough_rows
    assert report.drifted == drifted
    for name, value in report.psi.items():
        if name in drifted:
            assert value > 0.2
        else:
            assert value < 0.01, (name, value)


def test_drifted_features_come_highest_first(profile: ReferenceProfile) -> None:
    live = sample(7, shift=3.0, colours=(0.2, 0.3, 0.5))
    report = drift_report(profile, observed(profile, live), threshold=0.2, min_rows=200)
    assert report.drifted == ("x", "colour")
    assert report.psi["x"] > report.psi["colour"]


def test_prediction_drift_is_reported_apart(profile: ReferenceProfile) -> None:
    live = sample(8)
    shifted = np.random.default_rng(9).normal(loc=2.0, size=ROWS)
    report = drift_report(profile, observed(profile, live, shifted), threshold=0.2, min_rows=200)
    assert report.drifted == ()
    assert report.predictions_drifted == (PREDICTION,)
    assert report.prediction_psi[PREDICTION] > 0.2


@pytest.mark.parametrize(
    "rows, min_rows, enough",
    [
        pytest.param(199, 200, False, id="below-minimum"),
        pytest.param(200, 200, True, id="at-minimum"),
        pytest.param(0, 0, False, id="no-rows-never-enough"),
    ],
)
def test_too_few_rows_give_no_verdict(
    profile: ReferenceProfile, rows: int, min_rows: int, enough: bool
) -> None:
    report = drift_report(profile, observed(profile, sample(10, rows=rows, shift=5.0)), 0.2, min_rows)
    assert report.rows == rows
    assert report.enough_rows is enough
    assert bool(report.drifted) is enough
    if rows:
        assert report.psi["x"] > 0.2  # the figure is still there, without a verdict


# ---------------------------------------------------------------------------------------- bins


def test_values_outside_the_reference_range_land_in_the_open_bins(profile: ReferenceProfile) -> None:
    bins = profile.inputs["x"].bins
    counts = bins.count(pd.Series([-1e9, 1e9, np.inf, -np.inf]), 4)
    assert counts is not None
    assert counts[0] == 2 and counts[-2] == 2 and counts.sum() == 4


BIN_CASES = [
    pytest.param(pd.Series([1.0, np.nan, None, 2.0]), "numeric", {"missing": 2}, id="nan-and-none-missing"),
    pytest.param(
        pd.Series(["red", None, "mauve", "red"]),
        "categorical",
        {"missing": 1, "other": 1, "red": 2},
        id="unseen-other",
    ),
    pytest.param(pd.Series(["1.5", "not a number"]), "numeric", {"missing": 1}, id="unparsable-missing"),
    pytest.param(
        pd.Series([True, False, None], dtype=object),
        "categorical",
        {"missing": 1, "other": 2},
        id="bools-unseen",
    ),
]


@pytest.mark.parametrize("values, kind, expected", BIN_CASES)
def test_values_land_in_their_bins(values: pd.Series, kind: str, expected: dict[str, int]) -> None:
    bins = (
        FeatureBins("numeric", edges=(0.0, 1.0))
        if kind == "numeric"
        else FeatureBins("categorical", categories=("red", "blue"))
    )
    counts = bins.count(values, len(values))
    assert counts is not None
    by_label = dict(zip(bins.labels, counts.tolist(), strict=True))
    for label, count in expected.items():
        assert by_label[label] == count, by_label
    assert counts.sum() == len(values)


def test_columns_of_another_type_are_not_counted(profile: ReferenceProfile) -> None:
    live = sample(11, rows=10).assign(x=[[1.0, 2.0]] * 10, colour=pd.Timestamp("2024-01-01"))
    histogram = observed(profile, live)
    assert histogram.inputs["x"].sum() == 0 and histogram.inputs["colour"].sum() == 0
    assert histogram.inputs["y"].sum() == 10
    assert drift_report(profile, histogram, 0.2, 1).unobserved == ("x", "colour")


def test_an_absent_column_is_missing_in_every_row(profile: ReferenceProfile) -> None:
    histogram = observed(profile, sample(12, rows=20).drop(columns=["y"]))
    assert histogram.inputs["y"][-1] == 20


def test_numeric_edges_are_deduplicated() -> None:
    made = profile_from_frame(pd.DataFrame({"few": [0.0] * 90 + [1.0] * 10}))
    assert made.inputs["few"].bins.edges == (0.0, 1.0)
    assert made.inputs["few"].expected == pytest.approx((0.0, 0.9, 0.1, 0.0))


def test_categories_are_capped_by_frequency() -> None:
    frame = pd.DataFrame({"c": [f"v{i}" for i in range(30) for _ in range(i + 1)]})
    bins = profile_from_frame(frame, max_categories=5).inputs["c"].bins
    assert bins.categories == ("v29", "v28", "v27", "v26", "v25")


SKIPS = [
    pytest.param(pd.DataFrame({"empty": [None, None]}), "empty", "no values", id="no-values"),
    pytest.param(pd.DataFrame({"nan": [np.nan, np.nan]}), "nan", "no finite values", id="all-nan"),
    pytest.param(
        pd.DataFrame({"when": pd.to_datetime(["2024-01-01"])}), "when", "unsupported type", id="dates"
    ),
    pytest.param(pd.DataFrame({"nested": [[1], [2]]}), "nested", "unsupported values", id="lists"),
    pytest.param(pd.DataFrame({"n" * 300: [1.0]}), "n" * 199 + "…", "longer than", id="long-name"),
    pytest.param(pd.DataFrame({"": [1.0]}), "''", "name empty", id="empty-name"),
]


@pytest.mark.parametrize("frame, name, reason", SKIPS)
def test_unusable_columns_are_skipped_and_said(frame: pd.DataFrame, name: str, reason: str) -> None:
    made = profile_from_frame(frame)
    assert made.inputs == {}
    assert reason in made.skipped[name]


def test_a_repeated_column_is_profiled_once() -> None:
    made = profile_from_frame(pd.DataFrame([[1.0, 2.0], [3.0, 4.0]], columns=["a", "a"]))
    assert list(made.inputs) == ["a"] and made.skipped == {"a": "duplicate column name"}


def test_features_are_bounded() -> None:
    wide = pd.DataFrame(np.ones((3, MAX_FEATURES + 300)))
    made = profile_from_frame(wide)
    assert len(made.inputs) == MAX_FEATURES
    assert len(made.skipped) == MAX_FEATURES + 1
    assert made.skipped["…"] == "44 more columns skipped"


def test_predictions_with_a_column_per_output() -> None:
    outputs = pd.DataFrame({"score": np.linspace(0, 1, 50), "label": ["a", "b"] * 25})
    made = profile_from_frame(pd.DataFrame({"x": np.arange(50.0)}), predictions=outputs)
    assert set(made.predictions) == {"score", "label"}
    assert made.predictions["label"].bins.kind == "categorical"


# ------------------------------------------------------------------------------------- merging


def test_merging_equals_observing_the_concatenation(profile: ReferenceProfile) -> None:
    first, second = sample(13, rows=700), sample(14, rows=300, shift=1.0)
    rng = np.random.default_rng(15)
    p1, p2 = rng.normal(size=700), rng.normal(size=300)
    merged = observed(profile, first, p1).merge(observed(profile, second, p2))
    whole = observed(profile, pd.concat([first, second], ignore_index=True), np.concatenate([p1, p2]))
    assert merged.to_wire() == whole.to_wire()
    summed = Histogram.sum(profile, [observed(profile, first, p1), observed(profile, second, p2)])
    assert summed.to_wire() == whole.to_wire()
    assert Histogram.sum(profile, []).rows == 0


def test_histograms_of_another_profile_are_refused(profile: ReferenceProfile) -> None:
    other = profile_from_frame(sample(16))
    with pytest.raises(ValueError, match="different reference profiles"):
        observed(profile, sample(17)).merge(Histogram(other))
    with pytest.raises(ValueError, match="another reference profile"):
        drift_report(other, observed(profile, sample(17)), 0.2, 1)


def test_predictions_must_match_the_rows(profile: ReferenceProfile) -> None:
    with pytest.raises(ValueError, match="3 predictions for 2 rows"):
        observed(profile, sample(18, rows=2), [1.0, 2.0, 3.0])


# ---------------------------------------------------------------------------------------- wire


def through_json(value: dict[str, Any]) -> Any:
    return json.loads(json.dumps(value))


def test_wire_round_trips(profile: ReferenceProfile) -> None:
    again = ReferenceProfile.from_wire(through_json(profile.to_wire()))
    assert again == profile and again.fingerprint == profile.fingerprint
    histogram = observed(profile, sample(19), np.zeros(ROWS))
    back = Histogram.from_wire(through_json(histogram.to_wire()), again)
    assert back.to_wire() == histogram.to_wire()


def edit(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def apply(wire: dict[str, Any]) -> dict[str, Any]:
        changed = copy.deepcopy(wire)
        change(changed)
        return changed

    return apply


BAD_HISTOGRAMS = [
    pytest.param(lambda w: [w], "exactly the keys", id="not-an-object"),
    pytest.param(edit(lambda w: w.pop("rows")), "exactly the keys", id="no-rows"),
    pytest.param(edit(lambda w: w.update(extra=1)), "exactly the keys", id="extra-key"),
    pytest.param(edit(lambda w: w.update(version=2)), "unknown version", id="version"),
    pytest.param(edit(lambda w: w.update(version=True)), "unknown version", id="bool-version"),
    pytest.param(edit(lambda w: w.update(profile="0" * 32)), "another reference profile", id="other-profile"),
    pytest.param(edit(lambda w: w.update(rows=-1)), "whole number", id="negative-rows"),
    pytest.param(edit(lambda w: w.update(rows=True)), "whole number", id="bool-rows"),
    pytest.param(edit(lambda w: w.update(rows=2**60)), "whole number", id="huge-rows"),
    pytest.param(edit(lambda w: w["inputs"]["x"].append(0)), "expected 11 counts", id="too-many-bins"),
    pytest.param(
        edit(lambda w: w["inputs"].pop("x")), "exactly the profile's features", id="feature-missing"
    ),
    pytest.param(
        edit(lambda w: w["inputs"].update(z=[0])), "exactly the profile's features", id="unknown-feature"
    ),
    pytest.param(edit(lambda w: w["inputs"]["x"].__setitem__(0, 1.5)), "whole number", id="fractional-count"),
    pytest.param(edit(lambda w: w["inputs"]["x"].__setitem__(0, "7")), "whole number", id="string-count"),
    pytest.param(
        edit(lambda w: w["inputs"]["x"].__setitem__(0, 10**6)), "more counts than rows", id="over-rows"
    ),
    pytest.param(
        edit(lambda w: w.update(predictions=[])), "exactly the profile's features", id="predictions-list"
    ),
]


@pytest.mark.parametrize("spoil, message", BAD_HISTOGRAMS)
def test_malformed_histograms_are_refused(
    profile: ReferenceProfile, spoil: Callable[[dict[str, Any]], Any], message: str
) -> None:
    wire = through_json(observed(profile, sample(20, rows=100), np.zeros(100)).to_wire())
    with pytest.raises(ValueError, match=message):
        Histogram.from_wire(spoil(wire), profile)


BAD_PROFILES = [
    pytest.param(lambda w: "profile", "exactly the keys", id="not-an-object"),
    pytest.param(edit(lambda w: w.update(version="1")), "unknown version", id="version"),
    pytest.param(edit(lambda w: w["inputs"]["x"].update(kind="tensor")), "numeric or categorical", id="kind"),
    pytest.param(
        edit(lambda w: w["inputs"]["x"]["edges"].reverse()), "edges must increase", id="edges-order"
    ),
    pytest.param(
        edit(lambda w: w["inputs"]["x"]["edges"].extend(range(100, 200))), "at most 99", id="too-many-edges"
    ),
    pytest.param(
        edit(lambda w: w["inputs"]["x"]["edges"].__setitem__(0, None)), "finite numbers", id="edge-null"
    ),
    pytest.param(
        edit(lambda w: w["inputs"]["x"]["expected"].pop()), "proportions that sum to 1", id="expected-short"
    ),
    pytest.param(
        edit(lambda w: w["inputs"]["x"]["expected"].__setitem__(0, 5.0)), "sum to 1", id="expected-sum"
    ),
    pytest.param(
        edit(lambda w: w["inputs"]["colour"]["categories"].append("red")), "repeated", id="repeated-category"
    ),
    pytest.param(
        edit(lambda w: w["inputs"]["colour"]["categories"].__setitem__(0, 3)), "strings", id="category-type"
    ),
    pytest.param(
        edit(lambda w: w["inputs"].update({"": w["inputs"]["x"]})), "empty or longer", id="empty-name"
    ),
    pytest.param(
        edit(lambda w: w["inputs"].update({"n" * 201: w["inputs"]["x"]})), "empty or longer", id="long-name"
    ),
    pytest.param(
        edit(lambda w: w["inputs"].update({f"f{i}": w["inputs"]["x"] for i in range(MAX_FEATURES)})),
        "at most 256",
        id="too-many-features",
    ),
    pytest.param(edit(lambda w: w["skipped"].update(z=["why"])), "reasons must be strings", id="reason-type"),
]


@pytest.mark.parametrize("spoil, message", BAD_PROFILES)
def test_malformed_profiles_are_refused(
    profile: ReferenceProfile, spoil: Callable[[dict[str, Any]], Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ReferenceProfile.from_wire(spoil(through_json(profile.to_wire())))


# ----------------------------------------------------------------------------------------- PSI

PSI_CASES = [
    pytest.param([0.5, 0.5], [50, 50], 0.0, id="same"),
    pytest.param([0.5, 0.5], [25, 75], 0.25 * np.log(2) + 0.25 * np.log(1.5), id="known-value"),
    pytest.param([1.0, 0.0], [0, 10], (1 - 1e-4) * np.log(1 / 1e-4) * 2, id="empty-bins-smoothed"),
]


@pytest.mark.parametrize("expected, counts, value", PSI_CASES)
def test_psi_values(expected: list[float], counts: list[int], value: float) -> None:
    assert psi(expected, counts) == pytest.approx(value, rel=1e-3)


@pytest.mark.parametrize(
    "expected, counts",
    [pytest.param([0.5, 0.5], [1, 1, 1], id="shapes"), pytest.param([0.5, 0.5], [0, 0], id="no-counts")],
)
def test_psi_refuses_what_it_cannot_compare(expected: list[float], counts: list[int]) -> None:
    with pytest.raises(ValueError):
        psi(expected, counts)
