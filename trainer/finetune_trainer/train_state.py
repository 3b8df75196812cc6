"""TrainState: everything a run changes as it trains, and its checkpoint form.

One object owns the model's trainable part, the optimizer, the schedule, the (possibly disabled) grad
scaler and the run's bookkeeping — epoch, best-so-far, history, where a stopped epoch resumes and the
random states it resumes with. `state_dict()` holds tensors and plain Python values only, so
checkpoint.py can load it with `torch.load(weights_only=True)` (nothing in a checkpoint can run code).

Frozen parts are not saved: they are rebuilt from the weights source on resume and checked against
`frozen_digest`, so a head-only checkpoint is kilobytes instead of the whole backbone every epoch.

With training.ema the state also owns the weight average (torch's AveragedModel over what the loop
trains), its best epoch and that epoch's averaged weights; the checkpoint holds the average's trainable
tensors and step count, so a resumed run continues the same average.
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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

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


def _beats(accuracy: float, loss: float, best_accuracy: float, best_loss: float) -> bool:
    """Better accuracy, or the same with a lower loss."""
    return accuracy > best_accuracy or (accuracy == best_accuracy and loss < best_loss)


def _no_ema_best() -> dict[str, Any]:
    return {"accuracy": -1.0, "loss": float("inf"), "epoch": 0, "top5": None, "perClass": []}


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
    ema: AveragedModel | None = None  # the weight average (training.ema), built by attach_ema
    ema_best: dict[str, Any] = field(default_factory=_no_ema_best)  # the average's best epoch and scores
    ema_best_state: dict[str, torch.Tensor] | None = None  # its weights then, named as in `model`
    _ema_names: dict[str, str] = field(default_factory=dict)  # the average's tensor names → the model's
    _saved_ema: dict | None = None  # a resumed checkpoint's average, loaded once attach_ema builds it
    aux: nn.Module | None = None  # trains beside the model, checkpointed, never exported (distillation projection)
    # What is saved and restored as "the trainable part": fixed when the state is made (with the widest freeze
    # plan applied), so under gradual unfreezing the best epoch's weights and every checkpoint hold the stages
    # that train later too, whatever trains at the moment.
    _trainable_names: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self._trainable_names = frozenset(trainable_state(self.model))

    def trainable(self) -> dict[str, torch.Tensor]:
        """The model's tensors that training can change over the whole run (see _trainable_names)."""
        return {k: v.detach() for k, v in self.model.state_dict(keep_vars=True).items() if k in self._trainable_names}

    def improved(self, ev: EvalResult) -> bool:
        return _beats(ev.accuracy, ev.loss, self.best_accuracy, self.best_loss)

    def attach_ema(self, net: nn.Module, decay: float) -> None:
        """Average `net` — what the loop trains: the model, its head or an fx tail — from here on."""
        self.ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        where = {id(t): name for name, t in self.model.state_dict(keep_vars=True).items()}
        self._ema_names = {name: where[id(t)] for name, t in net.state_dict(keep_vars=True).items() if id(t) in where}
        if self._saved_ema is not None:
            self.ema.module.load_state_dict(self._saved_ema["model"], strict=False)
            self.ema.n_averaged.fill_(self._saved_ema["nAveraged"])

    def ema_scores_better(self) -> bool:
        """The average's best epoch beats the raw weights' best (accuracy, then loss): it is exported."""
        return _beats(self.ema_best["accuracy"], self.ema_best["loss"], self.best_accuracy, self.best_loss)

    def end_epoch(self, epoch: int, stats: EpochStats, ev: EvalResult, keep_best: bool = True,
                  ema_ev: EvalResult | None = None) -> tuple[dict, bool]:
        """Record a finished epoch; returns its history record and whether it is the best so far.
        `keep_best`: this process keeps the best weights (rank 0 of a group; it alone exports).
        `ema_ev`: the weight average's evaluation of the same epoch."""
        e = self.ema_best
        if ema_ev is not None and _beats(ema_ev.accuracy, ema_ev.loss, e["accuracy"], e["loss"]):
            self.ema_best = {"accuracy": ema_ev.accuracy, "loss": ema_ev.loss, "epoch": epoch, "top5": ema_ev.top5,
                             "perClass": ema_ev.per_class}
            if keep_best and self.ema is not None:
                self.ema_best_state = {self._ema_names[k]: v.detach().cpu().clone()
                                       for k, v in trainable_state(self.ema.module).items() if k in self._ema_names}
        is_best = self.improved(ev)
        if is_best:
            self.best_accuracy, self.best_loss, self.best_epoch, self.since_best = ev.accuracy, ev.loss, epoch, 0
            if keep_best:
                self.best_state = copy.deepcopy({k: v.cpu() for k, v in self.trainable().items()})
        else:
            self.since_best += 1
        record = {"epoch": epoch, "trainLoss": stats.loss, "valLoss": ev.loss, "valAccuracy": ev.accuracy,
                  "valTop5": ev.top5, "samplesPerSecond": stats.samples_per_second, "epochSeconds": stats.seconds,
                  "perClassAccuracy": ev.per_class}
        if ema_ev is not None:
            record.update(emaValLoss=ema_ev.loss, emaValAccuracy=ema_ev.accuracy)
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
            "epoch": self.epoch, "model": self.trainable(), "frozenDigest": self.frozen_digest,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "best": {k: getattr(self, k) for k in _BEST}, "best_state": self.best_state,
            "history": self.history, "resumeCount": self.resume_count,
            "aux": None if self.aux is None else self.aux.state_dict(),
            "ema": None if self.ema is None else {
                "model": trainable_state(self.ema.module), "nAveraged": int(self.ema.n_averaged),
                "best": self.ema_best, "bestState": self.ema_best_state},
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
        if self.aux is not None and state.get("aux"):
            self.aux.load_state_dict(state["aux"])
        if saved := state.get("ema"):
            self.ema_best, self.ema_best_state, self._saved_ema = saved["best"], saved["bestState"], saved
