"""schemathesis against the running app's `/openapi.json`: no 5xx, and answers conform where declared.

Operations: POST /serve, POST /invocations, GET /metadata, GET /healthz (`/openapi.json` and `/docs`
are not in the document). Per POST operation 15 positive examples (fitting the schema) and 15 negative
ones (breaking it); the parameterless GETs get 15 positive ones (they can only be called one way, so
hypothesis stops after one): at most 90 requests. schemathesis's pytest loader (`from_fixture`) breaks on
this pytest (`'Function' object has no attribute '_nodeid'`), so the operations' strategies drive plain
hypothesis tests instead.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.openapi import from_url
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.reliability.conftest import Phrasebook

pytestmark = pytest.mark.ray

OPERATIONS = [("POST", "/serve"), ("POST", "/invocations"), ("GET", "/metadata"), ("GET", "/healthz")]
# GET /metadata and /healthz take no parameters: there is nothing to break, so no negative examples.
CASES = [
    (method, path, mode)
    for method, path in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if method == "POST" or mode == GenerationMode.POSITIVE
]
EXAMPLES_PER_MODE = 15
VERSION = "serve-multiplexed-model-id"
SEEN: Counter[tuple[str, str, int]] = Counter()


@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=[f"{m} {p} {mode}" for m, p, mode in CASES])
def test_no_server_errors_and_declared_answers_conform(
    phrasebook: Phrasebook, method: str, path: str, mode: GenerationMode
) -> None:
    schema = from_url(f"{phrasebook.url}/openapi.json", timeout=30)
    operation = schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, suppress_health_check=list(HealthCheck))
    def fuzz(case: Case) -> None:
        if case.headers and case.headers.get(VERSION) == phrasebook.broken:
            # Pinning the version logged broken on purpose is a designed 500 (test_bad_input covers it).
            case.headers[VERSION] = phrasebook.default
        response = case.call_and_validate(
            base_url=phrasebook.url,
            timeout=60,
            checks=[not_a_server_error, response_schema_conformance, content_type_conformance],
        )
        SEEN[(f"{method} {path}", str(mode), response.status_code)] += 1
        if response.status_code >= 400:
            assert isinstance(response.json().get("error"), str), response.text[:300]

    fuzz()
    assert sum(count for (op, m, _), count in SEEN.items() if op == f"{method} {path}" and m == str(mode)) > 0


def test_after_fuzzing_the_replica_answers(phrasebook: Phrasebook) -> None:
    """Runs after the fuzz tests (file order): what they saw, and a good request still works."""
    print("schemathesis answers by (operation, mode, status):", dict(sorted(SEEN.items())))
    if SEEN:
        assert SEEN[("POST /serve", "positive", 200)] > 0
    assert phrasebook.healthy()
