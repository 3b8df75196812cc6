"""The frozen pass's candidate paths side by side: img/s and preparation time for each, on the same model and data.

The model is the demo's real ImageNet backbone (EfficientNet-Lite0 from a PyPI wheel, as timm's
tf_efficientnet_lite0) cut at its classifier (pooled penultimate features, what a head-only fine-tune caches)
or before its last stage (`--boundary last-stage`, what `partial` caches), with BatchNorms folded as the
trainer folds them. Inputs are random images already in memory, so the rows time the network alone: the
fastest row is the steady limit. A pass of N images also pays a path's preparation, so each row is also
given as N / (preparation + N / rate) for the real run's N: the best of those is "the limit" for that pass.
Then the trainer's own frozen pass over the demo's photos, decoding and resizing included: in this process,
`fit()` of one epoch under each training.frozenPass choice (eager, torchscript, auto), interleaved in the same
rounds, read from model.json. The faster of eager and torchscript is the limit for a pass that must decode
its images; auto is what a run picks. Last, one real `finetune-train train` in a process of its own, as a
user runs it. And the pass's input alone (decoding, resizing, the float tail, in the pass's streams, no
network), which gives the limit for a pass that must decode on the same cores. `--views K` makes the
trainer's runs head-only with augmentation and K cached views (N = K x train + val), the pass of issue 16's views.

    .venv/bin/python bench/frozen_pass.py [--size 224] [--batch 8] [--batches 16] [--rounds 3] [--no-compile]
        [--views K]

Rows: fp32 eager; bf16 autocast (the eager pass the trainer falls back to); bf16 weights eager; bf16
TorchScript trace + freeze + optimize_for_inference (the trainer's fast path, frozen_pass.FastPrefix);
torch.compile (inductor, bf16 weights) unless --no-compile; on a CPU of 2-3 threads the bf16 eager and
TorchScript rows again as that many single-threaded streams side by side (pass_streams, the trainer's
default there); on CUDA (--device cuda) the same rows there. The trainer's passes: eager, torchscript, auto
(streams by default) and auto with frozenPassStreams 1 (the pass before streams). Numbers, not asserts.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml
from augmented_views import AUGMENT  # bench/augmented_views.py's augmentation, for --views

from finetune_api.spec import parse_spec
from finetune_trainer import features, frozen_pass, pass_input, pass_streams
from finetune_trainer.data import load_splits
from finetune_trainer.demo import prepare
from finetune_trainer.engine import Compute, Precision
from finetune_trainer.fit import fit
from finetune_trainer.freeze import plan_freeze
from finetune_trainer.model import build_model
from finetune_trainer.report import Reporter

# (row, training.frozenPass, training.frozenPassStreams): the last is the pass as it ran before streams
CHOICES = (("eager", "eager", None), ("torchscript", "torchscript", None), ("auto", "auto", None),
           ("auto, 1 stream", "auto", 1))


def _spec(args, weights: Path, data: Path, out: Path, epochs: int = 1):
    return parse_spec(_spec_dict(args, weights, data, out, epochs))


def _spec_dict(args, weights: Path, data: Path, out: Path, epochs: int = 1, choice: str = "auto",
               streams: int | None = None) -> dict:
    views = {"featureCacheViews": args.views} if args.views else {}
    views |= {"frozenPassStreams": streams} if streams else {}
    return ({
        "model": {"library": "timm", "architecture": "tf_efficientnet_lite0",
                  "weights": {"source": "file", "path": str(weights)}},
        "dataset": {"path": str(data), "imageSize": args.size, **({"augment": AUGMENT} if args.views else {})},
        "freeze": {"policy": "head"} if args.boundary == "head" else {"policy": "partial", "trainableStages": 1},
        "training": {"epochs": epochs, "batchSize": 32, "device": args.device, "seed": 0,
                     "logEverySteps": 1000, "frozenPass": choice, **views},
        "output": {"path": str(out)},
    })


def trainer_pass(args, weights: Path, data: Path, out: Path, choice: str, streams: int | None) -> dict:
    """model.json's featureCache.frozenPass of a one-epoch fit() in this process under training.frozenPass
    `choice` (and frozenPassStreams `streams`): the trainer's own pass over the photos (decoding, resizing,
    folding, compiling included)."""
    fit(parse_spec(_spec_dict(args, weights, data, out, choice=choice, streams=streams)), Reporter(), out)
    how = json.loads((out / "model.json").read_text())["featureCache"]["frozenPass"]
    shutil.rmtree(out, ignore_errors=True)
    return how


def decoding(spec, prep, device: torch.device) -> float:
    """img/s of the trainer's pass input alone over the run's photos (train, then val), no network: decoding,
    resizing and the per-batch float tail. The faster of: the streams the trainer's pass runs (pass_input,
    pass_streams), and one single-threaded stream times the torch threads (decoding with no other thread to
    contend with, perfectly parallel): the higher rate makes the stricter limit."""
    splits = load_splits(spec.dataset, spec.training.seed)
    compute = Compute(device, Precision("bf16", torch.bfloat16, device.type), channels_last=True)

    def nothing(x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, 0]

    def rate(streams: int | None) -> float:
        source = pass_input.eval_input(splits.train + splits.val, prep, None, 0, device, streams=streams,
                                       reduced=True)
        start, n = time.perf_counter(), 0
        for _, _out, labels in pass_streams.map_splits([source], compute, None, nothing):
            n += len(labels)
        return n / (time.perf_counter() - start)

    every = torch.get_num_threads()
    in_streams = rate(None)
    torch.set_num_threads(1)
    try:
        one = rate(1)
    finally:
        torch.set_num_threads(every)
    return max(in_streams, one * every)


def _time(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batches: int, sync) -> float:
    with torch.inference_mode():
        run(x)  # warm-up: first-call allocations, oneDNN primitive creation
        sync()
        start = time.perf_counter()
        for _ in range(batches):
            run(x)
        sync()
    return batches * x.shape[0] / (time.perf_counter() - start)


def _time_streams(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batches: int, streams: int) -> float:
    """img/s of `streams` threads side by side, each running `run` on its share of the torch threads (the
    trainer's pass_streams, without the decoding)."""
    every = torch.get_num_threads()

    def work(n: int) -> None:
        with torch.inference_mode():
            for _ in range(n):
                run(x)

    each = max(1, batches // streams)
    with ThreadPoolExecutor(streams, initializer=torch.set_num_threads, initargs=(max(1, every // streams),)) as pool:
        list(pool.map(work, [1] * streams))  # warm-up
        start = time.perf_counter()
        list(pool.map(work, [each] * streams))
        elapsed = time.perf_counter() - start
    torch.set_num_threads(every)
    return streams * each * x.shape[0] / elapsed


def candidates(model, boundary: str, x: torch.Tensor, compile_too: bool) -> dict[str, Callable]:
    """name -> a function that prepares the path and returns what runs a batch."""
    device = x.device
    folded = features.folded_copy(copy.deepcopy(model).eval()).to(device)
    prefix = features.build_prefix(folded, boundary)
    bf16 = copy.deepcopy(prefix).to(torch.bfloat16).eval()

    def autocast(x):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return prefix(x)

    def scripted():
        fast = frozen_pass.FastPrefix(prefix)
        fast.compile(x)  # traced at the real input size, as the trainer does on its first batch
        return fast

    def compiled():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.compile(bf16)

    rows = {
        "fp32 eager": lambda: prefix,
        "bf16 autocast, eager (the fallback)": lambda: autocast,
        "bf16 weights, eager": lambda: (lambda x: bf16(x.to(torch.bfloat16))),
        "bf16 TorchScript fused (the trainer's fast path)": scripted,
    }
    if compile_too:
        compiled_model = {}
        rows["bf16 torch.compile (inductor)"] = lambda: (lambda x: compiled_model.setdefault(
            "m", compiled())(x.to(torch.bfloat16)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--boundary", choices=["head", "last-stage"], default="head")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per path (median shown)")
    parser.add_argument("--demo-output", type=Path, default=Path("demo-output"))
    parser.add_argument("--views", type=int, default=0, help="the trainer's passes with augmentation and K views")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    weights, data = prepare(args.demo_output)
    with tempfile.TemporaryDirectory() as tmp:
        spec = _spec(args, weights, data, Path(tmp) / "model")
        built = build_model(spec, 11)
        plan = plan_freeze(built.model, built.head_name, spec.freeze)
        boundary = built.head_name if args.boundary == "head" else \
            next(s for s in plan.stages if s.name in plan.trainable_stages).modules[0]
        x = torch.rand(args.batch, 3, args.size, args.size, device=device).contiguous(
            memory_format=torch.channels_last)
        prepared = []  # (name, run, input, batches, preparation seconds, streams)
        streams = torch.get_num_threads() if device.type == "cpu" and 2 <= torch.get_num_threads() < 4 else 1
        for name, make in candidates(built.model, boundary, x, not args.no_compile).items():
            start = time.perf_counter()
            run = make()
            if name.startswith("bf16 torch.compile"):
                _time(run, x, 1, sync)  # compilation happens on the first call: count it as preparation
            prepared.append((name, run, x, args.batches, time.perf_counter() - start, 1))
            if streams > 1 and name.startswith(("bf16 autocast", "bf16 weights", "bf16 TorchScript")):
                prepared.append((f"{name}, {streams} streams x 1 thread", run, x, args.batches, prepared[-1][4],
                                 streams))
        for b in (4, 8, 16, 32, 64):  # the batch size matters as much as the path on CPUs (caches)
            if b != args.batch:
                xb = torch.rand(b, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
                run = candidates(built.model, boundary, xb, False)["bf16 autocast, eager (the fallback)"]()
                prepared.append((f"bf16 autocast, eager, batch {b}", run, xb,
                                 max(2, args.batches * args.batch // b), 0.0, 1))
        # Rounds interleave the paths, so a shared machine's drift falls on all of them alike; the median counts.
        rates: dict[str, list[float]] = {name: [] for name, *_ in prepared}
        passes: dict[str, list[dict]] = {row: [] for row, *_ in CHOICES}
        decoded: list[float] = []  # img/s of the pass's input alone (no network), per round
        for r in range(args.rounds):
            decoded.append(decoding(spec, built.preprocessing, device))
            for name, run, xi, batches, _prep, k in prepared:
                rates[name].append(_time(run, xi, batches, sync) if k == 1 else _time_streams(run, xi, batches, k))
            for i, (row, choice, k) in enumerate(CHOICES):
                passes[row].append(trainer_pass(args, weights, data, Path(tmp) / f"pass-{i}-{r}", choice, k))
        rows = [(name, statistics.median(rates[name]), prep) for name, _run, _x, _b, prep, _k in prepared]
        # The trainer's own frozen pass in a real run over the demo's 605 photos (decode + resize included),
        # as `finetune-train train` in a process of its own: what a user's run does, start-up helpers included.
        out, job = Path(tmp) / "run", Path(tmp) / "job.yaml"
        job.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                       "metadata": {"name": "frozen-pass"},
                                       "spec": _spec_dict(args, weights, data, out)}))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "train", "-f", str(job)], check=True,
                       capture_output=True)
        whole = time.perf_counter() - start
        meta = json.loads((out / "model.json").read_text())
        how = meta["featureCache"]["frozenPass"]
        images = round(how["imagesPerSecond"] * how["seconds"])
        timings = meta.get("timings", {})
    over = [(name, rate, prep, images / (prep + images / rate)) for name, rate, prep in rows]
    steady_limit, limit = max(r[1] for r in over), max(r[3] for r in over)
    # Decoding is work the network-only rows leave out; with no idle core to hide it on, a pass that decodes
    # its images can at best spend the network's time plus the decoding's, every core busy with one of them.
    decode = statistics.median(decoded)
    with_decoding = 1 / (1 / limit + 1 / decode)
    print(f"tf_efficientnet_lite0 to {boundary} ({args.boundary}), {args.size} px, batch {args.batch}, "
          f"{args.device}, {torch.get_num_threads()} threads; N = {images} images (the real run's pass)")
    print(f"img/s: median of {args.rounds} interleaved rounds (min-max beside it)")
    print("| path | img/s | min-max | preparation s | img/s over N, preparation included | of the limit for N "
          "| of the fastest steady rate |\n|---|---|---|---|---|---|---|")
    for name, rate, prep, effective in over:
        print(f"| {name} | {rate:.1f} | {min(rates[name]):.0f}-{max(rates[name]):.0f} | {prep:.2f} | "
              f"{effective:.1f} | {effective / limit:.0%} | {rate / steady_limit:.0%} |")
    rate, prep = how["imagesPerSecond"], how.get("preparationSeconds", 0.0)
    raced = f"; raced: {how['batchSeconds']} s per batch" if how.get("batchSeconds") else ""
    print(f"| the trainer's frozen pass in a real run ({how['path']}, batch {how['batchSize']}, {how['workers']} "
          f"loader workers, {how.get('streams', 1)} streams, {how['inputs']}; {images} photos, decoding "
          f"included{raced}) | {rate:.1f} | one run | "
          f"{prep:.2f} | {rate:.1f} | {rate / limit:.0%} | {rate / steady_limit:.0%} |")
    print(f"whole `finetune-train train` of 1 epoch: {whole:.1f} s; model.json timings: {timings}")
    print(f"\nthe pass's input alone (decode, resize, float tail; no network), {images} photos, the faster of "
          f"the pass's streams and one thread x {torch.get_num_threads()}: {decode:.0f} img/s (median of "
          f"{args.rounds}, {min(decoded):.0f}-{max(decoded):.0f}); "
          f"the limit for N with that decoding on the same cores, 1 / (1 / {limit:.1f} + 1 / {decode:.0f}): "
          f"{with_decoding:.1f} img/s; the real run's pass at {rate / with_decoding:.0%} of it")
    print(f"\nthe trainer's frozen pass over the photos in this process (fit(), 1 epoch, views {args.views}), "
          f"decoding and resizing included; seconds and img/s: median of {args.rounds} rounds (min-max)")
    print("| training.frozenPass | path taken | images | seconds | min-max | img/s | of the photo limit "
          "| of the limit for N (in memory) | of that limit with decoding |\n|---|---|---|---|---|---|---|---|---|")
    medians = {c: statistics.median(h["seconds"] for h in hs) for c, hs in passes.items()}
    best = min(medians.values())
    for choice, hs in passes.items():
        n = round(hs[0]["imagesPerSecond"] * hs[0]["seconds"])
        taken = "/".join(sorted({h["path"] for h in hs}))
        secs = [h["seconds"] for h in hs]
        print(f"| {choice} | {taken} | {n} | {medians[choice]:.2f} | {min(secs):.2f}-{max(secs):.2f} | "
              f"{n / medians[choice]:.1f} | {best / medians[choice]:.0%} | {n / medians[choice] / limit:.0%} | "
              f"{n / medians[choice] / with_decoding:.0%} |")
    print(f"auto's reasons: {sorted({h['reason'] for h in passes['auto']})}; streams per row: "
          f"{ {row: sorted({h.get('streams', 1) for h in hs}) for row, hs in passes.items()} }")


if __name__ == "__main__":
    main()
