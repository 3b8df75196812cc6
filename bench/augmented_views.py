"""Cached augmented views vs the plain augmented loop, side by side in one process.

Both run `fit()` head-only on the demo's real ImageNet backbone (EfficientNet-Lite0 from a PyPI wheel, as
timm's tf_efficientnet_lite0) and photo patches (11 classes, 440 train / 165 val), made locally with nothing
downloaded; the same seed, epochs and augmentation (randomResizedCrop + horizontalFlip + colorJitter).
"views" sets training.featureCacheViews K: the frozen backbone runs once over K augmented copies of each
training image and each epoch samples one. "plain" sets training.featureCache: off: the backbone runs over
a freshly augmented image every step (and over val every epoch). Prints seconds, speed-up, best val
accuracy (what picks the exported weights, so biased upwards, more so for the noisier run) and the demo's
held-out test accuracy of those weights; numbers, not asserts.

    .venv/bin/python bench/augmented_views.py [--size 224] [--epochs 10] [--views 4] [--device cpu] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from finetune_api.spec import parse_spec
from finetune_trainer.demo import prepare
from finetune_trainer.fit import fit
from finetune_trainer.report import Reporter

AUGMENT = {"randomResizedCrop": True, "horizontalFlip": True, "colorJitter": 0.3}


def make_spec(args, out: Path, weights: Path, data: Path, views: int, seed: int = 0):
    cache = {"featureCacheViews": views} if views else {"featureCache": "off"}
    return parse_spec({
        "model": {"library": "timm", "architecture": "tf_efficientnet_lite0",
                  "weights": {"source": "file", "path": str(weights)}},
        "dataset": {"path": str(data), "imageSize": args.size, "augment": AUGMENT},
        "freeze": {"policy": "head"},
        "training": {"epochs": args.epochs, "batchSize": 32, "learningRate": 0.003, "device": args.device,
                     "seed": seed, "logEverySteps": 1000, **cache},
        "output": {"path": str(out)},
    })


def run(spec, out: Path) -> tuple[float, float, dict, float | None]:
    """(seconds, best val accuracy, model.json's featureCache, test accuracy of the exported best weights)."""
    start = time.perf_counter()
    result = fit(spec, Reporter(), out)
    seconds = time.perf_counter() - start
    meta = json.loads((out / "model.json").read_text())
    return seconds, max(h["valAccuracy"] for h in result.history), meta["featureCache"], result.test_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--demo-output", type=Path, default=Path("demo-output"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training seeds: one val image is 0.6 points, so accuracy is compared as a mean")
    args = parser.parse_args()
    weights, data = prepare(args.demo_output)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, views in ((f"views (K={args.views})", args.views), ("plain (featureCache off)", 0)):
            runs = []
            for seed in args.seeds:
                out = Path(tmp) / f"{name.split()[0]}-{seed}"
                runs.append(run(make_spec(args, out, weights, data, views, seed), out))
                shutil.rmtree(out, ignore_errors=True)
            rows.append((name, runs))
    plain = sum(r[0] for r in rows[-1][1]) / len(args.seeds)
    print(f"{args.size} px, {args.epochs} epochs, head, augment {AUGMENT}, seeds {args.seeds}")
    print("| loop | seconds (mean) | speed-up | best val acc (mean) | per seed | test acc of the best weights "
          "(mean) | per seed |\n|---|---|---|---|---|---|---|")
    for name, runs in rows:
        seconds, best = (sum(r[i] for r in runs) / len(runs) for i in (0, 1))
        tests = [r[3] for r in runs if r[3] is not None]
        test = f"{sum(tests) / len(tests):.3f} | " + ", ".join(f"{t:.3f}" for t in tests) if tests else "n/a | "
        print(f"| {name} | {seconds:.1f} | {plain / seconds:.1f}x | {best:.3f} | "
              + ", ".join(f"{r[1]:.3f}" for r in runs) + f" | {test} |")
    for name, runs in rows:
        print(f"{name}: featureCache {runs[0][2]}")


if __name__ == "__main__":
    main()
