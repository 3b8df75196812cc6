"""spec.freeze: what trains — the head, the backbone's last stages, or everything — and when stages unfreeze.

Part of the FineTuneJob spec (re-exported by finetune_api.spec); like it, no torch here. Rules between
the fields are mirrored as CEL rules in finetune_operator.cel_rules.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from finetune_api.base import _Model

MAX_SCHEDULE_STEPS = 16


class UnfreezeStep(_Model):
    """From `epoch` on, the backbone's last `trainableStages` stages train (gradual unfreezing)."""

    epoch: int = Field(ge=2, le=10000, description="the first epoch (1-based) with this many trainable stages")
    trainable_stages: int = Field(ge=1, le=32, description="how many of the backbone's last stages train from then")


class Freeze(_Model):
    policy: Literal["head", "partial", "full"] = Field(
        "head", description="head: backbone frozen; partial: last N stages train; full: all train"
    )
    trainable_stages: int | None = Field(
        None, ge=1, le=32, description="partial: how many of the backbone's last stages train (default 1)"
    )
    backbone_lr_scale: float = Field(
        0.1, gt=0.0, le=10.0, description="partial/full: learning-rate multiplier for backbone parameters"
    )
    layerwise_lr_decay: float = Field(
        1.0, gt=0.0, le=1.0,
        description="partial/full: each backbone stage further from the head trains at its neighbour's "
        "learning rate times this (learningRate x backboneLrScale x decay^depth, one param group per stage); "
        "1 = off",
    )
    schedule: list[UnfreezeStep] | None = Field(
        None, min_length=1, max_length=MAX_SCHEDULE_STEPS,
        description="head/partial: gradual unfreezing, e.g. [{epoch: 3, trainableStages: 1}, {epoch: 5, "
        "trainableStages: 2}]; epochs and stage counts strictly increasing, each count above the one before "
        "(head: 0, partial: trainableStages)",
    )

    @model_validator(mode="after")
    def _stages_only_with_partial(self) -> Freeze:
        if self.trainable_stages is not None and self.policy != "partial":
            raise ValueError("freeze.trainableStages is only valid with freeze.policy 'partial'")
        if self.layerwise_lr_decay != 1.0 and self.policy == "head" and not self.schedule:
            raise ValueError("freeze.layerwiseLrDecay is only valid with freeze.policy 'partial' or 'full' "
                             "(or with a freeze.schedule)")
        return self

    @model_validator(mode="after")
    def _schedule_increases(self) -> Freeze:
        if not self.schedule:
            return self
        if self.policy == "full":
            raise ValueError("freeze.schedule is only valid with freeze.policy 'head' or 'partial'")
        before_epoch, before = 1, self.initial_stages
        for step in self.schedule:
            if step.epoch <= before_epoch or step.trainable_stages <= before:
                raise ValueError(f"freeze.schedule must increase: epoch {step.epoch} with trainableStages "
                                 f"{step.trainable_stages} follows epoch {before_epoch} with {before}")
            before_epoch, before = step.epoch, step.trainable_stages
        return self

    @property
    def stages(self) -> int:
        return self.trainable_stages or 1

    @property
    def initial_stages(self) -> int:
        """Backbone stages that train from the first epoch (0 for head, every one for full: -1)."""
        return {"head": 0, "partial": self.stages}.get(self.policy, -1)

    def stages_at(self, epoch: int) -> int:
        """Backbone stages that train in `epoch` (1-based) under the schedule."""
        steps = [s.trainable_stages for s in self.schedule or [] if s.epoch <= epoch]
        return steps[-1] if steps else self.initial_stages

    @property
    def most_stages(self) -> int:
        """The most stages that ever train in the run (what the optimizer and the feature cache plan for)."""
        return self.schedule[-1].trainable_stages if self.schedule else self.initial_stages


