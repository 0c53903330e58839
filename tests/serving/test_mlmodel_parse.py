"""`serving_app.mlmodel.parse_mlmodel` on MLmodel texts a hostile registry could serve."""

from __future__ import annotations

import pytest

from serving_app.mlmodel import Unreadable, parse_mlmodel

URI = "models:/m/1"
# Each level ten aliases of the one below: walking `signature` would visit 10**6 lists.
ALIAS_BOMB = (
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{name}: &{name} [{', '.join([f'*{below}'] * 10)}]\n"
        for below, name in zip("abcde", "bcdef", strict=True)
    )
    + "signature: {inputs: *f}\n"
)


@pytest.mark.parametrize(
    ("text", "expected", "never_quoted"),
    [
        ("flavors: {python_function: {}}\n", None, ""),
        (ALIAS_BOMB, "YAML aliases are not accepted", ""),
        ("k: &anchor v\nother: *anchor\n", "YAML aliases are not accepted", ""),
        ("a: [\n  internal-answer-token: : :\n", "not YAML at line 2", "internal-answer-token"),
        ("- just\n- a list\n", "not a YAML mapping", ""),
    ],
)
def test_parse(text: str, expected: str | None, never_quoted: str) -> None:
    if expected is None:
        assert "flavors" in parse_mlmodel(text, URI)
        return
    with pytest.raises(Unreadable) as refused:
        parse_mlmodel(text, URI)
    assert expected in str(refused.value)
    if never_quoted:
        assert never_quoted not in str(refused.value)
