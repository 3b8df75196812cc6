"""The frozen pass's fast path on CPUs with bf16 kernels: the frozen prefix as oneDNN-fused TorchScript.

The eager pass runs the folded model op by op under autocast, which re-casts weights on every call; a copy
of just the frozen prefix (everything before the boundary, cut out with torch.fx) in bf16 weights, traced,
frozen and optimised for inference by TorchScript, lets oneDNN fuse convolutions with what follows them.
Measured side by side in bench/frozen_pass.py. The first batch's first images run through both, and the fast
path is kept only when it agrees with the eager one within bf16 tolerance and — under training.frozenPass
auto — when it is faster on this CPU, timed there; otherwise, or when the prefix cannot be cut out or
compiled, the pass stays eager and model.json says why. fp32 passes never take it: they stay bit-for-bit what
the plain loop computes. Bf16Weights is the same prefix cast to bf16 and run op by op, checked the same
way: auto's path for passes too short to pay for compiling.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from finetune_trainer.engine import Compute

log = logging.getLogger(__name__)

# |fast - eager| <= TOLERANCE x max|eager|: bf16 keeps 8 bits of mantissa (a relative step of 2^-8 per op);
# the two paths round in different places, and measured differences sit near 1-2 % of the largest value.
TOLERANCE = 0.05
PATH = "torchscript-bf16"
WEIGHTS_PATH = "bf16-weights"
# training.frozenPass auto compiles only passes of at least this many images, then races the two paths.
# Tracing, freezing, fusing and the race take about 0.5 s (bench/frozen_pass.py, "preparation"). Measured on
# a 2-core Sapphire Rapids (interleaved CLI runs, 2026-12-02), the compiled prefix, 20 % faster per batch in
# the race, still lost 0.2 s on the demo's 605-image pass and gained 0.4 s on 1925 images (4 views); the
# same prefix gained 31 % on an AMD EPYC and 3 % on another VM. `torchscript` compiles whatever the size.
MIN_IMAGES = 1024
# In streams (pass_streams: 2-3 single-threaded streams) the compiled prefix gains less over the bf16-weights
# prefix: in memory 263 against 254 img/s (2-core AMD EPYC, 2026-12-04), so its 0.5 s of preparation pays off
# only past about 3700 images; the demo's views pass (1925 images, 4 interleaved pairs of whole runs) took
# 11.7 s with the weights prefix against 12.3 s compiled and raced. Below this many images a pass in streams
# takes the weights prefix.
MIN_IMAGES_IN_STREAMS = 4096
# The check compares the fast path with eager on the first batch's first few images, not the whole batch:
# frozen eval-mode networks compute each image on its own, and a whole second pass of the first batch cost
# 0.05 s of a 3.3 s pass over the demo's photos (2-core AMD EPYC, 2026-12-04).
CHECK_IMAGES = 2
RACE_RUNS = 2  # timed calls per path in auto's race: the best of two shrugs off one interrupted call


def intended(compute: Compute) -> bool:
    """The fast path applies to bf16 passes on the CPU (CUDA's autocast kernels are already fused)."""
    return compute.device.type == "cpu" and compute.precision.dtype is torch.bfloat16


class FastPrefix:
    """The frozen prefix compiled on first use (from the first batch's shape) and checked against eager.

    `race` (training.frozenPass auto): once compiled and checked, both paths are timed on the first batch
    and the faster one runs the pass. How much the fused prefix wins depends on the CPU — measured +31 % on
    one AMD EPYC, +3 % on another VM, +20 % per batch on a Sapphire Rapids (bench/README.md) — so auto
    measures instead of assuming.
    An explicit `torchscript` keeps the compiled prefix without racing."""

    path, label = PATH, "TorchScript bf16 prefix"
    warm_on_batch = True  # decide() runs it on the whole first batch, not just the images it checks

    def __init__(self, prefix: nn.Module | None, why_not: str = "", race: bool = False) -> None:
        self._prefix, self.scripted = prefix, None
        self.usable: bool | None = None if prefix is not None else False  # None: not tried yet
        self.reason, self.race = why_not, race
        self.preparation = 0.0  # seconds spent compiling (and racing)
        self.batch_seconds: dict[str, float] = {}  # the race's steady per-batch times, by path

    def decide(self, images: torch.Tensor, eager: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Choose the path of the whole pass from its first batch: compile, check against `eager` on the
        batch's first CHECK_IMAGES images, race when asked. Afterwards `usable` says which path every batch
        takes, this one included, so every row of the cache comes from one path."""
        if not self.compile(images):
            return
        # TorchScript's profiling executor records shapes on its first calls: those are the pass's batches
        compiled = self(images if self.warm_on_batch else images[:CHECK_IMAGES])
        if not self.check(compiled[:CHECK_IMAGES], eager(images[:CHECK_IMAGES])):
            return
        if self.race and not self._faster(images, eager):
            self.usable, self.scripted = False, None  # the losing compiled module is not kept

    def _faster(self, images: torch.Tensor, eager: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Time both paths on the first batch (best of RACE_RUNS, after a warm-up call of the compiled
        prefix, whose executor optimises on its second call); True when the compiled one is faster."""
        start = time.perf_counter()
        self(images)
        fast, slow = (min(_seconds(run, images) for _ in range(RACE_RUNS)) for run in (self, eager))
        self.preparation += time.perf_counter() - start
        self.batch_seconds = {self.path: round(fast, 4), "eager": round(slow, 4)}
        per_batch = f"{fast * 1e3:.0f} ms against eager's {slow * 1e3:.0f} ms per batch of {len(images)}"
        if fast < slow:
            self.reason += f", and faster there: {per_batch}"
            return True
        self.reason = (f"eager kept: the {self.label} agreed with eager on the first batch but was not faster "
                       f"on this CPU ({per_batch})")
        log.info("frozen pass stays eager: %s", self.reason)
        return False

    def compile(self, images: torch.Tensor) -> bool:
        """Trace, freeze and optimise the bf16 prefix once; False (with the reason) when it cannot be."""
        if self.usable is not None:
            return self.usable
        start = time.perf_counter()
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TorchScript's deprecation notices: it is what runs fastest here
                prefix = copy.deepcopy(self._prefix).to(torch.bfloat16).eval()
                # check_trace re-runs both and diffs the graphs (tracing took 0.78 s with it, 0.30 s without,
                # on a busy 2-core VM), and check() below compares the prefix with eager on a whole batch anyway
                self.scripted = torch.jit.optimize_for_inference(torch.jit.freeze(
                    torch.jit.trace(prefix, images[:2].to(torch.bfloat16), check_trace=False)))
        except Exception as err:  # any tracing or fusion failure: the eager pass computes the same features
            self.usable, self.reason = False, f"TorchScript could not compile the frozen part ({type(err).__name__})"
            log.info("frozen pass stays eager: %s", self.reason)
        self._prefix = None
        self.preparation = time.perf_counter() - start
        return self.usable is not False

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.scripted(images.to(torch.bfloat16)).float()

    def check(self, fast: torch.Tensor, eager: torch.Tensor) -> bool:
        """Keep the fast path only if it computes what the eager pass does, within bf16 tolerance."""
        if self.usable is None:
            scale = float(eager.abs().max()) or 1.0
            diff = float((fast - eager).abs().max())
            self.usable = diff <= TOLERANCE * scale
            on = f"on the first batch's first {CHECK_IMAGES} images (max |diff| {diff:.3g} of max {scale:.3g})"
            self.reason = (f"{self.label}, checked against eager {on}" if self.usable else
                           f"the {self.label} disagreed with eager {on}: eager kept")
        return self.usable

    def describe(self) -> dict:
        return {"path": self.path if self.usable else "eager", "reason": self.reason,
                "preparationSeconds": round(self.preparation, 3),
                **({"batchSeconds": self.batch_seconds} if self.batch_seconds else {})}


class Bf16Weights(FastPrefix):
    """The frozen prefix with its weights cast to bf16 once, run op by op: what autocast computes, without
    casting every weight again on every call (in bench/frozen_pass.py the fastest eager row on CPUs with
    bf16 kernels). Autocast keeps some ops in fp32 (normalisations, softmax), a bf16 copy does not, so the
    first batch is still checked against the eager autocast pass, within bf16 tolerance, and the pass
    stays eager when they disagree. Nothing to compile: preparing it is one copy of the prefix."""

    path, label = WEIGHTS_PATH, "bf16-weights prefix"
    warm_on_batch = False

    def compile(self, images: torch.Tensor) -> bool:
        if self.usable is not None:
            return self.usable
        start = time.perf_counter()
        with torch.no_grad():
            self.scripted = copy.deepcopy(self._prefix).to(torch.bfloat16).eval()
        self._prefix, self.preparation = None, time.perf_counter() - start
        return True


def _seconds(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> float:
    start = time.perf_counter()
    run(images)
    return time.perf_counter() - start
