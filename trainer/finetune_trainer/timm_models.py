"""timm as the second model library: construction, pretrained weights, head, stages and fx tracing.

Everything here goes through timm's own API (`create_model`, `pretrained_cfg`, `reset_classifier`,
`group_matcher`, its fx no-trace registry), so any timm classification model works the same way a
torchvision one does. timm is imported lazily: a torchvision-only run never pays for it.
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import fx, nn

from finetune_api.errors import JobFileError, TrainingError


def is_timm(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def _timm():
    import timm

    return timm


def check_name(arch: str) -> None:
    """A wrong name lists the closest timm names (timm has ~1,300 architectures)."""
    timm = _timm()
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else "; see timm.list_models()"
    raise JobFileError(f"spec.model.architecture: {arch!r} is not a timm model{hint}")


def new_model(arch: str) -> nn.Module:
    """A randomly initialised timm model (its default pretrained config still describes its preprocessing)."""
    check_name(arch)
    return _timm().create_model(arch, pretrained=False)


def pretrained_model(arch: str, tag: str) -> tuple[nn.Module, str]:
    """timm's pretrained weights through its normal hub download and cache (HF_HOME); offline is one line."""
    check_name(arch)
    name = arch if tag == "DEFAULT" else f"{arch}.{tag}"
    timm = _timm()
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as err:  # offline, unknown tag, hub errors: all mean "cannot get these weights"
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise TrainingError(
            f"cannot load timm pretrained weights {name!r} ({type(err).__name__}: {first}); offline clusters "
            "can pre-seed the hub cache ($HF_HOME) or use model.weights.source: file"
        ) from None
    return model, f"timm {model.pretrained_cfg.get('hf_hub_id') or name}"


def head_name(model: nn.Module) -> str:
    """The classifier's dotted name from the model's pretrained config (e.g. classifier, fc, head.fc)."""
    name = model.pretrained_cfg.get("classifier")
    if isinstance(name, (list, tuple)):  # distilled models have two heads; the first is the classifier
        name = name[0]
    if not name:
        raise TrainingError(f"timm model {type(model).__name__} names no classifier in its pretrained config")
    return name


def reset_head(model: nn.Module, num_classes: int, make_head) -> str:
    """Replace the head through timm's API; a hidden layer / dropout wraps the new Linear's input width."""
    model.reset_classifier(num_classes)
    name = head_name(model)
    new = model.get_submodule(name)
    custom = make_head(new.in_features, num_classes) if isinstance(new, nn.Linear) else None
    if custom is not None and not isinstance(custom, nn.Linear):
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, custom)
    return name


def preprocessing_config(model: nn.Module) -> dict[str, Any]:
    """mean, std, interpolation and crop fraction of the model's pretrained config."""
    cfg = model.pretrained_cfg
    return {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            "interpolation": cfg.get("interpolation", "bilinear"), "crop_pct": float(cfg.get("crop_pct", 0.875))}


def stage_groups(model: nn.Module, head: str) -> list[list[str]]:
    """The backbone's stages as timm groups them (`group_matcher(coarse=True)`: stem, each stage, ...).

    timm lists the modules that own parameters; each group is collapsed to the largest containers it
    covers whole, so parameter-free layers inside a frozen block (dropout, drop-path) are set to eval too.
    """
    from timm.models import group_modules

    owners = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    groups = group_modules(model, model.group_matcher(coarse=True))
    stages = []
    for gid in sorted(groups):
        names = [n for n in groups[gid] if n != head and not n.startswith(head + ".")]
        if names:
            stages.append(_collapse(set(names), owners))
    return stages


def _collapse(names: set[str], owners: set[str]) -> list[str]:
    """The fewest module names whose parameter-owning descendants are exactly `names`."""
    out: list[str] = []
    for name in sorted(names):
        if any(name == o or name.startswith(o + ".") for o in out):
            continue
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the shortest ancestor that holds nothing outside the group
            prefix = ".".join(parts[:i])
            inside = {o for o in owners if o == prefix or o.startswith(prefix + ".")}
            if inside <= names:
                out.append(prefix)
                break
    return out


class _Tracer(fx.Tracer):
    """torch.fx with timm's no-trace modules as leaves (e.g. 'same'-padding convs with shape arithmetic)."""

    def __init__(self, leaves: tuple[type, ...], functions: tuple) -> None:
        super().__init__(autowrap_functions=functions)
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """fx-trace a timm model the way timm's own feature extractor does."""
    from timm.layers import _fx

    tracer = _Tracer(tuple(_fx.get_notrace_modules()), tuple(_fx.get_notrace_functions()))
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph)
