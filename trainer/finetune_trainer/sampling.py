"""The training sampler: one seeded permutation per epoch, split across ranks, resumable mid-epoch.

Why not RandomSampler/DistributedSampler: a preempted run resumes in the middle of an epoch, so the
sampler must replay the same permutation and skip what was already trained on — without loading
those images. The permutation is `torch.randperm(n, generator seeded with the epoch's seed)`, the
same order RandomSampler gives for that generator, and ranks take interleaved slices of it padded to
equal length, as DistributedSampler does (every rank runs the same number of steps, so DDP's
collectives never wait on a rank that ran out of data).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.per_rank = -(-size // num_replicas) if size else 0  # ceil: the last ranks repeat a few images
        self.seed = 0
        self.skip = 0

    def reseed(self, seed: int, skip: int = 0) -> None:
        """Start an epoch: its permutation comes from `seed`; the first `skip` of this rank's samples are done."""
        self.seed, self.skip = seed, max(0, min(skip, self.per_rank))

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist()
        if self.num_replicas > 1:
            order += order[: self.per_rank * self.num_replicas - self.size]
            order = order[self.rank :: self.num_replicas]
        return iter(order[self.skip :])

    def __len__(self) -> int:
        return self.per_rank - self.skip
