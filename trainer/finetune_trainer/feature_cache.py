"""prepare(): what the training loop trains and what it loads, with the feature cache on or off.

With a frozen prefix and fixed inputs (features.decide), the frozen part runs once over train and val;
the loop then trains the head (or an fx tail from the freeze boundary) on cached tensors. Otherwise it
trains the whole model on images. Either way the loop gets a module and two loaders and does not know
which it got. The cache is kept on disk (feature_store) for a retry or resume of a single process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune_api.errors import TrainingError
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import feature_store, features, frozen_pass, pass_input
from finetune_trainer.data import Preprocessing, Splits
from finetune_trainer.distributed import Dist, shard
from finetune_trainer.freeze import FreezePlan
from finetune_trainer.runtime import Env

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    net: nn.Module  # what trains: the model, its head, or an fx tail after the freeze boundary
    train_loader: DataLoader
    val_loader: DataLoader
    decision: features.CacheDecision
    stored: str | None = None  # "reused" | "written" | None: what the on-disk cache did
    note: str | None = None  # what the frozen pass did, for the run's log (reported after its start event)
    frozen_pass: dict | None = None  # how it ran: frozen_pass.FastPrefix.describe() (None: no pass this run)

    def describe(self) -> dict:
        d = self.decision
        return {"enabled": d.enabled, "reason": d.reason, "boundary": d.boundary, "stored": self.stored,
                "views": d.views, **({"frozenPass": self.frozen_pass} if self.frozen_pass else {})}


@dataclass
class CacheInputs:
    """What the on-disk cache key is made of, besides the frozen weights' digest."""

    splits: Splits
    preprocessing: Preprocessing
    frozen_digest: str
    output: Path


def prepare(spec: FineTuneJobSpec, model: nn.Module, plan: FreezePlan, loaders: tuple[DataLoader, DataLoader],
            env: Env, batch_size: int, dist: Dist, inputs: CacheInputs, needed: bool = True,
            announce: Callable[[features.CacheDecision], None] = lambda decision: None) -> Prepared:
    """`needed`: epochs are left to train (a finished run skips the frozen pass). `announce` is called
    with the decision as soon as it is made, before the (possibly long) frozen pass."""
    train_loader, val_loader = loaders
    decision, net = _plan(spec, model, plan)
    announce(decision)
    if not decision.enabled or not needed:
        return Prepared(net, train_loader, val_loader, decision)
    # On disk for one process only: ranks of a group may not share a writable output volume.
    views = decision.views
    t, reduced = spec.training, env.frozen_precision.dtype is not None
    plan = pass_input.pass_plan(t.frozen_pass_batch_size, batch_size, t.frozen_pass_workers, train_loader.num_workers,
                                env.frozen_compute.device, t.frozen_pass_streams, reduced)
    path = _pass_path(spec, env, len(train_loader.dataset) * max(1, views) + len(val_loader.dataset), plan.streams)
    shared = Path(spec.training.feature_cache_dir) if spec.training.feature_cache_dir else None
    store = None if dist.active else (inputs.output, feature_store.cache_key(
        inputs.splits, inputs.preprocessing, decision.boundary, inputs.frozen_digest, _precision_key(env, path[0]),
        env.channels_last, views=feature_store.views_key(spec, inputs.preprocessing) if views else None), shared)
    lock = feature_store.computing(shared, store[1]) if store and shared else contextlib.nullcontext()
    with lock:  # a shared folder: one job computes a key at a time, the others wait and reuse its file
        found = feature_store.load(*store) if store else None
        if found is not None and (not views or tuple(found[0][0].shape[:2]) == (views, len(found[0][1]))):
            where = feature_store.path_for(*store)
            where = where if shared else where.relative_to(store[0])
            note = (f"frozen-part outputs for {len(found[0][1]) + len(found[1][1])} images{_of(views)} reused from "
                    f"{where}; training continues from {decision.boundary}")
            loaders = features.cached_loaders(found[0], found[1], batch_size, 1, 0, views)
            return Prepared(net, *loaders, decision, "reused", note)
        train, val, note, how = _frozen_pass(model, decision.boundary, train_loader, val_loader, env, plan,
                                             dist, views, t.seed, path,
                                             # auto races the paths; under torchrun the ranks could pick apart
                                             race=t.frozen_pass == "auto" and not dist.active)
        stored = _store(store, train, val)
    loaders = features.cached_loaders(train, val, batch_size, dist.world, dist.rank, views)
    return Prepared(net, *loaders, decision, stored, note, how)


def _pass_path(spec: FineTuneJobSpec, env: Env, images: int, streams: int = 1) -> tuple[str, str]:
    """(path, why) of the frozen pass (training.frozenPass) of `images` in `streams`: "eager" with the reason
    it stays eager, or the path to try on the first batch (frozen_pass.PATH, frozen_pass.WEIGHTS_PATH) with an
    empty reason."""
    choice = spec.training.frozen_pass
    if choice == "eager":
        return "eager", "training.frozenPass: eager"
    if not frozen_pass.intended(env.frozen_compute):
        asked = f": training.frozenPass {choice} applies to bf16 passes on the CPU" if choice != "auto" else ""
        return "eager", f"fp32 (bit-for-bit the plain loop's numbers) or a CUDA pass{asked}"
    short = frozen_pass.MIN_IMAGES if streams <= 1 else frozen_pass.MIN_IMAGES_IN_STREAMS
    if choice == "bf16-weights" or (choice == "auto" and images < short):
        return frozen_pass.WEIGHTS_PATH, ""  # auto: compiling costs about a second, more than a short pass saves
    return frozen_pass.PATH, ""


def _precision_key(env: Env, path: str) -> str:
    """How the cached numbers were computed: the pass's precision, and its path when not eager."""
    name = env.frozen_precision.name
    return name if path == "eager" else f"{name}+{path}"


def _plan(spec: FineTuneJobSpec, model: nn.Module, plan: FreezePlan) -> tuple[features.CacheDecision, nn.Module]:
    """What the loop trains: the head, an fx tail after the freeze boundary, or the whole model."""
    cache = features.decide(spec, model, plan)
    if not cache.enabled:
        return cache, model
    if cache.boundary == plan.head_name:
        return cache, model.get_submodule(plan.head_name)
    tail = features.build_tail(model, cache.boundary)
    if tail is None:
        return features.CacheDecision(False, f"the model cannot be split at {cache.boundary}"), model
    return cache, tail


def _of(views: int) -> str:
    return f" (train: {views} augmented views each)" if views else ""


def _frozen_pass(model: nn.Module, boundary: str, train_loader: DataLoader, val_loader: DataLoader, env: Env,
                 plan: pass_input.Plan, dist: Dist, views: int = 0, seed: int = 0,
                 path: tuple[str, str] = ("eager", "the default"), race: bool = False):
    """One frozen pass over train (in dataset order, so later shuffles match the image loader) and val.

    `views` > 0: each train image is decoded once and passed as `views` augmented copies, view k of image i
    as cached_views.SeededViews(seed, k)[i] draws it; the features are stacked to (views, N, ...); val is
    passed once, unaugmented, as always. The pass loads with a batch size and workers of its own
    (`plan`: pass_input.pass_plan), uint8 images made float per batch (pass_input: the same values).

    Data parallel: each rank computes a contiguous slice of train, and the slices are gathered in rank
    order (= dataset order), so every rank holds the whole train cache and samples it exactly as one
    process would; each rank keeps only the features of its own val shard.
    """
    start = time.perf_counter()
    order = shard(len(train_loader.dataset), dist.world, dist.rank) if dist.active else None
    train_in = pass_input.pass_input(train_loader.dataset, train_loader.collate_fn, plan, views, seed, order)
    val_in = pass_input.pass_input(val_loader.dataset, val_loader.collate_fn, plan,
                                   sampler=val_loader.sampler if dist.active else None)
    limit = features.MAX_CACHE_BYTES // dist.world
    frozen = features.frozen_pass_model(model, env.frozen_precision)  # one copy for train and val
    fast = _fast_prefix(frozen, boundary, race, path[0]) if path[0] != "eager" else None
    try:
        # one pipeline for both splits (pass_streams.map_splits); the views' per-image seeds leave the run's
        # own random stream as it was
        with torch.random.fork_rng(devices=[]):
            train, val = features.extract_splits(frozen, boundary, [train_in, val_in], env.frozen_compute,
                                                 limit, fast)
    except MemoryError as err:
        fix = f"use fewer training.featureCacheViews (now {views})" if views else "set training.featureCache: off"
        raise TrainingError(f"feature cache: {err}{' (all views together)' if views else ''}; {fix}") from None
    if dist.active:
        train = (dist.concat_rows(train[0].transpose(0, 1)).transpose(0, 1).contiguous() if views
                 else dist.concat_rows(train[0]), dist.concat_rows(train[1]))
    n_val = len(val_loader.dataset) if dist.active else len(val[1])
    seconds, passed = time.perf_counter() - start, len(train[1]) * max(1, views) + len(val[1])
    how = {**(fast.describe() if fast is not None else {"path": "eager", "reason": path[1]}), **plan.describe(),
           "inputs": "uint8 per image, float per batch" if train_in.batched else "float per image",
           "seconds": round(seconds, 3), "imagesPerSecond": round(passed / seconds, 1) if seconds > 0 else None}
    note = (f"frozen-part outputs for {len(train[1]) + n_val} images{_of(views)} computed once in "
            f"{seconds:.1f}s ({env.frozen_precision.name}, {how['path']}, {how['imagesPerSecond']} img/s, batch "
            f"{plan.batch_size}, loader workers {plan.workers}, streams {plan.streams}); training continues from "
            f"{boundary}")
    return train, val, note, how


def _fast_prefix(frozen: nn.Module, boundary: str, race: bool, path: str) -> frozen_pass.FastPrefix:
    """The fast path `path` over the frozen prefix: compiled (or cast), checked against eager and, for the
    TorchScript prefix with `race`, timed against it on the first batch."""
    prefix = features.build_prefix(frozen, boundary)
    why_not = "" if prefix is not None else f"the frozen part cannot be cut out before {boundary} with torch.fx"
    if path == frozen_pass.WEIGHTS_PATH:
        return frozen_pass.Bf16Weights(prefix, why_not)
    return frozen_pass.FastPrefix(prefix, why_not, race)


def _store(store: tuple[Path, str, Path | None] | None, train, val) -> str | None:
    """Keep the features for a retry; a full or read-only volume only costs the next attempt the pass."""
    if store is None:
        return None
    try:
        feature_store.save(store[0], store[1], train, val, shared=store[2])
    except OSError as err:
        log.warning("feature cache not saved (%s): a retry computes it again", err)
        return None
    return "written"
