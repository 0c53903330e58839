"""A hostile registry on the real control plane: the real operator process, with the shipped RBAC, serves
resources whose tracking servers answer badly (a login page, malformed pages, a trickle, 1 GiB, a
redirect to another host) beside a resource on a real MLflow. The healthy one's promotion goes
through while they fail, each hostile resource says in its status what is wrong, nothing follows the
redirect, and the operator's memory stays bounded."""

from __future__ import annotations

import pytest
from regserve_operator.sandbox.mlflow_server import MlflowServer

from tests.k8s.operator_support import Cluster, OperatorProcess, carried, cond, new_model, rms_spec, until
from tests.k8s.test_operator_faults import (  # noqa: F401  (fixtures)
    cluster,
    kubeconfig,
    move_alias,
    operator,
    serve_first_version,
)
from tests.operator.mlflow_fixture import log_version
from tests.reliability.hostile_mlflow import HostileMlflow
from tests.reliability.operator_loop import rss_kib

pytestmark = pytest.mark.k8s

HOSTILE_MODES = ("login", "malformed", "trickle", "huge", "redirect", "endless")
# Longest a registry call may take in all (registry.py's search deadline) plus a poll and a pass.
VERDICT_S = 120.0
MAX_OPERATOR_RSS_MB = 600


@pytest.mark.slow
def test_a_hostile_registry_harms_only_its_own_resources(
    cluster: Cluster,  # noqa: F811
    operator: OperatorProcess,  # noqa: F811
    mlflow_server: MlflowServer,
) -> None:
    model, _v1 = serve_first_version(cluster, mlflow_server.url, "healthy")
    with HostileMlflow(trickle_interval_s=1.0) as hostile:
        for mode in HOSTILE_MODES:
            cluster.create_rms(f"hostile-{mode}", rms_spec(new_model(), hostile.url(mode)))
        # The hostile resources are in their first passes (a trickle holds a worker for its whole
        # deadline) when the healthy one is promoted.
        until("hostile registries asked", lambda: sum(hostile.requests.values()) >= len(HOSTILE_MODES))
        v2 = log_version(mlflow_server.url, model, {"prompt": "string"})
        move_alias(mlflow_server.url, model, v2)
        until("healthy promotion carried", lambda: carried(cluster, "healthy") == v2, timeout=60)

        def unreachable(mode: str) -> bool:
            reachable = cond(cluster.rms(f"hostile-{mode}"), "RegistryReachable")
            return reachable.get("status") == "False" and bool(reachable.get("message"))

        for mode in HOSTILE_MODES:
            until(f"{mode}: RegistryReachable=False", lambda mode=mode: unreachable(mode), timeout=VERDICT_S)
        assert hostile.other_requests == 0, "a redirect to another host was followed"
        assert hostile.huge_bytes_sent < 1 << 30, "a 1 GiB answer was read to its end"
        for mode in HOSTILE_MODES:
            assert cluster.rayservice(f"hostile-{mode}") is None, mode
    assert operator.proc is not None
    rss = rss_kib(operator.proc.pid) / 1024
    assert rss < MAX_OPERATOR_RSS_MB, rss
