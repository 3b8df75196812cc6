"""Where and how numbers are computed: device, precisions, memory layout, optimizer, schedule, seeds."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from finetune_api.spec import FineTuneJobSpec, Training
from finetune_trainer.distributed import Dist
from finetune_trainer.engine import Compute, Precision

log = logging.getLogger(__name__)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            log.warning("training.device cuda requested but no CUDA device is visible; using cpu")
            return torch.device("cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def device_for(choice: str, dist: Dist) -> torch.device:
    """The training device; each rank of a GPU group takes the GPU of its local rank."""
    device = resolve_device(choice)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def cpu_has_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """auto: bf16 (or fp16) autocast on CUDA; on CPUs with native bf16 kernels (AVX512-BF16, AMX) bf16
    autocast too — the same mixed precision, fp32 weights and optimizer state, with faster backward
    passes — else fp32. fp16 has no fast CPU path, so it falls back."""
    cuda = device.type == "cuda"
    if choice == "auto":
        choice = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else \
            ("bf16" if cpu_has_bf16() else "fp32")
    if choice == "fp16" and not cuda:
        log.warning("training.precision fp16 needs CUDA; using fp32 on cpu")
        choice = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    return Precision(choice, dtype, device.type)


def resolve_frozen_precision(choice: str, device: torch.device, training: Precision) -> Precision:
    """Frozen forward passes have no gradients to protect: auto uses bf16 on CPUs with bf16 kernels."""
    if choice == "auto" and device.type == "cpu" and cpu_has_bf16():
        return Precision("bf16", torch.bfloat16, "cpu")
    return training


@dataclass
class Env:
    """Where and how numbers are computed: device, training precision, frozen-pass precision, layout."""

    device: torch.device
    precision: Precision
    frozen_precision: Precision
    channels_last: bool

    @classmethod
    def create(cls, spec: FineTuneJobSpec, model: nn.Module, device: torch.device) -> Env:
        precision = resolve_precision(spec.training.precision, device)
        frozen = resolve_frozen_precision(spec.training.precision, device, precision)
        # channels_last is what oneDNN and cuDNN convolutions are fastest with from 64 px up; below
        # that (the 32 px digits) the reorders cost more than they save.
        channels_last = spec.dataset.image_size >= 64 and any(isinstance(m, nn.Conv2d) for m in model.modules())
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        return cls(device, precision, frozen, channels_last)

    @property
    def compute(self) -> Compute:
        """How training steps and evaluations run."""
        return Compute(self.device, self.precision, self.channels_last)

    @property
    def frozen_compute(self) -> Compute:
        """How the frozen pass runs (its own precision: no gradients to protect)."""
        return Compute(self.device, self.frozen_precision, self.channels_last)

    def scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is a no-op unless fp16 on CUDA needs one: the loop never branches on it."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision.needs_scaler)

    def describe(self) -> dict:
        return {"precision": self.precision.name, "frozenPrecision": self.frozen_precision.name,
                "device": str(self.device), "channelsLast": self.channels_last}


def build_optimizer(groups: list[dict], t: Training) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=t.learning_rate, weight_decay=t.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, t: Training):
    """The per-epoch schedule (None: constant). A warm-up of N epochs ramps every group linearly,
    epoch e at its lr × e/(N+1), then hands over to the main schedule, which runs over the epochs left."""
    lr = torch.optim.lr_scheduler
    epochs = t.epochs - t.warmup_epochs
    main = None
    if t.scheduler == "cosine":
        main = lr.CosineAnnealingLR(opt, T_max=epochs)
    elif t.scheduler == "step":
        main = lr.StepLR(opt, step_size=t.step_size, gamma=t.gamma)
    if not t.warmup_epochs:
        return main
    warmup = lr.LinearLR(opt, start_factor=1 / (t.warmup_epochs + 1), end_factor=1.0, total_iters=t.warmup_epochs)
    if main is None:  # LinearLR holds the full rate once its ramp is done
        return warmup
    return lr.SequentialLR(opt, [warmup, main], milestones=[t.warmup_epochs])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
