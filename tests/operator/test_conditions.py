from __future__ import annotations

from typing import Any

import pytest
from regserve_operator import conditions as c


def test_transition_time_moves_only_on_status_change() -> None:
    conds = c.set_condition(None, c.READY, "False", "Creating", "", now="t1", generation=1)
    conds = c.set_condition(conds, c.READY, "False", "Still", "msg", now="t2", generation=2)
    (ready,) = conds
    assert (ready.last_transition_time, ready.reason, ready.observed_generation) == ("t1", "Still", 2)
    conds = c.set_condition(conds, c.READY, "True", "Running", "", now="t3", generation=2)
    assert conds[0].last_transition_time == "t3"


def test_conditions_are_ordered_and_unique() -> None:
    conds = None
    for type_ in (c.ROLLOUT_IN_PROGRESS, c.READY, c.REGISTRY_REACHABLE, c.READY):
        conds = c.set_condition(conds, type_, "True", "R", "", now="t", generation=1)
    assert [x.type for x in conds or []] == [c.READY, c.REGISTRY_REACHABLE, c.ROLLOUT_IN_PROGRESS]
    assert c.is_true(conds, c.READY) and not c.is_true(conds, c.SIGNATURE_COMPATIBLE)


def _rs(
    active: str | None = None,
    pending: str | None = None,
    ready: str = "True",
    upgrading: str = "False",
    message: str = "",
) -> dict[str, Any]:
    status: dict[str, Any] = {
        "conditions": [{"type": "Ready", "status": ready}, {"type": "UpgradeInProgress", "status": upgrading}]
    }
    if active:
        status["activeServiceStatus"] = {
            "applicationStatuses": {"app": {"status": active, "message": message}}
        }
    if pending:
        status["pendingServiceStatus"] = {"applicationStatuses": {"app": {"status": pending}}}
    return {"spec": {}, "status": status}


@pytest.mark.parametrize(
    ("case", "rayservice", "app_status", "running", "failed", "upgrading"),
    [
        ("absent", None, None, False, False, False),
        ("no status yet", {"spec": {}}, None, False, False, False),
        ("running", _rs("RUNNING"), "RUNNING", True, False, False),
        ("deploying", _rs("DEPLOYING", ready="False"), "DEPLOYING", False, False, False),
        ("failed", _rs("DEPLOY_FAILED", message="boom"), "DEPLOY_FAILED", False, True, False),
        ("unhealthy", _rs("UNHEALTHY"), "UNHEALTHY", False, True, False),
        (
            "new cluster coming up: judged by pending",
            _rs("RUNNING", "DEPLOYING", upgrading="True"),
            "DEPLOYING",
            False,
            False,
            True,
        ),
        (
            "new cluster failed",
            _rs("RUNNING", "DEPLOY_FAILED", upgrading="True"),
            "DEPLOY_FAILED",
            False,
            True,
            True,
        ),
        (
            "other app only",
            {"status": {"activeServiceStatus": {"applicationStatuses": {"x": {"status": "RUNNING"}}}}},
            None,
            False,
            False,
            False,
        ),
    ],
)
def test_read_service_state(
    case: str, rayservice: Any, app_status: str | None, running: bool, failed: bool, upgrading: bool
) -> None:
    state = c.read_service_state(rayservice, "app")
    assert (state.app_status, state.running, state.failed, state.upgrading) == (
        app_status,
        running,
        failed,
        upgrading,
    )


def test_failure_message_collects_deployment_detail() -> None:
    rs = _rs("DEPLOY_FAILED", message="app failed")
    rs["status"]["activeServiceStatus"]["applicationStatuses"]["app"]["serveDeploymentStatuses"] = {
        "ModelServer": {"status": "UNHEALTHY", "message": "load error"}
    }
    assert c.read_service_state(rs, "app").message == "app failed ModelServer: load error"
