"""`make demo`: honest transfer learning on the bundled digits, on CPU, with no download.

1. pretrain resnet18 on digits 0–4 (examples/demo/digits/pretrain.yaml) → a weights file;
2. fine-tune a new head on digits 5–9 with that backbone frozen (finetune.yaml);
3. the same head on a random frozen backbone (baseline.yaml).
The accuracies of 2 and 3 side by side show what the pretrained features are worth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from finetune_api.errors import FinetuneError
from finetune_trainer.cli import load_job_with_overrides
from finetune_trainer.fit import fit
from finetune_trainer.predict import Predictor
from finetune_trainer.report import ConsoleReporter

STEPS = ("pretrain", "finetune", "baseline")


def run_step(examples: Path, output: Path, step: str) -> tuple[float, float]:
    overrides = {("output", "path"): str(output / step)}
    if step == "finetune":
        overrides[("model", "weights", "path")] = str(output / "pretrain" / "model.safetensors")
    job = load_job_with_overrides(str(examples / f"{step}.yaml"), overrides)
    print(f"\n=== {step}: {examples / f'{step}.yaml'} ===", file=sys.stderr)
    start = time.perf_counter()
    result = fit(job.spec, ConsoleReporter(), Path(job.spec.output.path), name=job.name)
    return result.val_accuracy, time.perf_counter() - start


def run_demo(examples: Path, output: Path) -> dict[str, tuple[float, float]]:
    """{step: (val accuracy, seconds)} for pretrain, finetune and baseline."""
    results = {step: run_step(examples, output, step) for step in STEPS}
    Predictor.load(output / "finetune")  # the export must load back
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", default="examples/demo/digits", help="folder with the three demo job files")
    parser.add_argument("--output", default="demo-output/digits")
    args = parser.parse_args(argv)
    examples, output = Path(args.examples), Path(args.output)
    started = time.perf_counter()
    try:
        results = run_demo(examples, output)
    except FinetuneError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    (ft, _), (base, _) = results["finetune"], results["baseline"]
    print("\nstep       task        backbone                    val accuracy   seconds")
    print(f"pretrain   digits 0-4  trained from scratch        {results['pretrain'][0]:>8.1%}   "
          f"{results['pretrain'][1]:7.1f}")
    print(f"finetune   digits 5-9  pretrained on 0-4, frozen   {ft:>8.1%}   {results['finetune'][1]:7.1f}")
    print(f"baseline   digits 5-9  random init, frozen         {base:>8.1%}   {results['baseline'][1]:7.1f}")
    print(f"\ntransfer learning: {ft:.1%} vs {base:.1%} for the random backbone "
          f"({(ft - base) * 100:+.1f} points); total {time.perf_counter() - started:.0f}s")
    print(f"export: {output / 'finetune'}/model.safetensors + model.json  "
          f"(try: finetune-train predict --model {output / 'finetune'} IMAGE.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
