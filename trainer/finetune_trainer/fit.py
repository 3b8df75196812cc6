"""fit(spec, reporter, output): data → model → freeze → train/evaluate per epoch → checkpoint → export.

Everything that can be wrong with the input is checked before the output folder is touched, so
a bad job leaves nothing behind. Each epoch reseeds from (seed, epoch): a resumed run replays the
exact shuffles, augmentations and dropout masks of an uninterrupted one.

Under torchrun every rank runs fit() with a `Dist` (distributed.py): same model and data, a share
of every global batch, DistributedDataParallel over what trains, and rank 0 alone on the output.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from finetune_api.errors import JobFileError, Preempted
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import checkpoint as ckpt
from finetune_trainer import startup
from finetune_trainer.data import build_dataloaders, load_splits
from finetune_trainer.distill import Distiller
from finetune_trainer.distributed import Dist
from finetune_trainer.engine import EpochStart, EpochStats, evaluate, train_one_epoch
from finetune_trainer.feature_cache import CacheInputs, prepare
from finetune_trainer.finish import Result, finished_export, result_from_export, write_result
from finetune_trainer.freeze import (
    FreezeSchedule,
    apply_freeze,
    describe_schedule,
    param_groups,
    plan_freeze,
    set_train_mode,
)
from finetune_trainer.model import build_model, check_head_batches
from finetune_trainer.report import Reporter
from finetune_trainer.runtime import Env, build_optimizer, build_scheduler, device_for, seed_everything
from finetune_trainer.safe_io import check_writable, first_line
from finetune_trainer.train_state import TrainState, frozen_digest, rng_state, set_rng_state

__all__ = ["Result", "fit"]


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
    device = device_for(spec.training.device, dist)
    with dist.session(device):
        return _fit(spec, reporter, output, name, dist.agreed(should_stop), dist, device)


def _fit(spec: FineTuneJobSpec, reporter: Reporter, output: Path, name: str, should_stop: Callable[[], bool],
         dist: Dist, device: torch.device) -> Result:
    t = spec.training
    startup.begin()
    batch = dist.per_rank_batch(t.batch_size)
    seed_everything(t.seed)  # the same on every rank: identical model initialisation everywhere
    splits = load_splits(spec.dataset, t.seed)
    check_head_batches(spec.head, len(splits.train), t.batch_size)
    built = build_model(spec, len(splits.classes))
    model = built.model
    plan = plan_freeze(model, built.head_name, spec.freeze)  # widest: every stage that trains at some epoch
    apply_freeze(model, plan)
    previous = dist.from_main(lambda: finished_export(output, spec))
    if previous is not None:
        reporter.event("message", level="info", text=f"{output} already holds a finished export of this spec")
        return result_from_export(output, previous, reused=True)
    distiller = Distiller.create(spec, splits.classes, built, plan)  # the teacher, checked before anything is written
    if dist.main:
        check_writable(output, "output.path")  # a read-only or misplaced volume fails now, not after an epoch

    env = Env.create(spec, model, device=device)
    loaders = build_dataloaders(splits, built.preprocessing, spec.dataset, batch, pin_memory=env.device.type == "cuda",
                                num_replicas=dist.world, rank=dist.rank)
    optimizer = build_optimizer(param_groups(model, plan, t, spec.freeze.backbone_lr_scale,
                                             spec.freeze.layerwise_lr_decay), t)
    distiller.join(optimizer, env.device)
    state = TrainState(model, optimizer, build_scheduler(optimizer, t), env.scaler(),
                       frozen_digest=_frozen_digest_everywhere(model, dist))  # frozen part: hashed once
    state.aux = distiller.projection  # distillation's feature projection: checkpointed, never exported
    resumed = _resume(output, spec, state, reporter, dist)
    prepared = prepare(spec, model, plan, loaders, env, batch, dist,
                       CacheInputs(splits, built.preprocessing, state.frozen_digest, output), needed=not state.done(t),
                       announce=lambda cache: _report_start(reporter, spec, name, splits, plan, env, built, cache,
                                                            state, output, dist, batch))
    if prepared.note:
        reporter.event("message", level="info", text=prepared.note)
    started = _report_startup(reporter)
    prepared = distiller.prepare(prepared, loaders[0], env, batch, dist, CacheInputs(
        splits, built.preprocessing, state.frozen_digest, output), reporter, needed=not state.done(t))
    if t.ema is not None:
        state.attach_ema(prepared.net, t.ema.decay)
    criterion = distiller.loss(nn.CrossEntropyLoss(label_smoothing=t.label_smoothing))  # the task loss in evaluate
    on_log = _step_reporter(reporter, t.epochs, state.epoch, dist.world)
    average = (lambda: state.ema.update_parameters(prepared.net)) if state.ema is not None else None

    def validate(net: nn.Module):
        dist.sync_buffers(net)  # BatchNorm statistics of training layers: rank 0's everywhere
        return evaluate(net, prepared.val_loader, criterion, env.compute, len(splits.classes),
                        reduce=dist.sum if dist.active else None)

    schedule, trained = FreezeSchedule(model, built.head_name, spec.freeze), None
    while not state.done(t):
        epoch = state.epoch + 1
        if (unfrozen := schedule.enter(epoch)) or trained is None:
            trained = dist.wrap(prepared.net, env.device)  # DDP syncs gradients of what trains; `net` evaluates
            if unfrozen:
                reporter.event("message", level="info", text=unfrozen)
        begin = _begin_epoch(state, prepared.train_loader, t.seed + epoch, dist)
        set_train_mode(model, schedule.plan)
        stats = train_one_epoch(trained, prepared.train_loader, optimizer, criterion, state.scaler, env.compute,
                                on_log=on_log(epoch), log_every=t.log_every_steps, should_stop=should_stop,
                                begin=begin, clip_norm=t.grad_clip_norm, after_step=average)
        stats = _global_stats(stats, dist)
        started = started or _report_startup(reporter)
        if stats.stopped:
            raise _stop_mid_epoch(output, spec, epoch, stats, state, reporter, dist)
        if state.scheduler is not None:
            state.scheduler.step()
        ev = validate(prepared.net)
        ema_ev = validate(state.ema.module) if state.ema is not None else None  # the average, beside the raw
        record, is_best = state.end_epoch(epoch, stats, ev, keep_best=dist.main, ema_ev=ema_ev)
        saved = ckpt.save_checkpoint(output, epoch, state.state_dict(), spec) if dist.main else None
        reporter.event("epoch", totalEpochs=t.epochs, isBest=is_best, bestValAccuracy=state.best_accuracy,
                       skippedBatches=stats.skipped_batches, lastCheckpoint=checkpoint_note(saved),
                       **{k: v for k, v in record.items() if k != "perClassAccuracy"})
        if should_stop() and state.epoch < t.epochs:
            raise Preempted(f"stopped after epoch {epoch}; its checkpoint is saved, a restart resumes there")

    extra = {"featureCache": prepared.describe(), **env.describe(), **distiller.describe(),
             **({"timings": startup.timings()} if startup.timings() else {}),
             **({"distributed": _parallel(dist, batch)} if dist.active else {})}
    meta = dist.from_main(lambda: write_result(output, spec, name, model, built, splits, state, env, resumed,
                                               reporter, extra))
    return result_from_export(output, meta, resumed)


def _report_startup(reporter: Reporter) -> bool:
    """The start-up line, once a first batch was seen (the frozen pass's, or the first epoch's); True if sent."""
    line = startup.describe()
    if line:
        reporter.event("message", level="info", text=line)
    return line is not None


def _parallel(dist: Dist, batch: int) -> dict:
    return {"workers": dist.world, "batchPerWorker": batch} if dist.active else {}


def _report_start(reporter, spec, name, splits, plan, env, built, cache, state, output, dist, batch) -> None:
    latest = ckpt.latest_checkpoint(output) if dist.main else None
    reporter.event(
        "start", name=name, architecture=spec.model.architecture, numClasses=len(splits.classes),
        classes=splits.classes, trainSize=len(splits.train), valSize=len(splits.val),
        freeze=describe_schedule(built.model, built.head_name, spec.freeze),
        device=str(env.device), precision=env.precision.name, weights=built.weights_note,
        totalEpochs=spec.training.epochs, startEpoch=state.epoch + 1, skippedImages=splits.skipped,
        featureCache=cache.enabled, cacheReason=cache.reason,
        resumeCount=state.resume_count, lastCheckpoint=checkpoint_note(latest), **_parallel(dist, batch))


def _step_reporter(reporter: Reporter, epochs: int, start_epoch: int, world: int):
    """on_log for each epoch: step progress with an ETA from this process's own rate since it started."""
    run_start = time.perf_counter()

    def for_epoch(epoch: int):
        def on_log(step: int, total: int, loss: float, sps: float) -> None:
            done = (epoch - 1 + step / total) / epochs
            elapsed = time.perf_counter() - run_start
            eta = elapsed / max(done - start_epoch / epochs, 1e-9) * (1 - done) if done else None
            reporter.event("step", epoch=epoch, totalEpochs=epochs, step=step, totalSteps=total, trainLoss=loss,
                           samplesPerSecond=sps * world, etaSeconds=eta)
        return on_log

    return for_epoch


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


def _stop_mid_epoch(output: Path, spec: FineTuneJobSpec, epoch: int, stats: EpochStats, state: TrainState,
                    reporter: Reporter, dist: Dist) -> Preempted:
    """SIGTERM mid-epoch: save where the epoch stopped, with its loss sums and random states.

    Data parallel: `stats` are already group totals; rank 0 saves every rank's random state (each
    resumes its own stream) and is the only one writing."""
    rng = dist.gather_objects(rng_state())
    if not dist.main:
        return Preempted(f"stopped in epoch {epoch} after step {stats.steps}; rank 0's checkpoint saved, a restart "
                         "resumes there")
    data = state.state_dict()
    data["inEpoch"] = {"epoch": epoch, "step": stats.steps, "lossSum": stats.loss_sum, "samples": stats.samples,
                       "skippedBatches": stats.skipped_batches, "rng": rng[0]}
    if dist.active:
        data["inEpoch"]["rngByRank"] = rng
    path = ckpt.save_checkpoint(output, epoch, data, spec, step=stats.steps)
    reporter.event("checkpoint", epoch=epoch, totalEpochs=spec.training.epochs, step=stats.steps,
                   lastCheckpoint=checkpoint_note(path))
    return Preempted(f"stopped in epoch {epoch} after step {stats.steps}; {path.name} saved, a restart resumes there")


def checkpoint_note(path: Path | None) -> dict | None:
    """status.lastCheckpoint: which epoch (and step, when mid-epoch) and when."""
    if path is None:
        return None
    epoch, kind, step = ckpt.position(path)
    when = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"epoch": epoch, **({"step": step} if kind == 0 else {}), "time": when, "file": path.name}


def _begin_epoch(state: TrainState, train_loader, seed: int, dist: Dist) -> EpochStart | None:
    """Seed the epoch (same shuffle and augmentations on every run); after a mid-epoch checkpoint,
    skip the steps it covered and restore its random states.

    The permutation comes from `seed` on every rank (each takes its slice of the same order); the
    augmentation and dropout streams are per rank (rank 0's is the single-process one)."""
    seed_everything(dist.epoch_seed(seed))
    train_loader.generator.manual_seed(dist.epoch_seed(seed))  # the loader's worker seeds
    begin, state.begin = state.begin, None
    # Global step k covers the same images whatever the number of ranks, so steps × per-rank batch
    # is where this rank resumes even when the group size changed.
    train_loader.sampler.reseed(seed, skip=begin.step * train_loader.batch_size if begin else 0)
    if begin and state.rng:
        set_rng_state(state.rng)
    return begin


def _resume(output: Path, spec: FineTuneJobSpec, state: TrainState, reporter: Reporter, dist: Dist) -> int | None:
    """Load the latest checkpoint (rank 0 reads it and hands it to the other ranks); the epoch it resumes at."""
    found = dist.from_main(lambda: _load_latest(output, spec, state.frozen_digest, reporter))
    if found is None:
        return None
    name, saved = found
    try:
        state.load_state_dict(saved)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as err:  # right header, wrong insides
        raise JobFileError(f"checkpoint {name} does not fit this model ({type(err).__name__}: {first_line(err)}); "
                           "delete it or use a new output path") from None
    where = f"epoch {state.epoch} done"
    if mid := saved.get("inEpoch"):
        # The saved sums are group totals: rank 0 carries them on, the others start from zero.
        sums = (mid["lossSum"], mid["samples"], mid["skippedBatches"]) if dist.main else (0.0, 0, 0)
        state.begin = EpochStart(mid["step"], *sums)
        state.rng = _rank_rng(mid, dist)
        where = f"epoch {mid['epoch']} stopped after step {mid['step']}"
    reporter.event("message", level="info", text=f"resuming from {name} ({where}; resume #{state.resume_count})")
    return state.epoch


def _load_latest(output: Path, spec: FineTuneJobSpec, digest: str, reporter: Reporter) -> tuple[str, dict] | None:
    found = ckpt.latest_readable(output, lambda text: reporter.event("message", level="warning", text=text))
    if found is None:
        return None
    path, saved = found
    saved = ckpt.load_for_resume(path, spec, saved)
    if saved.get("frozenDigest") != digest:
        raise JobFileError(f"the frozen weights differ from those {path.name} was trained on (was the weights "
                           "file replaced?); use a new output path or delete the checkpoints")
    return path.name, saved


def _rank_rng(mid: dict, dist: Dist) -> dict | None:
    """This rank's saved random state; None (keep the epoch's seeded one) when the group size changed."""
    if not dist.active:
        return mid["rng"]
    by_rank = mid.get("rngByRank")
    return by_rank[dist.rank] if by_rank and len(by_rank) == dist.world else None
