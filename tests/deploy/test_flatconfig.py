"""Flat `-C key=value` config into a spec, table-tested."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from regserve_operator.deploy.flatconfig import (
    ClientOptions,
    ConfigError,
    merge,
    resolve_key,
    split_config,
    validated,
)


@dataclass(frozen=True)
class Case:
    name: str
    config: dict[str, Any]
    want: dict[str, Any] | None = None  # None: refused
    options: ClientOptions = field(default_factory=ClientOptions)
    says: str = ""


CASES = [
    Case(
        "tails name nested fields, strings read by type",
        {"strategy": "Canary", "canary.steps": "10,50", "maxModelsPerReplica": "3", "paused": "false"},
        {
            "rollout": {"strategy": "Canary", "canary": {"steps": [10, 50]}},
            "serving": {"maxModelsPerReplica": 3},
            "paused": False,
        },
    ),
    Case("snake_case", {"max_models_per_replica": "2"}, {"serving": {"maxModelsPerReplica": 2}}),
    Case("full path", {"rollout.canary.stepSeconds": "5"}, {"rollout": {"canary": {"stepSeconds": 5}}}),
    Case("numbers", {"maxErrorRate": "0.05"}, {"rollout": {"canary": {"maxErrorRate": 0.05}}}),
    Case("JSON list", {"canary.steps": "[5, 25]"}, {"rollout": {"canary": {"steps": [5, 25]}}}),
    Case(
        "JSON object",
        {"gpuNodeSelector": '{"gpu": "a100"}'},
        {"resources": {"gpuNodeSelector": {"gpu": "a100"}}},
    ),
    Case(
        "Python values pass as they are", {"canary.steps": [1, 2]}, {"rollout": {"canary": {"steps": [1, 2]}}}
    ),
    Case(
        "client options are not spec fields",
        {"timeout": "60", "wait": "false"},
        {},
        ClientOptions(wait=False, timeout_s=60.0),
    ),
    Case("unknown key", {"canaryStepz": "1"}, None, says="unknown config key"),
    Case("close match suggested", {"stratgy": "Canary"}, None, says="did you mean rollout.strategy"),
    Case("ambiguous tail", {"name": "x"}, None, says="ambiguous"),
    Case("the model comes from the URI", {"model.alias": "x"}, None, says="model URI"),
    Case("not an integer", {"maxModelsPerReplica": "three"}, None, says="not a valid integer"),
    Case("not a boolean", {"paused": "maybe"}, None, says="not a valid boolean"),
    Case("timeout out of range", {"timeout": "-1"}, None, says="timeout"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_split_config(case: Case) -> None:
    if case.want is None:
        with pytest.raises(ConfigError, match=case.says):
            split_config(case.config)
        return
    options, fields = split_config(case.config)
    assert (options, fields) == (case.options, case.want)


def test_every_resolved_path_is_a_crd_field() -> None:
    assert resolve_key("trackingUri").path == ("registry", "trackingUri")
    assert resolve_key("shadow.percent").path == ("rollout", "shadow", "percent")


def test_merge_keeps_what_changes_do_not_name() -> None:
    base = {"serving": {"replicas": 2, "batching": {"maxBatchSize": 8}}, "paused": False}
    changes = {"serving": {"batching": {"batchWaitTimeoutMs": 5}}}
    assert merge(base, changes) == {
        "serving": {"replicas": 2, "batching": {"maxBatchSize": 8, "batchWaitTimeoutMs": 5}},
        "paused": False,
    }


def test_validation_names_the_bad_field() -> None:
    spec = {
        "model": {"name": "m", "alias": "champion"},
        "registry": {"trackingUri": "http://mlflow:5000"},
        "rollout": {"canary": {"steps": [150]}},
    }
    with pytest.raises(ConfigError, match=r"rollout\.canary: .*canary\.steps must lie within"):
        validated(spec)
    spec["rollout"] = {"strategy": "Canary"}
    assert validated(spec)["rollout"] == {"strategy": "Canary"}
