"""Frozen-backbone feature cache: with `freeze.policy: head` the backbone's output never changes,
so it is computed once and the head trains on the cached features for every epoch.

Only valid when nothing random happens before the head (no random augmentation; the backbone in
eval mode is deterministic). The head is the last operation of every torchvision classifier except
SqueezeNet (a conv followed by pooling), which falls back to the plain loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from finetune_trainer.engine import Precision
from finetune_trainer.spec import FineTuneJobSpec


@dataclass
class CacheDecision:
    enabled: bool
    reason: str


def decide(spec: FineTuneJobSpec, head: nn.Module) -> CacheDecision:
    if spec.freeze.policy != "head":
        return CacheDecision(False, f"freeze.policy {spec.freeze.policy}: the backbone trains")
    if spec.dataset.augment.any_random:
        return CacheDecision(False, "random augmentation changes backbone inputs every epoch")
    if isinstance(head, nn.Conv2d):
        return CacheDecision(False, "this architecture pools after its classifier")
    return CacheDecision(True, "backbone frozen and inputs fixed: features computed once")


@torch.inference_mode()
def extract(model: nn.Module, head_name: str, loader, device: torch.device, precision: Precision):
    """(features, labels) on the CPU: the head's input for every image, backbone in eval mode."""
    parent_name, _, leaf = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    head = getattr(parent, leaf)
    setattr(parent, leaf, nn.Identity())
    model.eval()
    feats, labels = [], []
    try:
        for batch in loader:
            if batch is None:
                continue
            images, targets = batch
            with precision.autocast():
                out = model(images.to(device, non_blocking=True))
            feats.append(out.float().cpu())
            labels.append(targets)
    finally:
        setattr(parent, leaf, head)
    return torch.cat(feats), torch.cat(labels)


def cached_loaders(train: tuple, val: tuple, batch_size: int) -> tuple[DataLoader, DataLoader]:
    """Loaders over cached features with the same shuffling contract as the image loaders."""
    train_loader = DataLoader(TensorDataset(*train), batch_size=batch_size, shuffle=True, generator=torch.Generator())
    val_loader = DataLoader(TensorDataset(*val), batch_size=batch_size, shuffle=False)
    return train_loader, val_loader
