"""Distillation overhead: the plain student vs the same student with spec.distillation, side by side in one process.

The demo's pair (examples/distillation/): the teacher is the real ImageNet EfficientNet-Lite0 (from a PyPI
wheel) fine-tuned head-only on the photo patches (11 classes, 440 train / 165 val / 165 test); the student a
random-init resnet18 at 64 px whose layer4 + head train (soft, T=4, alpha=0.5). Two pairs of runs, same seed
and epochs:

- cached:   training.featureCache auto — the student's frozen stages and the teacher's outputs are each
            computed once; an epoch adds one KL term per batch.
- no cache: training.featureCache off — the student runs its whole network on images every step, and the
            teacher runs on every batch.

Prints per-epoch seconds (the mean over epochs 2..N: steady state), whole-run seconds (with the one-time
frozen and teacher passes and the teacher's val/test scoring) and test accuracy; numbers, not asserts.

    .venv/bin/python bench/distillation.py [--epochs 5] [--teacher DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from finetune_trainer.cli import load_job_with_overrides
from finetune_trainer.demo import prepare
from finetune_trainer.fit import fit
from finetune_trainer.report import Reporter

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "distillation"


def job(file: str, out: Path, data: Path, overrides: dict):
    return load_job_with_overrides(str(EXAMPLES / file), {("output", "path"): str(out), ("dataset", "path"): str(data),
                                                          **overrides})


def run(spec, out: Path) -> dict:
    start = time.perf_counter()
    result = fit(spec, Reporter(), out)
    seconds = time.perf_counter() - start
    epochs = [h["epochSeconds"] for h in result.history]
    steady = epochs[1:] or epochs
    return {"seconds": seconds, "epoch": sum(steady) / len(steady), "test": result.test_accuracy or 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--teacher", help="an existing teacher export (default: trained here from teacher.yaml)")
    parser.add_argument("--demo-output", default="demo-output", help="where the backbone file and photos live")
    args = parser.parse_args()
    weights, data = prepare(Path(args.demo_output))
    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    try:
        teacher = Path(args.teacher) if args.teacher else work / "teacher"
        if not args.teacher:
            start = time.perf_counter()
            fit(job("teacher.yaml", teacher, data, {("model", "weights", "path"): str(weights)}).spec, Reporter(),
                teacher)
            print(f"teacher trained in {time.perf_counter() - start:.1f}s")
        common = {("training", "epochs"): args.epochs, ("training", "device"): args.device}
        rows = {}
        for cache in ("auto", "off"):
            for kd in (False, True):
                teach = {("distillation", "teacher", "fromJob"): str(teacher)} if kd else {("distillation",): None}
                extra = {**common, ("training", "featureCache"): cache, **teach}
                out = work / f"{cache}-{kd}"
                rows[cache, kd] = run(job("student.yaml", out, data, extra).spec, out)
        print(f"\nstudent resnet18 @64 px (layer4 + head), teacher EfficientNet-Lite0 @128 px, {args.epochs} epochs, "
              f"{args.device}")
        print("featureCache   run             s/epoch   overhead   whole run s   overhead   test acc")
        for cache, name in (("auto", "cached"), ("off", "no cache")):
            base = rows[cache, False]
            for kd in (False, True):
                r = rows[cache, kd]
                label = "distilled" if kd else "plain student"
                print(f"{name:<14} {label:<15} {r['epoch']:>8.2f} {r['epoch'] / base['epoch'] - 1:>+10.1%} "
                      f"{r['seconds']:>13.1f} {r['seconds'] / base['seconds'] - 1:>+10.1%} {r['test']:>9.1%}")
        print(json.dumps({f"{c}/{'kd' if k else 'plain'}": v for (c, k), v in rows.items()}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
