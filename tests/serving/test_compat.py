"""The compatibility rules, table-driven; the function must import without Ray, FastAPI or mlflow.

Cases are written with mlflow's own signature objects and compared in the form MLmodel stores them
(`ModelSignature.to_dict()`), which is what `compare_signatures` takes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import (
    AnyType,
    Array,
    ColSpec,
    DataType,
    Map,
    Object,
    ParamSchema,
    ParamSpec,
    Property,
    Schema,
    TensorSpec,
)

from serving_app.compat import SignatureDifference, check_signature
from serving_app.compat import compare_signatures as compare_mlmodel_forms


def compare_signatures(
    default: ModelSignature | None, candidate: ModelSignature | None
) -> list[SignatureDifference]:
    return compare_mlmodel_forms(
        default.to_dict() if default else None, candidate.to_dict() if candidate else None
    )


def cols(*specs: ColSpec) -> Schema:
    return Schema(list(specs))


def sig(inputs: Schema, outputs: Schema | None = None, params: ParamSchema | None = None) -> ModelSignature:
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


OUT = cols(ColSpec(DataType.string, "translation_text"))
PROMPT = ColSpec(DataType.string, "prompt")

CASES = [
    # (id, default, candidate, expected {(section, field, change)})
    ("identical", sig(cols(PROMPT), OUT), sig(cols(PROMPT), OUT), set()),
    (
        "renamed input (seed v3)",
        sig(cols(PROMPT), OUT),
        sig(cols(ColSpec(DataType.string, "text_to_translate")), OUT),
        {("inputs", "prompt", "missing"), ("inputs", "text_to_translate", "added_required")},
    ),
    (
        "new optional input is fine",
        sig(cols(PROMPT), OUT),
        sig(cols(PROMPT, ColSpec(DataType.string, "style", required=False)), OUT),
        set(),
    ),
    (
        "optional became required",
        sig(cols(PROMPT, ColSpec(DataType.long, "n", required=False)), OUT),
        sig(cols(PROMPT, ColSpec(DataType.long, "n")), OUT),
        {("inputs", "n", "became_required")},
    ),
    (
        "int widens to long and double",
        sig(cols(ColSpec(DataType.integer, "a"), ColSpec(DataType.float, "b"))),
        sig(cols(ColSpec(DataType.long, "a"), ColSpec(DataType.double, "b"))),
        set(),
    ),
    (
        "double narrows to float",
        sig(cols(ColSpec(DataType.double, "a"))),
        sig(cols(ColSpec(DataType.float, "a"))),
        {("inputs", "a", "type")},
    ),
    (
        "string to long",
        sig(cols(PROMPT)),
        sig(cols(ColSpec(DataType.long, "prompt"))),
        {("inputs", "prompt", "type")},
    ),
    ("anything to AnyType", sig(cols(PROMPT)), sig(cols(ColSpec(AnyType(), "prompt"))), set()),
    (
        "output removed",
        sig(cols(PROMPT), OUT),
        sig(cols(PROMPT), cols(ColSpec(DataType.string, "text"))),
        {("outputs", "translation_text", "missing")},
    ),
    (
        "output widened is still a change",
        sig(cols(PROMPT), cols(ColSpec(DataType.integer, "score"))),
        sig(cols(PROMPT), cols(ColSpec(DataType.double, "score"))),
        {("outputs", "score", "type")},
    ),
    (
        "extra output is fine",
        sig(cols(PROMPT), OUT),
        sig(
            cols(PROMPT),
            cols(ColSpec(DataType.string, "translation_text"), ColSpec(DataType.double, "score")),
        ),
        set(),
    ),
    (
        "tensor dtype widens, fixed dim may become variable",
        sig(
            Schema([TensorSpec(np.dtype("float32"), (-1, 4))]), Schema([TensorSpec(np.dtype("int64"), (-1,))])
        ),
        sig(
            Schema([TensorSpec(np.dtype("float64"), (-1, -1))]),
            Schema([TensorSpec(np.dtype("int64"), (-1,))]),
        ),
        set(),
    ),
    (
        "tensor shape changed",
        sig(Schema([TensorSpec(np.dtype("float64"), (-1, 4))])),
        sig(Schema([TensorSpec(np.dtype("float64"), (-1, 5))])),
        {("inputs", "", "shape")},
    ),
    (
        "tensor output dtype changed",
        sig(
            Schema([TensorSpec(np.dtype("float64"), (-1, 4))]), Schema([TensorSpec(np.dtype("int64"), (-1,))])
        ),
        sig(
            Schema([TensorSpec(np.dtype("float64"), (-1, 4))]),
            Schema([TensorSpec(np.dtype("float64"), (-1,))]),
        ),
        {("outputs", "", "type")},
    ),
    (
        "columns became tensors",
        sig(cols(PROMPT)),
        sig(Schema([TensorSpec(np.dtype("float64"), (-1, 4))])),
        {("inputs", "", "kind")},
    ),
    (
        "array item widens",
        sig(cols(ColSpec(Array(DataType.integer), "xs"))),
        sig(cols(ColSpec(Array(DataType.double), "xs"))),
        set(),
    ),
    (
        "map value narrows",
        sig(cols(ColSpec(Map(DataType.double), "m"))),
        sig(cols(ColSpec(Map(DataType.integer), "m"))),
        {("inputs", "m", "type")},
    ),
    (
        "object gains a required property",
        sig(cols(ColSpec(Object([Property("a", DataType.string)]), "o"))),
        sig(cols(ColSpec(Object([Property("a", DataType.string), Property("b", DataType.long)]), "o"))),
        {("inputs", "o", "type")},
    ),
    (
        "param removed, param added",
        sig(cols(PROMPT), params=ParamSchema([ParamSpec("temperature", DataType.double, 0.5)])),
        sig(cols(PROMPT), params=ParamSchema([ParamSpec("top_k", DataType.long, 5)])),
        {("params", "temperature", "missing")},
    ),
    (
        "param type changed",
        sig(cols(PROMPT), params=ParamSchema([ParamSpec("k", DataType.long, 1)])),
        sig(cols(PROMPT), params=ParamSchema([ParamSpec("k", DataType.string, "1")])),
        {("params", "k", "type")},
    ),
]


@pytest.mark.parametrize(
    ("default", "candidate", "expected"), [case[1:] for case in CASES], ids=[c[0] for c in CASES]
)
def test_compare_signatures(
    default: ModelSignature, candidate: ModelSignature, expected: set[tuple[str, str, str]]
) -> None:
    found = {(d.section, d.field, d.change) for d in compare_signatures(default, candidate)}
    assert found == expected


def test_missing_signatures() -> None:
    assert compare_signatures(None, sig(cols(PROMPT))) == []
    (difference,) = compare_signatures(sig(cols(PROMPT)), None)
    assert difference.change == "no_signature"
    assert "no signature" in str(difference)


MESSAGES = [
    # Texts as they read when compat compared mlflow objects (they are stored in resource status).
    (
        sig(cols(ColSpec(DataType.double, "a"))),
        sig(cols(ColSpec(DataType.float, "a"))),
        ["inputs.a: type double became float"],
    ),
    (
        sig(cols(ColSpec(Array(DataType.long), "xs"))),
        sig(cols(ColSpec(Map(DataType.long), "xs"))),
        ["inputs.xs: type Array became Map"],
    ),
    (
        sig(cols(ColSpec(Object([Property("a", DataType.string)]), "o"))),
        sig(cols(ColSpec(Object([Property("a", DataType.long)]), "o"))),
        ["inputs.o: property 'a': type string became long"],
    ),
    (
        sig(Schema([TensorSpec(np.dtype("float64"), (-1, 4))])),
        sig(Schema([TensorSpec(np.dtype("float32"), (-1, 3))])),
        ["inputs: dtype float64 became float32", "inputs: shape (-1, 4) became (-1, 3)"],
    ),
    (
        sig(cols(PROMPT), params=ParamSchema([ParamSpec("k", DataType.long, 1)])),
        sig(cols(PROMPT), params=ParamSchema([ParamSpec("k", DataType.string, "1")])),
        ["params.k: type DataType.long became DataType.string"],
    ),
    (
        sig(cols(PROMPT), params=ParamSchema([ParamSpec("k", DataType.long, [1], (-1,))])),
        sig(cols(PROMPT), params=ParamSchema([ParamSpec("k", DataType.long, 1)])),
        ["params.k: shape (-1,) became None"],
    ),
    (
        sig(
            cols(PROMPT),
            params=ParamSchema([ParamSpec("o", Object([Property("a", DataType.string)]), {"a": "x"})]),
        ),
        sig(
            cols(PROMPT),
            params=ParamSchema([ParamSpec("o", Object([Property("a", Map(DataType.long), False)]), {})]),
        ),
        ["params.o: type {a: string (required)} became {a: Map(str -> DataType.long) (optional)}"],
    ),
]


@pytest.mark.parametrize(("default", "candidate", "expected"), MESSAGES)
def test_difference_texts(default: ModelSignature, candidate: ModelSignature, expected: list[str]) -> None:
    assert [str(d) for d in compare_signatures(default, candidate)] == expected


def test_mlmodel_file_form() -> None:
    # As an MLmodel file holds it: JSON texts, `params` possibly absent.
    default = {"inputs": '[{"type": "string", "name": "prompt", "required": true}]', "outputs": None}
    candidate = {
        "inputs": '[{"type": "string", "name": "prompt", "required": true}, '
        '{"type": "long", "name": "n", "required": true}]',
        "outputs": None,
        "params": None,
    }
    assert compare_mlmodel_forms(default, default) == []
    assert [d.change for d in compare_mlmodel_forms(default, candidate)] == ["added_required"]


def test_check_signature() -> None:
    check_signature(None)
    check_signature(sig(cols(PROMPT), OUT).to_dict())
    for bad in ({"inputs": "{not json"}, {"inputs": '[{"name": "x"}]'}, {"params": '[{"type": "long"}]'}):
        with pytest.raises(ValueError, match="unreadable signature"):
            check_signature(bad)


def test_compat_imports_only_the_standard_library() -> None:
    # The operator gates rollouts with compat and must not pay for importing mlflow (or numpy,
    # which compat needs only when two tensor dtypes differ).
    code = (
        "import sys; before = set(sys.modules); import serving_app.compat; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "['serving_app']"
