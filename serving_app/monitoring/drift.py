"""Input and prediction drift: a version's reference binned once, live traffic counted into the same
bins by each replica, the counts summed over replicas and compared with the population stability
index (PSI). No raw rows move: a histogram is a few hundred integers.

Bins per feature: numeric values by the reference's quantiles, with open first and last bins so that
live values outside the reference's range still land somewhere; categorical values (strings, bools)
by the reference's most frequent categories plus "other". Both have a "missing" bin last.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from itertools import pairwise
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd
from pandas.api.types import infer_dtype

Kind = Literal["numeric", "categorical"]
Counts = npt.NDArray[np.int64]

PREDICTION = "prediction"  # the feature name of a model's single (1-D) output
MAX_FEATURES = 256  # per profile side (inputs, predictions)
MAX_NAME_CHARS = 200
MAX_BINS = 100  # numeric bins a profile may ask for
MAX_CATEGORIES = 100
MAX_CATEGORY_CHARS = 200  # a longer reference value is counted as "other"
MAX_REASON_CHARS = 200
MAX_COUNT = 2**53  # what a JSON number holds exactly
WIRE_VERSION = 1

_NUMERIC_OBJECTS = frozenset({"integer", "floating", "mixed-integer-float", "decimal"})
_CATEGORICAL_OBJECTS = frozenset({"string", "categorical", "boolean"})


# ------------------------------------------------------------------------------------------ bins


@dataclass(frozen=True)
class FeatureBins:
    """One feature's bins. Numeric: `edges` are interior cut points, bin i holds edges[i-1] <= x <
    edges[i]. Categorical: one bin per category, then "other". Either way "missing" (NaN, None) last."""

    kind: Kind
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return len(self.edges) + 2 if self.kind == "numeric" else len(self.categories) + 2

    @property
    def labels(self) -> tuple[str, ...]:
        if self.kind == "categorical":
            return (*self.categories, "other", "missing")
        if not self.edges:
            return ("all", "missing")
        inner = [f"[{lo:g}, {hi:g})" for lo, hi in pairwise(self.edges)]
        return (f"< {self.edges[0]:g}", *inner, f">= {self.edges[-1]:g}", "missing")

    def count(self, column: pd.Series[Any] | None, rows: int) -> Counts | None:
        """Counts per bin of `column` (None: the frame lacks it, every row is missing); None when its
        values cannot be read as this feature's kind."""
        if column is None:
            counts = np.zeros(self.size, dtype=np.int64)
            counts[-1] = rows
            return counts
        missing = column.isna().to_numpy(dtype=bool)
        if self.kind == "numeric":
            values = _numeric(column)
            if values is None:
                return None
            missing = missing | np.isnan(values)
            index = np.searchsorted(np.asarray(self.edges, dtype=np.float64), values[~missing], "right")
        else:
            if not _plain(column):
                return None
            codes = pd.Index(self.categories, dtype=object).get_indexer(column[~missing].astype(str))
            index = np.where(codes < 0, len(self.categories), codes)
        counts = np.bincount(index, minlength=self.size - 1).astype(np.int64)
        return np.append(counts, np.int64(missing.sum()))


def _numeric(column: pd.Series[Any]) -> npt.NDArray[np.float64] | None:
    """The column as floats (values that are no number become NaN: missing); None for columns of
    another type (dates, complex numbers, nested values)."""
    if column.dtype.kind in "iufb":
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    if _plain(column):  # text: what reads as a number is one
        try:
            return pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError):
            return None
    return None


def _plain(column: pd.Series[Any]) -> bool:
    """Whether the column holds plain values (numbers, text, bools), not dates or nested objects."""
    if column.dtype.kind in "iufb" or isinstance(column.dtype, pd.StringDtype | pd.CategoricalDtype):
        return True
    return column.dtype.kind in "OSU" and infer_dtype(column, skipna=True) != "mixed"


def _kind_of(column: pd.Series[Any]) -> Kind | str:
    """The feature kind a reference column makes, or why it makes none."""
    if column.dtype.kind == "b":
        return "categorical"
    if column.dtype.kind in "iuf":
        return "numeric"
    if column.dtype.kind not in "OSU" and not isinstance(column.dtype, pd.StringDtype | pd.CategoricalDtype):
        return f"unsupported type {column.dtype}"
    inferred = infer_dtype(column, skipna=True)
    if inferred in _NUMERIC_OBJECTS:
        return "numeric"
    if inferred in _CATEGORICAL_OBJECTS:
        return "categorical"
    return "no values" if inferred == "empty" else f"unsupported values ({inferred})"


def bins_of(column: pd.Series[Any], bins: int, max_categories: int) -> FeatureBins | str:
    """A reference column's bins, or why it has none."""
    kind = _kind_of(column)
    if kind == "numeric":
        values = _numeric(column)
        finite = values[np.isfinite(values)] if values is not None else np.empty(0)
        if finite.size == 0:
            return "no finite values"
        # Cuts at values the reference has (not between them), so that a few distinct values (counts,
        # flags, ratings) each keep a bin of their own rather than sharing one with a neighbour.
        cuts = np.quantile(finite, np.linspace(0.0, 1.0, bins + 1)[1:-1], method="higher")
        return FeatureBins("numeric", edges=tuple(float(edge) for edge in np.unique(cuts)))
    if kind == "categorical":
        present = column.dropna().astype(str)
        present = present[present.str.len() <= MAX_CATEGORY_CHARS]
        if present.empty:
            return "no values"
        frequencies = present.value_counts()
        # Ties broken by name, so equal data makes equal profiles (and fingerprints).
        ranked = sorted(frequencies.items(), key=lambda item: (-item[1], item[0]))
        return FeatureBins("categorical", categories=tuple(str(name) for name, _ in ranked[:max_categories]))
    return kind


# --------------------------------------------------------------------------------------- profile


@dataclass(frozen=True)
class FeatureProfile:
    bins: FeatureBins
    expected: tuple[float, ...]  # the reference's proportion per bin


@dataclass(frozen=True)
class ReferenceProfile:
    """What live traffic is compared with: per input feature and per model output, the bins and the
    reference's proportions. Computed once per version and handed to every replica."""

    inputs: Mapping[str, FeatureProfile]
    predictions: Mapping[str, FeatureProfile] = field(default_factory=dict)
    skipped: Mapping[str, str] = field(default_factory=dict)  # input name -> why it has no profile
    skipped_predictions: Mapping[str, str] = field(default_factory=dict)

    @cached_property
    def fingerprint(self) -> str:
        """Names this profile in histograms, so counts made against another one are refused."""
        text = json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": WIRE_VERSION,
            "inputs": {name: _feature_wire(feature) for name, feature in self.inputs.items()},
            "predictions": {name: _feature_wire(feature) for name, feature in self.predictions.items()},
            "skipped": dict(self.skipped),
            "skippedPredictions": dict(self.skipped_predictions),
        }

    @classmethod
    def from_wire(cls, data: Any) -> ReferenceProfile:
        """A profile from its JSON form; ValueError for anything that is not one."""
        body = _mapping(
            data, "profile", {"version", "inputs", "predictions", "skipped", "skippedPredictions"}
        )
        if not _is_version(body["version"]):
            raise ValueError(f"profile: unknown version {str(body['version'])[:40]!r}")
        return cls(
            inputs=_features_from_wire(body["inputs"], "inputs"),
            predictions=_features_from_wire(body["predictions"], "predictions"),
            skipped=_reasons_from_wire(body["skipped"], "skipped"),
            skipped_predictions=_reasons_from_wire(body["skippedPredictions"], "skippedPredictions"),
        )


def profile_from_frame(
    df: pd.DataFrame, predictions: Any = None, bins: int = 10, max_categories: int = 20
) -> ReferenceProfile:
    """The profile of reference rows `df` and, when given, the model's answers for them (a 1-D column,
    named `PREDICTION`, or a frame or mapping with a column per output name)."""
    if not 2 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be within 2..{MAX_BINS}")
    if not 1 <= max_categories <= MAX_CATEGORIES:
        raise ValueError(f"max_categories must be within 1..{MAX_CATEGORIES}")
    inputs, skipped = _profile_columns(df, bins, max_categories)
    if predictions is None:
        return ReferenceProfile(inputs, skipped=skipped)
    outputs, skipped_outputs = _profile_columns(as_frame(predictions), bins, max_categories)
    return ReferenceProfile(inputs, outputs, skipped, skipped_outputs)


def as_frame(predictions: Any) -> pd.DataFrame:
    """A model's answers as a frame: a column per output name, or one column `PREDICTION`."""
    if isinstance(predictions, pd.DataFrame):
        return predictions
    if isinstance(predictions, pd.Series):
        return pd.DataFrame({PREDICTION: predictions.to_numpy()})
    if isinstance(predictions, Mapping):
        return pd.DataFrame(dict(predictions))
    if isinstance(predictions, Sequence) and predictions and isinstance(predictions[0], Mapping):
        return pd.DataFrame.from_records(list(predictions))
    array = np.asarray(predictions)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"predictions of shape {array.shape}: give a frame with a column per output")
    return pd.DataFrame({PREDICTION: array})


def _profile_columns(
    df: pd.DataFrame, bins: int, max_categories: int
) -> tuple[dict[str, FeatureProfile], dict[str, str]]:
    profiles: dict[str, FeatureProfile] = {}
    skipped = _Skips()
    for position, column_name in enumerate(df.columns):
        name = str(column_name)
        if not 0 < len(name) <= MAX_NAME_CHARS:
            skipped.add(name or "''", f"name empty or longer than {MAX_NAME_CHARS} characters")
        elif name in profiles or name in skipped.reasons:
            skipped.add(name, "duplicate column name")
        elif len(profiles) >= MAX_FEATURES:
            skipped.add(name, f"more than {MAX_FEATURES} features")
        else:
            column = df.iloc[:, position]
            made = bins_of(column, bins, max_categories)
            counts = made.count(column, len(df)) if isinstance(made, FeatureBins) else None
            if isinstance(made, str):
                skipped.add(name, made)
            elif counts is None or counts[:-1].sum() == 0:
                skipped.add(name, "no usable values")
            else:
                profiles[name] = FeatureProfile(made, tuple(float(p) for p in counts / counts.sum()))
    return profiles, skipped.result()


class _Skips:
    """Skipped columns and why, bounded: a frame of 10,000 columns gives a short list and a count."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        self.more = 0

    def add(self, name: str, reason: str) -> None:
        if len(self.reasons) < MAX_FEATURES:
            shown = name if len(name) <= MAX_NAME_CHARS else name[: MAX_NAME_CHARS - 1] + "…"
            self.reasons[shown] = reason
        else:
            self.more += 1

    def result(self) -> dict[str, str]:
        return {**self.reasons, "…": f"{self.more} more columns skipped"} if self.more else self.reasons


# ------------------------------------------------------------------------------------- histogram


class Histogram:
    """Live traffic's counts per bin against one profile, plus the rows seen. Replicas observe into
    their own and the operator sums them; `to_wire`/`from_wire` carry one between processes."""

    def __init__(self, profile: ReferenceProfile) -> None:
        self.profile = profile
        self.rows = 0
        self.inputs = {name: np.zeros(f.bins.size, np.int64) for name, f in profile.inputs.items()}
        self.predictions = {name: np.zeros(f.bins.size, np.int64) for name, f in profile.predictions.items()}

    def observe(self, frame: pd.DataFrame, predictions: Any = None) -> None:
        """Count `frame`'s rows (and the model's answers for them). A column absent from the frame is
        missing in every row; one whose values are of another type is not counted."""
        outputs = None if predictions is None else as_frame(predictions)
        if outputs is not None and len(outputs) != len(frame):
            raise ValueError(f"{len(outputs)} predictions for {len(frame)} rows")
        rows = len(frame)
        _add(self.profile.inputs, self.inputs, frame, rows)
        if outputs is not None:
            _add(self.profile.predictions, self.predictions, outputs, rows)
        self.rows += rows

    def merge(self, other: Histogram) -> Histogram:
        if other.profile.fingerprint != self.profile.fingerprint:
            raise ValueError("histograms of different reference profiles cannot be merged")
        merged = Histogram(self.profile)
        merged.rows = self.rows + other.rows
        merged.inputs = {name: counts + other.inputs[name] for name, counts in self.inputs.items()}
        merged.predictions = {name: c + other.predictions[name] for name, c in self.predictions.items()}
        return merged

    @classmethod
    def sum(cls, profile: ReferenceProfile, histograms: Iterable[Histogram]) -> Histogram:
        total = cls(profile)
        for histogram in histograms:
            total = total.merge(histogram)
        return total

    def to_wire(self) -> dict[str, Any]:
        return {
            "version": WIRE_VERSION,
            "profile": self.profile.fingerprint,
            "rows": self.rows,
            "inputs": {name: counts.tolist() for name, counts in self.inputs.items()},
            "predictions": {name: counts.tolist() for name, counts in self.predictions.items()},
        }

    @classmethod
    def from_wire(cls, data: Any, profile: ReferenceProfile) -> Histogram:
        """A histogram sent by another process, checked against the profile it must have been counted
        with: ValueError for anything else (sizes and names come from the profile, never the sender)."""
        body = _mapping(data, "histogram", {"version", "profile", "rows", "inputs", "predictions"})
        if not _is_version(body["version"]):
            raise ValueError(f"histogram: unknown version {str(body['version'])[:40]!r}")
        if body["profile"] != profile.fingerprint:
            raise ValueError("histogram: counted against another reference profile")
        histogram = cls(profile)
        histogram.rows = _count_value(body["rows"], "histogram rows")
        histogram.inputs = _counts_from_wire(body["inputs"], profile.inputs, histogram.rows, "inputs")
        histogram.predictions = _counts_from_wire(
            body["predictions"], profile.predictions, histogram.rows, "predictions"
        )
        return histogram


def _add(
    features: Mapping[str, FeatureProfile], into: dict[str, Counts], frame: pd.DataFrame, rows: int
) -> None:
    for name, feature in features.items():
        column = frame[name] if name in frame.columns else None
        if isinstance(column, pd.DataFrame):  # a repeated column name: which one is meant is unknown
            continue
        counts = feature.bins.count(column, rows)
        if counts is not None:
            into[name] += counts


# ------------------------------------------------------------------------------------------- PSI


def psi(
    expected_proportions: Sequence[float] | npt.NDArray[np.float64],
    actual_counts: Sequence[int] | Counts,
    epsilon: float = 1e-4,
) -> float:
    """Population stability index: sum over bins of (actual - expected) * ln(actual / expected), with
    proportions below `epsilon` raised to it so that an empty bin on either side stays finite."""
    expected = np.asarray(expected_proportions, dtype=np.float64)
    counts = np.asarray(actual_counts, dtype=np.float64)
    if expected.shape != counts.shape or expected.ndim != 1:
        raise ValueError(f"{expected.shape} proportions against {counts.shape} counts")
    total = counts.sum()
    if total <= 0:
        raise ValueError("no counts to compare")
    actual = np.maximum(counts / total, epsilon)
    expected = np.maximum(expected, epsilon)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


@dataclass(frozen=True)
class DriftReport:
    """One window's drift. `drifted` names the features whose PSI is over the threshold, highest first;
    with fewer rows than the minimum there is no verdict (`enough_rows` False, nothing drifted)."""

    rows: int
    enough_rows: bool
    threshold: float
    psi: Mapping[str, float]
    drifted: tuple[str, ...]
    prediction_psi: Mapping[str, float]
    predictions_drifted: tuple[str, ...]
    unobserved: tuple[str, ...]  # input features with no counts (no rows, or values of another type)


def drift_report(
    profile: ReferenceProfile, histogram: Histogram, threshold: float, min_rows: int
) -> DriftReport:
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError("threshold must be a positive number")
    if histogram.profile.fingerprint != profile.fingerprint:
        raise ValueError("histogram counted against another reference profile")
    enough = histogram.rows >= max(min_rows, 1)
    inputs = _psi_of(profile.inputs, histogram.inputs)
    outputs = _psi_of(profile.predictions, histogram.predictions)
    unobserved = tuple(name for name in profile.inputs if name not in inputs)
    return DriftReport(
        rows=histogram.rows,
        enough_rows=enough,
        threshold=threshold,
        psi=inputs,
        drifted=_over(inputs, threshold) if enough else (),
        prediction_psi=outputs,
        predictions_drifted=_over(outputs, threshold) if enough else (),
        unobserved=unobserved,
    )


def _psi_of(features: Mapping[str, FeatureProfile], counts: Mapping[str, Counts]) -> dict[str, float]:
    return {
        name: psi(feature.expected, counts[name])
        for name, feature in features.items()
        if counts[name].sum() > 0
    }


def _over(values: Mapping[str, float], threshold: float) -> tuple[str, ...]:
    over = [(value, name) for name, value in values.items() if value > threshold]
    return tuple(name for _, name in sorted(over, key=lambda item: (-item[0], item[1])))


# ------------------------------------------------------------------------------------------ wire


def _feature_wire(feature: FeatureProfile) -> dict[str, Any]:
    bins = feature.bins
    shape = {"edges": list(bins.edges)} if bins.kind == "numeric" else {"categories": list(bins.categories)}
    return {"kind": bins.kind, **shape, "expected": list(feature.expected)}


def _mapping(data: Any, what: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict) or set(data) != keys:
        raise ValueError(f"{what}: expected an object with exactly the keys {sorted(keys)}")
    return data


def _is_version(value: Any) -> bool:
    return type(value) is int and value == WIRE_VERSION


def _names(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict) or len(data) > MAX_FEATURES + 1:
        raise ValueError(f"{what}: expected an object of at most {MAX_FEATURES} entries")
    for name in data:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise ValueError(f"{what}: a name is empty or longer than {MAX_NAME_CHARS} characters")
    return data


def _features_from_wire(data: Any, what: str) -> dict[str, FeatureProfile]:
    features = _names(data, what)
    if len(features) > MAX_FEATURES:
        raise ValueError(f"{what}: more than {MAX_FEATURES} features")
    return {name: _feature_from_wire(body, f"{what}.{name[:40]}") for name, body in features.items()}


def _feature_from_wire(data: Any, what: str) -> FeatureProfile:
    if not isinstance(data, dict):
        raise ValueError(f"{what}: expected an object")
    if data.get("kind") == "numeric":
        body = _mapping(data, what, {"kind", "edges", "expected"})
        edges = _floats(body["edges"], MAX_BINS - 1, what)
        if any(not lo < hi for lo, hi in pairwise(edges)):
            raise ValueError(f"{what}: edges must increase")
        bins = FeatureBins("numeric", edges=edges)
    elif data.get("kind") == "categorical":
        body = _mapping(data, what, {"kind", "categories", "expected"})
        categories = body["categories"]
        if not isinstance(categories, list) or len(categories) > MAX_CATEGORIES:
            raise ValueError(f"{what}: expected a list of at most {MAX_CATEGORIES} categories")
        if any(not isinstance(c, str) or len(c) > MAX_CATEGORY_CHARS for c in categories):
            raise ValueError(f"{what}: categories must be strings of at most {MAX_CATEGORY_CHARS} characters")
        if len(set(categories)) != len(categories):
            raise ValueError(f"{what}: repeated category")
        bins = FeatureBins("categorical", categories=tuple(categories))
    else:
        raise ValueError(f"{what}: kind must be numeric or categorical")
    expected = _floats(body["expected"], bins.size, what)
    if len(expected) != bins.size or min(expected) < 0 or not math.isclose(sum(expected), 1.0, abs_tol=1e-6):
        raise ValueError(f"{what}: expected {bins.size} proportions that sum to 1")
    return FeatureProfile(bins, expected)


def _floats(data: Any, most: int, what: str) -> tuple[float, ...]:
    if not isinstance(data, list) or len(data) > most:
        raise ValueError(f"{what}: expected a list of at most {most} numbers")
    numbers = []
    for value in data:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{what}: expected finite numbers")
        numbers.append(float(value))
    return tuple(numbers)


def _reasons_from_wire(data: Any, what: str) -> dict[str, str]:
    reasons = _names(data, what)
    if any(not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS for reason in reasons.values()):
        raise ValueError(f"{what}: reasons must be strings of at most {MAX_REASON_CHARS} characters")
    return dict(reasons)


def _count_value(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"{what}: expected a whole number within 0..2**53")
    return value


def _counts_from_wire(
    data: Any, features: Mapping[str, FeatureProfile], rows: int, what: str
) -> dict[str, Counts]:
    if not isinstance(data, dict) or set(data) != set(features):
        raise ValueError(f"{what}: expected counts for exactly the profile's features")
    counts: dict[str, Counts] = {}
    for name, feature in features.items():
        values = data[name]
        if not isinstance(values, list) or len(values) != feature.bins.size:
            raise ValueError(f"{what}.{name[:40]}: expected {feature.bins.size} counts")
        array = np.array([_count_value(v, f"{what}.{name[:40]}") for v in values], dtype=np.int64)
        if int(array.sum()) > rows:
            raise ValueError(f"{what}.{name[:40]}: more counts than rows")
        counts[name] = array
    return counts
