"""One epoch of training and one evaluation pass (the torchvision-references shape).

Losses are accumulated on the device and read back (`.item()`) only at log steps, so the loop
never forces a host sync per step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from finetune_trainer import startup


@dataclass
class Precision:
    """The resolved numeric mode: autocast dtype (None = fp32) and whether a GradScaler is needed."""

    name: str
    dtype: torch.dtype | None
    device_type: str

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16 and self.device_type == "cuda"


@dataclass(frozen=True)
class Compute:
    """Where and how a pass runs: device, numeric mode, memory layout of image batches."""

    device: torch.device
    precision: Precision
    channels_last: bool = False

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


@dataclass
class EpochStats:
    loss: float
    samples: int
    seconds: float
    skipped_batches: int
    steps: int = 0  # steps done in this epoch, including those before a mid-epoch resume
    stopped: bool = False  # should_stop() ended the epoch early
    loss_sum: float = 0.0  # sum of per-sample losses so far: what a mid-epoch checkpoint carries
    timed_samples: int | None = None  # samples trained in `seconds` (fewer than `samples` after a resume)

    @property
    def samples_per_second(self) -> float:
        n = self.samples if self.timed_samples is None else self.timed_samples
        return n / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EpochStart:
    """Where an epoch begins: step 0, or the step a mid-epoch checkpoint recorded (and its sums)."""

    step: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    skipped_batches: int = 0


@dataclass
class EvalResult:
    loss: float
    accuracy: float
    top5: float | None
    per_class: list[float]
    samples: int


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    criterion: nn.Module,
    scaler: torch.amp.GradScaler,
    compute: Compute,
    *,
    on_log: Callable[[int, int, float, float], None] | None = None,
    log_every: int = 10,
    should_stop: Callable[[], bool] = lambda: False,
    begin: EpochStart | None = None,
    clip_norm: float | None = None,
    after_step: Callable[[], None] | None = None,
) -> EpochStats:
    """Train over `loader` (which already skips what `begin` says was done). Stops after the step
    during which should_stop() became true; the returned stats then say where it stopped.

    `clip_norm`: the global gradient norm is clipped to it before each step, on unscaled gradients.
    `after_step`: called after every optimizer step (the weight average's update)."""
    begin = begin or EpochStart()
    device = compute.device
    total_loss = torch.full((), begin.loss_sum, device=device)
    samples, skipped, start = begin.samples, begin.skipped_batches, time.perf_counter()
    total_steps = begin.step + len(loader)
    step, stopped = begin.step, False
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for step, batch in enumerate(loader, start=begin.step + 1):
        if batch is None:  # every image of this batch was unreadable
            skipped += 1
            continue
        startup.first_batch()
        images, targets = compute.batch(batch[0]), batch[1].to(device, non_blocking=True)
        with compute.precision.autocast():
            loss = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # a disabled scaler (all but fp16 on CUDA) passes straight through
        if clip_norm is not None:
            scaler.unscale_(optimizer)  # clip what the step will apply, not the loss-scaled gradients
            torch.nn.utils.clip_grad_norm_(params, clip_norm)
        scaler.step(optimizer)
        scaler.update()
        if after_step is not None:
            after_step()
        total_loss += loss.detach() * targets.shape[0]
        samples += targets.shape[0]
        if on_log and (step % log_every == 0 or step == total_steps):
            elapsed = time.perf_counter() - start
            on_log(step, total_steps, (total_loss / samples).item(), (samples - begin.samples) / max(elapsed, 1e-9))
        if should_stop() and step < total_steps:
            stopped = True
            break
    seconds = time.perf_counter() - start
    loss_sum = total_loss.item()
    return EpochStats(loss_sum / max(samples, 1), samples, seconds, skipped, step, stopped, loss_sum,
                      samples - begin.samples)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, criterion: nn.Module, compute: Compute, num_classes: int,
             reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EvalResult:
    """Loss, accuracy, top-5 and per-class accuracy over `loader`. With `reduce` (data parallel: each
    rank holds a shard of the val set), the raw sums are combined across ranks before dividing."""
    model.eval()
    device = compute.device
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    hits = torch.zeros(num_classes, device=device)
    counts = torch.zeros(num_classes, device=device)
    n = 0
    for batch in loader:
        if batch is None:
            continue
        images, targets = compute.batch(batch[0]), batch[1].to(device, non_blocking=True)
        with compute.precision.autocast():
            logits = model(images)
        logits = logits.float()
        total_loss += criterion(logits, targets) * targets.shape[0]
        pred = logits.argmax(dim=1)
        ok = (pred == targets).float()
        correct += ok.sum()
        hits.index_add_(0, targets, ok)
        counts.index_add_(0, targets, torch.ones_like(ok))
        if num_classes > 5:
            top5 = logits.topk(5, dim=1).indices
            correct5 += (top5 == targets[:, None]).any(dim=1).float().sum()
        n += targets.shape[0]
    if reduce is not None:
        total_loss, correct, correct5, hits, counts, n = _reduced(reduce, total_loss, correct, correct5, hits,
                                                                  counts, n)
    n = max(n, 1)
    per_class = (hits / counts.clamp(min=1)).tolist()
    top5_acc = (correct5 / n).item() if num_classes > 5 else None
    return EvalResult((total_loss / n).item(), (correct / n).item(), top5_acc, per_class, n)


def _reduced(reduce: Callable[[torch.Tensor], torch.Tensor], total_loss, correct, correct5, hits, counts, n: int):
    """One collective for all of evaluate's sums: packed, reduced, unpacked."""
    k = hits.numel()
    packed = torch.cat([torch.stack([total_loss, correct, correct5]), hits, counts,
                        torch.tensor([float(n)], device=hits.device)])
    out = reduce(packed)
    return out[0], out[1], out[2], out[3:3 + k], out[3 + k:3 + 2 * k], int(out[-1].item())
