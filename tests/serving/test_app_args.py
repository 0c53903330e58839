"""`build_app`'s argument: the typed `AppArgs` or a dict of its fields (Ray's config path, Python callers),
validated by the same model, with errors that name the field. Binding only: no Ray."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from ray.serve import Application

from serving_app.app import build_app
from serving_app.config import AppArgs, app_args


@dataclass(frozen=True)
class Case:
    name: str
    raw: object
    expected: AppArgs | None = None
    error: type[Exception] | None = None
    message: tuple[str, ...] = ()  # parts the error must contain
    hidden: tuple[str, ...] = ()  # given values the error must not echo


CASES = [
    Case("typed args pass through", AppArgs(model_name="m"), expected=AppArgs(model_name="m")),
    Case(
        "a dict is validated into the args",
        {"model_name": "m", "max_batch_size": 4, "default_version": "3"},
        expected=AppArgs(model_name="m", max_batch_size=4, default_version="3"),
    ),
    Case(
        "numbers as text, as `serve run` passes them",
        {"model_name": "m", "max_batch_size": "8"},
        expected=AppArgs(model_name="m", max_batch_size=8),
    ),
    Case(
        "a bad value names its field",
        {"model_name": "m", "max_batch_size": 0},
        error=ValueError,
        message=("invalid build_app args", "max_batch_size", "greater than or equal to 1"),
    ),
    Case(
        "every bad field at once, values not echoed",
        {"max_batch_size": "many-secret-words", "tokenz": "s3cret"},
        error=ValueError,
        message=("model_name: Field required", "max_batch_size:", "tokenz: Extra inputs are not permitted"),
        hidden=("many-secret-words", "s3cret"),
    ),
    Case("no args at all", {}, error=ValueError, message=("model_name: Field required",)),
    Case("not a mapping", ["model_name", "m"], error=TypeError, message=("AppArgs or a dict", "list")),
    Case("None", None, error=TypeError, message=("NoneType",)),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_app_args(case: Case) -> None:
    if case.error is None:
        assert app_args(case.raw) == case.expected
        return
    with pytest.raises(case.error) as raised:
        app_args(case.raw)
    text = str(raised.value)
    assert all(part in text for part in case.message), text
    assert not any(value in text for value in case.hidden), text
    assert raised.value.__cause__ is None  # pydantic's error, which quotes the values, is not chained


@pytest.mark.parametrize(
    "args", [AppArgs(model_name="m", max_batch_size=16), {"model_name": "m", "max_batch_size": 16}]
)
def test_build_app_takes_typed_args_and_dicts(args: AppArgs | dict[str, Any]) -> None:
    app = build_app(args)
    assert isinstance(app, Application)
    bound = app._bound_deployment  # what the replica's __init__ will receive
    assert bound.init_args == (AppArgs(model_name="m", max_batch_size=16),)
    assert bound._deployment_config.max_ongoing_requests == 32


def test_build_app_refuses_a_bad_dict_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"max_models_per_replica: Input should be less than or equal to 64"):
        build_app({"model_name": "m", "max_models_per_replica": 100})
