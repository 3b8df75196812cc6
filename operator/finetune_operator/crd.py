"""The FineTuneJob CustomResourceDefinition, generated from the shared spec model.

`python -m finetune_operator.crd` prints the YAML that `make crd` writes to
charts/finetune-operator/crds/; a unit test fails when the checked-in file drifts.

The spec schema comes from pydantic's JSON schema, rewritten into a Kubernetes
*structural* schema: $refs inlined, titles dropped, `additionalProperties: false`
removed (structural schemas prune unknown fields instead), free-form objects marked
`x-kubernetes-preserve-unknown-fields`, and the cross-field rules that the model
enforces in Python mirrored as CEL `x-kubernetes-validations`.

`anyOf [X, null]` becomes plain X, deliberately not `nullable: true`: the API server
prunes an explicit null on a non-nullable field, which means "absent" — exactly what
None means in the model — and CEL `has()` stays exact in the cross-field rules.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from finetune_api.spec import API_GROUP, API_VERSION, KIND, FineTuneJobSpec
from finetune_api.status import FineTuneJobStatus
from finetune_operator.cel_rules import CEL_RULES, CONTROL_CHARACTER, PARENT_SEGMENT  # noqa: F401  (tests read them here)

PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["finetune"]
CRD_NAME = f"{PLURAL}.{API_GROUP}"

Schema = dict[str, Any]

def spec_schema() -> Schema:
    """The structural OpenAPI v3 schema of `spec`, from FineTuneJobSpec."""
    raw = FineTuneJobSpec.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _structural(raw, defs)
    # Unique volume names: a list-map keyed by name is the API server's own uniqueness
    # check (error "Duplicate value" at spec.volumes[i]), cheaper than a CEL rule.
    schema["properties"]["volumes"]["x-kubernetes-list-type"] = "map"
    schema["properties"]["volumes"]["x-kubernetes-list-map-keys"] = ["name"]
    schema["properties"]["dataset"]["properties"]["classes"]["x-kubernetes-list-type"] = "set"
    for path, rules in CEL_RULES.items():
        _at(schema, path)["x-kubernetes-validations"] = copy.deepcopy(rules)
    return schema


def status_schema() -> Schema:
    """The structural schema of `status`, from FineTuneJobStatus: every field the operator may write."""
    raw = FineTuneJobStatus.model_json_schema(by_alias=True, mode="serialization")
    defs = raw.pop("$defs", {})
    return _without_defaults(_structural(raw, defs))


def _without_defaults(node: Any) -> Any:
    """Status has no defaults: the operator writes what it derived, the API server adds nothing."""
    if isinstance(node, list):
        return [_without_defaults(n) for n in node]
    if not isinstance(node, dict):
        return node
    return {k: _without_defaults(v) for k, v in node.items() if k != "default"}


def _at(schema: Schema, path: str) -> Schema:
    """The sub-schema at a dotted path ("" is the root); `name[]` steps into a list's items."""
    node = schema
    for part in filter(None, path.split(".")):
        is_list = part.endswith("[]")
        node = node["properties"][part.removesuffix("[]")]
        if is_list:
            node = node["items"]
    return node


def _structural(node: Any, defs: dict[str, Schema]) -> Any:
    """Recursively rewrite one pydantic JSON-schema node into structural form."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in node:
        node = _drop_null_branch(node)
        if "$ref" in node:  # an optional nested model: resolve the branch that is left, absent by default
            return {**_structural(node, defs), _OPTIONAL: True}
    out: Schema = {}
    for key, value in node.items():
        if key in ("title", "$defs"):
            continue
        if key == "additionalProperties":
            if isinstance(value, dict):  # dict[str, str]: a typed map is structural
                out[key] = _structural(value, defs)
            elif value is True:  # dict[str, Any]: a Kubernetes object passed through
                out["x-kubernetes-preserve-unknown-fields"] = True
            continue  # `false` is implied: structural schemas prune unknown fields
        if key == "const":
            out["enum"] = [value]
            continue
        if key in ("exclusiveMinimum", "exclusiveMaximum"):
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
            continue
        if key == "properties":  # a map of field name → schema, not a schema itself
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _structural(value, defs) if key == "items" else value
    _default_empty_containers(out)
    if isinstance(out.get("items"), dict):
        out["items"].pop(_OPTIONAL, None)
    return out


# Marks an optional nested model until its parent has seen it (then removed): it gets no `default: {}`.
_OPTIONAL = "x-finetune-optional"


def _drop_null_branch(node: Schema) -> Schema:
    """`anyOf [X, null]` (an Optional field) → X; a null default means "absent"."""
    branches = [b for b in node["anyOf"] if b.get("type") != "null"]
    if len(branches) != 1:
        raise ValueError(f"unsupported anyOf in spec model: {node['anyOf']!r}")
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if rest.get("default", 0) is None:
        del rest["default"]
    return {**branches[0], **rest}


def _default_empty_containers(schema: Schema) -> None:
    """Optional nested objects default to {} so the API server fills their own defaults.

    pydantic emits no default for `default_factory` fields; without `default: {}` a
    manifest that omits `training` would be stored without `training.epochs: 10`.
    """
    props = schema.get("properties")
    if not props:
        return
    required = set(schema.get("required", []))
    for name, sub in props.items():
        # An optional model (`X | None = None`, e.g. training.ema) means "off" when absent: no default.
        if sub.pop(_OPTIONAL, False) or name in required or "default" in sub:
            continue
        if sub.get("type") == "object" and "properties" in sub:
            sub["default"] = {}


def crd() -> Schema:
    """The complete CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {
                "app.kubernetes.io/name": "finetune-operator",
                "app.kubernetes.io/part-of": "finetune",
            },
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": _root_schema()},
                }
            ],
        },
    }


# The server evaluates each column's JSONPath and shows its first result. Columns that read
# conditions select one by `type` (never "the last condition", Kubeflow's State-column bug);
# Epoch needs "3/10", which one JSONPath cannot format, so the operator publishes
# status.progress.epochText.
PRINTER_COLUMNS: list[Schema] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Epoch", "type": "string", "jsonPath": ".status.progress.epochText"},
    {
        "name": "Loss",
        "type": "number",
        "format": "float",
        "jsonPath": ".status.progress.trainLoss",
        "description": "latest training loss",
    },
    {
        "name": "Val-Acc",
        "type": "number",
        "format": "float",
        "jsonPath": ".status.progress.valAccuracy",
        "description": "validation accuracy of the latest epoch",
    },
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "priority": 1,
    },
    {"name": "ETA", "type": "string", "jsonPath": ".status.progress.etaText"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason", "priority": 1},
    {"name": "Job", "type": "string", "jsonPath": ".status.jobName", "priority": 1},
    {"name": "Resumes", "type": "integer", "jsonPath": ".status.resumeCount", "priority": 1},
]


def _root_schema() -> Schema:
    return {
        "type": "object",
        "description": "Fine-tunes a torchvision image classifier in a batch/v1 Job.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
    }


def render() -> str:
    """The CRD as the YAML document checked into the chart."""
    header = "# Generated by `make crd` (python -m finetune_operator.crd) from the spec model. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
