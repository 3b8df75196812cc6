"""Data-parallel plumbing: what changes when the trainer is one of several torchrun workers.

torchrun (one process per worker pod, or per GPU) sets WORLD_SIZE, RANK and LOCAL_RANK; `Dist` reads
them and offers the few collectives the loop needs. With one worker every method is a no-op that
returns its input, so the single-process path runs exactly as before.

The rules the loop follows:
- rank 0 owns the output folder: it alone reads the export and checkpoints (and broadcasts what it
  found), writes checkpoints, the export and progress. Other ranks never touch the output, so it
  need not even be shared between pods.
- decisions that steer control flow (stop on SIGTERM, early stopping, validation results) are made
  from numbers every rank holds identically, so no rank leaves the loop while others wait in a
  collective.
- every collective has a timeout (FINETUNE_COLLECTIVE_TIMEOUT_SECONDS): a peer that hangs makes the
  others fail instead of waiting forever, and torchrun / the Job then restarts the group.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as tdist
from torch import nn

from finetune_api.errors import FinetuneError, JobFileError

TIMEOUT_ENV = "FINETUNE_COLLECTIVE_TIMEOUT_SECONDS"
# Longest legitimate gap between two collectives: rank 0 writing a checkpoint or the export while the
# others already wait. A dead peer is noticed at once on gloo; a hung one (or NCCL) after this long.
DEFAULT_TIMEOUT_SECONDS = 600
# Per-rank seeds for augmentation and dropout: distinct streams, rank 0 keeps the single-worker seed.
RANK_SEED_STRIDE = 1_000_003

T = TypeVar("T")


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    # Collectives on CPU tensors and objects go through gloo: the default group when training on CPU,
    # a second group next to NCCL on GPUs (NCCL only moves CUDA tensors).
    _cpu_group: Any = field(default=None, repr=False)

    @classmethod
    def from_environment(cls, env: Mapping[str, str] | None = None) -> Dist:
        env = os.environ if env is None else env
        try:
            world, rank = int(env.get("WORLD_SIZE", "1")), int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", "0"))
        except ValueError as err:
            raise JobFileError(f"torchrun environment: {err}") from None
        if world < 1 or not 0 <= rank < world:
            raise JobFileError(f"torchrun environment: RANK {rank} outside WORLD_SIZE {world}")
        return cls(world, rank, local)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def per_rank_batch(self, batch_size: int) -> int:
        """training.batchSize is the global batch; each rank takes an equal share of every step."""
        if batch_size % self.world:
            raise JobFileError(f"spec.training.batchSize {batch_size} is the global batch and must be a multiple "
                               f"of the {self.world} training processes")
        return batch_size // self.world

    def epoch_seed(self, seed: int) -> int:
        return seed + self.rank * RANK_SEED_STRIDE

    # ------------------------------------------------------------------ lifetime

    @contextlib.contextmanager
    def session(self, device: torch.device) -> Iterator[None]:
        """The process group for one run; torn down on success (a failed rank just exits: the others'
        collectives then fail, and tearing down a broken NCCL group can itself hang)."""
        if not self.active or tdist.is_initialized():
            yield
            return
        timeout = dt.timedelta(seconds=collective_timeout())
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, timeout=timeout)
        self._cpu_group = tdist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
        yield
        tdist.destroy_process_group()

    # ------------------------------------------------------------------ collectives

    def from_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 and hand its result to every rank; an input error it raises is raised on
        every rank (the same message), so the whole group stops the same way."""
        if not self.active:
            return fn()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except FinetuneError as err:
                box[0] = ("error", err)
        tdist.broadcast_object_list(box, src=0, group=self._cpu_group)
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def gather_objects(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj, group=self._cpu_group)
        return out

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank (one tiny all-reduce)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self._cpu_group)
        return bool(t.item())

    def agreed(self, local: Callable[[], bool]) -> Callable[[], bool]:
        """A should_stop for the loop: true on all ranks at the same step once any rank wants to stop."""
        return local if not self.active else (lambda: self.any(local()))

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (float64 on the CPU), then rank 0's result everywhere: the numbers
        that decide early stopping and the best epoch are bit-identical on all ranks."""
        if not self.active:
            return values
        t = values.detach().to("cpu", torch.float64).clone()
        tdist.all_reduce(t, group=self._cpu_group)
        tdist.broadcast(t, src=0, group=self._cpu_group)
        return t.to(values.device, values.dtype)

    def concat_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, concatenated in rank order, on every rank (shapes may differ in length)."""
        if not self.active:
            return rows
        lengths = self.gather_objects(len(rows))
        padded = rows.new_zeros((max(lengths), *rows.shape[1:]))
        padded[: len(rows)] = rows
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        tdist.all_gather(parts, padded, group=self._cpu_group)
        return torch.cat([p[:n] for p, n in zip(parts, lengths, strict=True)])

    def sync_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics of training layers) everywhere, before evaluating."""
        if not self.active:
            return
        for buf in module.buffers():
            if buf.is_floating_point() or buf.dtype in (torch.int64, torch.int32):
                cpu = buf.detach().cpu().clone()
                tdist.broadcast(cpu, src=0, group=self._cpu_group)
                buf.data.copy_(cpu)

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel over the module the loop trains (the head, a tail or the model).

        Only parameters with requires_grad get gradient hooks, so a frozen backbone inside `module`
        never syncs gradients; with the feature cache the backbone is not inside at all.
        """
        if not self.active or not any(p.requires_grad for p in module.parameters()):
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def collective_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        raise JobFileError(f"{TIMEOUT_ENV}: expected seconds, got {raw!r}") from None
    if value <= 0:
        raise JobFileError(f"{TIMEOUT_ENV}: must be > 0, got {raw!r}")
    return value


def shard(n: int, world: int, rank: int) -> range:
    """This rank's contiguous slice of n items (ranks before it get the remainder first)."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def strided(n: int, world: int, rank: int) -> Sequence[int]:
    """Indices rank, rank+world, …: an evaluation shard (no padding, so every image counts once)."""
    return range(rank, n, world)
