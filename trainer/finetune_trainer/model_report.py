"""The evaluation report beside an export: evaluation.json, a confusion-matrix PNG and training curves.

Training writes it once, on the held-out test split with the best weights (on val when there is no
test split, and the report says so); `finetune-train evaluate` writes the same report for an export
on any ImageFolder. Numbers come from evaluation.py, pictures from plots.py.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune_trainer.checkpoint import atomic_write
from finetune_trainer.engine import Compute
from finetune_trainer.evaluation import evaluation_report, summary_line
from finetune_trainer.pass_streams import map_batches

log = logging.getLogger(__name__)

REPORT_FILE = "evaluation.json"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"
# A local sweep writes each trial's numbers and draws the pictures for its best export only (see
# finetune_trainer.sweep): drawing is close to half of what a trial costs once the frozen pass is shared.
_DRAW = contextvars.ContextVar("finetune_draw_plots", default=True)


@contextlib.contextmanager
def without_plots() -> Iterator[None]:
    """Reports written inside leave out the PNGs (evaluation.json and model.json say which files exist)."""
    token = _DRAW.set(False)
    try:
        yield
    finally:
        _DRAW.reset(token)


@torch.inference_mode()
def predict_probabilities(model: nn.Module, loader, compute: Compute) -> tuple[np.ndarray, np.ndarray]:
    """(labels, softmax probabilities) for every readable image of `loader` (a DataLoader or a
    pass_input.PassInput, whose streams it runs), in order."""
    model.eval()

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        with compute.precision.autocast():
            logits = model(images)
        return logits.float().softmax(dim=1).cpu()

    labels, probs = [], []
    for out, targets in map_batches(loader, compute, None, probabilities):
        probs.append(out)
        labels.append(targets)
    if not labels:
        raise ValueError("no readable images to evaluate")
    return torch.cat(labels).numpy().astype(np.int64), torch.cat(probs).double().numpy()


def write_report(folder: Path, labels: np.ndarray, probs: np.ndarray, classes: list[str], *, split: str,
                 history: list[dict] | None = None, extra: dict[str, Any] | None = None,
                 prefix: str = "") -> dict[str, Any]:
    """Write the report files into `folder` (atomically, each) and return what model.json records of them."""
    report = {"split": split, **(extra or {}), **evaluation_report(labels, probs, classes)}
    names = {"report": prefix + REPORT_FILE, "confusionMatrix": prefix + CONFUSION_PNG}
    atomic_write(folder / names["report"], lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2) + "\n"))
    if _DRAW.get():
        plots = _plots(folder, report, history, names)
    else:
        plots = {}
        del names["confusionMatrix"]
    return {"split": split, "samples": report["samples"], "accuracy": report["accuracy"],
            "topK": report["topK"], "macroF1": report["macroAvg"]["f1"],
            "expectedCalibrationError": report["expectedCalibrationError"], "files": {**names, **plots},
            "summary": summary_line(report, split)}


def draw_plots(folder: Path, report: dict, history: list[dict] | None) -> dict[str, str]:
    """The PNGs of a report written without them: {"confusionMatrix": …, "trainingCurves": …} as drawn."""
    names = {"confusionMatrix": CONFUSION_PNG}
    return {**names, **_plots(folder, report, history, names)}


def _plots(folder: Path, report: dict, history: list[dict] | None, names: dict[str, str]) -> dict[str, str]:
    """Pictures are a convenience: a plotting failure is logged and costs only the picture. Drawn by the
    trainer's plot helper when one runs (plot_helper: matplotlib imported during start-up), else here."""
    from finetune_trainer import plot_helper

    wanted = {"confusionMatrix": names["confusionMatrix"], "trainingCurves": CURVES_PNG}
    try:
        helper = plot_helper.active()
        made = helper.draw(folder, report, history, wanted) if helper is not None else None
        if made is None:
            from finetune_trainer.plots import draw_report

            made = draw_report(folder, report, history, wanted)
    except (OSError, ValueError, RuntimeError) as err:
        log.warning("evaluation plots not written: %s", err)
        names.pop("confusionMatrix", None)
        return {}
    return made
