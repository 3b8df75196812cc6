"""fit(spec, reporter, output): data → model → freeze → train/evaluate per epoch → checkpoint → export.

Everything that can be wrong with the input is checked before the output folder is touched, so
a bad job leaves nothing behind. Each epoch reseeds from (seed, epoch): a resumed run replays the
exact shuffles, augmentations and dropout masks of an uninterrupted one.

Under torchrun every rank runs fit() with a `Dist` (distributed.py): same model and data, a share
of every global batch, DistributedDataParallel over what trains, and rank 0 alone on the output.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from finetune_trainer import checkpoint as ckpt
from finetune_trainer import feature_store, features
from finetune_trainer.data import build_dataloaders, eval_loader, load_splits
from finetune_trainer.distributed import Dist, shard
from finetune_trainer.engine import EpochStart, EpochStats, EvalResult, Precision, evaluate, train_one_epoch
from finetune_trainer.errors import JobFileError, Preempted, TrainingError
from finetune_trainer.export import read_export, write_export
from finetune_trainer.freeze import apply_freeze, param_groups, plan_freeze, set_train_mode
from finetune_trainer.model import build_model
from finetune_trainer.model_report import predict_probabilities, write_report
from finetune_trainer.report import Reporter
from finetune_trainer.spec import FineTuneJobSpec, Training

log = logging.getLogger(__name__)


@dataclass
class Result:
    output: Path
    weights_file: str
    sha256: str
    best_epoch: int
    val_accuracy: float
    val_loss: float
    train_loss: float
    epochs_run: int
    resumed_from: int | None = None
    reused_export: bool = False
    history: list[dict] = field(default_factory=list)
    test_accuracy: float | None = None  # the held-out test split, evaluated once with the best weights


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            log.warning("training.device cuda requested but no CUDA device is visible; using cpu")
            return torch.device("cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(choice: str, device: torch.device) -> Precision:
    """auto: bf16 (or fp16) autocast on CUDA; on CPUs with native bf16 kernels (AVX512-BF16, AMX) bf16
    autocast too — the same mixed precision, fp32 weights and optimizer state, 1.5-1.8x faster
    backward passes measured here — else fp32. fp16 has no fast CPU path, so it falls back."""
    cuda = device.type == "cuda"
    if choice == "auto":
        choice = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else \
            ("bf16" if cpu_has_bf16() else "fp32")
    if choice == "fp16" and not cuda:
        log.warning("training.precision fp16 needs CUDA; using fp32 on cpu")
        choice = "fp32"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
    return Precision(choice, dtype, device.type)


def build_optimizer(groups: list[dict], t: Training) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate, momentum=t.momentum, weight_decay=t.weight_decay)
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=t.learning_rate, weight_decay=t.weight_decay)


def build_scheduler(opt: torch.optim.Optimizer, t: Training):
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    if t.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=t.step_size, gamma=t.gamma)
    return None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class _Run:
    """Mutable state of one training run (what a checkpoint holds)."""

    epoch: int = 0
    best_accuracy: float = -1.0
    best_loss: float = float("inf")
    best_epoch: int = 0
    best_state: dict | None = None
    since_best: int = 0
    frozen_digest: str = ""
    history: list[dict] = field(default_factory=list)
    resume_count: int = 0  # how many times this run was resumed from a checkpoint (status.resumeCount)
    begin: EpochStart | None = None  # the next epoch starts mid-way (a checkpoint taken on SIGTERM)
    rng: dict | None = None  # random states at that point, so the rest of the epoch replays exactly

    def improved(self, ev: EvalResult) -> bool:
        return ev.accuracy > self.best_accuracy or (ev.accuracy == self.best_accuracy and ev.loss < self.best_loss)


def fit(
    spec: FineTuneJobSpec,
    reporter: Reporter,
    output: Path,
    name: str = "finetune",
    should_stop: Callable[[], bool] = lambda: False,
    dist: Dist | None = None,
) -> Result:
    """Fine-tune per spec; returns the exported result. Raises JobFileError / TrainingError.

    `dist`: this process's place in a torchrun group (default: the only process). Every rank calls
    fit(); a stop requested on any rank stops all of them after the same step.
    """
    dist = dist or Dist()
    device = _device_for(spec.training.device, dist)
    with dist.session(device):
        return _fit(spec, reporter, output, name, dist.agreed(should_stop), dist, device)


def _fit(spec: FineTuneJobSpec, reporter: Reporter, output: Path, name: str, should_stop: Callable[[], bool],
         dist: Dist, device: torch.device) -> Result:
    t = spec.training
    batch = dist.per_rank_batch(t.batch_size)
    seed_everything(t.seed)  # the same on every rank: identical model initialisation everywhere
    splits = load_splits(spec.dataset, t.seed)
    built = build_model(spec, len(splits.classes))
    model = built.model
    plan = plan_freeze(model, built.head_name, spec.freeze)
    apply_freeze(model, plan)
    previous = dist.from_main(lambda: _finished_export(output, spec))
    if previous is not None:
        reporter.event("message", level="info", text=f"{output} already holds a finished export of this spec")
        return _result_from_export(output, previous, reused=True)

    env = _Env.create(spec, model, device=device)
    train_loader, val_loader = build_dataloaders(
        splits, built.preprocessing, spec.dataset, batch, pin_memory=env.device.type == "cuda",
        num_replicas=dist.world, rank=dist.rank,
    )
    optimizer = build_optimizer(param_groups(model, plan, t, spec.freeze.backbone_lr_scale), t)
    scheduler = build_scheduler(optimizer, t)
    scaler = torch.amp.GradScaler("cuda") if env.precision.needs_scaler else None
    criterion = nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    run = _Run()
    run.frozen_digest = _frozen_digest_everywhere(model, dist)  # the frozen part never changes: hash it once
    resumed = _maybe_resume(output, spec, model, optimizer, scheduler, scaler, run, reporter, dist)
    cache, net = _plan_cache(spec, model, plan)
    parallel = {"workers": dist.world, "batchPerWorker": batch} if dist.active else {}

    reporter.event(
        "start", name=name, architecture=spec.model.architecture, numClasses=len(splits.classes),
        classes=splits.classes, trainSize=len(splits.train), valSize=len(splits.val), freeze=plan.describe(),
        device=str(env.device), precision=env.precision.name, weights=built.weights_note, totalEpochs=t.epochs,
        startEpoch=run.epoch + 1, skippedImages=splits.skipped, featureCache=cache.enabled, cacheReason=cache.reason,
        resumeCount=run.resume_count, lastCheckpoint=_checkpoint_note(ckpt.latest_checkpoint(output)
                                                                      if dist.main else None),
        **parallel,
    )
    stored = None
    if cache.enabled and run.epoch < t.epochs:
        # On disk for one process only: ranks of a group may not share a writable output volume.
        key = None if dist.active else feature_store.cache_key(
            splits, built.preprocessing, cache.boundary, run.frozen_digest, env.frozen_precision.name,
            env.channels_last)
        train_loader, val_loader, stored = _feature_loaders(model, cache.boundary, train_loader, val_loader, env,
                                                            batch, reporter, dist, (output, key) if key else None)
    trained = dist.wrap(net, env.device)  # DDP syncs gradients of what trains; `net` stays for evaluation
    run_start = time.perf_counter()
    while run.epoch < t.epochs and not _early_stop(run, t):
        epoch = run.epoch + 1
        begin = _begin_epoch(run, train_loader, t.seed + epoch, dist)
        set_train_mode(model, plan)

        def on_log(step, total, loss, sps, _e=epoch):
            done = (_e - 1 + step / total) / t.epochs
            elapsed = time.perf_counter() - run_start
            eta = elapsed / max(done - (resumed or 0) / t.epochs, 1e-9) * (1 - done) if done else None
            reporter.event("step", epoch=_e, totalEpochs=t.epochs, step=step, totalSteps=total,
                           trainLoss=loss, samplesPerSecond=sps * dist.world, etaSeconds=eta)

        stats = train_one_epoch(trained, train_loader, optimizer, criterion, env.device, env.precision, scaler,
                                on_log, t.log_every_steps, should_stop, env.channels_last, begin)
        stats = _global_stats(stats, dist)
        state = (spec, run, model, optimizer, scheduler, scaler)
        if stats.stopped:
            path = _save_mid_epoch(output, epoch, stats, state, reporter, dist)
            saved = path.name if path else "rank 0's checkpoint"
            raise Preempted(f"stopped in epoch {epoch} after step {stats.steps}; {saved} saved, a restart "
                            "resumes there")
        if scheduler is not None:
            scheduler.step()
        dist.sync_buffers(net)  # BatchNorm statistics of training layers: rank 0's everywhere
        ev = evaluate(net, val_loader, criterion, env.device, env.precision, len(splits.classes), env.channels_last,
                      reduce=dist.sum if dist.active else None)
        _end_epoch(output, epoch, stats, ev, state, reporter, save=dist.main)
        if should_stop() and run.epoch < t.epochs:
            raise Preempted(f"stopped after epoch {epoch}; its checkpoint is saved, a restart resumes there")

    extra = {"featureCache": {"enabled": cache.enabled, "reason": cache.reason, "boundary": cache.boundary,
                              "stored": stored},
             **env.describe(), **({"distributed": parallel} if parallel else {})}
    return _export(output, spec, name, model, built, splits, run, env, resumed, reporter, extra, dist)


def _device_for(choice: str, dist: Dist) -> torch.device:
    """The training device; each rank of a GPU group takes the GPU of its local rank."""
    device = resolve_device(choice)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def _finished_export(output: Path, spec: FineTuneJobSpec) -> dict | None:
    """The export already in `output` when it is this spec's and complete; refuses another spec's."""
    previous = read_export(output)
    if previous and previous.get("fingerprint") != spec.resume_fingerprint():
        raise JobFileError(f"{output} already holds a model exported from a different spec; it is kept — "
                           "use a new output path or remove that model")
    if previous and previous.get("epochs", 0) >= spec.training.epochs:
        return previous
    return None


def _frozen_digest_everywhere(model: nn.Module, dist: Dist) -> str:
    """This rank's frozen-weights digest, checked equal on every rank: a worker whose weights file
    differs would silently train on different features."""
    digest = frozen_digest(model)
    digests = dist.gather_objects(digest)  # the same list on every rank, so all raise or none
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise JobFileError(f"the frozen weights of rank(s) {odd} differ from rank 0's (model.weights must be the "
                           "same file on every worker)")
    return digest


def _global_stats(stats: EpochStats, dist: Dist) -> EpochStats:
    """Epoch totals over all ranks, timed by this rank's clock: what the epoch record and checkpoints hold."""
    if not dist.active:
        return stats
    timed = stats.samples if stats.timed_samples is None else stats.timed_samples
    sums = dist.sum(torch.tensor([stats.loss_sum, stats.samples, stats.skipped_batches, timed], dtype=torch.float64))
    loss_sum, samples, skipped, timed = sums.tolist()
    return dataclasses.replace(stats, loss=loss_sum / max(samples, 1), samples=int(samples),
                               skipped_batches=int(skipped), loss_sum=loss_sum, timed_samples=int(timed))


@dataclass
class _Env:
    """Where and how numbers are computed: device, training precision, frozen-pass precision, layout."""

    device: torch.device
    precision: Precision
    frozen_precision: Precision
    channels_last: bool

    @classmethod
    def create(cls, spec: FineTuneJobSpec, model: nn.Module, device: torch.device) -> _Env:
        precision = resolve_precision(spec.training.precision, device)
        frozen = resolve_frozen_precision(spec.training.precision, device, precision)
        # channels_last is what oneDNN and cuDNN convolutions are fastest with — measured on these CPUs
        # from 64 px up; below that (the 32 px demo) the reorders cost more than they save.
        channels_last = spec.dataset.image_size >= 64 and any(isinstance(m, nn.Conv2d) for m in model.modules())
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        return cls(device, precision, frozen, channels_last)

    def describe(self) -> dict:
        return {"precision": self.precision.name, "frozenPrecision": self.frozen_precision.name,
                "device": str(self.device), "channelsLast": self.channels_last}


def cpu_has_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_frozen_precision(choice: str, device: torch.device, training: Precision) -> Precision:
    """Frozen forward passes have no gradients to protect: auto uses bf16 on CPUs with bf16 kernels."""
    if choice == "auto" and device.type == "cpu" and cpu_has_bf16():
        return Precision("bf16", torch.bfloat16, "cpu")
    return training


def _plan_cache(spec: FineTuneJobSpec, model: nn.Module, plan) -> tuple[features.CacheDecision, nn.Module]:
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


def _feature_loaders(model, boundary, train_loader, val_loader, env: _Env, batch_size, reporter, dist: Dist,
                     store: tuple[Path, str] | None):
    """One frozen pass over train (in dataset order, so later shuffles match the image loader) and val,
    or none when `store` (output, key) already holds it; returns the loaders and what the store did.

    Data parallel: each rank computes a contiguous slice of train, and the slices are gathered in rank
    order (= dataset order), so every rank holds the whole train cache and samples it exactly as one
    process would; each rank keeps only the features of its own val shard.
    """
    found = feature_store.load(*store) if store else None
    if found is not None:
        reporter.event("message", level="info", text=f"frozen-part outputs for {len(found[0][1]) + len(found[1][1])} "
                       f"images reused from {feature_store.path_for(*store).relative_to(store[0])}; "
                       f"training continues from {boundary}")
        return (*features.cached_loaders(found[0], found[1], batch_size, 1, 0), "reused")
    start = time.perf_counter()
    dataset = train_loader.dataset
    order = {"sampler": shard(len(dataset), dist.world, dist.rank)} if dist.active else {"shuffle": False}
    in_order = DataLoader(dataset, batch_size=batch_size, collate_fn=train_loader.collate_fn,
                          num_workers=train_loader.num_workers, **order)
    limit = features.MAX_CACHE_BYTES // dist.world
    frozen = features.frozen_pass_model(model, env.frozen_precision)  # one copy for train and val
    try:
        train = features.extract(frozen, boundary, in_order, env.device, env.frozen_precision, env.channels_last,
                                 limit)
        val = features.extract(frozen, boundary, val_loader, env.device, env.frozen_precision, env.channels_last,
                               limit)
    except MemoryError as err:
        raise TrainingError(f"feature cache: {err}; set training.featureCache: off") from None
    if dist.active:
        train = (dist.concat_rows(train[0]), dist.concat_rows(train[1]))
    n_val = len(val_loader.dataset) if dist.active else len(val[1])
    reporter.event("message", level="info", text=f"frozen-part outputs for {len(train[1]) + n_val} images "
                   f"computed once in {time.perf_counter() - start:.1f}s ({env.frozen_precision.name}); "
                   f"training continues from {boundary}")
    return (*features.cached_loaders(train, val, batch_size, dist.world, dist.rank), _store(store, train, val))


def _store(store: tuple[Path, str] | None, train, val) -> str | None:
    """Keep the features for a retry; a full or read-only volume only costs the next attempt the pass."""
    if store is None:
        return None
    try:
        feature_store.save(*store, train, val)
    except OSError as err:
        log.warning("feature cache not saved (%s): a retry computes it again", err)
        return None
    return "written"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training can change: trainable parameters and the buffers of modules that train.

    Frozen parts are rebuilt from the weights source on resume (checked by frozen_digest), so a
    head-only checkpoint is kilobytes instead of the whole backbone every epoch.
    """
    state = {}
    for mod_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        for name, t in [*own, *module.named_buffers(recurse=False)]:
            state[prefix + name] = t.detach()
    return state


def frozen_digest(model: nn.Module) -> str:
    """sha256 over every frozen parameter and the buffers of frozen modules."""
    trainable = trainable_state(model)
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if name not in trainable:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    return h.hexdigest()


def _early_stop(run: _Run, t: Training) -> bool:
    es = t.early_stopping
    if es.target_accuracy is not None and run.best_accuracy >= es.target_accuracy:
        return True
    return bool(es.patience) and run.since_best >= es.patience


def _end_epoch(output, epoch, stats, ev, state, reporter, save: bool = True) -> None:
    """Record the epoch; `save`: this process writes the checkpoint (rank 0 of a group)."""
    spec, run, model = state[:3]
    is_best = run.improved(ev)
    if is_best:
        run.best_accuracy, run.best_loss, run.best_epoch, run.since_best = ev.accuracy, ev.loss, epoch, 0
        if save:  # only the saving rank checkpoints and exports the best weights
            run.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in trainable_state(model).items()})
    else:
        run.since_best += 1
    record = {"epoch": epoch, "trainLoss": stats.loss, "valLoss": ev.loss, "valAccuracy": ev.accuracy,
              "valTop5": ev.top5, "samplesPerSecond": stats.samples_per_second, "epochSeconds": stats.seconds,
              "perClassAccuracy": ev.per_class}
    run.history.append(record)
    run.epoch = epoch
    path = ckpt.save_checkpoint(output, epoch, _checkpoint_state(*state)) if save else None
    reporter.event("epoch", totalEpochs=spec.training.epochs, isBest=is_best,
                   bestValAccuracy=run.best_accuracy, skippedBatches=stats.skipped_batches,
                   lastCheckpoint=_checkpoint_note(path),
                   **{k: v for k, v in record.items() if k != "perClassAccuracy"})


def _checkpoint_state(spec, run: _Run, model, optimizer, scheduler, scaler) -> dict:
    """Everything resuming needs except the frozen weights (rebuilt from the weights source)."""
    return {
        "epoch": run.epoch, "model": trainable_state(model), "frozenDigest": run.frozen_digest,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler else None,
        "scaler": scaler.state_dict() if scaler else None,
        "best": {k: getattr(run, k) for k in ("best_accuracy", "best_loss", "best_epoch", "since_best")},
        "best_state": run.best_state, "history": run.history, "resumeCount": run.resume_count,
        "spec": spec.to_wire(), "fingerprint": spec.resume_fingerprint(),
    }


def _save_mid_epoch(output, epoch, stats, state, reporter, dist: Dist) -> Path | None:
    """SIGTERM mid-epoch: save where the epoch stopped, with its loss sums and random states.

    Data parallel: `stats` are already group totals; rank 0 saves every rank's random state (each
    resumes its own stream) and is the only one writing — the others return None."""
    rng = dist.gather_objects(_rng_state())
    if not dist.main:
        return None
    spec = state[0]
    data = _checkpoint_state(*state)
    data["inEpoch"] = {"epoch": epoch, "step": stats.steps, "lossSum": stats.loss_sum, "samples": stats.samples,
                       "skippedBatches": stats.skipped_batches, "rng": rng[0]}
    if dist.active:
        data["inEpoch"]["rngByRank"] = rng
    path = ckpt.save_checkpoint(output, epoch, data, step=stats.steps)
    reporter.event("checkpoint", epoch=epoch, totalEpochs=spec.training.epochs, step=stats.steps,
                   lastCheckpoint=_checkpoint_note(path))
    return path


def _checkpoint_note(path: Path | None) -> dict | None:
    """status.lastCheckpoint: which epoch (and step, when mid-epoch) and when."""
    if path is None:
        return None
    epoch, kind, step = ckpt.position(path)
    when = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"epoch": epoch, **({"step": step} if kind == 0 else {}), "time": when, "file": path.name}


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _begin_epoch(run: _Run, train_loader, seed: int, dist: Dist) -> EpochStart | None:
    """Seed the epoch (same shuffle and augmentations on every run); after a mid-epoch checkpoint,
    skip the steps it covered and restore its random states.

    The permutation comes from `seed` on every rank (each takes its slice of the same order); the
    augmentation and dropout streams are per rank (rank 0's is the single-process one)."""
    seed_everything(dist.epoch_seed(seed))
    train_loader.generator.manual_seed(dist.epoch_seed(seed))  # the loader's worker seeds
    begin, run.begin = run.begin, None
    # Global step k covers the same images whatever the number of ranks, so steps × per-rank batch
    # is where this rank resumes even when the group size changed.
    train_loader.sampler.reseed(seed, skip=begin.step * train_loader.batch_size if begin else 0)
    if begin and run.rng:
        _set_rng_state(run.rng)
    return begin


def _maybe_resume(output, spec, model, optimizer, scheduler, scaler, run: _Run, reporter, dist: Dist) -> int | None:
    """Load the latest checkpoint (rank 0 reads it and hands it to the other ranks)."""
    found = dist.from_main(lambda: _load_latest(output, spec, run.frozen_digest))
    if found is None:
        return None
    name, state = found
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    for k, v in state["best"].items():
        setattr(run, k, v)
    run.best_state, run.history, run.epoch = state["best_state"], state["history"], state["epoch"]
    run.resume_count = state.get("resumeCount", 0) + 1
    where = f"epoch {run.epoch} done"
    if mid := state.get("inEpoch"):
        # The saved sums are group totals: rank 0 carries them on, the others start from zero.
        sums = (mid["lossSum"], mid["samples"], mid["skippedBatches"]) if dist.main else (0.0, 0, 0)
        run.begin = EpochStart(mid["step"], *sums)
        run.rng = _rank_rng(mid, dist)
        where = f"epoch {mid['epoch']} stopped after step {mid['step']}"
    reporter.event("message", level="info", text=f"resuming from {name} ({where}; resume #{run.resume_count})")
    return run.epoch


def _load_latest(output: Path, spec: FineTuneJobSpec, digest: str) -> tuple[str, dict] | None:
    path = ckpt.latest_checkpoint(output)
    if path is None:
        return None
    state = ckpt.load_for_resume(path, spec)
    if state.get("frozenDigest") != digest:
        raise JobFileError(f"the frozen weights differ from those {path.name} was trained on (was the weights "
                           "file replaced?); use a new output path or delete the checkpoints")
    return path.name, state


def _rank_rng(mid: dict, dist: Dist) -> dict | None:
    """This rank's saved random state; None (keep the epoch's seeded one) when the group size changed."""
    if not dist.active:
        return mid["rng"]
    by_rank = mid.get("rngByRank")
    return by_rank[dist.rank] if by_rank and len(by_rank) == dist.world else None


def _export(output, spec, name, model, built, splits, run, env: _Env, resumed, reporter, extra, dist: Dist) -> Result:
    """Rank 0 writes the export; the other ranks wait for it and return the same result."""
    meta = dist.from_main(lambda: _write_export(output, spec, name, model, built, splits, run, reporter, resumed,
                                                extra, env))
    return _result_from_export(output, meta, resumed)


def _write_export(output, spec, name, model, built, splits, run, reporter, resumed, extra, env: _Env) -> dict:
    if run.best_state is not None:
        model.load_state_dict(run.best_state, strict=False)
    best = next(h for h in run.history if h["epoch"] == run.best_epoch)
    evaluation = _evaluate_best(output, model, splits, built, env, run.history, spec)
    reporter.event("message", level="info", text=evaluation["summary"])
    meta = write_export(
        output, model, name=name, spec=spec, classes=splits.classes, preprocessing=built.preprocessing,
        best=best, history=run.history, evaluation=evaluation, extra={
            "weightsSource": built.weights_note,
            "freeze": {"policy": spec.freeze.policy, "headModule": built.head_name},
            "dataset": {"source": splits.source, "train": len(splits.train), "val": len(splits.val),
                        "test": len(splits.test), "skippedImages": splits.skipped},
            "resumedFromEpoch": resumed, "epochs": run.epoch, **extra,
        },
    )
    feature_store.discard(output)  # the export is committed: no retry will need the features
    per_class = dict(zip(splits.classes, best["perClassAccuracy"], strict=True))
    reporter.event("end", valAccuracy=best["valAccuracy"], valLoss=best["valLoss"], bestEpoch=run.best_epoch,
                   trainLoss=best["trainLoss"], perClassAccuracy=per_class, totalEpochs=spec.training.epochs,
                   epoch=run.epoch, testAccuracy=meta["metrics"].get("testAccuracy"),
                   weightsFile=meta["weightsFile"], sha256=meta["sha256"], output=str(output))
    return meta


def _evaluate_best(output: Path, model: nn.Module, splits, built, env: _Env, history: list[dict],
                   spec: FineTuneJobSpec) -> dict:
    """The report on the held-out test split (val when there is none), best weights, full model on images."""
    split, samples = ("test", splits.test) if splits.test else ("val", splits.val)
    loader = eval_loader(samples, built.preprocessing, spec.training.batch_size, spec.dataset.num_workers)
    labels, probs = predict_probabilities(model, loader, env.device, env.precision, env.channels_last)
    return write_report(output, labels, probs, splits.classes, split=split, history=history)


def _result_from_export(output: Path, meta: dict, resumed: int | None = None, reused: bool = False) -> Result:
    m = meta["metrics"]
    return Result(output, meta["weightsFile"], meta["sha256"], meta["bestEpoch"], m["valAccuracy"], m["valLoss"],
                  m["trainLoss"], meta.get("epochs", 0), resumed, reused, history=meta.get("history", []),
                  test_accuracy=m.get("testAccuracy"))
