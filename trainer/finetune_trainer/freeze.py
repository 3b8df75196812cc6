"""Freezing policies, backbone stages, train/eval modes and optimizer parameter groups.

`requires_grad_(False)` alone is not freezing: `model.train()` still updates BatchNorm running
statistics and enables dropout/stochastic depth in the frozen part. `set_train_mode` keeps every
frozen module in eval mode, so frozen parameters *and* buffers stay bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from finetune_api.errors import JobFileError
from finetune_api.spec import Freeze, Training
from finetune_trainer import timm_models

# Modules that hold parameters but are too small to count as a stage of their own.
_NORMS = (nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm)


@dataclass
class Stage:
    name: str
    modules: list[str]  # dotted module names in this stage


@dataclass
class FreezePlan:
    policy: str
    stages: list[Stage]
    trainable_stages: list[str]
    frozen_modules: list[str]  # set to eval() on every train-mode switch
    head_name: str

    def describe(self) -> str:
        if self.policy == "head":
            return f"backbone frozen, training {self.head_name}"
        if self.policy == "full":
            return "all parameters train"
        return f"training {', '.join(self.trainable_stages)} and {self.head_name}"


def _param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _contains(module_name: str, other: str) -> bool:
    return other == module_name or other.startswith(module_name + ".") or module_name == ""


def backbone_stages(model: nn.Module, head_name: str) -> list[Stage]:
    """Ordered stages of the backbone: top-level blocks, expanding containers that hold most params.

    resnet: [conv1+bn1, layer1..layer4]; mobilenet/efficientnet/convnext: features.0..N (+ the
    pre-classifier Linear); vit: conv_proj, encoder layers 0..11 (+ final LayerNorm).
    """
    if timm_models.is_timm(model):
        return [Stage("+".join(mods), mods) for mods in timm_models.stage_groups(model, head_name)]
    stages: list[Stage] = []

    def visit(prefix: str, module: nn.Module) -> None:
        children = [(f"{prefix}{n}", m) for n, m in module.named_children()
                    if f"{prefix}{n}" != head_name and _param_count(m) > 0]
        plain = [(n, m) for n, m in children if not head_name.startswith(n + ".")]
        # A level with fewer than 3 blocks is a wrapper (features/encoder/trunk): look inside its biggest.
        expand = max(plain, key=lambda c: _param_count(c[1]))[0] if 0 < len(plain) < 3 else None
        for name, child in children:
            branching = sum(1 for c in child.children() if _param_count(c) > 0) >= 2
            if head_name.startswith(name + ".") or (name == expand and branching):
                visit(name + ".", child)
            elif isinstance(child, _NORMS) and stages:
                stages[-1].modules.append(name)  # a lone norm belongs to the block before it
            else:
                stages.append(Stage(name, [name]))

    visit("", model)
    return stages


def plan_freeze(model: nn.Module, head_name: str, cfg: Freeze, epoch: int | None = None) -> FreezePlan:
    """What trains in `epoch` (1-based) under freeze.policy and freeze.schedule; with no epoch, the widest
    plan of the run — every stage that trains at some point — which the optimizer, the checkpoints and the
    feature cache's boundary are built for, so they never change when a stage unfreezes."""
    stages = backbone_stages(model, head_name)
    count = cfg.most_stages if epoch is None else cfg.stages_at(epoch)
    if cfg.policy == "full":
        trainable: list[Stage] = stages
    elif count > len(stages):
        field = "freeze.schedule" if cfg.schedule and count > cfg.initial_stages else "freeze.trainableStages"
        raise JobFileError(f"{field}: {count} exceeds the {len(stages)} stages of this backbone")
    else:
        trainable = stages[len(stages) - count:] if count else []
    frozen_modules = [m for s in stages if s not in trainable for m in s.modules]
    policy = "full" if cfg.policy == "full" else ("partial" if trainable else "head")
    return FreezePlan(policy, stages, [s.name for s in trainable], frozen_modules, head_name)


def describe_schedule(model: nn.Module, head_name: str, cfg: Freeze) -> str:
    """freeze.schedule in words, e.g. "epoch 1: backbone frozen, training fc; epoch 3: training layer4 and fc"."""
    if not cfg.schedule:
        return plan_freeze(model, head_name, cfg).describe()
    epochs = [1, *(s.epoch for s in cfg.schedule)]
    return "; ".join(f"epoch {e}: {plan_freeze(model, head_name, cfg, e).describe()}" for e in epochs)


def apply_freeze(model: nn.Module, plan: FreezePlan) -> None:
    """requires_grad per parameter: trainable stages and the head train, everything else is frozen."""
    if plan.policy == "full":
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    trainable = [m for s in plan.stages if s.name in plan.trainable_stages for m in s.modules]
    for name in [*trainable, plan.head_name]:
        model.get_submodule(name).requires_grad_(True)


def set_train_mode(model: nn.Module, plan: FreezePlan) -> None:
    """model.train() for what trains; frozen parts (and their BN statistics) stay in eval mode."""
    if plan.policy == "head":
        model.eval()
        model.get_submodule(plan.head_name).train()
        return
    model.train()
    for name in plan.frozen_modules:
        model.get_submodule(name).eval()
    for module in model.modules():  # stray frozen norms outside any stage (e.g. direct children)
        params = list(module.parameters(recurse=False))
        if isinstance(module, _NORMS) and params and not any(p.requires_grad for p in params):
            module.eval()


def param_groups(model: nn.Module, plan: FreezePlan, training: Training, backbone_lr_scale: float,
                 layerwise_decay: float = 1.0) -> list[dict]:
    """Only trainable parameters reach the optimizer; the backbone gets lr × backboneLrScale.

    With a layer-wise decay below 1, each trainable stage has a group of its own (named after it): the
    stage next to the head gets lr × backboneLrScale, each one further away that times the decay once
    more. Trainable parameters outside every stage (e.g. a ViT's class token) sit with the input side."""
    head_prefix = plan.head_name + "."
    head, backbone = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if name.startswith(head_prefix) else backbone).append((name, p))
    groups = [{"name": "head", "params": [p for _, p in head], "lr": training.learning_rate}]
    backbone_lr = training.learning_rate * backbone_lr_scale
    if backbone and layerwise_decay == 1.0:
        groups.append({"name": "backbone", "params": [p for _, p in backbone], "lr": backbone_lr})
    elif backbone:
        groups += _stage_groups(plan, backbone, backbone_lr, layerwise_decay)
    return groups


def _stage_groups(plan: FreezePlan, backbone: list, lr: float, decay: float) -> list[dict]:
    """One param group per trainable stage, nearest the head first: lr × decay^depth."""
    trainable = [s for s in plan.stages if s.name in plan.trainable_stages][::-1]
    by_stage: dict[str, list] = {s.name: [] for s in trainable}
    outside = []
    for name, p in backbone:
        stage = next((s for s in trainable if any(_contains(m, name) for m in s.modules)), None)
        (by_stage[stage.name] if stage else outside).append(p)
    groups = [{"name": s.name, "params": by_stage[s.name], "lr": lr * decay ** depth}
              for depth, s in enumerate(trainable) if by_stage[s.name]]
    if outside:
        groups.append({"name": "backbone", "params": outside, "lr": lr * decay ** max(len(trainable) - 1, 0)})
    return groups


class FreezeSchedule:
    """freeze.schedule over a run: each epoch's plan, applied to the model as the epoch starts.

    The optimizer, checkpoints and feature cache are built once for the widest plan; a stage that has not
    unfrozen yet only has requires_grad off (no gradients, so optimizers skip it) and stays in eval mode."""

    def __init__(self, model: nn.Module, head_name: str, cfg: Freeze) -> None:
        self.model, self.head_name, self.cfg = model, head_name, cfg
        self.plan = plan_freeze(model, head_name, cfg)
        self._count: int | None = None

    def enter(self, epoch: int) -> str | None:
        """Apply `epoch`'s plan; returns what now trains when that changed (None without a schedule)."""
        if not self.cfg.schedule or self.cfg.stages_at(epoch) == self._count:
            return None
        self._count = self.cfg.stages_at(epoch)
        self.plan = plan_freeze(self.model, self.head_name, self.cfg, epoch)
        apply_freeze(self.model, self.plan)
        return f"freeze.schedule, epoch {epoch}: {self.plan.describe()}"
