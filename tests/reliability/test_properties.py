"""Hypothesis properties of the signature → API schema mapping and of the compatibility rules (pure, fast).

Random MLflow column schemas: awkward names (leading `_`, `model_config`, `schema`, spaces, dots,
unicode, digits first), every `DataType`, optional flags, and `Array`/`Map`/`Object` nested to depth 2.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Map, Object, Property, Schema
from pydantic import ValidationError

from serving_app.compat import SignatureDifference
from serving_app.compat import compare_signatures as compare_mlmodel_forms
from serving_app.convert import normalise_records, records_to_model_input
from serving_app.schema import build_api_schema

PROPERTY_SETTINGS = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

AWKWARD_NAMES = ["_private", "model_config", "schema", "with space", "a.b", "1st", "ünï", "__class__", "x-y"]
NAMES = st.one_of(
    st.sampled_from(AWKWARD_NAMES),
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), min_size=1, max_size=8),
)
DATA_TYPES = st.sampled_from(list(DataType))


def value_types(depth: int = 2) -> st.SearchStrategy[Any]:
    """A column type: a DataType, or Array/Map/Object of value types, nested at most `depth` deep."""
    if depth == 0:
        return DATA_TYPES
    inner = value_types(depth - 1)
    objects = st.lists(
        st.tuples(NAMES, inner, st.booleans()), min_size=1, max_size=3, unique_by=lambda p: p[0]
    )
    return st.one_of(
        DATA_TYPES,
        DATA_TYPES,  # plain types twice as likely: most real signatures are flat
        inner.map(Array),
        inner.map(Map),
        objects.map(
            lambda props: Object([Property(name, dtype, required) for name, dtype, required in props])
        ),
    )


@st.composite
def column_schemas(draw: st.DrawFn, min_size: int = 1) -> Schema:
    columns = draw(
        st.lists(
            st.tuples(NAMES, value_types(), st.booleans()),
            min_size=min_size,
            max_size=5,
            unique_by=lambda c: c[0],
        )
    )
    return Schema([ColSpec(dtype, name, required) for name, dtype, required in columns])


def signature_of(inputs: Schema) -> ModelSignature:
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(DataType.string, "answer")]))


def compare_signatures(default: ModelSignature, candidate: ModelSignature) -> list[SignatureDifference]:
    """compat compares signatures in the form MLmodel stores them."""
    return compare_mlmodel_forms(default.to_dict(), candidate.to_dict())


# ------------------------------------------------------------------------------------------ values


def json_values(dtype: Any) -> st.SearchStrategy[Any]:
    """JSON values a caller may send for a column of type `dtype`."""
    if isinstance(dtype, DataType):
        return {
            DataType.boolean: st.booleans(),
            DataType.integer: st.integers(-(2**31), 2**31 - 1),
            DataType.long: st.integers(-(2**63), 2**63 - 1),
            DataType.float: st.floats(allow_nan=False, allow_infinity=False, width=32),
            DataType.double: st.floats(allow_nan=False, allow_infinity=False),
            DataType.string: st.text(max_size=10),
            DataType.binary: st.binary(max_size=8).map(lambda raw: base64.b64encode(raw).decode()),
            DataType.datetime: st.datetimes(dt.datetime(1970, 1, 2), dt.datetime(2100, 1, 1)).map(
                lambda moment: moment.isoformat()
            ),
        }[dtype]
    if isinstance(dtype, Array):
        return st.lists(json_values(dtype.dtype), max_size=3)
    if isinstance(dtype, Map):
        return st.dictionaries(st.text(max_size=5), json_values(dtype.value_type), max_size=3)
    if isinstance(dtype, Object):
        return st.fixed_dictionaries(
            {prop.name: json_values(prop.dtype) for prop in dtype.properties if prop.required},
            optional={
                prop.name: st.none() | json_values(prop.dtype)
                for prop in dtype.properties
                if not prop.required
            },
        )
    if isinstance(dtype, AnyType):
        return st.none() | st.integers() | st.text(max_size=5)
    raise TypeError(dtype)


@st.composite
def schema_and_record(draw: st.DrawFn) -> tuple[Schema, dict[str, Any]]:
    schema = draw(column_schemas())
    record: dict[str, Any] = {}
    for spec in schema.inputs:
        values = json_values(spec.type)
        record[str(spec.name)] = draw(values if spec.required else st.none() | values)
    return schema, record


# -------------------------------------------------------------------------------------- compatibility


@PROPERTY_SETTINGS
@given(column_schemas())
def test_a_signature_is_compatible_with_itself(inputs: Schema) -> None:
    assert compare_signatures(signature_of(inputs), signature_of(inputs)) == []


@PROPERTY_SETTINGS
@given(column_schemas(), NAMES, value_types())
def test_adding_an_optional_input_keeps_compatibility(inputs: Schema, name: str, dtype: Any) -> None:
    if name in inputs.input_names():
        name = f"{name}_new"
    wider = Schema([*inputs.inputs, ColSpec(dtype, name, required=False)])
    assert compare_signatures(signature_of(inputs), signature_of(wider)) == []


@PROPERTY_SETTINGS
@given(column_schemas(min_size=2), st.data())
def test_removing_an_input_is_reported(inputs: Schema, data: st.DataObject) -> None:
    removed = data.draw(st.sampled_from(inputs.input_names()))
    fewer = Schema([spec for spec in inputs.inputs if spec.name != removed])
    diffs = compare_signatures(signature_of(inputs), signature_of(fewer))
    assert ("inputs", removed, "missing") in {(d.section, d.field, d.change) for d in diffs}


@PROPERTY_SETTINGS
@given(column_schemas(), st.data())
def test_renaming_an_input_is_reported(inputs: Schema, data: st.DataObject) -> None:
    old = data.draw(st.sampled_from(inputs.input_names()))
    new = data.draw(NAMES.filter(lambda name: name not in inputs.input_names()))
    specs: list[Any] = inputs.inputs
    renamed = Schema([ColSpec(s.type, new, s.required) if s.name == old else s for s in specs])
    diffs = {
        (d.section, d.field, d.change)
        for d in compare_signatures(signature_of(inputs), signature_of(renamed))
    }
    assert ("inputs", old, "missing") in diffs
    # A renamed required input is also a new required one; a renamed optional one is not.
    assert (("inputs", new, "added_required") in diffs) == inputs.inputs[
        inputs.input_names().index(old)
    ].required


WIDENING_CHAIN = [DataType.integer, DataType.long, DataType.double]


@PROPERTY_SETTINGS
@given(
    column_schemas(),
    st.sampled_from([(a, b) for i, a in enumerate(WIDENING_CHAIN) for b in WIDENING_CHAIN[i + 1 :]]),
    st.sampled_from(["column", "array", "map", "object"]),
    NAMES,
)
def test_widening_is_compatible_and_narrowing_is_not(
    inputs: Schema, pair: tuple[DataType, DataType], wrapper: str, name: str
) -> None:
    narrow, wide = pair

    def wrap(dtype: DataType) -> Any:
        return {
            "column": dtype,
            "array": Array(dtype),
            "map": Map(dtype),
            "object": Object([Property("v", dtype)]),
        }[wrapper]

    others = [spec for spec in inputs.inputs if spec.name != name]
    before = signature_of(Schema([*others, ColSpec(wrap(narrow), name)]))
    after = signature_of(Schema([*others, ColSpec(wrap(wide), name)]))
    assert compare_signatures(before, after) == []
    narrowed = compare_signatures(after, before)
    assert [(d.field, d.change) for d in narrowed] == [(name, "type")]


# ------------------------------------------------------------------------------ signature → API schema


@PROPERTY_SETTINGS
@given(schema_and_record())
def test_a_record_that_fits_the_signature_validates_and_converts(case: tuple[Schema, dict[str, Any]]) -> None:
    inputs, record = case
    api = build_api_schema(signature_of(inputs))
    api.request_json_schema()  # the OpenAPI document can always be built
    for body in (record, [record, record]):
        payload = api.request_adapter.validate_json(json.dumps(body))
        records = normalise_records(payload, api.input_shape)
        assert len(records) == (2 if isinstance(body, list) else 1)
        frame = records_to_model_input(records, api.input_shape)
        assert isinstance(frame, pd.DataFrame)
        assert list(frame.columns) == inputs.input_names()
        assert len(frame) == len(records)


@PROPERTY_SETTINGS
@given(schema_and_record(), st.data())
def test_a_record_missing_a_required_column_names_it(
    case: tuple[Schema, dict[str, Any]], data: st.DataObject
) -> None:
    inputs, record = case
    specs: list[Any] = inputs.inputs
    required = [str(spec.name) for spec in specs if spec.required]
    if not required:
        # Make the first column required (and give it a value) so there is one to drop.
        required = [str(specs[0].name)]
        inputs = Schema([ColSpec(specs[0].type, required[0]), *specs[1:]])
        if record[required[0]] is None:
            record[required[0]] = data.draw(json_values(specs[0].type))
    dropped = data.draw(st.sampled_from(required))
    api = build_api_schema(signature_of(inputs))
    body = {key: value for key, value in record.items() if key != dropped}
    with pytest.raises(ValidationError) as raised:
        api.request_adapter.validate_json(json.dumps(body))
    missing = [error["loc"] for error in raised.value.errors() if error["type"] == "missing"]
    assert any(loc[-1] == dropped for loc in missing), raised.value.errors()
