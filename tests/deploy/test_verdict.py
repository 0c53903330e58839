"""Where a rollout stands for a waiting client, and what a rollback returns to: table-tested on statuses."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
from regserve_operator.deploy.ops import payload_of, previous_version
from regserve_operator.deploy.verbs import LiveLine, status_rows
from regserve_operator.deploy.verdict import Failed, Pending, Succeeded, Verdict, judge
from regserve_operator.spec import (
    Condition,
    HistoryEntry,
    RegisteredModelServingStatus,
    VersionRecord,
    status_to_wire,
)


def _cond(type_: str, status: str, reason: str = "R", message: str = "") -> Condition:
    return Condition(type=type_, status=status, reason=reason, message=message)  # type: ignore[arg-type]


SERVING_2 = dict(
    observed_generation=2,
    resolved_version="2",
    serving_version="2",
    conditions=[_cond("Ready", "True", "Serving"), _cond("SelectorResolved", "True", "Resolved")],
)


@dataclass(frozen=True)
class Case:
    name: str
    status: dict[str, Any]
    want: type[Verdict]
    generation: int = 2
    expected: str | None = None
    reason: str = ""


CASES = [
    Case("serving what the selector names", SERVING_2, Succeeded),
    Case("operator has not seen the write", {**SERVING_2, "observed_generation": 1}, Pending),
    Case("no status yet", {}, Pending, generation=1),
    Case(
        "canary in flight",
        {**SERVING_2, "resolved_version": "3", "rollout_version": "3", "rollout_phase": "Canary"},
        Pending,
    ),
    Case(
        "selector moved, rollout not started",
        {**SERVING_2, "resolved_version": "3"},
        Pending,
    ),
    Case(
        "held back: incompatible",
        {
            **SERVING_2,
            "resolved_version": "3",
            "rejected": VersionRecord(version="3", reason="Incompatible", message="column x missing"),
        },
        Failed,
        reason="Incompatible",
    ),
    Case(
        "rolled back",
        {
            **SERVING_2,
            "resolved_version": "3",
            "rejected": VersionRecord(version="3", reason="RolledBack", message="error rate 0.5"),
        },
        Failed,
        reason="RolledBack",
    ),
    Case(
        "an old rejection does not fail the serving version",
        {**SERVING_2, "rejected": VersionRecord(version="1", reason="Incompatible")},
        Succeeded,
    ),
    Case(
        "refused by policy",
        {**SERVING_2, "conditions": [_cond("Ready", "False", "PolicyViolation", "image not allowed")]},
        Failed,
        reason="PolicyViolation",
    ),
    Case(
        "deploying is not stuck",
        {**SERVING_2, "serving_version": None, "conditions": [_cond("Ready", "False", "Deploying")]},
        Pending,
    ),
    Case(
        "alias missing in the registry",
        {
            "observed_generation": 1,
            "conditions": [_cond("SelectorResolved", "False", "NotFound", "no alias")],
        },
        Failed,
        generation=1,
        reason="NotFound",
    ),
    Case("promotion not yet resolved", SERVING_2, Pending, expected="3"),
    Case("promotion resolved and serving", SERVING_2, Succeeded, expected="2"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_judge(case: Case) -> None:
    verdict = judge(case.generation, RegisteredModelServingStatus(**case.status), case.expected)
    assert isinstance(verdict, case.want), verdict
    if isinstance(verdict, Failed):
        assert verdict.reason == case.reason


def _history(*entries: tuple[str, str]) -> list[HistoryEntry]:
    return [HistoryEntry(version=v, outcome=o, at="t") for v, o in entries]  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "want"),
    [
        ({"serving_version": "3", "history": _history(("2", "Serving"), ("3", "Serving"))}, "2"),
        (
            # 4 never served (held), 3 superseded mid-rollout: back to the last that served
            {
                "serving_version": "5",
                "history": _history(
                    ("2", "Serving"),
                    ("3", "Superseded"),
                    ("4", "Held"),
                    ("5", "Serving"),
                    ("2", "Superseded"),
                ),
            },
            "2",
        ),
        ({"serving_version": "3", "rollout_version": "4", "history": _history(("3", "Serving"))}, "3"),
        ({"serving_version": "1", "history": _history(("1", "Serving"))}, None),
        ({}, None),
    ],
)
def test_previous_version(status: dict[str, Any], want: str | None) -> None:
    assert previous_version(RegisteredModelServingStatus(**status)) == want


@pytest.mark.parametrize(
    ("inputs", "want"),
    [
        (
            pd.DataFrame({"x": [1, 2]}),
            {"dataframe_split": {"columns": ["x"], "index": [0, 1], "data": [[1], [2]]}},
        ),
        (np.array([[1.0, 2.0]]), {"inputs": [[1.0, 2.0]]}),
        ([1, 2], {"inputs": [1, 2]}),
        ({"x": np.array([1, 2])}, {"inputs": {"x": [1, 2]}}),
        ({"dataframe_records": [{"x": 1}]}, {"dataframe_records": [{"x": 1}]}),
    ],
)
def test_payload_of_matches_mlflow_scoring_protocol(inputs: Any, want: dict[str, Any]) -> None:
    assert payload_of(inputs) == want


def test_status_rows_show_the_rollout() -> None:
    status = RegisteredModelServingStatus(
        **{**SERVING_2, "rollout_version": "3", "rollout_phase": "Canary", "rollout_weight": 10}
    )
    resource = {"metadata": {"name": "t"}, "spec": {"model": {"name": "m"}}, "status": status_to_wire(status)}
    header, row = status_rows([resource])
    assert header[0] == "NAME"
    assert row == ("t", "2", "3", "Canary", "10%", "True")


def test_live_line_prints_each_change_once_when_not_a_terminal() -> None:
    out = io.StringIO()
    line = LiveLine(out)
    for text in ("a", "a", "b"):
        line.show(text)
    line.end()
    assert out.getvalue() == "a\nb\n"
