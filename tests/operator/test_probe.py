from __future__ import annotations

import httpx
import pytest
from regserve_operator.probe import RolloutReport, RolloutUnsupported, probe_rollout

REPORT = {
    "generation": 3,
    "candidate": "2",
    "mode": "smoke",
    "percent": 0,
    "replicas": 1,
    "smoke": {"state": "passed", "replicas_passed": 1},
    "versions": {},
    "shadow": {},
}


@pytest.mark.parametrize(
    ("case", "status", "body", "want"),
    [
        ("a report", 200, REPORT, RolloutReport),
        ("an app without the route (older image)", 404, {"detail": "Not Found"}, RolloutUnsupported),
        ("not ready", 503, {}, type(None)),
        ("something that is not a report", 200, ["x"], type(None)),
    ],
)
def test_probe_rollout(case: str, status: int, body: object, want: type) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/app/rollout"
        return httpx.Response(status, json=body)

    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        assert isinstance(probe_rollout("http://serve/app/", client=client), want), case
