"""Cached augmented views: the feature cache with random per-image augmentation.

With training.featureCacheViews K > 0, the frozen part runs once over K augmented copies of every
training image instead of once per epoch: view k of image i is the train transform under a seed derived
from (training.seed, k, i) alone (SeededViews), so views differ from each other, are the same on every
run, and do not depend on the number of DataLoader workers, on which worker ran an image, or on how a
data-parallel group sharded the pass. The train cache is (K, N, ...) plus N labels; each epoch
ViewSampler keeps EpochSampler's permutation (and its mid-epoch skip) and picks one view per image from
the epoch's seed, so a resumed run samples exactly what the uninterrupted one did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import Dataset

from finetune_trainer.sampling import EpochSampler

_VIEW_CHOICE = 1 << 32  # offsets the epoch seed for the view choice: never a permutation seed (those are < 2**32)


def image_seed(seed: int, view: int, index: int) -> int:
    """The random seed of view `view` of training image `index`."""
    digest = hashlib.sha256(f"finetune-view/{seed}/{view}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seed_cpu(seed: int) -> None:
    """Seed torch's CPU generator, the one torchvision's random transforms draw from: what torch.manual_seed
    does for them, without also queueing lazy seeds for CUDA, MTIA and XPU, each of which records a formatted
    stack trace while those are not initialised (0.6 ms a call, a quarter of an augmented view's time on 2
    cores, 2026-12-04)."""
    torch.default_generator.manual_seed(seed)


class SeededViews(Dataset):
    """The train image dataset with view `view`'s transform: torch's generator seeded per image before it."""

    def __init__(self, images: Dataset, seed: int, view: int):
        self.images, self.seed, self.view = images, seed, view

    def __len__(self) -> int:
        return len(self.images)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        seed_cpu(image_seed(self.seed, self.view, i))
        return self.images[i]


class ViewsDataset(Dataset):
    """Cached train features (K, N, ...) and labels (N,); flat index k * N + i is view k of image i."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        if features.dim() < 2 or features.shape[1] != len(labels):
            raise ValueError(f"views of shape {tuple(features.shape)} do not match {len(labels)} labels")
        self.features, self.labels = features, labels
        self.views, self.size = features.shape[0], len(labels)

    def __len__(self) -> int:
        return self.views * self.size

    def __getitem__(self, j: int):
        k, i = divmod(j, self.size)
        return self.features[k, i], self.labels[i]


class ViewSampler(EpochSampler):
    """EpochSampler's permutation of the N images, each mapped to one of its K views for the epoch.

    The choice is drawn for all N images from the epoch's seed (the same on every rank and every resume),
    then this rank's slice of the permutation (less the steps a mid-epoch checkpoint covered) is mapped."""

    def __init__(self, size: int, views: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(size, num_replicas, rank)
        self.views = views

    def choice(self) -> torch.Tensor:
        """The view of each image in this epoch."""
        generator = torch.Generator().manual_seed(self.seed + _VIEW_CHOICE)
        return torch.randint(self.views, (self.size,), generator=generator)

    def __iter__(self) -> Iterator[int]:
        choice = self.choice().tolist()
        return iter([choice[i] * self.size + i for i in super().__iter__()])
