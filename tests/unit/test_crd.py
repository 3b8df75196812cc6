"""The generated CRD: no drift from the spec model, structural, defaults that agree with pydantic."""

from __future__ import annotations

import codecs
import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from finetune_api.errors import JobFileError
from finetune_api.spec import FineTuneJobSpec, parse_spec
from finetune_api.status import CONDITION_TYPES, PHASES
from finetune_operator import crd

pytestmark = pytest.mark.unit

CHART_CRD = Path(__file__).parents[2] / "charts/finetune-operator/crds/finetunejobs.finetune.dev.yaml"


def test_checked_in_crd_matches_generated() -> None:
    assert CHART_CRD.read_text() == crd.render(), "CRD drifted from the spec model: run `make crd`"


def test_crd_identity() -> None:
    doc = yaml.safe_load(crd.render())
    spec = doc["spec"]
    assert doc["metadata"]["name"] == "finetunejobs.finetune.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["ftj"]
    assert spec["names"]["categories"] == ["finetune"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["storage"] and version["served"]
    assert version["subresources"] == {"status": {}}


def _model_fields(model: type[BaseModel]) -> dict[str, Any]:
    """alias → nested field map (None for leaves), recursively through sub-models and lists of them."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        alias = field.alias or name
        sub = _submodel(field.annotation)
        out[alias] = _model_fields(sub) if sub else None
    return out


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _submodel(arg)
        if found:
            return found
    return None


def _schema_fields(schema: dict[str, Any]) -> dict[str, Any]:
    node = schema.get("items", schema) if schema.get("type") == "array" else schema
    props = node.get("properties")
    if not props:
        return {}
    return {name: (_schema_fields(sub) or None) for name, sub in props.items()}


def test_every_model_field_is_in_the_schema_and_vice_versa() -> None:
    assert _schema_fields(crd.spec_schema()) == _model_fields(FineTuneJobSpec)


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_schema_is_structural() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        if path.endswith(".properties") or path.endswith(".x-kubernetes-validations"):
            continue
        if "rule" in node:
            continue
        for banned in ("$ref", "anyOf", "title", "$defs", "const"):
            assert banned not in node, f"{banned} at {path}"
        assert node.get("additionalProperties") is not False, path
        if any(k in node for k in ("properties", "items", "enum", "maximum", "pattern")):
            assert "type" in node, f"no type at {path}"
        if "properties" in node:
            assert "additionalProperties" not in node, f"properties + additionalProperties at {path}"


def test_free_form_kubernetes_objects_preserve_unknown_fields() -> None:
    volume = crd.spec_schema()["properties"]["volumes"]["items"]["properties"]
    assert volume["persistentVolumeClaim"] == {"x-kubernetes-preserve-unknown-fields": True, "type": "object"}
    tolerations = crd.spec_schema()["properties"]["scheduling"]["properties"]["tolerations"]
    assert tolerations["items"]["x-kubernetes-preserve-unknown-fields"] is True


def test_optional_fields_are_not_nullable_and_have_no_null_default() -> None:
    for path, node in _walk(crd.spec_schema()):
        assert "nullable" not in node, path
        assert node.get("default", 0) is not None, path


def test_exclusive_bounds_use_openapi_v3_booleans() -> None:
    val_fraction = crd.spec_schema()["properties"]["dataset"]["properties"]["valFraction"]
    assert val_fraction["minimum"] == 0.0 and val_fraction["exclusiveMinimum"] is True
    assert val_fraction["maximum"] == 1.0 and val_fraction["exclusiveMaximum"] is True


def test_enums_limits_and_patterns_survive() -> None:
    props = crd.spec_schema()["properties"]
    assert props["training"]["properties"]["optimizer"]["enum"] == ["adam", "adamw", "sgd"]
    # torchvision names: a CEL rule on spec.model (a timm model may be any timm name, checked by the trainer)
    model_rules = " ".join(r["rule"] for r in props["model"]["x-kubernetes-validations"])
    assert "'resnet18'" in model_rules and "self.library == 'timm'" in model_rules
    assert props["model"]["properties"]["architecture"]["pattern"] == "^[a-z0-9][a-z0-9_]*$"
    assert props["training"]["properties"]["epochs"] == {
        "default": 10,
        "maximum": 10000,
        "minimum": 1,
        "type": "integer",
    }
    assert props["resources"]["properties"]["cpu"]["pattern"].startswith("^[0-9]")
    assert props["volumes"]["maxItems"] == 32
    assert props["dataset"]["properties"]["builtin"]["enum"] == ["digits"]
    assert crd.spec_schema()["required"] == ["dataset"]


def test_volume_names_are_unique_by_list_map() -> None:
    volumes = crd.spec_schema()["properties"]["volumes"]
    assert volumes["x-kubernetes-list-type"] == "map"
    assert volumes["x-kubernetes-list-map-keys"] == ["name"]
    assert "name" in volumes["items"]["required"]


def _apply_defaults(schema: dict[str, Any], obj: Any) -> Any:
    """What the API server's structural defaulting does: fill absent fields, recurse into objects."""
    if isinstance(obj, list) and "items" in schema:
        return [_apply_defaults(schema["items"], item) for item in obj]
    if not isinstance(obj, dict) or "properties" not in schema:
        return obj
    out = dict(obj)
    for name, sub in schema["properties"].items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = _apply_defaults(sub, out[name])
    return out


@pytest.mark.parametrize(
    "spec",
    [
        {"dataset": {"builtin": "digits"}},
        {"dataset": {"path": "/data"}, "freeze": {"policy": "partial"}, "training": {"epochs": 3}},
        {"dataset": {"builtin": "digits"}, "volumes": [{"name": "d", "mountPath": "/d", "emptyDir": {}}]},
    ],
)
def test_api_server_defaults_agree_with_pydantic_defaults(spec: dict[str, Any]) -> None:
    defaulted = _apply_defaults(crd.spec_schema(), spec)
    assert defaulted["training"]["epochs"] >= 1  # defaulting reached nested objects
    assert parse_spec(defaulted).to_wire() == parse_spec(spec).to_wire()


# Each CEL rule mirrors a Python rule: a manifest the rule rejects is rejected by the model too,
# and both messages name the same field. (The CEL itself runs on a real API server in tests/e2e.)
CEL_MIRRORS = {
    "spec.training.batchSize is the global batch": {"dataset": {"builtin": "digits"}, "workers": 3},
    "spec.model.weights.path is required": {
        "model": {"weights": {"source": "file"}},
        "dataset": {"builtin": "digits"},
    },
    "spec.model.weights.path must not contain '..'": {
        "model": {"weights": {"path": "/a/../b"}},
        "dataset": {"builtin": "digits"},
    },
    "spec.model.weights.path must not contain control": {
        "model": {"weights": {"path": "/a/\tb"}},
        "dataset": {"builtin": "digits"},
    },
    "spec.dataset: set exactly one": {"dataset": {"builtin": "digits", "path": "/data"}},
    "spec.dataset.sha256, manifest, credentials": {"dataset": {"path": "/data", "sha256": "0" * 64}},
    "spec.model.weights.uri needs weights.source": {
        "model": {"weights": {"source": "none", "uri": "s3://b/w.pt"}}, "dataset": {"builtin": "digits"}},
    "spec.model.architecture must be a torchvision": {"model": {"architecture": "resnet9000"},
                                                      "dataset": {"builtin": "digits"}},
    "spec.model.weights.source torchvision or timm": {
        "model": {"library": "timm", "weights": {"source": "torchvision"}},
        "dataset": {"builtin": "digits"},
    },
    "spec.dataset.testFraction plus": {"dataset": {"builtin": "digits", "testFraction": 0.5, "valFraction": 0.5}},
    "spec.dataset.path must not contain '..'": {"dataset": {"path": "/data\\..\\etc"}},
    "spec.dataset.path must not contain control": {"dataset": {"path": "/data\n"}},
    "spec.dataset.augment.gaussianBlur.kernelSize must be at most": {
        "dataset": {"builtin": "digits", "imageSize": 8, "augment": {"gaussianBlur": {"kernelSize": 9}}},
    },
    "spec.dataset.augment.gaussianBlur.kernelSize must be odd": {
        "dataset": {"builtin": "digits", "augment": {"gaussianBlur": {"kernelSize": 4}}},
    },
    "spec.dataset.augment.randomResizedCropScale and": {
        "dataset": {"builtin": "digits", "augment": {"randomResizedCropScale": [0.5, 1.0]}},
    },
    "spec.dataset.augment.colorJitterDetail replaces": {
        "dataset": {"builtin": "digits", "augment": {"colorJitter": 0.2, "colorJitterDetail": {"hue": 0.1}}},
    },
    "spec.dataset.augment.autoAugment.numOps": {
        "dataset": {"builtin": "digits", "augment": {"autoAugment": {"policy": "trivialAugmentWide", "numOps": 2}}},
    },
    "spec.dataset.augment.randomResizedCropScale must be": {
        "dataset": {"builtin": "digits", "augment": {"randomResizedCrop": True, "randomResizedCropScale": [0.9, 0.5]}},
    },
    "spec.dataset.augment.randomResizedCropRatio must be": {
        "dataset": {"builtin": "digits", "augment": {"randomResizedCrop": True, "randomResizedCropRatio": [2.0, 0.5]}},
    },
    "spec.dataset.augment.affine.scale must be": {
        "dataset": {"builtin": "digits", "augment": {"affine": {"scale": [1.2, 0.8]}}},
    },
    "spec.dataset.augment.gaussianBlur.sigma must be": {
        "dataset": {"builtin": "digits", "augment": {"gaussianBlur": {"sigma": [2.0, 0.1]}}},
    },
    "spec.freeze.trainableStages": {"dataset": {"builtin": "digits"}, "freeze": {"trainableStages": 2}},
    "spec.freeze.layerwiseLrDecay": {"dataset": {"builtin": "digits"}, "freeze": {"layerwiseLrDecay": 0.5}},
    "spec.freeze.schedule is only valid": {
        "dataset": {"builtin": "digits"},
        "freeze": {"policy": "full", "schedule": [{"epoch": 2, "trainableStages": 1}]},
    },
    "spec.freeze.schedule must increase: its first": {
        "dataset": {"builtin": "digits"},
        "freeze": {"policy": "partial", "trainableStages": 2, "schedule": [{"epoch": 2, "trainableStages": 2}]},
    },
    "spec.freeze.schedule must increase: epochs": {
        "dataset": {"builtin": "digits"},
        "freeze": {"schedule": [{"epoch": 3, "trainableStages": 1}, {"epoch": 3, "trainableStages": 2}]},
    },
    "spec.freeze.schedule: its last epoch": {
        "dataset": {"builtin": "digits"}, "training": {"epochs": 4},
        "freeze": {"schedule": [{"epoch": 5, "trainableStages": 1}]},
    },
    "spec.distillation.teacher: set exactly one": {
        "dataset": {"builtin": "digits"}, "distillation": {"teacher": {"fromJob": "t", "model": {}}},
    },
    "spec.distillation.teacher.fromJob must not contain '..'": {
        "dataset": {"builtin": "digits"}, "distillation": {"teacher": {"fromJob": "../t"}},
    },
    "spec.distillation.teacher.fromJob must not contain control": {
        "dataset": {"builtin": "digits"}, "distillation": {"teacher": {"fromJob": "t\x01"}},
    },
    "spec.distillation.teacher.model.architecture": {
        "dataset": {"builtin": "digits"}, "distillation": {"teacher": {"model": {"architecture": "resnet9000"}}},
    },
    "spec.distillation.teacher.model.weights.source": {
        "dataset": {"builtin": "digits"},
        "distillation": {"teacher": {"model": {"library": "timm", "weights": {"source": "torchvision"}}}},
    },
    "spec.distillation.teacher.model.weights.path is required": {
        "dataset": {"builtin": "digits"}, "distillation": {"teacher": {"model": {"weights": {"source": "file"}}}},
    },
    "spec.distillation.teacher.model.weights.uri needs": {
        "dataset": {"builtin": "digits"},
        "distillation": {"teacher": {"model": {"weights": {"path": "/w.pt", "uri": "s3://b/w.pt"}}}},
    },
    "spec.distillation.teacher.model.weights.path must not contain '..'": {
        "dataset": {"builtin": "digits"},
        "distillation": {"teacher": {"model": {"weights": {"source": "file", "path": "/a/../b"}}}},
    },
    "spec.distillation.teacher.model.weights.path must not contain control": {
        "dataset": {"builtin": "digits"},
        "distillation": {"teacher": {"model": {"weights": {"source": "file", "path": "/a\x02"}}}},
    },
    "spec.head: set one of": {"dataset": {"builtin": "digits"}, "head": {"layers": [8], "hiddenUnits": 8}},
    "spec.head.activation and head.norm": {"dataset": {"builtin": "digits"}, "head": {"norm": "layernorm"}},
    "spec.training.warmupEpochs": {"dataset": {"builtin": "digits"}, "training": {"epochs": 3, "warmupEpochs": 3}},
    "spec.output.path must not contain '..'": {"dataset": {"builtin": "digits"}, "output": {"path": "../x"}},
    "spec.output.path must not contain control": {"dataset": {"builtin": "digits"}, "output": {"path": "/o\x1bx"}},
    "spec.output.formats has duplicates": {"dataset": {"builtin": "digits"},
                                           "output": {"formats": ["safetensors", "onnx", "onnx"]}},
    "spec.output.formats must include safetensors": {"dataset": {"builtin": "digits"}, "output": {"formats": ["onnx"]}},
    "spec.serving.smokeTest.dataPath must be inside": {
        "dataset": {"builtin": "digits"}, "serving": {"smokeTest": {"dataPath": "/database/x"}},
        "volumes": [{"name": "d", "mountPath": "/data", "emptyDir": {}}],
    },
    "spec.serving.smokeTest.dataPath must not contain '..'": {
        "dataset": {"builtin": "digits"}, "serving": {"smokeTest": {"dataPath": "/data/../x"}},
        "volumes": [{"name": "d", "mountPath": "/data", "emptyDir": {}}],
    },
    "spec.serving.smokeTest.dataPath must not contain control": {
        "dataset": {"builtin": "digits"}, "serving": {"smokeTest": {"dataPath": "/data/\x01"}},
        "volumes": [{"name": "d", "mountPath": "/data", "emptyDir": {}}],
    },
    "spec.serving.smokeTest.dataPath must be an absolute": {
        "dataset": {"builtin": "digits"}, "serving": {"smokeTest": {"dataPath": "data/x"}},
        "volumes": [{"name": "d", "mountPath": "/data", "emptyDir": {}}],
    },
    "spec.serving.inferenceService.minReplicas": {
        "dataset": {"builtin": "digits"}, "serving": {"inferenceService": {"minReplicas": 3, "maxReplicas": 2}},
    },
    "spec.volumes[]: each volume": {
        "dataset": {"builtin": "digits"},
        "volumes": [{"name": "a", "mountPath": "/a"}],
    },
    "spec.volumes[].mountPath must be": {
        "dataset": {"builtin": "digits"},
        "volumes": [{"name": "a", "mountPath": "rel", "emptyDir": {}}],
    },
    "spec.volumes[].mountPath must not contain '..'": {
        "dataset": {"builtin": "digits"},
        "volumes": [{"name": "a", "mountPath": "/a/..", "emptyDir": {}}],
    },
    "spec.volumes[].mountPath must not contain control": {
        "dataset": {"builtin": "digits"},
        "volumes": [{"name": "a", "mountPath": "/a\x00", "emptyDir": {}}],
    },
}


def test_every_cel_rule_has_a_python_mirror() -> None:
    messages = [r["message"] for rules in crd.CEL_RULES.values() for r in rules]
    for message in messages:
        assert any(message.startswith(prefix) for prefix in CEL_MIRRORS), f"no mirror case for {message!r}"


@pytest.mark.parametrize("prefix", sorted(CEL_MIRRORS))
def test_python_model_rejects_what_the_cel_rule_rejects(prefix: str) -> None:
    with pytest.raises(JobFileError):
        parse_spec(CEL_MIRRORS[prefix])


@pytest.mark.parametrize(
    "path",
    ["/data", "/a/../b", "..", "../x", "/a/..", "a\\..\\b", "/a..b/..c", "/x\ty", "/x\x1fy", "/ok/.../y", "/é/中"],
)
def test_cel_path_regexes_reject_exactly_what_the_model_rejects(path: str) -> None:
    """The RE2 patterns behave as Python's re here (plain classes and escapes): both sides agree per path."""
    patterns = [codecs.decode(p, "unicode_escape") for p in (crd.PARENT_SEGMENT, crd.CONTROL_CHARACTER)]
    cel_rejects = any(re.search(p, path) for p in patterns)
    try:
        parse_spec({"dataset": {"path": path}})
        model_rejects = False
    except JobFileError:
        model_rejects = True
    assert cel_rejects == model_rejects, (path, patterns)


def test_cel_field_paths_point_at_declared_fields() -> None:
    for path, rules in crd.CEL_RULES.items():
        node = crd._at(crd.spec_schema(), path)
        for rule in rules:
            if "fieldPath" in rule:
                assert rule["fieldPath"].lstrip(".") in node["properties"], rule


def _resolve(schema: dict[str, Any], jsonpath: str) -> dict[str, Any]:
    """The schema node a printer-column JSONPath reads (filters stripped)."""
    node = schema
    for part in re.sub(r"\[[^\]]*\]", "", jsonpath).lstrip(".").split("."):
        if node.get("type") == "array":
            node = node["items"]
        node = node["properties"][part]
    return node


def test_printer_columns_read_declared_fields_and_never_the_last_condition() -> None:
    version = crd.crd()["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    root = {
        **root,
        "properties": {**root["properties"], "metadata": {"properties": {"creationTimestamp": {}}}},
    }
    status = root["properties"]["status"]
    names = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Epoch", "Val-Acc", "Age", "Reason"} <= names
    for column in version["additionalPrinterColumns"]:
        path = column["jsonPath"]
        assert "-1" not in path, f"{column['name']} reads the last condition"
        if "conditions" in path:
            assert "[?(@.type==" in path or '[?(@.status=="True")]' in path, f"{column['name']} must filter"
        _resolve(root, path)  # KeyError when a column reads an undeclared field
    reason = next(c for c in version["additionalPrinterColumns"] if c["name"] == "Reason")
    assert reason["priority"] == 1
    epoch = next(c for c in version["additionalPrinterColumns"] if c["name"] == "Epoch")
    assert epoch["jsonPath"] == ".status.progress.epochText"
    assert "epochText" in status["properties"]["progress"]["properties"]


def test_status_schema_declares_phases_and_condition_fields() -> None:
    status = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert status["properties"]["phase"]["enum"] == list(PHASES)
    cond = status["properties"]["conditions"]["items"]["properties"]
    assert {"type", "status", "reason", "message", "lastTransitionTime"} <= set(cond)
    assert "Ready" in CONDITION_TYPES and "Stalled" in CONDITION_TYPES
    for field in (
        "observedGeneration",
        "startTime",
        "completionTime",
        "reason",
        "message",
        "jobName",
        "attempts",
    ):
        assert field in status["properties"], field
    progress = status["properties"]["progress"]["properties"]
    for field in (
        "epoch",
        "totalEpochs",
        "step",
        "totalSteps",
        "percent",
        "trainLoss",
        "valLoss",
        "valAccuracy",
        "bestValAccuracy",
        "samplesPerSecond",
        "etaSeconds",
        "lastUpdateTime",
    ):
        assert field in progress, field
    output = status["properties"]["output"]["properties"]
    assert {"path", "weightsFile", "sha256", "bestEpoch", "valAccuracy"} <= set(output)


def test_main_prints_the_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert crd.main() == 0
    assert yaml.safe_load(capsys.readouterr().out)["kind"] == "CustomResourceDefinition"
