"""The FineTuneJob manifests in examples/: each parses with the shared spec model and fits the CRD's schema.

The spec model is what the operator and the trainer enforce; the CRD's OpenAPI schema is what the API
server enforces on `kubectl apply`. An example must pass both. The structural check here covers types,
required fields, enums, bounds, patterns and unknown fields (the API server would prune those silently);
CEL rules are left to the spec model, which implements the same rules, and to the e2e tier's dry run.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_api.spec import API_GROUP, API_VERSION, KIND, parse_job

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
ALL_EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
# FineTuneSweeps (kind FineTuneSweep) have their own tests at the end; the rest are FineTuneJobs.
SWEEPS = [p for p in ALL_EXAMPLES if re.search(r"^kind: *FineTuneSweep *$", p.read_text(), re.M)]
EXAMPLES = [p for p in ALL_EXAMPLES if p not in SWEEPS]
SWEEP_CRD = ROOT / "charts/finetune-operator/crds/finetunesweeps.finetune.dev.yaml"
CRD = ROOT / "charts/finetune-operator/crds/finetunejobs.finetune.dev.yaml"
EXPECTED = {"augmentation-cpu.yaml", "augmented-views-cpu.yaml", "cpu-demo.yaml", "gradual-unfreezing-cpu.yaml",
            "gpu-resnet50.yaml", "gpu-timm-convnext.yaml", "mlp-head-cpu.yaml", "multi-worker-cpu.yaml",
            "partial-unfreeze.yaml", "s3-dataset.yaml", "schedules-cpu.yaml", "suspended-kueue.yaml"}


def _load(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert len(docs) == 1, f"{path.name}: one FineTuneJob per file"
    return docs[0]


def _schema() -> dict[str, Any]:
    if not CRD.exists():
        pytest.skip(f"{CRD.relative_to(ROOT)} not generated yet (make crd)")
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == API_VERSION]
    return version["schema"]["openAPIV3Schema"]


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
}


def structural_errors(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Errors of `value` against an OpenAPI v3 (Kubernetes structural) schema; [] when it fits."""
    where = path or "<root>"
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null is not allowed"]
    if schema.get("x-kubernetes-int-or-string"):
        expected: Any = (int, str)
    else:
        expected = _TYPES.get(schema.get("type", ""), object)
    is_bool = isinstance(value, bool)
    if not isinstance(value, expected) or (is_bool and schema.get("type") in ("integer", "number")):
        return [f"{where}: expected {schema.get('type')}, got {type(value).__name__}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not is_bool:
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is not None and (value < lo or (schema.get("exclusiveMinimum") is True and value == lo)):
            errors.append(f"{where}: {value} is below the minimum {lo}")
        if hi is not None and (value > hi or (schema.get("exclusiveMaximum") is True and value == hi)):
            errors.append(f"{where}: {value} is above the maximum {hi}")
    if isinstance(value, str):
        if len(value) > schema.get("maxLength", len(value)) or len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: length {len(value)} out of bounds")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{where}: more than {schema['maxItems']} items")
        for i, item in enumerate(value):
            errors += structural_errors(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{where}: required field {name!r} is missing")
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = f"{path}.{key}" if path else key
            if props is not None and key in props:
                errors += structural_errors(item, props[key], sub)
            elif isinstance(extra, dict):
                errors += structural_errors(item, extra, sub)
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{sub}: unknown field (the API server would drop it)")
    return errors


def _crd_view(doc: dict[str, Any]) -> dict[str, Any]:
    """What the schema sees: apiVersion/kind/metadata are validated by the API server itself."""
    return {k: v for k, v in doc.items() if k != "metadata"}


def test_the_documented_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= EXPECTED


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_a_valid_finetunejob(path: Path) -> None:
    doc = _load(path)
    assert doc["apiVersion"] == f"{API_GROUP}/{API_VERSION}"
    assert doc["kind"] == KIND
    name = doc["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, name
    assert "namespace" not in doc["metadata"], "examples apply to the namespace the user picks"
    job = parse_job(doc)  # raises JobFileError with the reason
    assert job.name == name


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_fits_the_crd_schema(path: Path) -> None:
    assert structural_errors(_crd_view(_load(path)), _schema()) == []


def test_cpu_demo_is_small_and_offline() -> None:
    spec = parse_job(_load(ROOT / "examples/cpu-demo.yaml")).spec
    assert spec.dataset.builtin == "digits"
    assert spec.model.architecture == "resnet18" and spec.model.weights.source == "none"
    assert 16 <= spec.dataset.image_size <= 32
    assert spec.training.epochs == 2
    assert spec.resources.gpus == 0 and spec.resources.cpu and spec.resources.memory
    assert not spec.volumes, "the e2e suite runs it on any cluster: no PVCs"


def test_gpu_resnet50_uses_imagenet_weights_a_pvc_and_a_gpu() -> None:
    spec = parse_job(_load(ROOT / "examples/gpu-resnet50.yaml")).spec
    assert spec.model.architecture == "resnet50"
    assert spec.model.weights.source == "torchvision" and spec.model.weights.name.startswith("IMAGENET1K")
    assert spec.dataset.path and spec.dataset.path.startswith("/data")
    assert any(v.persistent_volume_claim and spec.dataset.path.startswith(v.mount_path) for v in spec.volumes)
    assert spec.resources.gpus == 1
    assert spec.training.precision == "auto"


def test_gpu_timm_names_a_timm_model_that_exists_with_its_pretrained_tag() -> None:
    import timm

    spec = parse_job(_load(ROOT / "examples/gpu-timm-convnext.yaml")).spec
    assert spec.model.library == "timm" and spec.model.weights.source == "timm"
    assert timm.is_model(spec.model.architecture)
    assert f"{spec.model.architecture}.{spec.model.weights.name}" in timm.list_pretrained(spec.model.architecture + "*")
    assert spec.dataset.test_fraction and spec.freeze.policy == "partial" and spec.resources.gpus == 1


def test_partial_unfreeze_unfreezes_part_of_the_backbone() -> None:
    spec = parse_job(_load(ROOT / "examples/partial-unfreeze.yaml")).spec
    assert spec.freeze.policy == "partial" and spec.freeze.stages >= 1
    assert spec.freeze.backbone_lr_scale < 1.0


def test_suspended_kueue_is_suspended_and_queued() -> None:
    doc = _load(ROOT / "examples/suspended-kueue.yaml")
    assert doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"]
    spec = parse_job(doc).spec
    assert spec.run_policy.suspend is True
    assert spec.resources.cpu and spec.resources.memory, "Kueue admits by resource requests"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["spec"]["training"].update(optimizer="lion"), "is not one of"),
        (lambda d: d["spec"].pop("dataset"), "required field 'dataset'"),
        (lambda d: d["spec"]["training"].update(epochs=0), "below the minimum"),
        (lambda d: d["spec"]["training"].update(epochz=3), "unknown field"),
        (lambda d: d["spec"]["resources"].update(memory="lots"), "does not match"),
        (lambda d: d["spec"]["training"].update(epochs="2"), "expected integer"),
    ],
    ids=["enum", "required", "minimum", "unknown", "pattern", "type"],
)
def test_the_schema_check_catches_broken_manifests(mutate: Any, expected: str) -> None:
    doc = copy.deepcopy(_load(ROOT / "examples/cpu-demo.yaml"))
    mutate(doc)
    errors = structural_errors(_crd_view(doc), _schema())
    assert any(expected in e for e in errors), errors


def test_the_sweep_example_exists() -> None:
    assert [p.name for p in SWEEPS] == ["sweep-cpu.yaml"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_sweep_example_parses_and_fits_the_sweep_crd(path: Path) -> None:
    from finetune_api.sweep import parse_sweep

    doc = _load(path)
    sweep = parse_sweep(doc)  # every parameter path exists and every probed value makes a valid trial
    assert sweep.name == doc["metadata"]["name"] and "namespace" not in doc["metadata"]
    crd = yaml.safe_load(SWEEP_CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == API_VERSION]
    assert structural_errors(_crd_view(doc), version["schema"]["openAPIV3Schema"]) == []
    assert sweep.spec.template.spec.resources.gpus == 0 and sweep.spec.template.spec.dataset.builtin == "digits"
