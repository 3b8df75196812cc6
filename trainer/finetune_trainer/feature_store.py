"""The feature cache on disk: `<output>/cache/features-<key>.pt`, so a retry or a resume skips the frozen pass.

The key hashes everything the cached activations depend on: the frozen weights (their digest), every
image (file path, size and mtime, or the pixels of in-memory images), labels and class names, the
preprocessing, the freeze boundary, the precision and memory layout of the frozen pass, and the torch
version; with augmented views (cached_views) also their count, the whole augmentation spec, the seed and
torchvision's version. Anything changed gives a new key; the file of an old key is deleted when the new one is written,
and every file once the export is committed (no retry needs them; they can be gigabytes). A file that
fails to load (truncated, another format, another key, tensors that do not match the digest stored with
them) is treated as absent, never trusted. One process only: the ranks of a data-parallel group keep
their features in memory.

`training.featureCacheDir` names a folder several jobs share (a sweep's trials, on one volume): files there
are kept after the export and never deleted for another key (they belong to other jobs), and `computing()`
lets one job at a time run the frozen pass for a key while the others wait for its file — so trials with
the same frozen part, data and preprocessing pay for one pass between them.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torchvision

from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.checkpoint import atomic_write
from finetune_trainer.data import Preprocessing, Sample, Splits

CACHE_DIR = "cache"
PREFIX = "features-"
FORMAT = 1
log = logging.getLogger(__name__)
Pair = tuple[torch.Tensor, torch.Tensor]


def cache_key(splits: Splits, prep: Preprocessing, boundary: str, frozen_digest: str, precision: str,
              channels_last: bool, views: dict | None = None) -> str:
    """`views`: views_key() when the train cache holds augmented views (None: one unaugmented pass)."""
    h = hashlib.sha256()
    header = {"format": FORMAT, "torch": torch.__version__, "classes": splits.classes, "boundary": boundary,
              "frozen": frozen_digest, "precision": precision, "channelsLast": channels_last,
              "preprocessing": [prep.resize, prep.crop, list(prep.mean), list(prep.std)]}
    if views is not None:  # only then, so the key of an unaugmented cache is what it always was
        header["views"] = views
    h.update(json.dumps(header, sort_keys=True).encode())
    for split in (splits.train, splits.val):
        h.update(b"|split|")
        for sample in split:
            _hash_sample(h, sample)
    return h.hexdigest()


def views_key(spec: FineTuneJobSpec, prep: Preprocessing) -> dict:
    """What augmented views depend on besides the images and weights: their number, every augmentation
    field, the seed they derive from, the interpolation of the crops, and torchvision's version."""
    return {"count": spec.training.feature_cache_views, "seed": spec.training.seed,
            "augment": spec.dataset.augment.model_dump(mode="json"), "interpolation": prep.interpolation,
            "torchvision": torchvision.__version__}


def _hash_sample(h, sample: Sample) -> None:
    h.update(str(sample.label).encode())
    if sample.pixels is not None:
        h.update(sample.pixels.tobytes())
        return
    st = os.stat(sample.path)  # type: ignore[arg-type]
    # Path, size and mtime, as make and rsync decide "changed": hashing every image's bytes would cost
    # a read of the whole dataset, which is what the cache saves.
    h.update(f"{sample.path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())


def path_for(output: Path, key: str, shared: Path | None = None) -> Path:
    return (shared if shared is not None else output / CACHE_DIR) / f"{PREFIX}{key[:32]}.pt"


def load(output: Path, key: str, shared: Path | None = None) -> tuple[Pair, Pair] | None:
    """The cached (train, val) features for `key`, or None (absent, unreadable, another key, or tensors
    that are not what was written)."""
    path = path_for(output, key, shared)
    try:
        if not path.is_file():
            return None
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("key") != key:
            return None
        pairs = (data["trainX"], data["trainY"]), (data["valX"], data["valY"])
        if data.get("digest") != _digest(pairs):
            log.warning("feature cache %s does not match its digest: computing it again", path.name)
            return None
        return pairs
    except Exception as err:  # a broken cache only costs the frozen pass, never the run
        log.warning("feature cache %s unreadable (%s): computing it again", path.name, type(err).__name__)
        return None


def save(output: Path, key: str, train: Pair, val: Pair, shared: Path | None = None) -> Path:
    """Write atomically (a unique temp file renamed into place: concurrent writers of one key each publish a
    whole file), then, in a job's own folder only, delete the files of other keys (stale after a change)."""
    path = path_for(output, key, shared)
    data = {"key": key, "trainX": train[0], "trainY": train[1], "valX": val[0], "valY": val[1],
            "digest": _digest((train, val))}
    atomic_write(path, lambda tmp: torch.save(data, tmp))
    if shared is None:
        for old in path.parent.glob(f"{PREFIX}*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
    return path


def _digest(pairs: tuple[Pair, Pair]) -> str:
    """sha256 over the tensors' dtypes, shapes and bytes: what a reader checks before trusting a file."""
    h = hashlib.sha256()
    for t in (t for pair in pairs for t in pair):
        t = t.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@contextlib.contextmanager
def computing(shared: Path, key: str) -> Iterator[None]:
    """Hold the shared folder's lock for `key` while the frozen pass runs: jobs that need the same features
    wait here, then find the file published. flock is released by the kernel if the holder dies, so a
    killed trial never blocks the others. A folder that cannot be made or locked (read-only, no locks on
    the file system) only costs the sharing: the job computes on its own and says so."""
    try:
        shared.mkdir(parents=True, exist_ok=True)
        lock = open(shared / f".{PREFIX}{key[:32]}.lock", "a")  # noqa: SIM115  (held across the yield)
    except OSError as err:
        log.warning("feature cache folder %s unusable (%s): computing without sharing", shared, err.strerror)
        yield
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as err:
            log.warning("feature cache lock unavailable in %s (%s): computing without it", shared, err.strerror)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(lock, fcntl.LOCK_UN)


def discard(output: Path) -> None:
    """Delete every cached feature file, and the teacher outputs beside them (after the export: no retry
    needs them, and they can be gigabytes)."""
    for path in (output / CACHE_DIR).glob("*.pt"):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        (output / CACHE_DIR).rmdir()
