"""spec.distillation: a student learns from a fine-tuned teacher (knowledge distillation).

Part of the FineTuneJob spec (re-exported by finetune_api.spec); like it, no torch here. Names follow
DeiT and timm: `type` soft | hard (DeiT's `distillation-type`), `alpha`, `temperature` (DeiT's tau).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from finetune_api.backbone import ModelSpec
from finetune_api.base import MAX_PATH, _Model, _no_parent_segments


class Teacher(_Model):
    """Exactly one of `fromJob` or `model`."""

    from_job: str | None = Field(
        None, min_length=1, max_length=MAX_PATH,
        description="on a cluster: the name of a Succeeded FineTuneJob in this namespace whose export is the "
        "teacher; in a local run: the path of an export folder (model.safetensors + model.json)",
    )
    model: ModelSpec | None = Field(
        None, description="a teacher model with its own weights (its classes must be the student's, read from "
        "the model.json beside a weights file)",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Teacher:
        if (self.from_job is None) == (self.model is None):
            raise ValueError("distillation.teacher: set exactly one of teacher.fromJob or teacher.model")
        _no_parent_segments(self.from_job)
        return self


class Distillation(_Model):
    """The loss is (1 - alpha) x task loss + alpha x distillation loss."""

    teacher: Teacher
    type: Literal["soft", "hard", "feature"] = Field(
        "soft", description="soft: KL divergence of the softened outputs at temperature T, times T^2; hard: cross "
        "entropy on the teacher's top class; feature: MSE between pooled pre-logits features (a learned "
        "projection when their widths differ)",
    )
    temperature: float = Field(4.0, gt=0.0, le=100.0, description="soft: the softmax temperature T")
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the distillation term (the task loss gets "
                         "1 - alpha)")
