"""Portable exports (ONNX, TorchScript) and the parity check that stands behind them.

Every format is a graph from image pixels to class probabilities: softmax is inside, and with
output.foldNormalization so is the mean/std step, so a client sends [N,3,H,W] floats in [0,1]. Before
model.json records a format, the format itself (onnxruntime for ONNX, libtorch for TorchScript) runs on
the val images beside the PyTorch model; a format that disagrees fails the export with one line.

ONNX goes through torch.onnx's torch.export-based exporter (onnxscript): it is the one torch keeps
(the TorchScript-based exporter is deprecated and warns it will be removed). An architecture that
torch.export cannot capture falls back to that older exporter, and model.json says which one ran.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from finetune_api.errors import JobFileError
from finetune_api.output import Output
from finetune_trainer.checkpoint import atomic_write
from finetune_trainer.data import Preprocessing, Sample, eval_loader
from finetune_trainer.export import sha256_file
from finetune_trainer.serving_layout import repository_name, write_repository

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"
GRAPH_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
Runner = Callable[[np.ndarray], np.ndarray]  # [N,3,H,W] float32 → [N,C] probabilities


class ParityError(JobFileError):
    """A format's outputs differ from the PyTorch model's: retrying exports the same graph again."""


class ServedGraph(nn.Module):
    """The exported computation: (optional normalisation) → model → softmax, in fp32."""

    def __init__(self, model: nn.Module, prep: Preprocessing, fold_normalization: bool):
        super().__init__()
        self.model = model
        self.fold = fold_normalization
        self.register_buffer("mean", torch.tensor(prep.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(prep.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fold:
            x = (x - self.mean) / self.std
        return self.model(x).float().softmax(dim=1)


def graph_input(prep: Preprocessing, fold_normalization: bool) -> dict[str, Any]:
    """What a client of the graph sends (model.json's `formats.<fmt>.input`)."""
    steps = (f"resize the shorter side to {prep.resize} ({prep.interpolation}), center-crop {prep.crop}, "
             "RGB channels first, scale to [0,1]")
    return {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, prep.crop, prep.crop],
            "normalizationInGraph": fold_normalization,
            "expects": steps if fold_normalization else f"{steps}, then (x - mean) / std per channel"}


def example_batch(prep: Preprocessing) -> torch.Tensor:
    # Two images, not one: torch.export specialises a dimension whose example size is 1.
    return torch.rand(2, 3, prep.crop, prep.crop, generator=torch.Generator().manual_seed(0))


def export_onnx(graph: nn.Module, path: Path, example: torch.Tensor, opset: int) -> str:
    """Write the ONNX graph (dynamic batch axis) atomically; returns the exporter that produced it."""
    def dynamo(tmp: str) -> None:
        with _quiet():
            torch.onnx.export(graph, (example,), tmp, dynamo=True, opset_version=opset, external_data=False,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))

    def legacy(tmp: str) -> None:
        with _quiet():
            torch.onnx.export(graph, (example,), tmp, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})

    try:
        atomic_write(path, dynamo)
        return "torch.export"
    except Exception as err:  # any capture failure of torch.export: the older exporter may still trace it
        log.warning("torch.export-based ONNX export failed (%s); using the TorchScript-based exporter",
                    str(err).splitlines()[0] if str(err) else type(err).__name__)
    atomic_write(path, legacy)
    return "torchscript-trace"


def export_torchscript(graph: nn.Module, path: Path, example: torch.Tensor) -> str:
    with torch.no_grad(), _quiet():
        traced = torch.jit.trace(graph, (example,), check_trace=False)
    atomic_write(path, lambda tmp: traced.save(tmp))
    return "torch.jit.trace"


@contextlib.contextmanager
def _quiet():
    """The exporters print progress to stdout, which is the trainer's JSON-lines channel."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def onnx_runner(path: Path) -> Runner:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]


def torchscript_runner(path: Path) -> Runner:
    with _quiet():  # torch.jit.load warns that TorchScript is deprecated; libtorch and Triton still load it
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).numpy()
    return run


RUNNERS: dict[str, Callable[[Path], Runner]] = {"onnx": onnx_runner, "torchscript": torchscript_runner}


@dataclass
class ParityInputs:
    """The val images twice: normalised for the PyTorch model, and as the format's client sends them."""

    normalized: np.ndarray
    reference: np.ndarray  # the PyTorch model's probabilities on them

    def for_graph(self, prep: Preprocessing, fold_normalization: bool) -> np.ndarray:
        if not fold_normalization:
            return self.normalized
        mean = np.asarray(prep.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(prep.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return (self.normalized * std + mean).astype(np.float32)


@torch.inference_mode()
def parity_inputs(model: nn.Module, samples: list[Sample], prep: Preprocessing, max_images: int,
                  batch_size: int = 64) -> ParityInputs:
    batches = [b[0] for b in eval_loader(samples[:max_images], prep, batch_size) if b is not None]
    if not batches:
        raise JobFileError("output.formats: no readable val image to run the parity check on")
    images = torch.cat(batches).float()
    reference = torch.cat([model(chunk).float().softmax(dim=1) for chunk in images.split(batch_size)])
    return ParityInputs(images.numpy(), reference.numpy())


def compare(reference: np.ndarray, probs: np.ndarray, tolerance: float) -> dict[str, Any]:
    """Max abs difference, top-1 agreement, and the disagreements the tolerance cannot explain (a flip
    between two classes whose reference probabilities are within 2 x tolerance is rounding, not a bug)."""
    if probs.shape != reference.shape:
        return {"images": int(reference.shape[0]), "maxAbsDiff": None, "top1Agreement": 0.0, "unexplained": -1,
                "shape": list(probs.shape)}
    diff = float(np.abs(probs.astype(np.float64) - reference).max())
    ours, theirs = reference.argmax(1), probs.argmax(1)
    rows = np.arange(len(ours))
    margin = reference[rows, ours] - reference[rows, theirs]
    flips = ours != theirs
    return {"images": len(ours), "maxAbsDiff": diff, "top1Agreement": float(1.0 - flips.mean()),
            "unexplained": int((flips & (margin > 2 * tolerance)).sum())}


def check(fmt: str, result: dict[str, Any], tolerance: float) -> None:
    if result["unexplained"] < 0:
        raise ParityError(f"output.formats: {fmt} returned probabilities of shape {result['shape']} for "
                          f"{result['images']} val images; the PyTorch model's have another shape")
    diff, agree = result["maxAbsDiff"], result["top1Agreement"]
    if not np.isfinite(diff) or diff > tolerance or result["unexplained"]:
        raise ParityError(f"output.formats: {fmt} disagrees with the PyTorch model on the val images (top-1 "
                          f"agreement {agree:.4f} over {result['images']} images, max abs diff {diff:.3g}, "
                          f"output.parity.tolerance {tolerance:g}); the export is not committed")


def write_graphs(folder: Path, model: nn.Module, prep: Preprocessing, output: Output, samples: list[Sample],
                 name: str, classes: list[str]) -> dict[str, Any]:
    """Every format beyond safetensors into its serving/ model repository, parity-checked; model.json's
    `formats` and `serving` entries. Raises ParityError when a format disagrees."""
    wanted = [f for f in output.formats if f in GRAPH_FILES]
    if not wanted:
        return {}
    net = ServedGraph(copy.deepcopy(model).cpu().float().eval(), prep, output.fold_normalization).eval()
    inputs = parity_inputs(net.model, samples, prep, output.parity.max_images)
    formats: dict[str, Any] = {}
    for fmt in wanted:
        repo = repository_name(name, fmt, wanted)
        path = folder / "serving" / repo / "1" / GRAPH_FILES[fmt]
        path.parent.mkdir(parents=True, exist_ok=True)
        example = example_batch(prep)
        made_by = (export_onnx(net, path, example, output.opset) if fmt == "onnx"
                   else export_torchscript(net, path, example))
        probs = RUNNERS[fmt](path)(inputs.for_graph(prep, output.fold_normalization))
        parity = compare(inputs.reference, probs, output.parity.tolerance)
        check(fmt, parity, output.parity.tolerance)
        formats[fmt] = {"file": str(path.relative_to(folder)), "exporter": made_by,
                        **({"opset": output.opset} if fmt == "onnx" else {}),
                        "input": graph_input(prep, output.fold_normalization),
                        "output": {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(classes)],
                                   "meaning": "softmax class probabilities, in the order of `classes`"},
                        "parity": {**parity, "against": "the PyTorch model, fp32 on CPU", "split": "val",
                                   "tolerance": output.parity.tolerance},
                        "sha256": sha256_file(path),
                        "triton": write_repository(folder / "serving" / repo, fmt, prep, classes,
                                                   output.fold_normalization)}
    return formats
