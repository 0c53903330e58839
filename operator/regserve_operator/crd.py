"""CRD YAML generated from the pydantic models in `spec.py` (the one source of the schema).

Pydantic emits JSON Schema; Kubernetes wants a *structural* OpenAPI v3 schema: no `$ref`, no `anyOf`
with `null`, no `title`, every object typed. This module rewrites the one into the other.
"""

from __future__ import annotations

import copy
import json
from typing import Any, cast

import yaml

from regserve_operator import spec as s

# Keys pydantic emits that a structural schema does not want.
_DROP = {"title", "$defs"}


def openapi_schema(model: type[s.BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    return _structural(raw, defs)


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return _structural({**target, **extra}, defs)
    if "anyOf" in node:
        return _structural(_without_null(node), defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "additionalProperties" and value is False):
            continue  # pruning already drops unknown fields
        _keyword(out, key, value, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("default") is None:
        out.pop("default", None)
    return out


def _keyword(out: dict[str, Any], key: str, value: Any, defs: dict[str, Any]) -> None:
    """One JSON Schema keyword written into `out` as a structural OpenAPI v3 schema has it."""
    if key == "properties":
        if value:  # the API server drops an empty one: written, it would read back as drift
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
    elif key == "const":
        out["enum"] = [value]
    elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
        # JSON Schema's numeric bound is OpenAPI v3's (Kubernetes') bound plus a boolean flag.
        out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
        out[key] = True
    else:
        out[key] = _structural(value, defs)


def _without_null(node: dict[str, Any]) -> dict[str, Any]:
    """An optional field (`anyOf: [T, null]`) as T: structural schemas express optional by omission."""
    variants = [v for v in node["anyOf"] if v.get("type") != "null"]
    if len(variants) != 1:
        raise ValueError(f"cannot express union in a structural schema: {node}")
    merged = {**{k: v for k, v in node.items() if k != "anyOf"}, **variants[0]}
    if merged.get("default", 0) is None:
        del merged["default"]
    return merged


def crd_schema() -> dict[str, Any]:
    spec_schema = openapi_schema(s.RegisteredModelServingSpec)
    status_schema = openapi_schema(s.RegisteredModelServingStatus)
    # kopf records handler progress and results under status; keep whatever it writes.
    status_schema["x-kubernetes-preserve-unknown-fields"] = True
    status_schema.pop("additionalProperties", None)
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }


PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.name"},
    {"name": "Selector", "type": "string", "jsonPath": ".status.selector"},
    {"name": "Serving", "type": "string", "jsonPath": ".status.servingVersion"},
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Rollout", "type": "string", "jsonPath": ".status.rolloutPhase"},
    {"name": "Weight", "type": "integer", "jsonPath": ".status.rolloutWeight", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{s.PLURAL}.{s.GROUP}"},
        "spec": {
            "group": s.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": s.KIND,
                "listKind": f"{s.KIND}List",
                "plural": s.PLURAL,
                "singular": s.SINGULAR,
                "shortNames": s.SHORT_NAMES,
                "categories": ["regserve"],
            },
            "versions": [
                {
                    "name": s.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": crd_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `regserve crd` from operator/regserve_operator/spec.py. Do not edit.\n"


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=120)


# --------------------------------------------------------------------------------------------------
# The API reference page (docs/reference/crd.md), from the same schema the CRD is built from


def reference_markdown() -> str:
    """Every spec and status field of the CRD with its type, default, bounds and description, and the
    CEL rules, as a Markdown page; regenerated with the CRD so the reference cannot drift from it."""
    lines = [
        "# API reference: RegisteredModelServing",
        "",
        "<!-- Generated by `make chart-sync` from operator/regserve_operator/spec.py. Do not edit. -->",
        "",
        f"`apiVersion: {s.GROUP}/{s.VERSION}`, `kind: {s.KIND}` (plural `{s.PLURAL}`, short names "
        + ", ".join(f"`{name}`" for name in s.SHORT_NAMES)
        + "). Namespaced, with a status subresource.",
        "",
        "`kubectl get rms` shows these columns (`-o wide` adds those of priority 1):",
        "",
        "| column | JSON path | priority |",
        "|---|---|---|",
    ]
    columns = [cast(dict[str, Any], column) for column in PRINTER_COLUMNS]
    lines += [f"| {c['name']} | `{c['jsonPath']}` | {c.get('priority', 0)} |" for c in columns]
    for section, model in (
        ("spec", s.RegisteredModelServingSpec),
        ("status", s.RegisteredModelServingStatus),
    ):
        schema = openapi_schema(model)
        lines += ["", f"## {section}", "", "| field | type | default | description |", "|---|---|---|---|"]
        rules: list[tuple[str, dict[str, Any]]] = []
        lines += [_reference_row(path, node) for path, node in _fields(section, schema, rules)]
        if rules:
            lines += ["", f"Validation rules on {section} (CEL, checked at `kubectl apply`):", ""]
            lines += [f"- `{path}`: {rule['message']} (`{rule['rule']}`)" for path, rule in rules]
    return "\n".join(lines) + "\n"


def _fields(
    path: str, node: dict[str, Any], rules: list[tuple[str, dict[str, Any]]]
) -> list[tuple[str, dict[str, Any]]]:
    """(path, schema) of every field below `node`, depth first; collects the CEL rules on the way."""
    rules += [(path, rule) for rule in node.get("x-kubernetes-validations", [])]
    out: list[tuple[str, dict[str, Any]]] = []
    required = set(node.get("required", []))
    for name, sub in node.get("properties", {}).items():
        child = f"{path}.{name}"
        out.append((child, {**sub, "x-required": name in required}))
        out += _fields(child, sub, rules)
    items = node.get("items")
    if isinstance(items, dict) and ("properties" in items or "items" in items):
        out += _fields(f"{path}[]", items, rules)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and "properties" in extra:
        out += _fields(f"{path}.<key>", extra, rules)
    return out


def _type_name(node: dict[str, Any]) -> str:
    kind = str(node.get("type", "any"))
    if kind == "array":
        return f"[]{_type_name(node.get('items', {}))}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map[string]{_type_name(node['additionalProperties'])}"
    return kind


def _constraints(node: dict[str, Any]) -> list[str]:
    notes = []
    if node.get("x-required"):
        notes.append("required")
    if "enum" in node:
        notes.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    bounds = (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minLength", "length ≥"),
        ("maxLength", "length ≤"),
        ("minItems", "items ≥"),
        ("maxItems", "items ≤"),
    )
    notes += [f"{label} {node[key]}" for key, label in bounds if key in node]
    if "pattern" in node:
        notes.append(f"pattern `{node['pattern']}`")
    return notes


def _reference_row(path: str, node: dict[str, Any]) -> str:
    default = f"`{json.dumps(node['default'], separators=(',', ':'))}`" if "default" in node else ""
    text = " ".join(str(node.get("description", "")).split())
    notes = _constraints(node)
    if notes:
        text = f"{text} ({'; '.join(notes)})" if text else f"({'; '.join(notes)})"
    cells = [f"`{path}`", f"`{_type_name(node)}`", default, text]
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
