"""The end of a run: the best weights back in the model, the test evaluation, the export, the Result.

Rank 0 alone runs write_result (fit hands the others its model.json). The export is committed last
(model.json), after the evaluation report beside it, so a reader that finds model.json finds all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from finetune_api.errors import JobFileError
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import feature_store
from finetune_trainer.data import Splits
from finetune_trainer.eval_features import shared_head_eval
from finetune_trainer.export import read_export, write_export
from finetune_trainer.fetch import read_lineage
from finetune_trainer.model import BuiltModel
from finetune_trainer.model_report import predict_probabilities, write_report
from finetune_trainer.pass_input import eval_input
from finetune_trainer.portable import write_graphs
from finetune_trainer.report import Reporter
from finetune_trainer.runtime import Env
from finetune_trainer.train_state import TrainState


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


def finished_export(output: Path, spec: FineTuneJobSpec) -> dict | None:
    """The export already in `output` when it is this spec's and complete; refuses another spec's."""
    previous = read_export(output)
    if previous and previous.get("fingerprint") != spec.resume_fingerprint():
        raise JobFileError(f"{output} already holds a model exported from a different spec; it is kept — "
                           "use a new output path or remove that model")
    missing = set(spec.output.formats) - {"safetensors", *previous.get("formats", {})} if previous else set()
    if previous and previous.get("epochs", 0) >= spec.training.epochs and not missing:
        return previous  # a format asked for after the run: the export is written again, from the checkpoint
    return None


def write_result(output: Path, spec: FineTuneJobSpec, name: str, model: nn.Module, built: BuiltModel,
                 splits: Splits, state: TrainState, env: Env, resumed: int | None, reporter: Reporter,
                 extra: dict) -> dict:
    """Best weights → evaluation report → export; returns model.json's content."""
    weights, best, ema_note = _exported(spec, state)
    if weights is not None:
        model.load_state_dict(weights, strict=False)
    evaluation = _evaluate_best(output, model, splits, built, env, state.history, spec, state.frozen_digest)
    reporter.event("message", level="info", text=evaluation["summary"])
    if "distillation" in extra:  # the student's own scores beside its teacher's
        test = evaluation["accuracy"] if evaluation.get("split") == "test" else None
        extra = {**extra, "distillation": {**extra["distillation"], "student": {
            "valAccuracy": best["valAccuracy"], "testAccuracy": test}}}
    formats = write_graphs(output, model, built.preprocessing, spec.output, splits.val, name, splits.classes)
    meta = write_export(
        output, model, name=name, spec=spec, classes=splits.classes, preprocessing=built.preprocessing,
        best=best, history=state.history, evaluation=evaluation, formats=formats, extra={
            "weightsSource": built.weights_note,
            "freeze": {"policy": spec.freeze.policy, "headModule": built.head_name},
            "dataset": {"source": splits.source, "train": len(splits.train), "val": len(splits.val),
                        "test": len(splits.test), "skippedImages": splits.skipped},
            "resumedFromEpoch": resumed, "epochs": state.epoch, **extra,
            # dataset.uri / weights.uri: where the data and weights came from (uri, sha256, size)
            **({"sources": sources} if (sources := read_lineage(output)) else {}),
            **({"ema": ema_note} if ema_note else {}),
        },
    )
    feature_store.discard(output)  # the export is committed: no retry will need the features
    per_class = dict(zip(splits.classes, best["perClassAccuracy"], strict=True))
    reporter.event("end", valAccuracy=best["valAccuracy"], valLoss=best["valLoss"], bestEpoch=best["epoch"],
                   trainLoss=best["trainLoss"], perClassAccuracy=per_class, totalEpochs=spec.training.epochs,
                   epoch=state.epoch, testAccuracy=meta["metrics"].get("testAccuracy"),
                   weightsFile=meta["weightsFile"], sha256=meta["sha256"], output=str(output))
    return meta


def _exported(spec: FineTuneJobSpec, state: TrainState) -> tuple[dict | None, dict, dict | None]:
    """The weights to export (the raw best epoch's, or the weight average's when it scores better), the
    history record whose metrics they carry, and model.json's `ema` entry saying which it was."""
    best = next(h for h in state.history if h["epoch"] == state.best_epoch)
    if spec.training.ema is None:
        return state.best_state, best, None
    use_ema = state.ema_scores_better()
    e = state.ema_best
    note = {"decay": spec.training.ema.decay, "exported": "ema" if use_ema else "raw",
            "emaValAccuracy": e["accuracy"], "emaBestEpoch": e["epoch"],
            "rawValAccuracy": state.best_accuracy, "rawBestEpoch": state.best_epoch}
    if not use_ema:
        return state.best_state, best, note
    record = next(h for h in state.history if h["epoch"] == e["epoch"])
    averaged = {**record, "valAccuracy": e["accuracy"], "valLoss": e["loss"], "valTop5": e["top5"],
                "perClassAccuracy": e["perClass"]}
    return state.ema_best_state, averaged, note


def _evaluate_best(output: Path, model: nn.Module, splits: Splits, built: BuiltModel, env: Env,
                   history: list[dict], spec: FineTuneJobSpec, frozen: str = "") -> dict:
    """The report on the held-out test split (val when there is none), best weights, full model on images
    (or, for head-only jobs sharing a feature cache folder, the head on the frozen part's shared outputs)."""
    split, samples = ("test", splits.test) if splits.test else ("val", splits.val)
    loader = eval_input(samples, built.preprocessing, spec.training.frozen_pass_batch_size, spec.dataset.num_workers,
                        env.compute.device, spec.training.batch_size, spec.training.frozen_pass_streams,
                        env.compute.precision.dtype is not None)
    shared = shared_head_eval(model, built.head_name, loader, samples, splits.classes, built.preprocessing,
                              env.compute, spec, frozen, output)
    labels, probs = shared if shared is not None else predict_probabilities(model, loader, env.compute)
    return write_report(output, labels, probs, splits.classes, split=split, history=history)


def result_from_export(output: Path, meta: dict, resumed: int | None = None, reused: bool = False) -> Result:
    m = meta["metrics"]
    return Result(output, meta["weightsFile"], meta["sha256"], meta["bestEpoch"], m["valAccuracy"], m["valLoss"],
                  m["trainLoss"], meta.get("epochs", 0), resumed, reused, history=meta.get("history", []),
                  test_accuracy=m.get("testAccuracy"))
