"""How the API server's refusals read to a user, decided on status codes and Status details: table-tested."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from kubernetes.client.exceptions import ApiException
from regserve_operator.deploy.stores import StoreError, _kube_error, service_of


def _status(code: int, kind: str | None = None, message: str = "m") -> str:
    details = {"kind": kind} if kind else {}
    return json.dumps({"kind": "Status", "code": code, "message": message, "details": details})


@dataclass(frozen=True)
class Case:
    name: str
    code: int
    body: str
    says: str
    missing: bool = False
    conflict: bool = False


CASES = [
    Case("no such resource", 404, _status(404, "registeredmodelservings"), "not found", missing=True),
    Case("no such namespace", 404, _status(404, "namespaces"), "namespace ns does not exist"),
    Case("no CRD: the API server's plain 404 page", 404, "404 page not found", "install regserve's CRDs"),
    Case("forbidden", 403, _status(403, message="cannot create"), "forbidden in namespace ns: cannot create"),
    Case("exists", 409, _status(409, message="already exists"), "already exists", conflict=True),
    Case("invalid", 422, _status(422, message="metadata.name: Invalid"), "refused the resource"),
    Case("other", 500, _status(500, message="etcd down"), "answered 500: etcd down"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_kube_errors_read_as_what_to_do(case: Case) -> None:
    error = _kube_error("creating t", ApiException(status=case.code, body=case.body), "ns")
    assert isinstance(error, StoreError)
    assert case.says in str(error)
    assert (error.missing, error.conflict) == (case.missing, case.conflict)


def test_service_of_a_status_url() -> None:
    assert service_of("http://t-serve-svc.team-a.svc:8000/t") == ("t-serve-svc", "team-a", 8000, "/t")
    with pytest.raises(StoreError):
        service_of("http://127.0.0.1:8000/t")
