"""schemathesis against the running app's `/openapi.json`: no 5xx, and answers conform where declared.

Operations: POST /serve, POST /invocations, GET /metadata, GET /healthz (`/openapi.json` and `/docs`
are not in the document). Both positive and negative examples (schemathesis's coverage phase plus
at most 30 random examples per operation), so bodies that break the schema are sent too.
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.openapi import from_url
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.reliability.conftest import Phrasebook

pytestmark = pytest.mark.ray

SEEN: Counter[tuple[str, int]] = Counter()


@pytest.fixture
def serving_openapi(phrasebook: Phrasebook) -> schemathesis.schemas.BaseSchema:
    return from_url(f"{phrasebook.url}/openapi.json", timeout=30)


schema = schemathesis.pytest.from_fixture("serving_openapi")


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_declared_answers_conform(case: Case, phrasebook: Phrasebook) -> None:
    response = case.call_and_validate(
        base_url=phrasebook.url,
        timeout=60,
        checks=[not_a_server_error, response_schema_conformance, content_type_conformance],
    )
    SEEN[(f"{case.method} {case.path}", response.status_code)] += 1
    if response.status_code >= 400:
        assert isinstance(response.json().get("error"), str), response.text[:300]


def test_fuzzing_reached_every_operation_and_the_replica_survived(phrasebook: Phrasebook) -> None:
    """Runs after the fuzz test in file order: every operation was called, and a good request still works."""
    print("schemathesis answers by (operation, status):", dict(sorted(SEEN.items())))
    operations = {operation for operation, _ in SEEN}
    assert operations == {"POST /serve", "POST /invocations", "GET /metadata", "GET /healthz"}
    assert SEEN[("POST /serve", 200)] > 0
    assert phrasebook.healthy()
