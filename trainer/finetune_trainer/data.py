"""Datasets: ImageFolder layouts on disk and the bundled digits, with the weights' preprocessing.

Every input problem that retrying cannot fix (missing path, empty class, empty split) is a
JobFileError raised before training starts. Unreadable images found up front are skipped with a
warning and a count; one that breaks later (e.g. a file changed mid-run) is dropped from its batch,
never crashing the epoch.
"""

from __future__ import annotations

import functools
import gzip
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from finetune_api.errors import JobFileError, TrainingError
from finetune_api.spec import Dataset as DatasetSpec
from finetune_trainer import augment
from finetune_trainer.sampling import EpochSampler

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What the network expects; recorded in model.json so predict reproduces it exactly."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"  # timm models name theirs (often bicubic)

    @property
    def _mode(self) -> T.InterpolationMode:
        return T.InterpolationMode(self.interpolation)

    def eval_transform(self) -> Callable:
        return T.Compose([
            T.ToImage(),
            T.Resize(self.resize, interpolation=self._mode, antialias=True),
            T.CenterCrop(self.crop),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(self.mean, self.std),
        ])

    def to_json(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation}

    @classmethod
    def from_json(cls, p: dict) -> Preprocessing:
        return cls(p["resize"], p["crop"], tuple(p["mean"]), tuple(p["std"]), p.get("interpolation", "bilinear"))


@dataclass
class Sample:
    """An image as a file path or as in-memory pixels (the bundled digits)."""

    label: int
    path: str | None = None
    pixels: np.ndarray | None = None

    def load(self) -> Image.Image:
        if self.pixels is not None:
            return Image.fromarray(self.pixels).convert("RGB")
        with Image.open(self.path) as im:  # type: ignore[arg-type]
            return im.convert("RGB")


# Decoded, resized tensors are kept in memory up to this size when the transform is deterministic,
# so epochs after the first skip decoding and resizing entirely.
MEMO_BYTES = 2 << 30


class ImageDataset(Dataset):
    def __init__(self, samples: Sequence[Sample], transform: Callable, deterministic: bool = False,
                 crop: int = 224):
        self.samples = list(samples)
        self.transform = transform
        fits = len(self.samples) * 3 * crop * crop * 4 <= MEMO_BYTES
        self.memo: dict[int, torch.Tensor] | None = {} if deterministic and fits else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        if self.memo is not None and i in self.memo:
            return self.memo[i], self.samples[i].label
        try:
            x = self.transform(self.samples[i].load())
        except Exception as err:  # PIL raises many types for crafted data (struct.error, ZeroDivisionError, …)
            log.warning("skipping unreadable image %s: %s", self.samples[i].path, err)
            return None
        if self.memo is not None:
            self.memo[i] = x
        return x, self.samples[i].label


def skip_broken(batch: list):
    """collate_fn that drops images that failed to load instead of crashing the epoch."""
    good = [b for b in batch if b is not None]
    if not good:
        return None
    return torch.utils.data.default_collate(good)


@dataclass
class Splits:
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    skipped: int = 0
    source: str = ""
    notes: list[str] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)  # held out: evaluated once, with the best weights


# ---------------------------------------------------------------- bundled digits


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8×8 digits shipped in the package, as uint8 images (0–255) and labels."""
    raw = resources.files("finetune_trainer").joinpath("assets/digits.csv.gz").read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",")
    images = (table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
    return images, table[:, -1].astype(np.int64)


def _digits_splits(spec: DatasetSpec, seed: int) -> Splits:
    images, labels = load_digits_arrays()
    names = [str(d) for d in range(10)]
    wanted = _select_classes(names, spec.classes, "builtin digits")
    samples = {c: [Sample(i, pixels=images[k]) for k in np.flatnonzero(labels == int(c))]
               for i, c in enumerate(wanted)}
    samples, test = _hold_out(samples, spec.test_fraction, seed)
    train, val = _split(samples, spec.val_fraction, seed)
    return Splits(wanted, train, val, source="builtin:digits", test=test)


# ---------------------------------------------------------------- ImageFolder


def _select_classes(found: list[str], wanted: list[str] | None, where: str) -> list[str]:
    if wanted is None:
        return found
    missing = [c for c in wanted if c not in found]
    if missing:
        raise JobFileError(f"dataset.classes: {missing} not found in {where} (has {found[:20]})")
    return list(wanted)


def _scan_class_dirs(root: Path) -> dict[str, list[Path]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    out = {}
    for c in classes:
        files = sorted(p for p in (root / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        out[c] = files
    return out


def _readable(paths: list[Path]) -> tuple[list[Path], int]:
    """Verify image headers up front so broken files are counted once, not hit every epoch."""
    good, bad = [], 0
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
            good.append(p)
        except Exception as err:  # PIL raises many types for corrupt data
            bad += 1
            log.warning("skipping unreadable image %s: %s", p, err)
    return good, bad


def _folder_samples(root: Path, classes: list[str], where: str) -> tuple[dict[str, list[Sample]], int]:
    scanned = _scan_class_dirs(root)
    out, skipped = {}, 0
    for i, c in enumerate(classes):
        good, bad = _readable(scanned.get(c, []))
        skipped += bad
        if not good:
            raise JobFileError(f"dataset: class {c!r} has no readable images in {where}")
        out[c] = [Sample(i, path=str(p)) for p in good]
    return out, skipped


def _folder_splits(spec: DatasetSpec, seed: int) -> Splits:
    root = Path(spec.path)  # type: ignore[arg-type]
    if not root.is_dir():
        raise JobFileError(f"dataset.path: {root} does not exist or is not a directory")
    train_dir, val_dir, test_dir = root / "train", root / "val", root / "test"
    if train_dir.is_dir() and val_dir.is_dir():
        found = sorted(_scan_class_dirs(train_dir))
        classes = _select_classes(found, spec.classes, str(train_dir))
        _require(classes, train_dir)
        tr, bad_tr = _folder_samples(train_dir, classes, str(train_dir))
        va, bad_va = _folder_samples(val_dir, classes, str(val_dir))
        test, bad_te, where = _test_folder(test_dir, classes)
        if not test:
            tr, test = _hold_out(tr, spec.test_fraction, seed)
            where = f", testFraction {spec.test_fraction}" if test else ""
        train = [s for c in classes for s in tr[c]]
        val = [s for c in classes for s in va[c]]
        return Splits(classes, train, val, bad_tr + bad_va + bad_te, source=f"folder:{root} (train/ + val/{where})",
                      test=test)
    found = sorted(_scan_class_dirs(root))
    classes = _select_classes(found, spec.classes, str(root))
    _require(classes, root)
    per_class, skipped = _folder_samples(root, classes, str(root))
    per_class, test = _hold_out(per_class, spec.test_fraction, seed)
    train, val = _split(per_class, spec.val_fraction, seed)
    where = f", testFraction {spec.test_fraction}" if test else ""
    return Splits(classes, train, val, skipped, source=f"folder:{root} (valFraction {spec.val_fraction}{where})",
                  test=test)


def _test_folder(test_dir: Path, classes: list[str]) -> tuple[list[Sample], int, str]:
    """<path>/test/<class>/…: every class of train/ must be there (a partial test set would mislead)."""
    if not test_dir.is_dir():
        return [], 0, ""
    te, bad = _folder_samples(test_dir, classes, str(test_dir))
    return [s for c in classes for s in te[c]], bad, " + test/"


def _hold_out(per_class: dict[str, list[Sample]], fraction: float | None,
              seed: int) -> tuple[dict[str, list[Sample]], list[Sample]]:
    """Split the test set off first (stratified, seeded on a stream of its own), so the val split of
    what remains is drawn exactly as it would be without a test set of the same images."""
    if not fraction:
        return per_class, []
    return _take(per_class, fraction, np.random.default_rng([seed, 7]), leave=2, splits="train/val/test")


def _take(per_class: dict[str, list[Sample]], fraction: float, rng: np.random.Generator, leave: int,
          splits: str) -> tuple[dict[str, list[Sample]], list[Sample]]:
    """Per class, a seeded share `fraction` is taken out: at least one image, and at least `leave` stay."""
    rest, taken = {}, []
    for c, samples in per_class.items():
        if len(samples) < leave + 1:
            raise JobFileError(f"dataset: class {c!r} needs at least {leave + 1} images to split {splits}")
        order = rng.permutation(len(samples))
        n = min(max(1, round(len(samples) * fraction)), len(samples) - leave)
        taken += [samples[k] for k in order[:n]]
        rest[c] = [samples[k] for k in order[n:]]
    return rest, taken


def _require(classes: list[str], root: Path) -> None:
    if len(classes) < 2:
        raise JobFileError(f"dataset.path: need at least 2 class folders in {root}, found {classes}")


def _split(per_class: dict[str, list[Sample]], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Stratified, seeded split: every class keeps at least one image on each side."""
    rest, val = _take(per_class, fraction, np.random.default_rng(seed), leave=1, splits="train/val")
    return [s for samples in rest.values() for s in samples], val


def _cap_per_class(samples: list[Sample], cap: int, seed: int) -> list[Sample]:
    """Keep at most `cap` training images per class, chosen by a seeded shuffle (few-shot runs)."""
    rng = np.random.default_rng(seed + 1)
    by_label: dict[int, list[Sample]] = {}
    for s in samples:
        by_label.setdefault(s.label, []).append(s)
    kept = []
    for label in sorted(by_label):
        group = by_label[label]
        kept += [group[k] for k in sorted(rng.permutation(len(group))[:cap])]
    return kept


def load_splits(spec: DatasetSpec, seed: int) -> Splits:
    splits = _digits_splits(spec, seed) if spec.builtin == "digits" else _folder_splits(spec, seed)
    if spec.max_images_per_class is not None:
        splits.train = _cap_per_class(splits.train, spec.max_images_per_class, seed)
    if not splits.train or not splits.val:
        raise JobFileError("dataset: the train or val split is empty")
    if splits.skipped:
        log.warning("skipped %d unreadable image(s)", splits.skipped)
    return splits


def eval_loader(samples: list[Sample], prep: Preprocessing, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Images in order with the eval transform: the test split, or any folder `evaluate` is given."""
    return DataLoader(ImageDataset(samples, prep.eval_transform()), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, collate_fn=skip_broken)


def folder_samples_for(root: Path, classes: list[str]) -> tuple[list[Sample], int]:
    """An ImageFolder (<root>/<class>/…) labelled with an export's class list; unknown folders refused."""
    if not root.is_dir():
        raise JobFileError(f"--data: {root} does not exist or is not a directory")
    found = sorted(_scan_class_dirs(root))
    unknown = [c for c in found if c not in classes]
    if unknown:
        raise JobFileError(f"--data: class folder(s) {unknown[:10]} in {root} are not classes of the model "
                           f"({classes[:20]})")
    if not found:
        raise JobFileError(f"--data: {root} has no class folders")
    samples, skipped = [], 0
    scanned = _scan_class_dirs(root)
    for c in found:
        good, bad = _readable(scanned[c])
        skipped += bad
        samples += [Sample(classes.index(c), path=str(p)) for p in good]
    if not samples:
        raise JobFileError(f"--data: {root} holds no readable images")
    return samples, skipped


def build_dataloaders(
    splits: Splits, prep: Preprocessing, spec: DatasetSpec, batch_size: int, pin_memory: bool = False,
    num_replicas: int = 1, rank: int = 0,
) -> tuple[DataLoader, DataLoader]:
    """The train loader's EpochSampler is reseeded by the caller per epoch (resume = same order).

    With several replicas, `batch_size` is the per-rank share; each rank evaluates every
    num_replicas-th val image (no padding, so the summed counts equal a single-process pass).
    """
    fixed = not spec.augment.any_random
    train_ds = ImageDataset(splits.train, augment.train_transform(prep, spec.augment), fixed, prep.crop)
    val_ds = ImageDataset(splits.val, prep.eval_transform(), True, prep.crop)
    common = {
        "batch_size": batch_size,
        "num_workers": spec.num_workers,
        "collate_fn": skip_broken if num_replicas == 1 else collate_all,
        "pin_memory": pin_memory,
        "persistent_workers": spec.num_workers > 0,
    }
    # Workers seed themselves when they start, from the loader's generator: with random augmentation they
    # are restarted each epoch, so they start from the generator fit() reseeds per epoch and an epoch's
    # augmentations depend on (seed, epoch) alone. Fixed transforms keep their workers (and their memo).
    mix = augment.batch_mix(spec.augment, len(splits.classes))
    loader = DataLoader if mix is None else functools.partial(augment.MixingLoader, mix=mix)
    train = loader(train_ds, sampler=EpochSampler(len(train_ds), num_replicas, rank), generator=torch.Generator(),
                   **{**common, "persistent_workers": spec.num_workers > 0 and fixed})
    if num_replicas == 1:
        val = DataLoader(val_ds, shuffle=False, **common)
    else:
        val = DataLoader(val_ds, sampler=range(rank, len(val_ds), num_replicas), **common)
    return train, val


def collate_all(batch: list):
    """collate_fn for data-parallel runs: a rank cannot skip a step (the others would wait for its
    gradients), so a batch with no readable image is an error that restarts the group."""
    good = skip_broken(batch)
    if good is None:
        raise TrainingError("every image of a batch failed to load (was the dataset changed mid-run?)")
    return good
