"""Payload records: which client request ids are kept, and which requests are sampled."""

from __future__ import annotations

import math
import random
import re

import pytest

from serving_app.monitoring.records import request_id, sampled

NEW_ID = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize(
    "sent",
    [
        "abc",
        "a",
        "0",
        "req-1234",
        "2f1c7a4e-6b0d-4d55-9a1e-0c7d3f2b9e11",
        "trace.span:7/part+x=y@host_z",
        "A" * 128,
    ],
    ids=["word", "one-char", "digit", "dashed", "uuid", "every-punctuation-allowed", "128-chars"],
)
def test_a_plain_bounded_token_is_kept(sent: str) -> None:
    assert request_id(sent) == sent


@pytest.mark.parametrize(
    "sent",
    [
        None,
        "",
        "A" * 129,
        "x" * 10_000,
        "abc\n",
        "abc\r\nX-Injected: 1",
        "a\x00b",
        "tab\there",
        "a\x7f",
        "two words",
        " lead",
        "trail ",
        "caf\u00e9",
        "\u0440\u0435\u043a",
        "emoji\U0001f600",
        "semi;colon",
        'quote"d',
        "<script>",
        "comma,separated",
    ],
    ids=[
        "none",
        "empty",
        "129-chars",
        "very-long",
        "newline",
        "header-injection",
        "nul",
        "tab",
        "del",
        "space",
        "leading-space",
        "trailing-space",
        "latin-accent",
        "cyrillic",
        "emoji",
        "semicolon",
        "quote",
        "markup",
        "comma",
    ],
)
def test_anything_else_is_replaced_by_a_new_id(sent: str | None) -> None:
    replaced = request_id(sent)
    assert NEW_ID.fullmatch(replaced)
    assert replaced != sent


def test_new_ids_differ() -> None:
    assert len({request_id(None) for _ in range(1000)}) == 1000


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(0.0, False), (-1.0, False), (1.0, True), (2.0, True)],
    ids=["zero", "negative", "one", "above-one"],
)
def test_the_ends_of_the_rate_decide_alone(rate: float, expected: bool) -> None:
    ids = [f"r{n}" for n in range(2000)] + ["", "A" * 128]
    assert {sampled(rid, rate) for rid in ids} == {expected}


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.9])
def test_the_same_id_gets_the_same_answer(rate: float) -> None:
    ids = [request_id(None) for _ in range(500)] + [f"client-{n}" for n in range(500)]
    first = [sampled(rid, rate) for rid in ids]
    assert [sampled(rid, rate) for rid in ids] == first
    assert [sampled(rid, rate) for rid in reversed(ids)] == first[::-1]


def test_a_higher_rate_keeps_every_id_a_lower_one_kept() -> None:
    # One hash per id compared to the rate: raising it only adds requests (a canary's share grows smoothly).
    ids = [f"client-{n}" for n in range(5000)]
    low = {rid for rid in ids if sampled(rid, 0.1)}
    high = {rid for rid in ids if sampled(rid, 0.5)}
    assert low <= high


IDS = 20_000


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["random-hex", "client-sequence"])
def test_the_sampled_share_is_the_rate(rate: float, kind: str) -> None:
    draw = random.Random(f"{kind}-{rate}")
    if kind == "random-hex":
        ids = [f"{draw.getrandbits(128):032x}" for _ in range(IDS)]
    else:
        # Ids a client numbers in order: the hash must spread them as well.
        ids = [f"order-{n}" for n in range(IDS)]
    share = sum(sampled(rid, rate) for rid in ids) / IDS
    sigma = math.sqrt(rate * (1 - rate) / IDS)
    assert abs(share - rate) <= 5 * sigma, f"{share=} {rate=} {sigma=}"
