"""Build any torchvision classifier by name, load its backbone weights, replace its head.

The head is found generically: the last nn.Linear in module order (the classifier of every
torchvision classification model), or the final 1×1 conv for SqueezeNet. Loading a weights file
always drops the file's old head — the new task has its own classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tvm

from finetune_api.errors import JobFileError, TrainingError
from finetune_api.spec import FineTuneJobSpec, Head, Weights
from finetune_trainer import timm_models
from finetune_trainer.data import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from finetune_trainer.safe_io import first_line, regular_file

log = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    model: nn.Module
    head_name: str  # dotted path of the replaced classifier module
    preprocessing: Preprocessing
    weights_note: str


def find_head(model: nn.Module) -> str:
    """Dotted name of the final classification layer."""
    if timm_models.is_timm(model):
        return timm_models.head_name(model)
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None and isinstance(getattr(model, "classifier", None), nn.Sequential):
        convs = [f"classifier.{n}" for n, m in model.classifier.named_children() if isinstance(m, nn.Conv2d)]
        last = convs[-1] if convs else None
    if last is None:
        raise TrainingError(f"cannot find the classifier layer of {type(model).__name__}")
    return last


_ACTIVATIONS = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "silu": lambda: nn.SiLU(inplace=True)}
_NORMS = {"none": None, "batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}


def make_head(in_features: int, num_classes: int, cfg: Head, conv: bool = False) -> nn.Module:
    """One Linear, or per hidden width Linear → norm → activation → dropout, then the output Linear.

    The module order (and so the state_dict keys) of the integer form `hiddenUnits: N` is the one it has
    always had, so exports and checkpoints of earlier versions load unchanged."""
    if conv:  # SqueezeNet classifies with a 1×1 conv followed by global pooling
        return nn.Conv2d(in_features, num_classes, kernel_size=1)
    layers: list[nn.Module] = []
    norm = _NORMS[cfg.norm]
    for width in cfg.widths:
        layers.append(nn.Linear(in_features, width))
        if norm is not None:
            layers.append(norm(width))
        layers.append(_ACTIVATIONS[cfg.activation]())
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        in_features = width
    if cfg.dropout and not cfg.widths:
        layers.append(nn.Dropout(cfg.dropout))
    layers.append(nn.Linear(in_features, num_classes))
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def check_head_batches(cfg: Head, train_images: int, batch_size: int) -> None:
    """BatchNorm in a training head cannot normalise a batch of one image: refused before anything runs."""
    if cfg.norm == "batchnorm" and train_images % batch_size == 1:
        raise JobFileError(f"head.norm: batchnorm cannot train on the last batch of 1 image ({train_images} "
                           f"training images, training.batchSize {batch_size}); change the batch size or use "
                           "layernorm")


def replace_head(model: nn.Module, num_classes: int, cfg: Head) -> str:
    if timm_models.is_timm(model):
        return timm_models.reset_head(model, num_classes, lambda width, n: make_head(width, n, cfg))
    name = find_head(model)
    old = model.get_submodule(name)
    conv = isinstance(old, nn.Conv2d)
    in_features = old.in_channels if conv else old.in_features
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, make_head(in_features, num_classes, cfg, conv))
    return name


def new_model(arch: str, library: str = "torchvision") -> nn.Module:
    """A randomly initialised `arch` without Inception/GoogLeNet's auxiliary heads (ImageNet-only aids)."""
    if library == "timm":
        return timm_models.new_model(arch)
    kwargs = {"aux_logits": False, "init_weights": False} if arch in ("inception_v3", "googlenet") else {}
    model = tvm.get_model(arch, weights=None, **kwargs)
    for attr in ("AuxLogits", "aux1", "aux2"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
    return model


def _torchvision_weights(arch: str, name: str):
    try:
        enum = tvm.get_model_weights(arch)
        return enum.DEFAULT if name == "DEFAULT" else enum[name]
    except KeyError:
        choices = ", ".join(["DEFAULT", *[w.name for w in tvm.get_model_weights(arch)]])
        raise JobFileError(f"model.weights.name: {name!r} is not a weights of {arch} (choose {choices})") from None


def _preprocessing(weights, image_size: int, model: nn.Module) -> Preprocessing:
    if timm_models.is_timm(model):  # the architecture's pretrained config, whatever the weights source
        cfg = timm_models.preprocessing_config(model)
        return Preprocessing(resize=round(image_size / cfg["crop_pct"]), crop=image_size, mean=cfg["mean"],
                             std=cfg["std"], interpolation=cfg["interpolation"])
    if weights is None:
        return Preprocessing(resize=image_size, crop=image_size)
    tf = weights.transforms()
    ratio = tf.resize_size[0] / tf.crop_size[0]
    return Preprocessing(
        resize=round(image_size * ratio), crop=image_size, mean=tuple(tf.mean), std=tuple(tf.std)
    )


def build_model(spec: FineTuneJobSpec, num_classes: int) -> BuiltModel:
    arch, wcfg = spec.model.architecture, spec.model.weights
    tv_weights = _torchvision_weights(arch, wcfg.name) if wcfg.source == "torchvision" else None
    note = "random initialisation"
    if wcfg.source == "timm":
        model, note = timm_models.pretrained_model(arch, wcfg.name)
    else:
        model = new_model(arch, spec.model.library)
    if tv_weights is not None:
        note = _load_torchvision_weights(model, tv_weights)
    elif wcfg.source == "file":
        note = load_weights_file(model, wcfg)
    head = replace_head(model, num_classes, spec.head)
    prep = _preprocessing(tv_weights, spec.dataset.image_size, model)
    if tv_weights is None and wcfg.source == "file" and not timm_models.is_timm(model):
        prep = Preprocessing(prep.resize, prep.crop, IMAGENET_MEAN, IMAGENET_STD)
    return BuiltModel(model, head, prep, note)


def _load_torchvision_weights(model: nn.Module, weights) -> str:
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as err:  # URLError, HTTPError, hash mismatch, ... all mean "cannot fetch"
        raise TrainingError(
            f"cannot download torchvision weights {weights} ({type(err).__name__}: {err}); "
            "on an offline cluster pre-seed $TORCH_HOME or use model.weights.source: file"
        ) from None
    head = find_head(model)
    state = {k: v for k, v in state.items() if not k.startswith(head + ".") and not k.startswith("AuxLogits.")
             and not k.startswith("aux")}
    missing, _ = model.load_state_dict(state, strict=False)
    unexpected_head = [k for k in missing if not k.startswith(head + ".")]
    if unexpected_head:
        raise TrainingError(f"torchvision weights {weights} left parameters unset: {unexpected_head[:5]}")
    return f"torchvision {weights}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, a plain state_dict, or a checkpoint holding one under 'model'/'state_dict'."""
    regular_file(path, "model.weights.path")  # missing, a directory or a FIFO (whose read would block)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise JobFileError(f"model.weights.path: {path} is not a readable checkpoint ({type(err).__name__}: "
                           f"{first_line(err, 100)})") from None
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise JobFileError(f"model.weights.path: {path} holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights_file(model: nn.Module, wcfg: Weights) -> str:
    """Load a backbone from a file; every shape mismatch and missing tensor is reported by name."""
    path = Path(wcfg.path)  # type: ignore[arg-type]
    state = read_state_dict(path)
    head = find_head(model)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(head + ".")}
    problems = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith(head + ".")]
    unknown = [k for k in state if k not in own]
    if problems or missing or unknown:
        parts = []
        if problems:
            parts.append(f"{len(problems)} shape mismatch(es): " + "; ".join(problems[:5]))
        if missing:
            parts.append(f"{len(missing)} missing tensor(s) e.g. {missing[:3]}")
        if unknown:
            parts.append(f"{len(unknown)} unexpected tensor(s) e.g. {unknown[:3]}")
        raise JobFileError(f"model.weights.path: {path} does not fit {type(model).__name__}: " + " | ".join(parts))
    model.load_state_dict(state, strict=False)
    return f"file {path} ({len(state)} tensors, old head dropped)"
