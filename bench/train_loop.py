"""Plain seed-style fine-tuning loop vs finetune_trainer.fit, side by side in one process.

Same data, same model, same seed, same epochs: the demo's real ImageNet backbone (EfficientNet-Lite0 from a
PyPI wheel, as timm's tf_efficientnet_lite0) on the demo's photo patches (11 classes, 440 train / 165 val),
both made locally with nothing downloaded. For each of `head` and `partial` (last stage) it prints seconds,
training images/s, the speed-up, the ratio to one backbone forward pass over the same images (fp32 and bf16),
and the best-epoch val accuracies (which mean something: the backbone is really pretrained). "ours" runs with
the defaults (precision auto: bf16 on CPUs with native bf16); "ours32" is one more run in fp32, the plain
loop's precision, so the accuracy columns compare the same computation.

    .venv/bin/python bench/train_loop.py [--size 224] [--epochs 10] [--device cpu] [--repeat 3]

On a CUDA machine `--device cuda` runs the same comparison on the GPU. Numbers, not asserts:
tests never time anything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from finetune_api.spec import parse_spec
from finetune_trainer.data import build_dataloaders, load_splits
from finetune_trainer.demo import prepare
from finetune_trainer.fit import fit
from finetune_trainer.freeze import param_groups, plan_freeze
from finetune_trainer.model import build_model
from finetune_trainer.report import Reporter
from finetune_trainer.runtime import seed_everything


def make_spec(args, policy: str, out: Path, weights: Path, data: Path, precision: str = "auto"):
    return parse_spec(spec_dict(args, policy, out, weights, data, precision))


def spec_dict(args, policy: str, out: Path, weights: Path, data: Path, precision: str = "auto") -> dict:
    freeze = {"policy": policy, **({"trainableStages": 1} if policy == "partial" else {})}
    return ({
        "model": {"library": "timm", "architecture": "tf_efficientnet_lite0",
                  "weights": {"source": "file", "path": str(weights)}},
        "dataset": {"path": str(data), "imageSize": args.size},
        "freeze": freeze,
        "training": {"epochs": args.epochs, "batchSize": 32, "learningRate": 0.003, "device": args.device,
                     "seed": 0, "logEverySteps": 1000, "precision": precision},
        "output": {"path": str(out)},
    })


def whole_process(args, policy: str, work: Path, weights: Path, data: Path) -> tuple[float, dict, list[float], float]:
    """(plain seconds, the plain child's report, ours' seconds per run, ours val acc), each a fresh process from
    its start to its exit: the plain loop as a child of this script (once: it takes minutes), ours as
    `finetune-train train -f job.yaml` --repeat times (a fresh output each time), so both pay the interpreter,
    the imports and the data scan, as a user's run does."""
    common = ["--size", str(args.size), "--epochs", str(args.epochs), "--device", args.device,
              "--demo-output", args.demo_output]
    start = time.perf_counter()
    child = subprocess.run([sys.executable, __file__, "--plain-child", policy, *common], check=True,
                           capture_output=True, text=True)
    t_plain, report = time.perf_counter() - start, json.loads(child.stdout.splitlines()[-1])
    t_ours = []
    for i in range(args.repeat):
        out = work / f"process-{policy}-{i}"
        job = work / f"process-{policy}-{i}.yaml"
        job.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                       "metadata": {"name": f"bench-{policy}"},
                                       "spec": spec_dict(args, policy, out, weights, data)}))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "finetune_trainer.cli", "train", "-f", str(job)], check=True,
                       capture_output=True)
        t_ours.append(time.perf_counter() - start)
    meta = json.loads((out / "model.json").read_text())
    return t_plain, report, t_ours, meta["metrics"]["valAccuracy"]


def plain_loop(spec, device: torch.device) -> tuple[float, float, int]:
    """The seed's loop: full forward through the frozen backbone every step, .item() every step.

    Frozen parts are kept in eval mode (unlike the seed, whose model.train() drifts frozen BatchNorm
    statistics), so both loops compute the same function and only their cost differs.
    """
    seed_everything(0)
    splits = load_splits(spec.dataset, 0)
    built = build_model(spec, len(splits.classes))
    model = built.model.to(device)
    model.requires_grad_(False)
    plan = plan_freeze(model, built.head_name, spec.freeze)  # the same modules train in both loops
    trainable = [model.get_submodule(m) for s in plan.stages if s.name in plan.trainable_stages for m in s.modules]
    trainable.append(model.get_submodule(built.head_name))
    for m in trainable:
        m.requires_grad_(True)
    # fit()'s parameter groups (backbone at lr × backboneLrScale): the same optimisation, only the cost differs
    opt = torch.optim.Adam(param_groups(model, plan, spec.training, spec.freeze.backbone_lr_scale),
                           lr=spec.training.learning_rate)
    train, val = build_dataloaders(splits, built.preprocessing, spec.dataset, spec.training.batch_size)
    crit = nn.CrossEntropyLoss()
    start = time.perf_counter()
    best = -1.0
    for epoch in range(1, spec.training.epochs + 1):
        # The same shuffle per epoch as fit() (seed + epoch), so both loops see the images in one order
        # and their accuracies differ only by what each computes.
        seed_everything(spec.training.seed + epoch)
        train.sampler.reseed(spec.training.seed + epoch)
        model.eval()
        for m in trainable:
            m.train()
        for images, labels in train:
            loss = crit(model(images.to(device)), labels.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()
        correct = total = 0
        model.eval()
        with torch.no_grad():
            for images, labels in val:
                correct += (model(images.to(device)).argmax(1).cpu() == labels).sum().item()
                total += len(labels)
        best = max(best, correct / total)  # fit() exports (and reports) its best epoch too
    return time.perf_counter() - start, best, len(splits.train)


@torch.inference_mode()
def one_backbone_pass(spec, device: torch.device, dtype: torch.dtype | None) -> float:
    """The physical limit of head-only training: one forward pass over every train and val image."""
    splits = load_splits(spec.dataset, 0)
    built = build_model(spec, len(splits.classes))
    model = built.model.to(device).eval().to(memory_format=torch.channels_last)
    train, val = build_dataloaders(splits, built.preprocessing, spec.dataset, 32)
    for loader in (train, val):  # decode once so the timed pass measures compute only
        for _ in loader:
            pass
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    start = time.perf_counter()
    with autocast:
        for loader in (train, val):
            for images, _ in loader:
                model(images.to(device).contiguous(memory_format=torch.channels_last))
    return time.perf_counter() - start


def ours(spec) -> tuple[float, float]:
    start = time.perf_counter()
    result = fit(spec, Reporter(), Path(spec.output.path))
    return time.perf_counter() - start, result.val_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--policies", default="head,partial")
    parser.add_argument("--demo-output", default="demo-output", help="where the backbone and patches are kept")
    parser.add_argument("--repeat", type=int, default=3, help="runs of ours per policy (median reported)")
    parser.add_argument("--whole-process", action="store_true",
                        help="run the plain loop in a process of its own (its loop time fills the table) and ours "
                        "as finetune-train train too, timing each from Python's start to its exit")
    parser.add_argument("--plain-child", help=argparse.SUPPRESS)  # whole_process(): one plain loop, then exit
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.plain_child:
        weights, data = prepare(Path(args.demo_output))
        with tempfile.TemporaryDirectory() as tmp:
            seconds, acc, n = plain_loop(make_spec(args, args.plain_child, Path(tmp), weights, data), device)
        print(json.dumps({"valAccuracy": acc, "seconds": seconds, "trainImages": n}))
        return
    work = Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    try:
        weights, data = prepare(Path(args.demo_output))
        probe = make_spec(args, "head", work / "probe", weights, data)
        fp32 = one_backbone_pass(probe, device, None)
        bf16 = one_backbone_pass(probe, device, torch.bfloat16)
        print(f"tf_efficientnet_lite0 (ImageNet) on photo patches, {args.size}px, {args.epochs} epochs, "
              f"device {args.device}, torch threads {torch.get_num_threads()}")
        print(f"one backbone pass over train+val: fp32 {fp32:.1f}s, bf16 {bf16:.1f}s")
        processes: list[tuple] = []
        print(f"{'policy':8} {'loop':6} {'seconds':>8} {'img/s':>8} {'speed-up':>9} {'x bf16 pass':>12} {'val acc':>8}")
        for policy in args.policies.split(","):
            if args.whole_process:  # the plain loop runs once, in its own process: its loop time is the row
                p_plain, report, p_ours, pa_ours = whole_process(args, policy, work, weights, data)
                t_plain, acc_plain, n = report["seconds"], report["valAccuracy"], report["trainImages"]
                processes.append((policy, p_plain, acc_plain, p_ours, pa_ours))
            else:
                spec_plain = make_spec(args, policy, work / f"plain-{policy}", weights, data)
                t_plain, acc_plain, n = plain_loop(spec_plain, device)
            # ours is short enough to repeat: the median of --repeat runs (a shared machine is noisy)
            runs = [ours(make_spec(args, policy, work / f"ours-{policy}-{i}", weights, data))
                    for i in range(args.repeat)]
            t_ours, acc_ours = sorted(runs)[len(runs) // 2]
            if len(runs) > 1:
                print(f"{policy:8} ours runs: " + ", ".join(f"{t:.1f}s" for t, _ in runs))
            # The same computation in fp32 (no bf16 rounding): what the accuracy comparison is about.
            t_fp32, acc_fp32 = ours(make_spec(args, policy, work / f"ours-{policy}-fp32", weights, data, "fp32"))
            for name, secs, acc in (("plain", t_plain, acc_plain), ("ours", t_ours, acc_ours),
                                    ("ours32", t_fp32, acc_fp32)):
                print(f"{policy:8} {name:6} {secs:8.1f} {n * args.epochs / secs:8.0f} {t_plain / secs:8.1f}x "
                      f"{secs / bf16:11.2f}x {acc:8.3f}")
        if processes:
            print("\nwhole process, python start to exit (plain: a child running the loop above; ours: "
                  "finetune-train train -f job.yaml)")
            print(f"ours: the median of {args.repeat} runs (each listed)")
            print(f"{'policy':8} {'plain s':>8} {'ours s':>8} {'speed-up':>9} {'plain acc':>10} {'ours acc':>9}  runs")
            for policy, p_plain, pa_plain, p_runs, pa_ours in processes:
                p_ours = statistics.median(p_runs)
                print(f"{policy:8} {p_plain:8.1f} {p_ours:8.1f} {p_plain / p_ours:8.1f}x {pa_plain:10.3f} "
                      f"{pa_ours:9.3f}  " + ", ".join(f"{t:.1f}" for t in p_runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
