"""Signature compatibility between a registered model's default version and another version.

Pure and importable without Ray, FastAPI or mlflow: the operator gates rollouts with the same function
the serving app uses to answer 409, and the operator must not pay for `import mlflow` (most of its
memory) to do it. Signatures are therefore compared in their MLmodel form, the dict
`ModelSignature.to_dict()` produces and an MLmodel file stores: `{"inputs": <JSON text>, "outputs":
<JSON text>, "params": <JSON text>}`, any of them None. Callers holding mlflow objects pass
`signature.to_dict()`.

A candidate version is compatible with the default when every request the default's API accepts is
accepted by the candidate with the same meaning:

- every input of the default exists in the candidate with the same type or a safely widening one
  (int → long → double, float → double, any → AnyType), and a removed input is a difference because
  the candidate would silently ignore it;
- no input the default treats as optional (or lacks) is required by the candidate;
- tensors keep rank, each fixed dimension stays or becomes variable (-1), dtypes widen safely;
- outputs keep their names and types (new outputs are allowed: JSON consumers ignore extra keys);
- params of the default stay with the same type and shape (new params carry defaults, so they are fine).

Difference texts are worded exactly as when this module compared mlflow's own objects (type names as
mlflow prints them), so verdicts already stored in resource status keep reading the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Signature = Mapping[str, Any]
"""A signature in MLmodel form: `{"inputs": str | None, "outputs": str | None, "params": str | None}`."""

# Column types a value of the key type may safely be read as, besides itself.
_WIDENINGS: dict[str, frozenset[str]] = {
    "integer": frozenset({"long", "float", "double"}),
    "long": frozenset({"double"}),
    "float": frozenset({"double"}),
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


def compare_signatures(default: Signature | None, candidate: Signature | None) -> list[SignatureDifference]:
    """Differences that make `candidate` incompatible with `default`; empty means compatible."""
    if default is None:
        return []  # the default's API is free-form: nothing a candidate could break
    if candidate is None:
        return [SignatureDifference("inputs", "", "no_signature", "candidate version has no signature")]
    diffs = _compare_inputs(_schema(default.get("inputs")), _schema(candidate.get("inputs")))
    diffs += _compare_outputs(_schema(default.get("outputs")), _schema(candidate.get("outputs")))
    diffs += _compare_params(_params(default.get("params")), _params(candidate.get("params")))
    return diffs


def check_signature(signature: Signature | None) -> None:
    """Raise ValueError when `signature` is not a readable signature in MLmodel form."""
    if signature is None:
        return
    try:
        _schema(signature.get("inputs"))
        _schema(signature.get("outputs"))
        _params(signature.get("params"))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"unreadable signature: {type(error).__name__}: {error}") from error


def signature_fingerprint(signature: Signature | None) -> str:
    """Stable text of a signature, to key caches of compatibility verdicts and schemas."""
    if signature is None:
        return "none"
    return json.dumps(dict(signature), sort_keys=True)


# ------------------------------------------------------------------------- the MLmodel form, parsed
# Small mirrors of mlflow's DataType/Array/Map/Object/AnyType/ColSpec/TensorSpec/ParamSpec, read the
# way mlflow's `from_json_dict` reads them.


@dataclass(frozen=True)
class Scalar:
    name: str  # an mlflow DataType name: string, integer, long, float, double, boolean, binary, datetime


@dataclass(frozen=True)
class ArrayOf:
    items: ValueType


@dataclass(frozen=True)
class MapOf:
    values: ValueType


@dataclass(frozen=True)
class Prop:
    name: str
    dtype: ValueType
    required: bool


@dataclass(frozen=True)
class ObjectOf:
    properties: tuple[Prop, ...]  # sorted by name, as mlflow keeps them


@dataclass(frozen=True)
class AnyValue:
    pass


@dataclass(frozen=True)
class SparkVector:
    pass


ValueType = Scalar | ArrayOf | MapOf | ObjectOf | AnyValue | SparkVector


@dataclass(frozen=True)
class Column:
    name: str | None
    type: ValueType
    required: bool | None


@dataclass(frozen=True)
class Tensor:
    name: str | None
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Param:
    name: str
    dtype: Scalar | ObjectOf
    shape: tuple[int, ...] | None


def _json_list(value: Any) -> list[Any]:
    if not value:
        return []
    return list(json.loads(value) if isinstance(value, str) else value)


def _schema(value: Any) -> list[Column | Tensor] | None:
    specs = [_tensor(spec) if spec["type"] == "tensor" else _column(spec) for spec in _json_list(value)]
    return specs or None


def _params(value: Any) -> list[Param] | None:
    params = []
    for spec in _json_list(value):
        kind = spec.get("type") or spec.get("dtype")  # older MLmodels say `dtype`
        dtype: Scalar | ObjectOf = _object(spec) if kind == "object" else Scalar(kind)
        shape = spec.get("shape")
        params.append(Param(str(spec["name"]), dtype, tuple(shape) if shape is not None else None))
    return params or None


def _column(spec: Mapping[str, Any]) -> Column:
    value_type = _value_type(spec)
    # mlflow defaults a missing `required` to True for plain types but to None (falsy) for the others.
    required = spec.get("required", True if isinstance(value_type, Scalar) else None)
    return Column(spec.get("name"), value_type, required)


def _tensor(spec: Mapping[str, Any]) -> Tensor:
    info = spec["tensor-spec"]
    return Tensor(spec.get("name"), str(info["dtype"]), tuple(info["shape"]))


def _value_type(spec: Mapping[str, Any]) -> ValueType:
    kind = spec["type"]
    if kind == "array":
        return ArrayOf(_value_type(spec["items"]))
    if kind == "map":
        return MapOf(_value_type(spec["values"]))
    if kind == "object":
        return _object(spec)
    if kind == "any":
        return AnyValue()
    if kind == "sparkml_vector":
        return SparkVector()
    return Scalar(str(kind))


def _object(spec: Mapping[str, Any]) -> ObjectOf:
    props = (
        Prop(name, _value_type(prop), prop.get("required", True)) for name, prop in spec["properties"].items()
    )
    return ObjectOf(tuple(sorted(props, key=lambda prop: prop.name)))


# --------------------------------------------------------------------------------------------- inputs


def _is_tensor(schema: Sequence[Column | Tensor]) -> bool:
    return isinstance(schema[0], Tensor)


def _compare_inputs(
    default: list[Column | Tensor] | None, candidate: list[Column | Tensor] | None
) -> list[SignatureDifference]:
    if default is None:
        return []
    if candidate is None:
        return [SignatureDifference("inputs", "", "no_schema", "candidate declares no input schema")]
    if _is_tensor(default) != _is_tensor(candidate):
        kinds = (
            "tensor" if _is_tensor(default) else "column",
            "tensor" if _is_tensor(candidate) else "column",
        )
        return [SignatureDifference("inputs", "", "kind", f"{kinds[0]}-based input became {kinds[1]}-based")]
    if _is_tensor(default):
        return _compare_tensor_lists("inputs", default, candidate)
    return _compare_columns(default, candidate)


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
    return all(spec.name for spec in specs)


# -------------------------------------------------------------------------------------------- outputs


def _compare_outputs(
    default: list[Column | Tensor] | None, candidate: list[Column | Tensor] | None
) -> list[SignatureDifference]:
    if default is None:
        return []
    if candidate is None:
        return [SignatureDifference("outputs", "", "no_schema", "candidate declares no output schema")]
    if _is_tensor(default) != _is_tensor(candidate):
        return [SignatureDifference("outputs", "", "kind", "output changed between tensor and columns")]
    if _is_tensor(default):
        return _compare_tensor_lists("outputs", default, candidate)
    old_columns: list[Any] = default
    new_columns: list[Any] = candidate
    if not _all_named(old_columns) or not _all_named(new_columns):
        old_types = [spec.type for spec in old_columns]
        new_types = [spec.type for spec in new_columns]
        if len(old_types) != len(new_types) or any(
            _type_change(o, n, widen=False) for o, n in zip(old_types, new_types, strict=False)
        ):
            return [SignatureDifference("outputs", "", "type", "unnamed output columns changed")]
        return []
    new_by_name = {spec.name: spec for spec in new_columns}
    diffs = []
    for old in old_columns:
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


def _compare_params(default: list[Param] | None, candidate: list[Param] | None) -> list[SignatureDifference]:
    if default is None:
        return []
    new_by_name = {spec.name: spec for spec in (candidate or [])}
    diffs = []
    for old in default:
        new = new_by_name.get(old.name)
        if new is None:
            diffs.append(SignatureDifference("params", old.name, "missing", "param removed in candidate"))
        elif old.dtype != new.dtype:
            diffs.append(
                SignatureDifference(
                    "params",
                    old.name,
                    "type",
                    f"type {_mlflow_str(old.dtype)} became {_mlflow_str(new.dtype)}",
                )
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


def _compare_tensors(section: str, name: str, old: Tensor, new: Tensor) -> list[SignatureDifference]:
    diffs = []
    widen = section == "inputs"
    if old.dtype != new.dtype:
        # numpy only when dtypes differ: its casting table is the rule, and the operator then pays for
        # it only when a tensor model's dtype actually changes (MLmodel dtype names are canonical).
        import numpy as np

        old_dtype, new_dtype = np.dtype(old.dtype), np.dtype(new.dtype)
        if old_dtype != new_dtype and not (widen and np.can_cast(old_dtype, new_dtype, casting="safe")):
            diffs.append(SignatureDifference(section, name, "type", f"dtype {old_dtype} became {new_dtype}"))
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


def _type_change(old: ValueType, new: ValueType, *, widen: bool) -> str:
    """Empty when a value of type `old` is accepted as `new`; otherwise why not."""
    if isinstance(new, AnyValue) and widen:
        return ""
    if isinstance(old, Scalar) and isinstance(new, Scalar):
        if old == new or (widen and new.name in _WIDENINGS.get(old.name, frozenset())):
            return ""
        return f"type {old.name} became {new.name}"
    if type(old) is not type(new):
        return f"type {_type_name(old)} became {_type_name(new)}"
    if isinstance(old, ArrayOf) and isinstance(new, ArrayOf):
        inner = _type_change(old.items, new.items, widen=widen)
        return f"array item: {inner}" if inner else ""
    if isinstance(old, MapOf) and isinstance(new, MapOf):
        inner = _type_change(old.values, new.values, widen=widen)
        return f"map value: {inner}" if inner else ""
    if isinstance(old, ObjectOf) and isinstance(new, ObjectOf):
        return _object_change(old, new, widen=widen)
    return ""


def _object_change(old: ObjectOf, new: ObjectOf, *, widen: bool) -> str:
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


# mlflow's class names, as the texts used them.
_TYPE_NAMES = {
    ArrayOf: "Array",
    MapOf: "Map",
    ObjectOf: "Object",
    AnyValue: "AnyType",
    SparkVector: "SparkMLVector",
}


def _type_name(value: ValueType) -> str:
    if isinstance(value, Scalar):
        return value.name
    return _TYPE_NAMES[type(value)]


def _mlflow_repr(value: ValueType) -> str:
    """`repr()` of the mlflow type object `value` stands for."""
    if isinstance(value, Scalar):
        return value.name
    if isinstance(value, ArrayOf):
        return f"Array({_mlflow_repr(value.items)})"
    if isinstance(value, MapOf):
        return f"Map(str -> {_mlflow_str(value.values)})"
    if isinstance(value, ObjectOf):
        props = (
            f"{p.name}: {_mlflow_repr(p.dtype)} ({'required' if p.required else 'optional'})"
            for p in value.properties
        )
        return "{" + ", ".join(props) + "}"
    if isinstance(value, AnyValue):
        return "Any"
    return "SparkML vector"


def _mlflow_str(value: ValueType) -> str:
    """`str()` of the mlflow type object: DataType is an Enum (`DataType.long`), others print their repr."""
    return f"DataType.{value.name}" if isinstance(value, Scalar) else _mlflow_repr(value)


__all__ = [
    "Signature",
    "SignatureDifference",
    "check_signature",
    "compare_signatures",
    "signature_fingerprint",
]
