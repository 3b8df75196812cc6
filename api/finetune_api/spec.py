"""The FineTuneJob spec: one typed model shared by the trainer and the operator.

This module must never import torch or kubernetes: the operator imports it to validate
specs and to generate the CRD schema, and it has neither installed.

Field names are the v1alpha1 API contract (DESIGN §2): camelCase on the wire,
snake_case in Python. Unknown fields are errors, never silently dropped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from finetune_api.augment import ADDED_FIELDS as AUGMENT_ADDED_FIELDS
from finetune_api.augment import (  # noqa: F401  (re-exported: dataset.augment is part of the spec)
    AUTO_AUGMENT_POLICIES,
    Affine,
    Augment,
    AutoAugment,
    ColorJitterDetail,
    GaussianBlur,
)
from finetune_api.backbone import LIBRARIES, TIMM_NAME_PATTERN, ModelSpec, Weights  # noqa: F401
from finetune_api.base import (  # noqa: F401  (re-exported: the patterns and limits are part of the spec's API)
    DNS_LABEL_PATTERN,
    MAX_NAME,
    MAX_PATH,
    QUANTITY_PATTERN,
    PathStr,
    _Model,
    _no_parent_segments,
)
from finetune_api.cluster import VOLUME_SOURCES, K8sObject, Resources, RunPolicy, Scheduling, Volume  # noqa: F401
from finetune_api.distill import Distillation, Teacher  # noqa: F401
from finetune_api.documents import read_yaml_document
from finetune_api.errors import JobFileError, format_validation_error
from finetune_api.freeze import Freeze, UnfreezeStep  # noqa: F401
from finetune_api.head import Head
from finetune_api.output import FORMATS, Output, Parity  # noqa: F401  (re-exported: spec.output)
from finetune_api.serving import InferenceServiceSpec, Serving, SmokeTest, within  # noqa: F401  (spec.serving)
from finetune_api.source import Credentials, DatasetSource, fingerprint_fields  # noqa: F401  (dataset.uri …)

API_GROUP = "finetune.dev"
API_VERSION = "v1alpha1"
KIND = "FineTuneJob"


class Dataset(DatasetSource):
    builtin: Literal["digits"] | None = Field(None, description="bundled demo data (no network)")
    path: PathStr | None = Field(None, description="ImageFolder root: train/ and val/, or class folders")
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="val split when there is no val/ folder")
    test_fraction: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="held-out test split taken before the val split (seeded) when there is no test/ folder; "
        "evaluated once with the best weights",
    )
    image_size: int = Field(224, ge=8, le=1024, description="side of the square network input")
    classes: list[Annotated[str, Field(min_length=1, max_length=MAX_NAME)]] | None = Field(
        None, max_length=10000, description="use only these class names (default: all)"
    )
    max_images_per_class: int | None = Field(
        None, ge=1, le=10_000_000, description="cap training images per class (seeded; val keeps all)"
    )
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes")
    augment: Augment = Field(default_factory=Augment)

    @model_validator(mode="after")
    def _one_source(self) -> Dataset:
        _no_parent_segments(self.path)
        if sum(x is not None for x in (self.builtin, self.path, self.uri)) != 1:
            raise ValueError("set exactly one of dataset.builtin, dataset.path or dataset.uri")
        self.check_dataset_source()
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("dataset.classes has duplicates")
        if self.test_fraction is not None and self.test_fraction + self.val_fraction >= 1.0:
            raise ValueError("dataset.testFraction plus dataset.valFraction must be below 1")
        return self

    @model_validator(mode="after")
    def _blur_fits(self) -> Dataset:
        # A kernel wider than the image cannot be reflect-padded: refused here rather than mid-training.
        blur = self.augment.gaussian_blur
        if blur is not None and blur.kernel_size > self.image_size:
            raise ValueError(f"dataset.augment.gaussianBlur.kernelSize ({blur.kernel_size}) must be at most "
                             f"dataset.imageSize ({self.image_size})")
        return self


class Ema(_Model):
    decay: float = Field(0.999, gt=0.0, lt=1.0, description="weight of the running average at each optimizer step")


class EarlyStopping(_Model):
    patience: int = Field(0, ge=0, le=10000, description="epochs without improvement before stopping (0 = off)")
    target_accuracy: float | None = Field(None, gt=0.0, le=1.0, description="stop once val accuracy reaches it")


MAX_CACHE_VIEWS = 64  # training.featureCacheViews


class Training(_Model):
    epochs: int = Field(10, ge=1, le=10000)
    batch_size: int = Field(
        32, ge=1, le=65536,
        description="images per optimizer step over all workers (the global batch); with several training "
        "processes each takes an equal share, so it must be a multiple of their number",
    )
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = Field(0.001, gt=0.0, le=10.0)
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only")
    scheduler: Literal["none", "cosine", "step"] = "none"
    step_size: int = Field(10, ge=1, le=10000, description="step scheduler: epochs between decays")
    gamma: float = Field(0.1, gt=0.0, le=1.0, description="step scheduler: decay factor")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16/fp16 autocast on CUDA, bf16 on CPUs with native bf16, else fp32 "
        "(fp32 for bit-for-bit reproducible runs)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    early_stopping: EarlyStopping = Field(default_factory=EarlyStopping)
    log_every_steps: int = Field(10, ge=1, le=100000, description="progress events every N steps")
    feature_cache: Literal["auto", "off"] = Field(
        "auto", description="auto: with a frozen backbone and fixed inputs, compute backbone features once"
    )
    feature_cache_views: int = Field(0, ge=0, le=MAX_CACHE_VIEWS, description="random augmentation with a frozen "
                                     "part: it runs once over K augmented copies per training image, each epoch "
                                     "samples one (0 = off: random augmentation turns the cache off)")
    feature_cache_dir: PathStr | None = Field(
        None, description="a folder shared by several jobs (a sweep's trials) for the feature cache instead of "
        "<output>/cache: files there are published atomically, verified when read, kept after the export for the "
        "other jobs, and computed by one job at a time (the others wait and reuse them)")
    frozen_pass: Literal["auto", "eager", "torchscript", "bf16-weights"] = Field(
        "auto", description="how the feature cache's frozen pass runs on CPUs with bf16: auto: passes of 1024 "
        "images or more through a TorchScript-compiled bf16 prefix, kept only if it agrees with eager and is faster "
        "on the first batch (timed), shorter passes through the bf16-weights prefix, kept only if it agrees with "
        "eager; eager: the model op by op under autocast; torchscript: the compiled prefix whatever the pass's "
        "size; bf16-weights: the prefix with its weights cast to bf16 once, op by op (all but eager: bf16 CPU "
        "passes only, checked against eager on the first batch)")
    frozen_pass_batch_size: int | None = Field(
        None, ge=1, le=65536, description="images per batch of the feature cache's frozen pass (inference only, "
        "no gradients; default on CPUs: 4 per torch thread, at least 8 — small batches run fastest there; on CUDA: "
        "batchSize, at least 128); augmented views count as images; the final evaluation over the held-out split runs "
        "at this batch size too")
    frozen_pass_workers: int | None = Field(
        None, ge=0, le=64, description="DataLoader worker processes decoding images while the frozen pass runs "
        "(0: in the pass's own process; default: dataset.numWorkers when set, else none below 4 cores, then one per "
        "4 cores up to 4; on CUDA every core but one, up to 4)")
    frozen_pass_streams: int | None = Field(
        None, ge=1, le=64, description="CPU inference passes (the feature cache's frozen pass, the final evaluation): "
        "batches computed side by side, each stream decoding its own and running the network on its share of the "
        "torch threads (default: one stream per thread below 4 threads for bf16 passes without loader workers, "
        "else 1; fp32 passes default to 1, bit-for-bit the plain loop's numbers; more than 1 takes no loader "
        "workers)")
    warmup_epochs: int = Field(
        0, ge=0, le=1000,
        description="linear learning-rate warm-up: epoch e of the first N trains at learningRate x e/(N+1), "
        "then the scheduler runs over the remaining epochs (0 = off)",
    )
    grad_clip_norm: float | None = Field(
        None, gt=0.0, le=1e6, description="clip the global gradient norm to this before each step (default: off)")
    ema: Ema | None = Field(
        None, description="keep an exponential moving average of the trained weights, evaluated every epoch; "
        "exported instead of the raw weights when it scores better (default: off)")

    @model_validator(mode="after")
    def _cache_dir_safe(self) -> Training:
        _no_parent_segments(self.feature_cache_dir)
        return self

    @model_validator(mode="after")
    def _warmup_fits(self) -> Training:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"training.warmupEpochs ({self.warmup_epochs}) must be below training.epochs "
                             f"({self.epochs})")
        return self


class FineTuneJobSpec(_Model):
    """spec of a FineTuneJob (v1alpha1)."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    dataset: Dataset
    freeze: Freeze = Field(default_factory=Freeze)
    head: Head = Field(default_factory=Head)
    training: Training = Field(default_factory=Training)
    output: Output = Field(default_factory=Output)
    distillation: Distillation | None = Field(
        None, description="learn from a teacher model as well as from the labels (default: off)")
    serving: Serving | None = Field(
        None, description="cluster-only: once the job succeeds, serve its export with a KServe InferenceService, "
        "smoke-test it and promote it (default: off)")
    # cluster-only: ignored by local runs
    image: str | None = Field(None, max_length=512, description="trainer image (default: operator setting)")
    resources: Resources = Field(default_factory=Resources)
    volumes: list[Volume] = Field(default_factory=list, max_length=32)
    scheduling: Scheduling = Field(default_factory=Scheduling)
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    workers: int = Field(
        1, ge=1, le=64,
        description="trainer pods (data parallel with torchrun); with more than one, each pod runs one "
        "training process per GPU (one on CPU) and resources apply per pod",
    )

    @model_validator(mode="after")
    def _unique_volumes(self) -> FineTuneJobSpec:
        names = [v.name for v in self.volumes]
        if len(set(names)) != len(names):
            raise ValueError("volumes[].name must be unique")
        return self

    @model_validator(mode="after")
    def _smoke_data_mounted(self) -> FineTuneJobSpec:
        smoke = self.serving.smoke_test if self.serving else None
        if smoke is not None and not any(within(smoke.data_path, v.mount_path) for v in self.volumes):
            raise ValueError(f"serving.smokeTest.dataPath ({smoke.data_path}) must be inside one of spec.volumes "
                             "(the smoke-test pod mounts that volume)")
        return self

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> FineTuneJobSpec:
        # Refused rather than rounded: the global batch (and so the learning-rate schedule) stays what
        # the user wrote, whatever the number of workers.
        if self.training.batch_size % self.processes:
            raise ValueError(f"training.batchSize ({self.training.batch_size}) is the global batch and must be a "
                             f"multiple of the {self.processes} training processes "
                             "(workers times max(1, resources.gpus))")
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> FineTuneJobSpec:
        schedule = self.freeze.schedule
        if schedule and schedule[-1].epoch > self.training.epochs:
            raise ValueError(f"freeze.schedule: epoch {schedule[-1].epoch} is after the last of training.epochs "
                             f"({self.training.epochs})")
        return self

    @property
    def processes(self) -> int:
        """Training processes in a cluster run: one per GPU (or one) in each of `workers` pods.

        A single worker keeps running one process (on one GPU) without torchrun.
        """
        return self.workers * max(1, self.resources.gpus) if self.workers > 1 else 1

    def resume_fingerprint(self) -> str:
        """Hash of everything that makes a checkpoint incompatible if changed.

        Epochs, early stopping, logging and cluster settings may change between attempts
        (e.g. extend training); architecture, data, freezing, head and optimisation may not.
        """
        # Fields added after v1alpha1's first release leave the fingerprint of a spec that does not use
        # them unchanged, so outputs written by an earlier trainer still resume.
        t = _dump(self.training, {"warmup_epochs": 0, "grad_clip_norm": None, "ema": None,
                                  "feature_cache_views": 0},
                  {"epochs", "early_stopping", "log_every_steps", "device", "feature_cache", "frozen_pass",
                   "feature_cache_dir", "frozen_pass_batch_size", "frozen_pass_workers",
                   "frozen_pass_streams"})
        model = self.model.model_dump(exclude={"library"} if self.model.library == "torchvision" else set())
        model["weights"] = self.model.weights.model_dump(include=fingerprint_fields(self.model.weights))
        dataset = self.dataset.model_dump(exclude={"num_workers", "augment", *(() if self.dataset.test_fraction else
                                                                                 ("test_fraction",))})
        dataset = {k: v for k, v in dataset.items() if k in fingerprint_fields(self.dataset)}
        dataset["augment"] = _dump(self.dataset.augment, AUGMENT_ADDED_FIELDS)
        relevant = {
            "model": model,
            "dataset": dataset,
            "freeze": _dump(self.freeze, {"layerwise_lr_decay": 1.0, "schedule": None}),
            "head": _dump(self.head, {"layers": None, "activation": "relu", "norm": "none"}),
            "training": t,
            **({"distillation": self.distillation.model_dump()} if self.distillation else {}),
        }
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _dump(model: _Model, added: dict[str, Any], exclude: set[str] = frozenset()) -> dict[str, Any]:
    """model_dump for the fingerprint, without fields added later while they hold their defaults."""
    unused = {name for name, default in added.items() if getattr(model, name) == default}
    return model.model_dump(exclude=set(exclude) | unused)


class JobFile(BaseModel):
    """A parsed job file: the name (from metadata when present) and its spec."""

    name: str = "finetune"
    spec: FineTuneJobSpec


def parse_spec(data: Any, prefix: str = "spec") -> FineTuneJobSpec:
    """Validate a spec dict (camelCase), raising JobFileError with a readable one-line message."""
    if not isinstance(data, dict):
        raise JobFileError(f"{prefix}: must be a mapping, got {type(data).__name__}")
    try:
        return FineTuneJobSpec.model_validate(data)
    except ValidationError as err:
        raise JobFileError(format_validation_error(err, prefix)) from None


def check_type(doc: dict, kind: str) -> None:
    """A manifest's kind and apiVersion, when given, must be ours (a missing one is taken to be)."""
    if doc.get("kind", kind) != kind:
        raise JobFileError(f"kind: expected {kind!r}, got {doc.get('kind')!r}")
    expected = f"{API_GROUP}/{API_VERSION}"
    if doc.get("apiVersion", expected) != expected:
        raise JobFileError(f"apiVersion: expected {expected!r}, got {doc.get('apiVersion')!r}")


def parse_job(doc: Any) -> JobFile:
    """A full FineTuneJob manifest, or just its spec."""
    if not isinstance(doc, dict):
        raise JobFileError("job file must be a YAML mapping (a FineTuneJob or its spec)")
    if "kind" in doc or "apiVersion" in doc or "spec" in doc:
        check_type(doc, KIND)
        name = str((doc.get("metadata") or {}).get("name") or "finetune")
        return JobFile(name=name, spec=parse_spec(doc.get("spec")))
    return JobFile(spec=parse_spec(doc))


def read_job_document(path: str | Path) -> Any:
    """The job file's YAML, unvalidated; unreadable, oversized, undecodable or bad YAML become a JobFileError."""
    return read_yaml_document(path, "job file")


def load_job(path: str | Path) -> JobFile:
    """Read and validate a job file; every problem becomes a JobFileError."""
    return parse_job(read_job_document(path))
