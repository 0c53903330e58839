"""Malformed, oversized and mistyped bodies on both POST routes, and predict/load faults.

Every bad body must get a 4xx with a stable `error` code (never a 5xx), and the replica must answer a
good request exactly afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.reliability.conftest import Phrasebook

pytestmark = pytest.mark.ray

NINE_MIB = 9 * 1024 * 1024
JSON = {"content-type": "application/json"}
DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 50_000 + b"1" + b"}" * 50_000


def big_chunks() -> Iterator[bytes]:
    """A 9 MiB JSON body streamed without Content-Length (chunked transfer encoding)."""
    yield b'{"prompt": "'
    for _ in range(9):
        yield b"x" * (1024 * 1024)
    yield b'"}'


# (case id, body, headers, {route: (status, error code)})
BAD_BODIES: list[tuple[str, bytes, dict[str, str], dict[str, tuple[int, str]]]] = [
    (
        "invalid json",
        b'{"prompt": "Hello"',
        JSON,
        {"serve": (422, "invalid_input"), "invocations": (422, "invalid_input")},
    ),
    ("empty body", b"", JSON, {"serve": (422, "invalid_input"), "invocations": (422, "invalid_input")}),
    ("json null", b"null", JSON, {"serve": (422, "invalid_input"), "invocations": (422, "invalid_input")}),
    ("json number", b"42", JSON, {"serve": (422, "invalid_input"), "invocations": (422, "invalid_input")}),
    ("empty list", b"[]", JSON, {"serve": (422, "invalid_input"), "invocations": (422, "invalid_input")}),
    (
        "deeply nested arrays",
        DEEP,
        JSON,
        {"serve": (422, "invalid_input"), "invocations": (422, "invalid_input")},
    ),
    (
        "deeply nested objects",
        DEEP_OBJECT,
        JSON,
        {"serve": (422, "invalid_input"), "invocations": (422, "invalid_input")},
    ),
    (
        "non-utf-8 bytes",
        b'{"prompt": "\xff\xfe\xc3("}',
        JSON,
        {"serve": (422, "invalid_input"), "invocations": (422, "invalid_input")},
    ),
    (
        "text/plain",
        b'{"prompt": "Hello"}',
        {"content-type": "text/plain"},
        {"serve": (415, "unsupported_media_type"), "invocations": (415, "unsupported_media_type")},
    ),
    (
        "form encoded",
        b"prompt=Hello",
        {"content-type": "application/x-www-form-urlencoded"},
        {"serve": (415, "unsupported_media_type"), "invocations": (415, "unsupported_media_type")},
    ),
    (
        "unknown scoring key",
        b'{"records": [{"prompt": "Hello"}]}',
        JSON,
        {"serve": (422, "invalid_input"), "invocations": (422, "invalid_input")},
    ),
    (
        "non-utf-8 csv",
        b"prompt\n\xff\xfe\n",
        {"content-type": "text/csv"},
        {"serve": (415, "unsupported_media_type"), "invocations": (422, "invalid_input")},
    ),
]


@pytest.mark.parametrize("route", ["serve", "invocations"])
@pytest.mark.parametrize(("case", "body", "headers", "expected"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_body_is_a_stable_4xx(
    phrasebook: Phrasebook,
    route: str,
    case: str,
    body: bytes,
    headers: dict[str, str],
    expected: dict[str, tuple[int, str]],
) -> None:
    response = httpx.post(f"{phrasebook.url}/{route}", content=body, headers=headers, timeout=60)
    status, code = expected[route]
    assert (response.status_code, response.json().get("error")) == (status, code), response.text[:500]
    assert isinstance(response.json().get("message"), str)


@pytest.mark.parametrize("route", ["serve", "invocations"])
def test_csv_answers_by_route(phrasebook: Phrasebook, route: str) -> None:
    """CSV is MLflow's scoring format: /invocations takes it, /serve refuses it as a media type."""
    response = httpx.post(
        f"{phrasebook.url}/{route}",
        content=b"prompt\nHello\n",
        headers={"content-type": "text/csv"},
        timeout=60,
    )
    if route == "serve":
        assert (response.status_code, response.json()["error"]) == (415, "unsupported_media_type")
    else:
        assert response.status_code == 200, response.text
        assert response.json() == {"predictions": [{"translation_text": "Hallo"}]}


@pytest.mark.parametrize("route", ["serve", "invocations"])
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_nine_mib_body_is_413(phrasebook: Phrasebook, route: str, chunked: bool) -> None:
    if chunked:
        content: bytes | Iterator[bytes] = big_chunks()
    else:
        content = b"".join(big_chunks())
        assert len(content) > NINE_MIB
    response = httpx.post(f"{phrasebook.url}/{route}", content=content, headers=JSON, timeout=120)
    assert response.status_code == 413, response.text[:500]
    assert response.json()["error"] == "body_too_large"
    if chunked:
        assert "content-length" not in {key.lower() for key in response.request.headers}


def test_off_signature_scoring_body_is_422(phrasebook: Phrasebook) -> None:
    """The scoring protocol's twin of /serve's 422: a record without the signature's column.

    Found here: it was a 500 prediction_failed (MLflow's schema enforcement failed inside predict)."""
    response = httpx.post(
        f"{phrasebook.url}/invocations", json={"dataframe_records": [{"promt": "Hello"}]}, timeout=60
    )
    assert (response.status_code, response.json()["error"]) == (422, "invalid_input"), response.text


def test_replica_answers_after_all_bad_bodies(phrasebook: Phrasebook) -> None:
    assert phrasebook.healthy()


@pytest.mark.parametrize("route", ["serve", "invocations"])
def test_predict_that_raises_is_500_with_error_id_then_healthy(phrasebook: Phrasebook, route: str) -> None:
    body = {"prompt": "boom"} if route == "serve" else {"dataframe_records": [{"prompt": "boom"}]}
    first = httpx.post(f"{phrasebook.url}/{route}", json=body, timeout=60)
    second = httpx.post(f"{phrasebook.url}/{route}", json=body, timeout=60)
    for response in (first, second):
        assert response.status_code == 500
        assert response.json()["error"] == "prediction_failed"
        assert len(response.json()["detail"]["error_id"]) == 16
    assert first.json()["detail"]["error_id"] != second.json()["detail"]["error_id"]
    # A batch where one record raises fails as a whole, and nothing of it leaks into the next answer.
    mixed = httpx.post(f"{phrasebook.url}/serve", json=[{"prompt": "Hello"}, {"prompt": "boom"}], timeout=60)
    assert mixed.status_code == 500
    assert phrasebook.healthy()


def test_broken_version_load_is_500_repeatedly_and_default_unharmed(phrasebook: Phrasebook) -> None:
    """Failed loads are not cached: each pinned request retries the load and fails the same way."""
    headers = {"serve-multiplexed-model-id": phrasebook.broken}
    for _ in range(2):
        response = httpx.post(
            f"{phrasebook.url}/serve", json={"prompt": "Hello"}, headers=headers, timeout=60
        )
        assert response.status_code == 500
        body = response.json()
        assert body["error"] == "version_load_failed"
        assert len(body["detail"]["error_id"]) == 16
    metadata = httpx.get(f"{phrasebook.url}/metadata", timeout=30).json()
    assert phrasebook.broken not in metadata["loaded_versions"]
    assert phrasebook.healthy()
