"""Signature compatibility between a registered model's default version and another version.

Pure and importable without Ray or FastAPI: the operator gates rollouts with the same function the
serving app uses to answer 409.

A candidate version is compatible with the default when every request the default's API accepts is
accepted by the candidate with the same meaning:

- every input of the default exists in the candidate with the same type or a safely widening one
  (int → long → double, float → double, any → AnyType), and a removed input is a difference because
  the candidate would silently ignore it;
- no input the default treats as optional (or lacks) is required by the candidate;
- tensors keep rank, each fixed dimension stays or becomes variable (-1), dtypes widen safely;
- outputs keep their names and types (new outputs are allowed: JSON consumers ignore extra keys);
- params of the default stay with the same type and shape (new params carry defaults, so they are fine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import (
    AnyType,
    Array,
    DataType,
    Map,
    Object,
    ParamSchema,
    Schema,
)

# Column types a value of the key type may safely be read as, besides itself.
_WIDENINGS: dict[DataType, frozenset[DataType]] = {
    DataType.integer: frozenset({DataType.long, DataType.float, DataType.double}),
    DataType.long: frozenset({DataType.double}),
    DataType.float: frozenset({DataType.double}),
}


@dataclass(frozen=True)
class SignatureDifference:
    """One reason a candidate version's signature does not fit the default's API."""

    section: str  # "inputs", "outputs" or "params"
    field: str  # column/tensor/param name; "" for the whole section or an unnamed tensor
    change: str  # stable code: missing, added_required, became_required, type, shape, kind, ...
    detail: str  # human sentence

    def __str__(self) -> str:
        where = f"{self.section}.{self.field}" if self.field else self.section
        return f"{where}: {self.detail}"


def compare_signatures(
    default: ModelSignature | None, candidate: ModelSignature | None
) -> list[SignatureDifference]:
    """Differences that make `candidate` incompatible with `default`; empty means compatible."""
    if default is None:
        return []  # the default's API is free-form: nothing a candidate could break
    if candidate is None:
        return [SignatureDifference("inputs", "", "no_signature", "candidate version has no signature")]
    diffs = _compare_inputs(default.inputs, candidate.inputs)
    diffs += _compare_outputs(default.outputs, candidate.outputs)
    diffs += _compare_params(default.params, candidate.params)
    return diffs


def is_compatible(default: ModelSignature | None, candidate: ModelSignature | None) -> bool:
    return not compare_signatures(default, candidate)


def signature_fingerprint(signature: ModelSignature | None) -> str:
    """Stable text of a signature, to key caches of compatibility verdicts and schemas."""
    if signature is None:
        return "none"
    import json

    return json.dumps(signature.to_dict(), sort_keys=True)


# --------------------------------------------------------------------------------------------- inputs


def _compare_inputs(default: Schema | None, candidate: Schema | None) -> list[SignatureDifference]:
    if default is None:
        return []
    if candidate is None:
        return [SignatureDifference("inputs", "", "no_schema", "candidate declares no input schema")]
    if default.is_tensor_spec() != candidate.is_tensor_spec():
        kinds = (
            "tensor" if default.is_tensor_spec() else "column",
            "tensor" if candidate.is_tensor_spec() else "column",
        )
        return [SignatureDifference("inputs", "", "kind", f"{kinds[0]}-based input became {kinds[1]}-based")]
    if default.is_tensor_spec():
        return _compare_tensor_lists("inputs", default.inputs, candidate.inputs)
    return _compare_columns(default.inputs, candidate.inputs)


def _compare_columns(default: list[Any], candidate: list[Any]) -> list[SignatureDifference]:
    diffs: list[SignatureDifference] = []
    if not _all_named(default) or not _all_named(candidate):
        return _compare_unnamed_columns(default, candidate)
    new_by_name = {spec.name: spec for spec in candidate}
    old_names = {spec.name for spec in default}
    for old in default:
        new = new_by_name.get(old.name)
        if new is None:
            diffs.append(SignatureDifference("inputs", old.name, "missing", "input removed in candidate"))
            continue
        if old.required is False and new.required:
            diffs.append(
                SignatureDifference("inputs", old.name, "became_required", "optional input became required")
            )
        reason = _type_change(old.type, new.type, widen=True)
        if reason:
            diffs.append(SignatureDifference("inputs", old.name, "type", reason))
    for new in candidate:
        if new.name not in old_names and new.required:
            diffs.append(SignatureDifference("inputs", new.name, "added_required", "new required input"))
    return diffs


def _compare_unnamed_columns(default: list[Any], candidate: list[Any]) -> list[SignatureDifference]:
    if len(default) != len(candidate):
        return [
            SignatureDifference(
                "inputs", "", "arity", f"{len(default)} unnamed columns became {len(candidate)}"
            )
        ]
    diffs = []
    for index, (old, new) in enumerate(zip(default, candidate, strict=True)):
        reason = _type_change(old.type, new.type, widen=True)
        if reason:
            diffs.append(SignatureDifference("inputs", f"[{index}]", "type", reason))
    return diffs


def _all_named(specs: list[Any]) -> bool:
    return all(getattr(spec, "name", None) for spec in specs)


# -------------------------------------------------------------------------------------------- outputs


def _compare_outputs(default: Schema | None, candidate: Schema | None) -> list[SignatureDifference]:
    if default is None:
        return []
    if candidate is None:
        return [SignatureDifference("outputs", "", "no_schema", "candidate declares no output schema")]
    if default.is_tensor_spec() != candidate.is_tensor_spec():
        return [SignatureDifference("outputs", "", "kind", "output changed between tensor and columns")]
    if default.is_tensor_spec():
        return _compare_tensor_lists("outputs", default.inputs, candidate.inputs)
    if not _all_named(default.inputs) or not _all_named(candidate.inputs):
        old_types = [spec.type for spec in default.inputs]
        new_types = [spec.type for spec in candidate.inputs]
        if len(old_types) != len(new_types) or any(
            _type_change(o, n, widen=False) for o, n in zip(old_types, new_types, strict=False)
        ):
            return [SignatureDifference("outputs", "", "type", "unnamed output columns changed")]
        return []
    new_by_name = {spec.name: spec for spec in candidate.inputs}
    diffs = []
    for old in default.inputs:
        new = new_by_name.get(old.name)
        if new is None:
            diffs.append(
                SignatureDifference("outputs", str(old.name), "missing", "output removed in candidate")
            )
            continue
        reason = _type_change(old.type, new.type, widen=False)
        if reason:
            diffs.append(SignatureDifference("outputs", str(old.name), "type", reason))
    return diffs


# --------------------------------------------------------------------------------------------- params


def _compare_params(default: ParamSchema | None, candidate: ParamSchema | None) -> list[SignatureDifference]:
    if default is None:
        return []
    new_by_name = {spec.name: spec for spec in (candidate.params if candidate else [])}
    diffs = []
    for old in default.params:
        new = new_by_name.get(old.name)
        if new is None:
            diffs.append(SignatureDifference("params", old.name, "missing", "param removed in candidate"))
        elif old.dtype != new.dtype:
            diffs.append(
                SignatureDifference("params", old.name, "type", f"type {old.dtype} became {new.dtype}")
            )
        elif old.shape != new.shape:
            diffs.append(
                SignatureDifference("params", old.name, "shape", f"shape {old.shape} became {new.shape}")
            )
    return diffs


# -------------------------------------------------------------------------------------------- tensors


def _compare_tensor_lists(
    section: str, default: list[Any], candidate: list[Any]
) -> list[SignatureDifference]:
    if len(default) == 1 and len(candidate) == 1 and not default[0].name and not candidate[0].name:
        return _compare_tensors(section, "", default[0], candidate[0])
    new_by_name = {spec.name or "": spec for spec in candidate}
    diffs = []
    for old in default:
        name = str(old.name or "")
        new = new_by_name.get(name)
        if new is None:
            diffs.append(SignatureDifference(section, name, "missing", "tensor removed in candidate"))
        else:
            diffs += _compare_tensors(section, name, old, new)
    return diffs


def _compare_tensors(section: str, name: str, old: Any, new: Any) -> list[SignatureDifference]:
    diffs = []
    widen = section == "inputs"
    if old.type != new.type and not (widen and np.can_cast(old.type, new.type, casting="safe")):
        diffs.append(SignatureDifference(section, name, "type", f"dtype {old.type} became {new.type}"))
    if len(old.shape) != len(new.shape):
        diffs.append(SignatureDifference(section, name, "shape", f"shape {old.shape} became {new.shape}"))
    else:
        for old_dim, new_dim in zip(old.shape, new.shape, strict=True):
            fits = old_dim == new_dim or (widen and new_dim == -1)
            if not fits:
                diffs.append(
                    SignatureDifference(section, name, "shape", f"shape {old.shape} became {new.shape}")
                )
                break
    return diffs


# ---------------------------------------------------------------------------------------- value types


def _type_change(old: Any, new: Any, *, widen: bool) -> str:
    """Empty when a value of type `old` is accepted as `new`; otherwise why not."""
    if isinstance(new, AnyType) and widen:
        return ""
    if isinstance(old, DataType) and isinstance(new, DataType):
        if old == new or (widen and new in _WIDENINGS.get(old, frozenset())):
            return ""
        return f"type {old.name} became {new.name}"
    if type(old) is not type(new):
        return f"type {_type_name(old)} became {_type_name(new)}"
    if isinstance(old, Array):
        inner = _type_change(old.dtype, new.dtype, widen=widen)
        return f"array item: {inner}" if inner else ""
    if isinstance(old, Map):
        inner = _type_change(old.value_type, new.value_type, widen=widen)
        return f"map value: {inner}" if inner else ""
    if isinstance(old, Object):
        return _object_change(old, new, widen=widen)
    return ""


def _object_change(old: Object, new: Object, *, widen: bool) -> str:
    new_props = {prop.name: prop for prop in new.properties}
    old_names = {prop.name for prop in old.properties}
    for prop in old.properties:
        counterpart = new_props.get(prop.name)
        if counterpart is None:
            return f"property {prop.name!r} removed"
        if widen and not prop.required and counterpart.required:
            return f"property {prop.name!r} became required"
        inner = _type_change(prop.dtype, counterpart.dtype, widen=widen)
        if inner:
            return f"property {prop.name!r}: {inner}"
    for prop in new.properties:
        if widen and prop.name not in old_names and prop.required:
            return f"new required property {prop.name!r}"
    return ""


def _type_name(value: Any) -> str:
    if isinstance(value, DataType):
        return value.name
    return type(value).__name__


__all__ = [
    "SignatureDifference",
    "compare_signatures",
    "is_compatible",
    "signature_fingerprint",
]
