"""What the frozen pass reads: images decoded and resized as uint8 per image, turned to float in whole batches.

The image datasets end every transform with ToDtype(float32, scale) + Normalize, per image. For a pass that
only runs the network, that tail is most of the per-image work besides decoding (two elementwise passes over
a float image, each its own small parallel region) and makes every collated batch four times larger. Here
the same two torchvision transforms run once per batch instead (both accept (..., C, H, W)); they are
elementwise, so every value is bit-for-bit what the per-image path computes — an fp32 cache is unchanged.

With augmented views, each image is decoded once and its K views drawn from that one decoded image, under
the same per-(seed, view, image) seeds as cached_views.SeededViews: the same views, K - 1 fewer decodes.

A transform whose tail is anything else (random erasing runs after Normalize, per image) is left whole:
the pass then reads float images as before, and `PassInput.batched` says so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from finetune_trainer import cpus, startup
from finetune_trainer.cached_views import image_seed, seed_cpu
from finetune_trainer.data import ImageDataset, Preprocessing, Sample, skip_broken

log = logging.getLogger(__name__)


def split_tail(transform: Callable) -> tuple[Callable, Callable | None]:
    """(per-image part, per-batch tail): the tail is the final ToDtype(float32, scale) + Normalize, or None
    (the transform stays whole) when the transform does not end with exactly those two."""
    ops = list(getattr(transform, "transforms", ()))
    if len(ops) < 3 or not (isinstance(ops[-2], T.ToDtype) and isinstance(ops[-1], T.Normalize)):
        return transform, None
    to_dtype = ops[-2]
    if not (to_dtype.scale and to_dtype.dtype in (torch.float32, {torch.Tensor: torch.float32})):
        return transform, None
    return T.Compose(ops[:-2]), T.Compose(ops[-2:])


class Pixels(Dataset):
    """An ImageDataset's samples through its transform's per-image part (uint8 tensors, or the whole
    transform's float output when it cannot be split). Unreadable images are None, as there."""

    def __init__(self, images: ImageDataset, transform: Callable):
        self.samples, self.transform = images.samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        try:
            return self._pixels(i), self.samples[i].label
        except Exception as err:  # PIL raises many types for crafted data, as in ImageDataset
            log.warning("skipping unreadable image %s: %s", self.samples[i].path, err)
            return None

    def _pixels(self, i: int) -> torch.Tensor:
        return self.transform(self.samples[i].load())


class Views(Pixels):
    """K augmented views of each image, decoded once: item i is (K, C, H, W) — view k drawn with torch's
    generator seeded by image_seed(seed, k, i), exactly what SeededViews(…, k)[i] computes. The generator
    is the process's: streams (pass_streams) draw one image's views at a time, decoding side by side."""

    _seeded = threading.Lock()

    def __init__(self, images: ImageDataset, transform: Callable, seed: int, views: int):
        super().__init__(images, transform)
        self.seed, self.views = seed, views
        # A leading ToImage draws nothing and gives every view the same tensor: done once per image
        ops = list(getattr(transform, "transforms", ()))
        self.once, self.per_view = ((ops[0], T.Compose(ops[1:])) if ops and isinstance(ops[0], T.ToImage)
                                    else (None, transform))

    def _pixels(self, i: int) -> torch.Tensor:
        image = self.samples[i].load()
        if self.once is not None:
            image = self.once(image)
        out = []
        with self._seeded:
            for k in range(self.views):
                seed_cpu(image_seed(self.seed, k, i))
                out.append(self.per_view(image))
        return torch.stack(out)


@dataclass
class PassInput:
    """A loader for one split of the frozen pass and what turns its batches into the network's input."""

    loader: DataLoader
    tail: Callable | None  # per batch: uint8 → normalised float (None: the loader yields float already)
    views: int = 0  # > 0: batches are (B, K, C, H, W); the pass flattens them and regroups its outputs
    streams: int = 1  # batches computed side by side (pass_streams), each on `threads` torch threads
    threads: int = 1

    @property
    def batched(self) -> bool:
        return self.tail is not None

    def network_input(self, images: torch.Tensor) -> torch.Tensor:
        if self.views:
            images = images.flatten(0, 1)
        return self.tail(images) if self.tail is not None else images

    def on_device(self, images: torch.Tensor, compute) -> torch.Tensor:
        """A loaded batch as the network's input on compute's device.

        uint8 batches travel to the device before they are made float (a quarter of the bytes), and are made
        float before they are laid out channels-last: torchvision's Normalize broadcasts its per-channel mean
        and std along the last dimensions, which is fast on (N, C, H, W) and slow on a channels-last tensor
        (measured on 2 cores, batches of 8 at 224 px: 0.04 ms per image, then 0.05 for the layout change,
        against 0.28 ms on the channels-last batch; the same values either way)."""
        return compute.batch(self.network_input(images.to(compute.device, non_blocking=True)))


def as_pass_input(loader) -> PassInput:
    """A PassInput as it is, or a float-image DataLoader as one (one stream, no tail)."""
    return loader if isinstance(loader, PassInput) else PassInput(loader, None)


def batches(loader, compute) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(network input on the device, labels) per readable batch of a PassInput or of a float-image DataLoader
    (PassInput.on_device)."""
    source = as_pass_input(loader)
    for batch in source.loader:
        if batch is not None:
            startup.first_batch()
            yield source.on_device(batch[0], compute), batch[1]


@dataclass(frozen=True)
class Plan:
    """How the frozen pass loads and runs: images per batch, DataLoader workers, pinned memory (CUDA), and
    the streams computing batches side by side with their torch threads each (pass_streams)."""

    batch_size: int
    workers: int
    pin_memory: bool = False
    streams: int = 1
    threads: int = 1

    def describe(self) -> dict:
        return {"batchSize": self.batch_size, "workers": self.workers, "pinMemory": self.pin_memory,
                "streams": self.streams, **({"threadsPerStream": self.threads} if self.streams > 1 else {})}


def pass_plan(batch_size: int | None, train_batch: int, workers: int | None, loader_workers: int,
              device: torch.device, streams: int | None = None, reduced: bool = False) -> Plan:
    """The pass's own batch size, loader workers and streams, unless the spec sets them (frozenPassBatchSize,
    frozenPassWorkers, else dataset.numWorkers when set; frozenPassStreams). `reduced`: the pass runs in a
    reduced precision (bf16), whose numbers need not be bit-for-bit those of one stream.

    On the CPU, small batches run fastest: measured on 2 cores (EfficientNet-Lite0, 224 px, bf16), batch 8
    passed 203 img/s, 16: 156, 32: 119 (activations that fit the caches), so the default is 4 images per
    torch thread, at least 8. On CUDA: the training batch, at least 128. Workers decode while the network
    runs where a core is spare for them: on 2 cores one worker competing with the network's two threads
    cost 30 % (sequential 207 img/s, one worker 145, a decoding thread 159), so the default is none below
    4 cores, then one per 4 cores up to 4 (on CUDA, where the CPU only decodes, every core but one, up to 4).

    Below 4 cores a reduced-precision CPU pass without workers runs one single-threaded stream per torch
    thread instead, each decoding its own batches (pass_streams; measured in bench/README.md); streams
    decode in the pass's process, so they take no loader workers. fp32 passes keep one stream by default:
    bit-for-bit the plain loop's numbers."""
    cores, cuda = cpus.usable_cores(), device.type == "cuda"  # a pod's CPU limit, not the node's cores
    threads = torch.get_num_threads()
    size = batch_size or (max(train_batch, 128) if cuda else max(8, 4 * threads))
    if workers is None:
        spare = min(4, cores - 1) if cuda else (0 if cores < 4 else min(4, cores // 4))
        workers = loader_workers if loader_workers > 0 else max(0, spare)
    if streams is None:
        streams = threads if not cuda and reduced and workers == 0 and 2 <= threads < 4 else 1
    streams = 1 if cuda else min(streams, threads)  # more streams than threads would only queue for cores
    if streams > 1:
        workers = 0  # each stream decodes its own batches
    return Plan(size, workers, cuda, streams, max(1, threads // streams))


def pass_input(images: ImageDataset, collate_fn: Callable, plan: Plan, views: int = 0, seed: int = 0,
               sampler=None) -> PassInput:
    """The frozen pass's loader over `images` (an ImageDataset): in dataset order (or `sampler`'s), views
    K > 0 drawn per image as cached_views.SeededViews draws them."""
    pixels, tail = split_tail(images.transform)
    data = Views(images, pixels, seed, views) if views else Pixels(images, pixels)
    per_batch = max(1, plan.batch_size // views) if views else plan.batch_size  # views count toward the batch
    loader = DataLoader(data, batch_size=per_batch, collate_fn=collate_fn, num_workers=plan.workers,
                        pin_memory=plan.pin_memory, shuffle=False, sampler=sampler,
                        **({"prefetch_factor": 4} if plan.workers else {}))
    return PassInput(loader, tail, views, plan.streams, plan.threads)


def eval_input(samples: list[Sample], prep: Preprocessing, batch_size: int | None, workers: int,
               device: torch.device, train_batch: int = 32, streams: int | None = None,
               reduced: bool = False) -> PassInput:
    """The held-out split in order with the eval transform (uint8 per image, float per batch): what the
    final evaluation and `evaluate` read. Same values as data.eval_loader; decoding overlaps with the network
    (pass_plan's workers or streams; `reduced`: a bf16 pass). `batch_size` None: the frozen pass's own
    default (small batches on the CPU), which an inference-only pass over images runs fastest at."""
    plan = pass_plan(batch_size, train_batch, None, workers, device, streams, reduced)
    return pass_input(ImageDataset(samples, prep.eval_transform()), skip_broken, plan)
