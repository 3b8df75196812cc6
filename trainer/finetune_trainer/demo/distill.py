"""`make demo-distill`: the fine-tuned ImageNet model teaches a small randomly initialised student, on CPU.

1. the teacher (examples/distillation/teacher.yaml): EfficientNet-Lite0 from a PyPI wheel, frozen, with a new
   head on the eleven photo-patch classes;
2. the student (examples/distillation/student.yaml) without distillation: a random-init resnet18 at a quarter
   of the resolution, its last stage and head trained on the labels alone (the control);
3. the same student with `spec.distillation` (soft, T=4, alpha=0.5, fromJob = the teacher's export).
Both students get the same data, seed and schedule; the table shows what the teacher adds, and the distilled
student's model.json records the control's accuracy (distillation.withoutDistillation).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from finetune_trainer.cli import load_job_with_overrides
from finetune_trainer.demo import prepare
from finetune_trainer.distill import record_baseline
from finetune_trainer.fit import fit
from finetune_trainer.report import ConsoleReporter, Reporter


@dataclass
class Row:
    val_accuracy: float
    test_accuracy: float
    seconds: float


def run_chain(examples: Path, output: Path, seed: int = 0, quiet: bool = False) -> dict[str, Row]:
    """{teacher, student, distilled: Row}; outputs under <output>/distillation[/seed-N]/."""
    weights, data = prepare(output)
    base = output / "distillation" if seed == 0 else output / "distillation" / f"seed-{seed}"
    common = {("dataset", "path"): str(data), ("training", "seed"): seed}
    teacher_out = output / "distillation" / "teacher"  # one teacher (seed 0) for every student seed
    runs = {
        "teacher": ("teacher.yaml", teacher_out, {("model", "weights", "path"): str(weights),
                                                  ("training", "seed"): 0}),
        "student": ("student.yaml", base / "student-plain", {("distillation",): None}),
        "distilled": ("student.yaml", base / "student", {("distillation", "teacher", "fromJob"): str(teacher_out)}),
    }
    rows = {}
    for run, (file, out, extra) in runs.items():
        job = load_job_with_overrides(str(examples / file), {**common, ("output", "path"): str(out), **extra})
        if not quiet:
            print(f"\n=== {run}: {examples / file} (seed {seed}) ===", file=sys.stderr)
        start = time.perf_counter()
        result = fit(job.spec, Reporter() if quiet else ConsoleReporter(), out, name=job.name)
        rows[run] = Row(result.val_accuracy, result.test_accuracy or 0.0, time.perf_counter() - start)
    record_baseline(base / "student", base / "student-plain")
    return rows


def print_table(rows: dict[str, Row], seed: int, output: Path) -> None:
    what = {"teacher": "EfficientNet-Lite0, ImageNet, frozen + head", "student": "resnet18 random init, labels only",
            "distilled": "resnet18 random init, labels + teacher"}
    print(f"\nrun        model                                          val acc   test acc   seconds   (seed {seed})")
    for run, r in rows.items():
        print(f"{run:<10} {what[run]:<45} {r.val_accuracy:>8.1%} {r.test_accuracy:>10.1%} {r.seconds:>9.1f}")
    gain = rows["distilled"].test_accuracy - rows["student"].test_accuracy
    print(f"\ndistillation: the student scores {rows['distilled'].test_accuracy:.1%} test accuracy with the teacher, "
          f"{rows['student'].test_accuracy:.1%} without ({gain * 100:+.1f} points)")
    print(f"model.json: {output / 'distillation' / 'student'}/model.json, section `distillation`")


def main(examples: Path, output: Path, seed: int = 0) -> int:
    rows = run_chain(examples, output, seed)
    print_table(rows, seed, output)
    return 0
