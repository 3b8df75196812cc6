"""The KServe / Triton model repository beside an export: serving/<model>/{config.pbtxt, labels.txt, 1/model.*}.

Triton (and KServe's Triton runtime, storageUri pointing at serving/) loads it as it is. One model per
format: the ONNX graph is <name>, the TorchScript graph <name>-torchscript when both are exported (Triton
wants one platform per model folder). TorchScript inputs and outputs follow libtorch's <name>__<index> names.
No torch here: the text is built from the preprocessing and the classes alone.
"""

from __future__ import annotations

from pathlib import Path

from finetune_trainer.checkpoint import atomic_write
from finetune_trainer.data import Preprocessing

LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"
MAX_BATCH = 64
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}
TENSOR_NAMES = {"onnx": ("input", "probabilities"), "torchscript": ("input__0", "probabilities__0")}


def repository_name(name: str, fmt: str, formats: list[str]) -> str:
    return f"{name}-torchscript" if fmt == "torchscript" and "onnx" in formats else name


def config_pbtxt(model: str, fmt: str, crop: int, num_classes: int) -> str:
    inp, out = TENSOR_NAMES[fmt]
    return (f'name: "{model}"\nplatform: "{PLATFORMS[fmt]}"\nmax_batch_size: {MAX_BATCH}\n'
            f'input [\n  {{\n    name: "{inp}"\n    data_type: TYPE_FP32\n    dims: [ 3, {crop}, {crop} ]\n  }}\n]\n'
            f'output [\n  {{\n    name: "{out}"\n    data_type: TYPE_FP32\n    dims: [ {num_classes} ]\n'
            f'    label_filename: "{LABELS_FILE}"\n  }}\n]\n'
            "dynamic_batching { }\n")


def write_repository(folder: Path, fmt: str, prep: Preprocessing, classes: list[str], folded: bool) -> dict:
    """config.pbtxt and labels.txt (the graph file is already in folder/1/); what model.json says of them."""
    folder.mkdir(parents=True, exist_ok=True)
    text = config_pbtxt(folder.name, fmt, prep.crop, len(classes))
    atomic_write(folder / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
    atomic_write(folder / LABELS_FILE, lambda tmp: Path(tmp).write_text("".join(f"{c}\n" for c in classes)))
    inp, out = TENSOR_NAMES[fmt]
    return {"model": folder.name, "platform": PLATFORMS[fmt], "config": f"serving/{folder.name}/{CONFIG_FILE}",
            "labels": f"serving/{folder.name}/{LABELS_FILE}", "input": inp, "output": out,
            "maxBatchSize": MAX_BATCH, "normalizationInGraph": folded}
