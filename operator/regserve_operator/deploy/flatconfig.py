"""`-C key=value` config, MLflow's flat style, into a RegisteredModelServing spec.

A key names a spec field by its path (`rollout.canary.steps`) or by any unambiguous tail of it
(`canary.steps`, `strategy`, `maxModelsPerReplica`; snake_case too). String values are read by the
field's type in the CRD schema: numbers, booleans, comma-separated lists, JSON for lists and objects.
The result is validated by the same pydantic models as the CRD.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from regserve_operator.crd import openapi_schema
from regserve_operator.spec import RegisteredModelServingSpec, parse_spec

# Keys that are not spec fields: how the client waits.
TIMEOUT_KEY = "timeout"
WAIT_KEY = "wait"
CLIENT_KEYS = frozenset({TIMEOUT_KEY, WAIT_KEY})
DEFAULT_TIMEOUT_S = 900.0
MAX_TIMEOUT_S = 86400.0
# The model URI sets these; a config key for them would be a second, conflicting answer.
_FROM_MODEL_URI = "model"
_TRUE = frozenset({"true", "yes", "1", "on"})
_FALSE = frozenset({"false", "no", "0", "off"})
_SNAKE = re.compile(r"_([a-z0-9])")


class ConfigError(ValueError):
    """Config a user must change; the message names the key."""


@dataclass(frozen=True)
class ClientOptions:
    wait: bool = True
    timeout_s: float = DEFAULT_TIMEOUT_S


@dataclass(frozen=True)
class Field:
    path: tuple[str, ...]
    schema: Mapping[str, Any]


@functools.cache
def spec_fields() -> dict[str, Field]:
    """Every settable path of the spec (objects and leaves), by its dotted camelCase path."""
    found: dict[str, Field] = {}

    def walk(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for name, child in (node.get("properties") or {}).items():
            here = (*path, name)
            if here[0] != _FROM_MODEL_URI:
                found[".".join(here)] = Field(here, child)
            walk(child, here)

    walk(openapi_schema(RegisteredModelServingSpec), ())
    return found


def resolve_key(key: str) -> Field:
    """The spec field a flat key names: the whole path, or the one path ending with it."""
    camel = ".".join(_SNAKE.sub(lambda m: m.group(1).upper(), part) for part in key.split("."))
    fields = spec_fields()
    if camel in fields:
        return fields[camel]
    tail = "." + camel
    matches = sorted(path for path in fields if path.endswith(tail))
    if len(matches) == 1:
        return fields[matches[0]]
    if matches:
        raise ConfigError(f"config key {key!r} is ambiguous: say which of {', '.join(matches)}")
    if camel.split(".")[0] == _FROM_MODEL_URI:
        raise ConfigError(f"config key {key!r}: the model comes from the model URI (models:/...)")
    close = difflib.get_close_matches(camel, list(fields), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint} (`mlflow deployments help -t regserve` lists them)")


def coerce(field: Field, key: str, value: Any) -> Any:
    """A string from the command line as the field's type; anything else as it is."""
    if not isinstance(value, str):
        return value
    kind = field.schema.get("type")
    text = value.strip()
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            return float(text)
        if kind == "boolean":
            return _boolean(text)
        if kind == "object":
            return json.loads(text)
        if kind == "array":
            if text.startswith("["):
                return json.loads(text)
            item = Field(field.path, field.schema.get("items") or {})
            return [coerce(item, key, part) for part in text.split(",") if part.strip()]
    except (ValueError, json.JSONDecodeError) as error:
        raise ConfigError(f"config key {key!r}: {value[:200]!r} is not a valid {kind} ({error})") from None
    return value


def _boolean(text: str) -> bool:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError("expected true or false")


def split_config(config: Mapping[str, Any] | None) -> tuple[ClientOptions, dict[str, Any]]:
    """The client's own options, and the spec fields as a nested dict (not yet validated)."""
    options = ClientOptions()
    nested: dict[str, Any] = {}
    for key, value in (config or {}).items():
        if key == TIMEOUT_KEY:
            options = ClientOptions(options.wait, _timeout(value))
        elif key == WAIT_KEY:
            options = ClientOptions(_client_bool(key, value), options.timeout_s)
        else:
            field = resolve_key(str(key))
            _set(nested, field.path, coerce(field, str(key), value))
    return options, nested


def _timeout(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"config key 'timeout': {str(value)[:64]!r} is not a number of seconds") from None
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise ConfigError(f"config key 'timeout': between 0 and {MAX_TIMEOUT_S:.0f} seconds")
    return seconds


def _client_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    try:
        return _boolean(str(value).strip())
    except ValueError:
        raise ConfigError(f"config key {key!r}: expected true or false") from None


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config sets {'.'.join(path)} inside a value given whole")
        tree = child
    tree[path[-1]] = value


def merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`changes` over `base`, objects merged key by key (JSON merge patch without deletions)."""
    out = dict(base)
    for key, value in changes.items():
        old = out.get(key)
        out[key] = merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def validated(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as the CRD would take it, or a ConfigError naming each bad field."""
    try:
        parse_spec(spec)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'])}: {e['msg']}" for e in error.errors()[:20]
        )
        raise ConfigError(f"invalid config: {problems}") from None
    return dict(spec)
