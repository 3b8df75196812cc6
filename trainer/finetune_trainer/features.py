"""Feature cache at the freeze boundary: what enters the first trainable module never changes
while everything before it is frozen and the inputs are fixed, so it is computed once.

- `head`: the boundary is the new head; the cache holds penultimate features.
- `partial`: the boundary is the first trainable stage; the cache holds the activations entering
  it, and a torch.fx "tail" graph (boundary → logits, sharing the model's modules) trains on them.
Only valid when nothing random happens before the boundary (no random augmentation; frozen modules
run in eval mode). Anything that cannot be split cleanly falls back to the plain loop, with the
reason recorded in model.json.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader, TensorDataset

from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import pass_streams, timm_models
from finetune_trainer.cached_views import ViewSampler, ViewsDataset
from finetune_trainer.engine import Compute, Precision
from finetune_trainer.freeze import FreezePlan
from finetune_trainer.frozen_pass import FastPrefix
from finetune_trainer.pass_input import PassInput
from finetune_trainer.sampling import EpochSampler

MAX_CACHE_BYTES = 4 << 30
DEVICE_CHUNK = 1 << 30  # outputs gathered on the device before one copy to the host


@dataclass
class CacheDecision:
    enabled: bool
    reason: str
    boundary: str | None = None  # module whose input is cached
    views: int = 0  # augmented views per training image (0: the images' one fixed transform)


def decide(spec: FineTuneJobSpec, model: nn.Module, plan: FreezePlan) -> CacheDecision:
    if spec.training.feature_cache == "off":
        return CacheDecision(False, "training.featureCache is off")
    if plan.policy == "full":
        return CacheDecision(False, "freeze.policy full: nothing is frozen")
    augment, views = spec.dataset.augment, spec.training.feature_cache_views
    on = ", ".join(augment.random_fields)
    if augment.any_random and not views:
        return CacheDecision(False, f"random augmentation ({on}) changes backbone inputs every epoch")
    if augment.any_random and augment.mixes_batches:
        return CacheDecision(False, f"random augmentation ({on}): MixUp/CutMix mix the pixels of several images "
                             "per batch, which cached views of single images cannot replay")
    views = views if augment.any_random else 0  # fixed inputs: one view is all there is
    what = (f"random augmentation ({on}): {views} augmented views per training image computed once by the "
            "frozen part, one sampled per image each epoch; " if views else "")
    if plan.policy == "head":
        if isinstance(model.get_submodule(plan.head_name), nn.Conv2d):
            return CacheDecision(False, "this architecture pools after its classifier")
        return CacheDecision(True, what + ("backbone frozen: penultimate features" if views else
                                           "backbone frozen and inputs fixed: penultimate features computed once"),
                             plan.head_name, views)
    first = next(s for s in plan.stages if s.name in plan.trainable_stages)
    return CacheDecision(True, what + f"frozen stages before {first.name} computed once", first.modules[0], views)


class _Stop(Exception):
    """Raised by the boundary hook: nothing after the boundary needs computing."""


def extract(model: nn.Module, boundary: str, loader, compute: Compute, limit: int = MAX_CACHE_BYTES,
            fast: FastPrefix | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs of `boundary`, labels) for every image of one split: extract_splits of that one loader."""
    return extract_splits(model, boundary, [loader], compute, limit, fast)[0]


@torch.inference_mode()
def extract_splits(model: nn.Module, boundary: str, loaders: list, compute: Compute, limit: int = MAX_CACHE_BYTES,
                   fast: FastPrefix | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs of `boundary`, labels) for every image of each of `loaders`, frozen prefix in eval mode, kept
    on the CPU; the splits pass through one pipeline (pass_streams.map_splits).

    `model` comes from `frozen_pass_model`. A loader: a DataLoader of float image batches, or a
    pass_input.PassInput (uint8 batches made float per batch; with views, (B, K, ...) batches whose outputs
    come back as (K, N, ...)). `limit` is this process's share of the budget, per split (a data-parallel
    rank extracts a shard that is then gathered, so every rank ends up holding the whole cache). `fast`: the
    compiled prefix (frozen_pass), used once the first batch shows it agrees with the eager pass. Outputs
    stay on the device until the end (no host sync per batch), in chunks of at most DEVICE_CHUNK bytes."""
    splits = [_Gathered() for _ in loaders]
    local = threading.local()  # the boundary's input, per thread: streams run the model side by side

    def grab(module, args):
        local.grabbed = args[0].float()
        raise _Stop

    def eager(images: torch.Tensor) -> torch.Tensor:
        with compute.precision.autocast(), contextlib.suppress(_Stop):
            model(images)
        return local.grabbed

    def step(images: torch.Tensor) -> torch.Tensor:
        return fast(images) if fast is not None and fast.usable and fast.scripted is not None else eager(images)

    def decide(images: torch.Tensor) -> None:  # the first batch decides the path of all
        fast.decide(images, eager)

    model.eval()
    handle = model.get_submodule(boundary).register_forward_pre_hook(grab)
    try:
        deciding = fast is not None and fast.usable is None  # else every batch takes one known path
        for s, out, targets in pass_streams.map_splits(loaders, compute, decide if deciding else None, step):
            splits[s].add(out, targets, limit)
    finally:
        handle.remove()
    return [split.result(loader.views if isinstance(loader, PassInput) else 0)
            for split, loader in zip(splits, loaders, strict=True)]


class _Gathered:
    """One split's outputs as they come: on the device in chunks, moved to the CPU a chunk at a time."""

    def __init__(self) -> None:
        self.captured: list[torch.Tensor] = []
        self.moved: list[torch.Tensor] = []  # earlier chunks, already on the CPU
        self.labels: list[torch.Tensor] = []
        self.total = self.on_device = 0

    def add(self, out: torch.Tensor, labels: torch.Tensor, limit: int) -> None:
        self.captured.append(out)
        self.labels.append(labels)
        size = out.numel() * 4
        self.total, self.on_device = self.total + size, self.on_device + size
        if self.total > limit:
            raise MemoryError("boundary activations exceed the in-memory cache budget")
        if self.on_device > DEVICE_CHUNK:
            self.moved.append(torch.cat(self.captured).cpu())
            self.captured.clear()
            self.on_device = 0

    def result(self, views: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.captured:
            self.moved.append(torch.cat(self.captured).cpu())
        out = torch.cat(self.moved)
        if views:  # rows are (image, view) pairs in image order: regroup as (K, N, ...)
            out = out.unflatten(0, (-1, views)).transpose(0, 1).contiguous()
        return out, torch.cat(self.labels)


def build_prefix(model: nn.Module, boundary: str) -> fx.GraphModule | None:
    """A module computing the boundary's input from images (the frozen part alone), sharing the model's
    parameters; None when the model cannot be traced or the boundary is not a single-input module call."""
    try:
        gm = trace(model)
    except Exception:
        return None
    node = next((n for n in gm.graph.nodes if n.op == "call_module"
                 and (n.target == boundary or n.target.startswith(boundary + "."))), None)
    if node is None or len(node.args) != 1 or not isinstance(node.args[0], fx.Node):
        return None
    graph, env, needed = fx.Graph(), {}, _ancestors(node.args[0])
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(env[node.args[0]])
    return fx.GraphModule(gm, graph)


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def frozen_pass_model(model: nn.Module, precision: Precision) -> nn.Module:
    """What `extract` runs, prepared once for all its calls: the model in eval mode, or — when the pass
    is reduced-precision anyway — its folded copy (folding changes rounding by ~1e-6, so an fp32 run
    stays bit-for-bit the plain loop's)."""
    return folded_copy(model.eval()) if precision.dtype is not None else model.eval()


def folded_copy(model: nn.Module) -> nn.Module:
    """For the frozen pass: a copy whose eval-mode BatchNorms that directly follow a convolution are folded
    into it (an affine map after a linear one), the same outputs up to rounding and ~8% faster on CPU.
    A copy, so the model that trains keeps its modules; the module tree (and so the boundary hook) is
    unchanged. A model torch.fx cannot trace is used as it is."""
    try:
        graph = trace(model).graph
    except Exception:  # data-dependent control flow: no folding, same results
        return model
    folded = copy.deepcopy(model)
    modules = dict(folded.named_modules())
    for node in graph.nodes:
        src = node.args[0] if node.op == "call_module" and node.args else None
        after = _after_fold(modules.get(node.target))
        if not (after is not None and isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d) and len(src.users) == 1):
            continue
        conv, bn = modules[src.target], modules[node.target]
        _replace(folded, src.target, fuse_conv_bn_eval(conv, bn))
        _replace(folded, node.target, after)
    return folded.eval()


def _after_fold(module: nn.Module | None) -> nn.Module | None:
    """What stays of a BatchNorm2d once folded into the convolution before it: nothing for torch's own;
    for timm's norm-act layers (BatchNormAct2d: batch norm, then `drop`, then `act`) their dropout and
    activation. None: not a foldable norm. Folding these matters beyond speed: left in the graph, a bf16
    copy would normalise with bf16 running statistics, which drift far from fp32 over dozens of layers."""
    if type(module) is nn.BatchNorm2d:
        return nn.Identity()
    act, drop = getattr(module, "act", None), getattr(module, "drop", None)
    if isinstance(module, nn.BatchNorm2d) and type(module).__name__ == "BatchNormAct2d" and \
            isinstance(act, nn.Module) and isinstance(drop, nn.Module):
        return nn.Sequential(drop, act)
    return None


def trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx graph of the model; timm models are traced with timm's own leaf modules."""
    return timm_models.symbolic_trace(model) if timm_models.is_timm(model) else fx.symbolic_trace(model)


def _replace(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent, _, name = qualname.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def build_tail(model: nn.Module, boundary: str) -> nn.Module | None:
    """A module computing logits from the boundary's input, sharing the model's parameters.

    None when the model cannot be traced or its later layers need anything from before the
    boundary other than the boundary's input (e.g. a skip connection across it).
    """
    try:
        gm = trace(model)
    except Exception:
        return None
    nodes = list(gm.graph.nodes)
    start = next((i for i, n in enumerate(nodes) if n.op == "call_module"
                  and (n.target == boundary or n.target.startswith(boundary + "."))), None)
    if start is None or len(nodes[start].args) != 1 or not isinstance(nodes[start].args[0], fx.Node):
        return None
    entry, later = nodes[start].args[0], nodes[start:]
    inside = set(later) | {entry}
    graph, env = fx.Graph(), {}
    env[entry] = graph.placeholder("boundary_input")
    for node in later:
        for dep in node.all_input_nodes:
            if dep not in inside:
                if dep.op != "get_attr":
                    return None  # needs a value computed before the boundary
                env[dep] = graph.node_copy(dep, lambda n: env[n])
                inside.add(dep)
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(gm, graph)


def cached_loaders(train: tuple, val: tuple, batch_size: int, num_replicas: int = 1,
                   rank: int = 0, views: int = 0) -> tuple[DataLoader, DataLoader]:
    """Loaders over cached tensors with the same shuffling contract as the image loaders.

    `views` > 0: train features are (views, N, ...); each epoch's sampler picks one view per image."""
    if views:
        dataset, sampler = ViewsDataset(*train), ViewSampler(len(train[1]), views, num_replicas, rank)
    else:
        dataset, sampler = TensorDataset(*train), EpochSampler(len(train[1]), num_replicas, rank)
    train_loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator())
    val_loader = DataLoader(TensorDataset(*val), batch_size=batch_size, shuffle=False)
    return train_loader, val_loader
