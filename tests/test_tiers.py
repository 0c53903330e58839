"""The directory rule (tests/tiers.py) that tests/conftest.py applies to every collected test."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests import tiers


@dataclass(frozen=True)
class Case:
    name: str
    directory: str
    markers: tuple[str, ...]
    fixtures: tuple[str, ...]
    problem: str | None  # a fragment of the reason; None: in its place


CASES = [
    Case("pure, in a pure directory", "operator", (), ("mlflow_server",), None),
    Case("slow only, in a pure directory", "serving", ("slow",), (), None),
    Case("pure, directly in tests/", "", (), (), None),
    Case("pure, in a mixed directory", "install", (), (), None),
    Case("the plane, in tests/k8s", "k8s", ("k8s",), ("kube_plane",), None),
    Case("the plane, in tests/install", "install", (), ("kube_plane",), None),
    Case("kuberay, in tests/k8s", "k8s", ("k8s", "kuberay", "slow"), ("kube_plane",), None),
    Case("local Ray, in tests/serving_ray", "serving_ray", ("ray",), ("local_ray",), None),
    Case("local Ray, in tests/local", "local", ("ray", "slow"), ("mlflow_server",), None),
    Case("the plane, in tests/operator", "operator", ("k8s",), ("kube_plane",), "belongs in tests/install"),
    Case("the plane by fixture only, in tests/deploy", "deploy", (), ("kube_plane",), "needs k8s"),
    Case("marked ray, in tests/serving", "serving", ("ray",), (), "belongs in tests/local"),
    Case("kuberay, in tests/install", "install", ("k8s", "kuberay"), (), "needs kuberay"),
    Case("local Ray, unmarked", "reliability", (), ("local_ray",), "not marked so"),
    Case("unmarked, in tests/k8s", "k8s", (), (), "every test in tests/k8s is marked k8s"),
    Case("unmarked, in tests/serving_ray", "serving_ray", (), (), "is marked ray"),
    Case("the plane, in tests/serving_ray", "serving_ray", ("k8s",), (), "belongs in tests/install"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_misplaced(case: Case) -> None:
    marked, needed = tiers.parts(case.markers, case.fixtures)
    reason = tiers.misplaced(case.directory, marked, needed)
    if case.problem is None:
        assert reason is None
    else:
        assert reason is not None and case.problem in reason, reason


def test_every_part_has_a_home_and_every_dedicated_directory_is_one() -> None:
    assert set(tiers.HOMES) == set(tiers.PARTS)
    assert all(directory in tiers.HOMES[part] for directory, part in tiers.ONLY.items())
