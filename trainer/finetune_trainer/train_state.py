"""TrainState: everything a run changes as it trains, and its checkpoint form.

One object owns the model's trainable part, the optimizer, the schedule, the (possibly disabled) grad
scaler and the run's bookkeeping — epoch, best-so-far, history, where a stopped epoch resumes and the
random states it resumes with. `state_dict()` holds tensors and plain Python values only, so
checkpoint.py can load it with `torch.load(weights_only=True)` (nothing in a checkpoint can run code).

Frozen parts are not saved: they are rebuilt from the weights source on resume and checked against
`frozen_digest`, so a head-only checkpoint is kilobytes instead of the whole backbone every epoch.
"""

from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune_trainer.engine import EpochStart, EpochStats, EvalResult


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training can change: trainable parameters and the buffers of modules that train."""
    state = {}
    for mod_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for name, t in [*own, *module.named_buffers(recurse=False)]:
            state[prefix + name] = t.detach()
    return state


def frozen_digest(model: nn.Module) -> str:
    """sha256 over every frozen parameter and the buffers of frozen modules."""
    trainable = trainable_state(model)
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name not in trainable:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """Every random stream a step draws from, as tensors and plain values (no numpy objects)."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "words": list(words), "gaussNext": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "hasGauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["words"]), py["gaussNext"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["hasGauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_BEST = ("best_accuracy", "best_loss", "best_epoch", "since_best")


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LRScheduler, or None for a constant learning rate
    scaler: torch.amp.GradScaler  # disabled (a no-op) unless fp16 on CUDA
    frozen_digest: str = ""
    epoch: int = 0  # epochs finished
    best_accuracy: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = 0
    since_best: int = 0
    best_state: dict[str, torch.Tensor] | None = None  # trainable tensors of the best epoch
    history: list[dict] = field(default_factory=list)
    resume_count: int = 0  # status.resumeCount
    begin: EpochStart | None = None  # the next epoch starts mid-way (a checkpoint taken on SIGTERM)
    rng: dict | None = None  # random states at that point, so the rest of the epoch replays exactly

    def improved(self, ev: EvalResult) -> bool:
        return ev.accuracy > self.best_accuracy or (ev.accuracy == self.best_accuracy and ev.loss < self.best_loss)

    def end_epoch(self, epoch: int, stats: EpochStats, ev: EvalResult, keep_best: bool = True) -> tuple[dict, bool]:
        """Record a finished epoch; returns its history record and whether it is the best so far.
        `keep_best`: this process keeps the best weights (rank 0 of a group; it alone exports)."""
        is_best = self.improved(ev)
        if is_best:
            self.best_accuracy, self.best_loss, self.best_epoch, self.since_best = ev.accuracy, ev.loss, epoch, 0
            if keep_best:
                self.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in trainable_state(self.model).items()})
        else:
            self.since_best += 1
        record = {"epoch": epoch, "trainLoss": stats.loss, "valLoss": ev.loss, "valAccuracy": ev.accuracy,
                  "valTop5": ev.top5, "samplesPerSecond": stats.samples_per_second, "epochSeconds": stats.seconds,
                  "perClassAccuracy": ev.per_class}
        self.history.append(record)
        self.epoch = epoch
        return record, is_best

    def done(self, training) -> bool:
        """All epochs run, or early stopping (target accuracy reached, or `patience` epochs without gain)."""
        es = training.early_stopping
        if self.epoch >= training.epochs:
            return True
        if es.target_accuracy is not None and self.best_accuracy >= es.target_accuracy:
            return True
        return bool(es.patience) and self.since_best >= es.patience

    def state_dict(self) -> dict[str, Any]:
        """Everything resuming needs except the frozen weights (rebuilt from the weights source)."""
        return {
            "epoch": self.epoch, "model": trainable_state(self.model), "frozenDigest": self.frozen_digest,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "best": {k: getattr(self, k) for k in _BEST}, "best_state": self.best_state,
            "history": self.history, "resumeCount": self.resume_count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        for k, v in state["best"].items():
            setattr(self, k, v)
        self.best_state, self.history, self.epoch = state["best_state"], state["history"], state["epoch"]
        self.resume_count = state.get("resumeCount", 0) + 1
