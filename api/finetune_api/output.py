"""spec.output: where the export goes and in which formats.

Part of the FineTuneJob spec (re-exported by finetune_api.spec); like it, no torch here. None of these
fields is part of the resume fingerprint: asking for another format never invalidates a checkpoint.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from finetune_api.base import PathStr, _Model, _no_parent_segments

FORMATS = ("safetensors", "onnx", "torchscript")
Format = Literal["safetensors", "onnx", "torchscript"]
ONNX_OPSETS = (17, 18, 19, 20, 21)  # the opsets torch.onnx's exporter and onnxruntime both support


class Parity(_Model):
    tolerance: float = Field(
        1e-4, gt=0.0, le=1.0,
        description="largest allowed absolute difference between a format's class probabilities and the PyTorch "
        "model's on any val image; a larger one, or a different top-1 class on an image the tolerance cannot "
        "explain, fails the export",
    )
    max_images: int = Field(512, ge=1, le=100000, description="val images the parity check runs on (the first N)")


class Output(_Model):
    path: PathStr = Field("/output", description="checkpoints/, the exported weights and model.json")
    formats: list[Format] = Field(
        default_factory=lambda: ["safetensors"], min_length=1, max_length=len(FORMATS),
        description="safetensors: the weights for finetune-train; onnx: a graph for onnxruntime / Triton "
        "(dynamic batch axis); torchscript: a graph for libtorch / Triton. Every format beyond safetensors is "
        "checked against the PyTorch model on the val images and gets a serving/<name>/ model repository",
    )
    opset: int = Field(18, ge=ONNX_OPSETS[0], le=ONNX_OPSETS[-1], description="ONNX opset of the onnx format")
    fold_normalization: bool = Field(
        False,
        description="put the mean/std normalisation inside the onnx and torchscript graphs, so a client sends "
        "resized [N,3,H,W] float pixels in [0,1] (default: the client normalises, as model.json says)",
    )
    parity: Parity = Field(default_factory=Parity)

    @model_validator(mode="after")
    def _safe(self) -> Output:
        _no_parent_segments(self.path)
        if len(set(self.formats)) != len(self.formats):
            raise ValueError("output.formats has duplicates")
        if "safetensors" not in self.formats:
            raise ValueError("output.formats must include safetensors (the weights finetune-train and resume read)")
        return self
