"""What runs the network: the export's ONNX graph in onnxruntime, or its safetensors weights in PyTorch.

Both take [N,3,H,W] float32 pixels in [0,1] (the server's one tensor contract) and return softmax
probabilities [N,C]. The ONNX backend imports no torch; the torch backend is the trainer's own Predictor,
so its image path is exactly `finetune-train predict`'s.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from finetune_serve.images import Preprocessing

META_FILE = "model.json"  # finetune_trainer.export.META_FILE (that module imports torch; a test keeps them equal)
MAX_META_BYTES = 64 << 20  # finetune_trainer.export.MAX_META_BYTES
BACKENDS = ("auto", "onnx", "torch")


class ExportError(Exception):
    """The export folder cannot be served; one line for the operator's log."""


class Backend(Protocol):
    name: str
    prep: Preprocessing

    def images(self, images: list[Image.Image]) -> np.ndarray: ...

    def run(self, pixels: np.ndarray) -> np.ndarray: ...


@dataclass
class Export:
    folder: Path
    meta: dict[str, Any] = field(repr=False)

    @classmethod
    def read(cls, folder: str | Path) -> Export:
        folder = Path(folder)
        try:
            with open(folder / META_FILE, "rb") as f:
                meta = json.loads(f.read(MAX_META_BYTES + 1))
        except OSError as err:
            raise ExportError(f"--model: {folder} holds no readable {META_FILE} ({err.strerror})") from None
        except (ValueError, RecursionError):  # also what a file over the cap gives: cut off, it does not parse
            raise ExportError(f"--model: {folder / META_FILE} is not valid JSON (or over {MAX_META_BYTES} "
                              "bytes)") from None
        if not isinstance(meta, dict) or not {"classes", "preprocessing", "name"} <= set(meta):
            raise ExportError(f"--model: {folder / META_FILE} is not a finetune-operator export")
        try:
            Preprocessing.from_json(meta["preprocessing"])
            if not meta["classes"] or not all(isinstance(c, str) for c in meta["classes"]):
                raise TypeError("classes")
        except (KeyError, TypeError, ValueError) as err:
            raise ExportError(f"--model: {folder / META_FILE} has unusable classes or preprocessing ({err})") from None
        return cls(folder, meta)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def prep(self) -> Preprocessing:
        return Preprocessing.from_json(self.meta["preprocessing"])

    def verified(self, relative: str, sha256: str) -> Path:
        path = self.folder / str(relative)
        if not path.resolve().is_relative_to(self.folder.resolve()):
            raise ExportError(f"--model: {META_FILE} names a file outside the export ({relative!r})")
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as err:
            raise ExportError(f"--model: cannot read {path} ({err.strerror})") from None
        if h.hexdigest() != sha256:
            raise ExportError(f"--model: {path} does not match the sha256 in {META_FILE}")
        return path


class OnnxBackend:
    name = "onnx"

    def __init__(self, export: Export, threads: int = 0):
        import onnxruntime as ort

        try:
            entry = export.meta["formats"]["onnx"]
            path = export.verified(entry["file"], entry["sha256"])
            self.input, self.output = entry["input"]["name"], entry["output"]["name"]
            self.folded = bool(entry["input"]["normalizationInGraph"])
        except (KeyError, TypeError) as err:
            raise ExportError(f"--model: {META_FILE}'s formats.onnx entry is incomplete (no {err})") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types: a graph that does not load
            line = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise ExportError(f"--model: {path} is not an ONNX graph onnxruntime can load ({line})") from None
        self.prep = export.prep

    def images(self, images: list[Image.Image]) -> np.ndarray:
        return np.stack([self.prep.pixels(im) for im in images])

    def run(self, pixels: np.ndarray) -> np.ndarray:
        x = pixels if self.folded else self.prep.normalize(pixels)
        return self.session.run([self.output], {self.input: np.ascontiguousarray(x, dtype=np.float32)})[0]


class TorchBackend:
    name = "torch"

    def __init__(self, export: Export, threads: int = 0):
        import torch

        from finetune_trainer.predict import Predictor

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.predictor = Predictor.load(export.folder)
        self.transform = self.predictor.preprocessing.eval_transform()
        self.prep = export.prep

    def images(self, images: list[Image.Image]) -> np.ndarray:
        # The trainer's transform, then back to [0,1] pixels: the one tensor contract of run().
        normalized = np.stack([self.transform(im).numpy() for im in images])
        mean = np.asarray(self.prep.mean, dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.asarray(self.prep.std, dtype=np.float32).reshape(1, 3, 1, 1)
        return normalized * std + mean

    def run(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(self.prep.normalize(pixels))
            return self.predictor.model(x).float().softmax(dim=1).numpy()


def load_backend(folder: str | Path, choice: str = "auto", threads: int = 0) -> tuple[Export, Backend]:
    """auto: ONNX when the export has it and onnxruntime is installed, else PyTorch."""
    export = Export.read(folder)
    formats = export.meta.get("formats")
    has_onnx = isinstance(formats, dict) and "onnx" in formats
    if choice == "auto":
        choice = "onnx" if has_onnx and _importable("onnxruntime") else "torch"
    if choice == "onnx":
        if not has_onnx:
            raise ExportError(f"--backend onnx: {folder} has no onnx format (export with output.formats: "
                              "[safetensors, onnx])")
        if not _importable("onnxruntime"):
            raise ExportError("--backend onnx: onnxruntime is not installed (pip install 'finetune-operator[serve]')")
        return export, OnnxBackend(export, threads)
    if not _importable("torch"):
        raise ExportError(f"{folder} has no onnx format and torch is not installed: install "
                          "'finetune-operator[trainer]' or export with output.formats: [safetensors, onnx]")
    return export, TorchBackend(export, threads)


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
