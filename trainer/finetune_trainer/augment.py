"""Training-split augmentation: spec.dataset.augment turned into torchvision.transforms.v2 objects.

Nothing here is hand-written image processing; this module only decides which torchvision transforms
run, with which arguments, in which order. Val and test images never come here (they get
Preprocessing.eval_transform).

Randomness: per-image transforms run in the train dataset and draw from torch's default generator —
in the main process, which fit() reseeds every epoch, or in DataLoader workers, which torch seeds from
the loader's generator (also reseeded every epoch) when they start. MixUp / CutMix need a whole batch,
so they run on each collated batch (MixingLoader), in the main process rather than in a worker's
collate_fn: there they draw from the stream fit() seeds per epoch and saves in a mid-epoch checkpoint,
so the mix of every batch depends on (seed, epoch, step) alone — not on numWorkers, and a resumed run
mixes as the uninterrupted one did.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

from finetune_api.augment import RAND_AUGMENT_MAGNITUDE, RAND_AUGMENT_NUM_OPS, Augment, AutoAugment

if TYPE_CHECKING:
    from finetune_trainer.data import Preprocessing

# Rotations, affine maps and the policies' geometric ops resample on a grid, whatever the model's own
# resize interpolation: torchvision refuses bicubic (which timm models often name) for tensor input
# there, and bilinear is what its references use.
RESAMPLE = T.InterpolationMode.BILINEAR


def train_transform(prep: Preprocessing, augment: Augment) -> T.Compose:
    """Decode → geometry → an automatic policy → colour → float, normalise → random erasing.

    With only the first v1alpha1 fields set, the result is exactly the transform those fields always built."""
    ops: list = [T.ToImage(), *_geometry(prep, augment)]
    if augment.auto_augment is not None:
        ops.append(_policy(augment.auto_augment))
    ops += _colour(augment)
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(prep.mean, prep.std)]
    if augment.random_erasing > 0:  # on the normalised tensor: the erased box reads as the mean colour
        ops.append(T.RandomErasing(p=augment.random_erasing))
    return T.Compose(ops)


def _geometry(prep: Preprocessing, a: Augment) -> list:
    mode = T.InterpolationMode(prep.interpolation)
    if a.random_resized_crop:
        ranges = {k: tuple(v) for k, v in (("scale", a.random_resized_crop_scale),
                                           ("ratio", a.random_resized_crop_ratio)) if v is not None}
        ops: list = [T.RandomResizedCrop(prep.crop, interpolation=mode, antialias=True, **ranges)]
    else:
        ops = [T.Resize(prep.resize, interpolation=mode, antialias=True), T.CenterCrop(prep.crop)]
    if a.horizontal_flip:
        ops.append(T.RandomHorizontalFlip())
    if a.vertical_flip:
        ops.append(T.RandomVerticalFlip())
    if a.affine is not None and a.affine.active:  # rotation folded in: one resampling, not two
        t, scale = a.affine.translate, a.affine.scale
        ops.append(T.RandomAffine(degrees=a.rotation, translate=(t, t) if t else None,
                                  scale=tuple(scale) if scale else None, shear=a.affine.shear or None,
                                  interpolation=RESAMPLE))
    elif a.rotation > 0:
        ops.append(T.RandomRotation(a.rotation, interpolation=RESAMPLE))
    return ops


def _policy(p: AutoAugment) -> T.Transform:
    if p.policy == "randAugment":
        return T.RandAugment(num_ops=RAND_AUGMENT_NUM_OPS if p.num_ops is None else p.num_ops,
                             magnitude=RAND_AUGMENT_MAGNITUDE if p.magnitude is None else p.magnitude,
                             interpolation=RESAMPLE)
    if p.policy == "trivialAugmentWide":
        return T.TrivialAugmentWide(interpolation=RESAMPLE)
    return T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, interpolation=RESAMPLE)


def _colour(a: Augment) -> list:
    ops: list = []
    if a.color_jitter > 0:
        j = a.color_jitter
        ops.append(T.ColorJitter(brightness=j, contrast=j, saturation=j))
    elif a.color_jitter_detail is not None and a.color_jitter_detail.active:
        d = a.color_jitter_detail
        ops.append(T.ColorJitter(brightness=d.brightness, contrast=d.contrast, saturation=d.saturation, hue=d.hue))
    if a.random_grayscale > 0:
        ops.append(T.RandomGrayscale(p=a.random_grayscale))
    if a.gaussian_blur is not None:
        b = a.gaussian_blur
        ops.append(T.RandomApply([T.GaussianBlur(b.kernel_size, sigma=tuple(b.sigma))], p=b.probability))
    return ops


def batch_mix(augment: Augment, num_classes: int) -> T.Transform | None:
    """MixUp and/or CutMix over (images, labels) batches: labels become (N, num_classes) probabilities.

    With both, each batch gets one of the two (chosen evenly), as torchvision's references do."""
    mixes: list[T.Transform] = []
    if augment.mixup_alpha > 0:
        mixes.append(T.MixUp(alpha=augment.mixup_alpha, num_classes=num_classes))
    if augment.cutmix_alpha > 0:
        mixes.append(T.CutMix(alpha=augment.cutmix_alpha, num_classes=num_classes))
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else T.RandomChoice(mixes)


class MixingLoader(DataLoader):
    """A DataLoader whose collated batches are mixed by `mix` in the process iterating it (see the module
    docstring for why not in collate_fn). Sampler, generator, batch size and length are the DataLoader's."""

    def __init__(self, *args, mix: Callable, **kwargs):
        super().__init__(*args, **kwargs)
        self.mix = mix

    def __iter__(self):
        for batch in super().__iter__():
            yield None if batch is None else self.mix(*batch)
