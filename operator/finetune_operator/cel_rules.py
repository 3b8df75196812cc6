"""The cross-field rules of the spec model, mirrored as CEL `x-kubernetes-validations` for the CRD.

Keyed by the schema path (dotted, `[]` for list items) they attach to; messages name the field, as the
model's errors do. tests/unit/test_crd.py checks every rule has a Python mirror case the model refuses too.
"""

from __future__ import annotations

from typing import Any

from finetune_api.architectures import ARCHITECTURES
from finetune_api.spec import LIBRARIES, Dataset

Schema = dict[str, Any]

# The model's path rule (spec._no_parent_segments): no '..' segment between either kind of slash and no
# control characters. Raw strings: Python keeps the backslashes, the CEL literal halves them for RE2.
PARENT_SEGMENT = r"(^|[/\\\\])\\.\\.([/\\\\]|$)"
CONTROL_CHARACTER = r"[\\x00-\\x1f]"
# The model's default image size, for rules that read dataset.imageSize when it is absent.
IMAGE_SIZE = Dataset.model_fields["image_size"].default


def _path_rules(field: str, where: str, optional: bool = True) -> list[Schema]:
    guard = f"!has(self.{field}) || " if optional else ""
    return [
        {
            "rule": f"{guard}!self.{field}.matches('{PARENT_SEGMENT}')",
            "message": f"{where} must not contain '..' segments",
            "fieldPath": f".{field}",
        },
        {
            "rule": f"{guard}!self.{field}.matches('{CONTROL_CHARACTER}')",
            "message": f"{where} must not contain control characters",
            "fieldPath": f".{field}",
        },
    ]


def _ordered_rule(path: str) -> list[Schema]:
    """A [min, max] pair (a two-item list) must be ordered, as the model's validator says."""
    return [{"rule": "self[0] <= self[1]", "message": f"spec.{path} must be [min, max] with min <= max"}]


def _model_rules(where: str) -> list[Schema]:
    """spec.model's rules, also for the distillation teacher's model."""
    return [
        {
            # The model checks torchvision names; timm names are checked by the trainer (it has timm).
            "rule": "(has(self.library) && self.library == 'timm') || !has(self.architecture) || self.architecture in ["
            + ", ".join(f"'{a}'" for a in ARCHITECTURES) + "]",
            "message": f"{where}.architecture must be a torchvision classification model name "
            "(or set model.library: timm)",
            "fieldPath": ".architecture",
        },
        {
            "rule": "!has(self.weights) || !has(self.weights.source) || !(self.weights.source in LIBS) "
            "|| self.weights.source == (has(self.library) ? self.library : 'torchvision')".replace(
                "LIBS", "[" + ", ".join(f"'{x}'" for x in LIBRARIES) + "]"),
            "message": f"{where}.weights.source torchvision or timm needs the same library",
            "fieldPath": ".library",
        },
    ]


def _weights_rules(where: str) -> list[Schema]:
    return [
        {
            "rule": "!has(self.source) || self.source != 'file' || has(self.path) || has(self.uri)",
            "message": f"{where}.path is required when weights.source is 'file'",
            "fieldPath": ".path",
        },
        {
            "rule": "!has(self.uri) || (!has(self.path) && (!has(self.source) || self.source == 'file'))",
            "message": f"{where}.uri needs weights.source 'file' (or unset) and no weights.path",
            "fieldPath": ".uri",
        },
        *_path_rules("path", f"{where}.path"),
    ]


# Cross-field rules the model enforces in Python, keyed by the schema path (dotted,
# `[]` for list items) they attach to. Messages name the field, as the model's do.
CEL_RULES: dict[str, list[Schema]] = {
    "": [
        {
            "rule": "!has(self.workers) || self.workers <= 1 || !has(self.training) || !has(self.training.batchSize)"
            " || self.training.batchSize % (self.workers * (has(self.resources) && has(self.resources.gpus)"
            " && self.resources.gpus > 1 ? self.resources.gpus : 1)) == 0",
            "message": "spec.training.batchSize is the global batch and must be a multiple of the training "
            "processes (workers times max(1, resources.gpus))",
            "fieldPath": ".training",
        },
        {
            "rule": "!has(self.freeze) || !has(self.freeze.schedule) || "
            "self.freeze.schedule[size(self.freeze.schedule) - 1].epoch <= "
            "(has(self.training) && has(self.training.epochs) ? self.training.epochs : 10)",
            "message": "spec.freeze.schedule: its last epoch must be at most training.epochs",
            "fieldPath": ".freeze",
        },
        {
            # finetune_api.serving.within, literally: the mount path itself or below it.
            "rule": "!has(self.serving) || !has(self.serving.smokeTest) || (has(self.volumes) && self.volumes.exists("
            "v, self.serving.smokeTest.dataPath == v.mountPath || self.serving.smokeTest.dataPath.startsWith("
            "v.mountPath.endsWith('/') ? v.mountPath : v.mountPath + '/')))",
            "message": "spec.serving.smokeTest.dataPath must be inside one of spec.volumes",
            "fieldPath": ".serving",
        },
    ],
    "model": _model_rules("spec.model"),
    "model.weights": _weights_rules("spec.model.weights"),
    "dataset": [
        {
            "rule": "(has(self.builtin) ? 1 : 0) + (has(self.path) ? 1 : 0) + (has(self.uri) ? 1 : 0) == 1",
            "message": "spec.dataset: set exactly one of dataset.builtin, dataset.path or dataset.uri",
        },
        {
            "rule": "has(self.uri) || !(has(self.sha256) || has(self.manifest) || has(self.credentials) "
            "|| has(self.endpoint) || has(self.revision))",
            "message": "spec.dataset.sha256, manifest, credentials, endpoint and revision need dataset.uri",
        },
        {
            "rule": "!has(self.testFraction) || self.testFraction + (has(self.valFraction) ? self.valFraction : 0.2)"
            " < 1.0",
            "message": "spec.dataset.testFraction plus dataset.valFraction must be below 1",
            "fieldPath": ".testFraction",
        },
        *_path_rules("path", "spec.dataset.path"),
        {
            "rule": "!has(self.augment) || !has(self.augment.gaussianBlur)"
            " || !has(self.augment.gaussianBlur.kernelSize)"
            f" || self.augment.gaussianBlur.kernelSize <= (has(self.imageSize) ? self.imageSize : {IMAGE_SIZE})",
            "message": "spec.dataset.augment.gaussianBlur.kernelSize must be at most dataset.imageSize",
            "fieldPath": ".augment",
        },
    ],
    "dataset.augment": [
        {
            "rule": "(!has(self.randomResizedCropScale) && !has(self.randomResizedCropRatio))"
            " || (has(self.randomResizedCrop) && self.randomResizedCrop)",
            "message": "spec.dataset.augment.randomResizedCropScale and randomResizedCropRatio need "
            "randomResizedCrop: true",
            "fieldPath": ".randomResizedCrop",
        },
        {
            "rule": "!has(self.colorJitterDetail) || !has(self.colorJitter) || self.colorJitter == 0.0",
            "message": "spec.dataset.augment.colorJitterDetail replaces colorJitter: set one of them",
            "fieldPath": ".colorJitterDetail",
        },
    ],
    "dataset.augment.autoAugment": [
        {
            "rule": "(!has(self.numOps) && !has(self.magnitude)) || self.policy == 'randAugment'",
            "message": "spec.dataset.augment.autoAugment.numOps and magnitude are only valid with policy "
            "'randAugment'",
            "fieldPath": ".policy",
        },
    ],
    "dataset.augment.gaussianBlur.kernelSize": [
        {"rule": "self % 2 == 1", "message": "spec.dataset.augment.gaussianBlur.kernelSize must be odd"},
    ],
    **{path: _ordered_rule(path) for path in ("dataset.augment.randomResizedCropScale",
                                              "dataset.augment.randomResizedCropRatio",
                                              "dataset.augment.affine.scale", "dataset.augment.gaussianBlur.sigma")},
    "freeze": [
        {
            "rule": "!has(self.trainableStages) || (has(self.policy) && self.policy == 'partial')",
            "message": "spec.freeze.trainableStages is only valid with freeze.policy 'partial'",
            "fieldPath": ".trainableStages",
        },
        {
            "rule": "!has(self.layerwiseLrDecay) || self.layerwiseLrDecay == 1.0 || (has(self.policy) && "
            "self.policy != 'head') || has(self.schedule)",
            "message": "spec.freeze.layerwiseLrDecay is only valid with freeze.policy 'partial' or 'full' "
            "(or with a freeze.schedule)",
            "fieldPath": ".layerwiseLrDecay",
        },
        {
            "rule": "!has(self.schedule) || !has(self.policy) || self.policy != 'full'",
            "message": "spec.freeze.schedule is only valid with freeze.policy 'head' or 'partial'",
            "fieldPath": ".schedule",
        },
        {
            # The first step adds stages to those training from epoch 1 (head: 0, partial: trainableStages).
            "rule": "!has(self.schedule) || self.schedule[0].trainableStages > ((has(self.policy) && "
            "self.policy == 'partial') ? (has(self.trainableStages) ? self.trainableStages : 1) : 0)",
            "message": "spec.freeze.schedule must increase: its first trainableStages must be above the stages "
            "training from epoch 1",
            "fieldPath": ".schedule",
        },
    ],
    "freeze.schedule": [
        {
            "rule": "self.map(s, s.epoch).isSorted() && self.map(s, s.trainableStages).isSorted() && "
            "self.all(a, self.exists_one(b, b.epoch == a.epoch || b.trainableStages == a.trainableStages))",
            "message": "spec.freeze.schedule must increase: epochs and trainableStages strictly increasing",
        },
    ],
    "distillation.teacher": [
        {
            "rule": "has(self.fromJob) != has(self.model)",
            "message": "spec.distillation.teacher: set exactly one of teacher.fromJob or teacher.model",
        },
        *_path_rules("fromJob", "spec.distillation.teacher.fromJob"),
    ],
    "distillation.teacher.model": _model_rules("spec.distillation.teacher.model"),
    "distillation.teacher.model.weights": _weights_rules("spec.distillation.teacher.model.weights"),
    "head": [
        {
            "rule": "!has(self.layers) || !has(self.hiddenUnits) || self.hiddenUnits == 0",
            "message": "spec.head: set one of head.layers or head.hiddenUnits (hiddenUnits N is layers [N])",
            "fieldPath": ".layers",
        },
        {
            "rule": "has(self.layers) || (has(self.hiddenUnits) && self.hiddenUnits > 0) || "
            "((!has(self.activation) || self.activation == 'relu') && (!has(self.norm) || self.norm == 'none'))",
            "message": "spec.head.activation and head.norm need hidden layers (head.layers or head.hiddenUnits)",
            "fieldPath": ".activation",
        },
    ],
    "training": [
        {
            # 0 (the default the API server fills in) never conflicts: an invalid epochs is reported alone.
            "rule": "!has(self.warmupEpochs) || self.warmupEpochs == 0 || self.warmupEpochs < (has(self.epochs) ? "
            "self.epochs : 10)",
            "message": "spec.training.warmupEpochs must be below training.epochs",
            "fieldPath": ".warmupEpochs",
        },
    ],
    "output": [
        *_path_rules("path", "spec.output.path"),
        {
            "rule": "!has(self.formats) || self.formats.all(f, self.formats.exists_one(g, g == f))",
            "message": "spec.output.formats has duplicates",
            "fieldPath": ".formats",
        },
        {
            "rule": "!has(self.formats) || 'safetensors' in self.formats",
            "message": "spec.output.formats must include safetensors",
            "fieldPath": ".formats",
        },
    ],
    "serving.inferenceService": [
        {
            "rule": "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
            "message": "spec.serving.inferenceService.minReplicas must be at most maxReplicas",
            "fieldPath": ".minReplicas",
        },
    ],
    "serving.smokeTest": [
        *_path_rules("dataPath", "spec.serving.smokeTest.dataPath", optional=False),
        {
            "rule": "self.dataPath.startsWith('/')",
            "message": "spec.serving.smokeTest.dataPath must be an absolute path",
            "fieldPath": ".dataPath",
        },
    ],
    "volumes[]": [
        {
            "rule": "["
            + ", ".join(
                f"has(self.{s})"
                for s in (
                    "persistentVolumeClaim",
                    "emptyDir",
                    "configMap",
                    "secret",
                    "nfs",
                    "csi",
                    "hostPath",
                    "ephemeral",
                )
            )
            + "].filter(x, x).size() == 1",
            "message": "spec.volumes[]: each volume needs exactly one source of persistentVolumeClaim, "
            "emptyDir, configMap, secret, nfs, csi, hostPath, ephemeral",
        },
        {
            "rule": "self.mountPath.startsWith('/')",
            "message": "spec.volumes[].mountPath must be an absolute path",
            "fieldPath": ".mountPath",
        },
        *_path_rules("mountPath", "spec.volumes[].mountPath", optional=False),
    ],
}
