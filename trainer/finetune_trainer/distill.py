"""Knowledge distillation (spec.distillation): the student learns from the labels and from a frozen teacher.

loss = (1 - alpha) x task loss + alpha x distillation loss, where the distillation loss is
- soft: KL(teacher/T || student/T) of the softened distributions x T^2 (batchmean; Hinton et al. 2015 —
  the T^2 keeps the soft term's gradients on the task term's scale whatever T is);
- hard: cross entropy on the teacher's top class (DeiT's hard distillation);
- feature: MSE between the student's pooled pre-logits features (the input of its head's output Linear),
  through a learned Linear projection when the widths differ, and the teacher's. The projection trains with
  the student, is checkpointed (TrainState.aux) and is never exported.

How the teacher's output reaches the loss without the epoch loop knowing: the train loader is wrapped
(`Lesson`), and each batch it yields leaves the teacher's rows for exactly that batch in `lesson.current`,
which the loss takes (once). With fixed inputs the rows come from the cached train outputs — the train
dataset is wrapped to yield each item's index (teacher.Indexed), so samplers, mid-epoch resume skips, view
choices and data-parallel shards keep working unchanged; with random augmentation the teacher runs on each
batch as it is yielded (after MixUp/CutMix, so it judges the images the student sees). evaluate() never
goes through the lesson, so validation losses stay the task loss.

With the feature cache on and only the head training, the student's pooled pre-logits are the cached
features themselves — constant, so a feature loss on them could not teach the student anything; that case
(freeze.policy head with a one-Linear head) is refused before training.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from finetune_api.errors import JobFileError
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import teacher as teachers
from finetune_trainer.checkpoint import atomic_write
from finetune_trainer.distributed import Dist
from finetune_trainer.export import META_FILE, read_export
from finetune_trainer.feature_cache import CacheInputs, Prepared
from finetune_trainer.feature_store import views_key
from finetune_trainer.freeze import FreezePlan
from finetune_trainer.model import BuiltModel, find_head
from finetune_trainer.report import Reporter
from finetune_trainer.runtime import Env


def soft_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher/T || student/T) x T^2, averaged over the batch."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1), reduction="batchmean",
                    log_target=True) * (t * t)


def hard_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student, teacher.argmax(dim=1))


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the (projected) student features and the teacher's."""
    return F.mse_loss(student, teacher)


class Lesson:
    """The train loader with the teacher's rows for each batch it yields (see the module docstring).

    Sampler, generator, batch size and length are the wrapped loader's: fit() reseeds it as before."""

    def __init__(self, loader: DataLoader, cached: torch.Tensor | None, runner: teachers.Runner | None):
        self.loader, self.cached, self.runner = loader, cached, runner
        self.current: torch.Tensor | None = None

    def __getattr__(self, name: str):  # sampler, generator, batch_size, dataset ...
        return getattr(self.__dict__["loader"], name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if batch is None:
                yield None
                continue
            if self.cached is not None:
                images, targets, index = batch
                self.current = self.cached[index]
            else:
                images, targets = batch[0], batch[1]
                images = self.runner.compute.batch(images)  # once: the loop's own .to() is then a no-op
                self.current = self.runner.signal(images)
            yield images, targets

    def take(self) -> torch.Tensor | None:
        current, self.current = self.current, None
        return current


class DistillLoss(nn.Module):
    """(1 - alpha) x task + alpha x distillation on training batches; the task loss alone elsewhere."""

    def __init__(self, task: nn.Module, lesson: Lesson | None, kind: str, temperature: float, alpha: float):
        super().__init__()
        self.task, self.kind, self.temperature, self.alpha = task, kind, temperature, alpha
        self.__dict__["lesson"] = lesson  # not a submodule

    def forward(self, output, targets: torch.Tensor) -> torch.Tensor:
        logits, feats = output if isinstance(output, tuple) else (output, None)
        task = self.task(logits, targets)
        teacher = self.lesson.take() if self.lesson is not None else None
        if teacher is None:
            return task
        teacher = teacher.to(logits.device, non_blocking=True)
        return (1 - self.alpha) * task + self.alpha * self.distill(logits.float(), feats, teacher)

    def distill(self, logits: torch.Tensor, feats: torch.Tensor | None, teacher: torch.Tensor) -> torch.Tensor:
        if self.kind == "soft":
            return soft_loss(logits, teacher, self.temperature)
        if self.kind == "hard":
            return hard_loss(logits, teacher)
        return feature_loss(feats.float(), teacher)


class Student(nn.Module):
    """For `feature`: what trains — the student's net and the projection, inside one module (so DDP syncs
    both). Where a loss is backpropagated it returns (logits, projected pre-logits); under evaluate's
    inference mode only the logits, like the net itself."""

    def __init__(self, net: nn.Module, linear: nn.Linear, projection: nn.Module):
        super().__init__()
        self.net, self.projection = net, projection
        self.linear_name = next(n for n, m in net.named_modules() if m is linear)  # by name: copies stay copies

    def forward(self, x: torch.Tensor):
        if not torch.is_grad_enabled():
            return self.net(x)
        seen: list[torch.Tensor] = []
        handle = self.net.get_submodule(self.linear_name).register_forward_pre_hook(
            lambda module, args: seen.append(args[0]))
        try:
            logits = self.net(x)
        finally:
            handle.remove()
        return logits, self.projection(seen[-1])


@dataclasses.dataclass
class Distiller:
    """spec.distillation for one run; `Distiller.off()` (no distillation) leaves everything as it was."""

    spec: FineTuneJobSpec | None = None
    teacher: teachers.LoadedTeacher | None = None
    student_linear: nn.Linear | None = None
    projection: nn.Module | None = None  # feature: trains, is checkpointed, never exported
    lesson: Lesson | None = None
    section: dict | None = None  # model.json's distillation section (the student's scores are added last)

    @classmethod
    def off(cls) -> Distiller:
        return cls()

    @classmethod
    def create(cls, spec: FineTuneJobSpec, classes: list[str], built: BuiltModel, plan: FreezePlan) -> Distiller:
        """Loads and checks the teacher (before anything is written); one JobFileError line when it cannot teach."""
        d = spec.distillation
        if d is None:
            return cls.off()
        teacher = teachers.load(d.teacher, built.preprocessing)
        teachers.check_classes(teacher.classes, classes)
        if d.type != "feature":
            return cls(spec, teacher)
        head = built.model.get_submodule(built.head_name)
        linear, theirs = teachers.last_linear(head), teachers.last_linear(
            teacher.model.get_submodule(find_head(teacher.model)))
        if linear is None or theirs is None:
            raise JobFileError("distillation.type feature: the student and the teacher need a Linear output layer "
                               "(their pooled pre-logits are its input)")
        if plan.policy == "head" and head is linear:
            raise JobFileError("distillation.type feature: with freeze.policy head and a one-Linear head the "
                               "student's pre-logits features are its frozen backbone's (constant), so a feature "
                               "loss cannot teach it; use type soft or hard, freeze.policy partial/full, or "
                               "head.hiddenUnits")
        width, target = linear.in_features, theirs.in_features
        projection = nn.Linear(width, target) if width != target else None
        return cls(spec, teacher, linear, projection)

    @property
    def active(self) -> bool:
        return self.teacher is not None

    def join(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        """The projection trains with the student (the optimizer's defaults: learningRate, weightDecay)."""
        if self.projection is not None:
            self.projection.to(device)
            optimizer.add_param_group({"name": "distillation-projection", "params": list(self.projection.parameters())})

    def loss(self, task: nn.Module) -> nn.Module:
        if not self.active:
            return task
        d = self.spec.distillation
        return DistillLoss(task, self.lesson, d.type, d.temperature, d.alpha)

    def prepare(self, prepared: Prepared, image_train: DataLoader, env: Env, batch_size: int, dist: Dist,
                inputs: CacheInputs, reporter: Reporter, needed: bool = True) -> Prepared:
        """The teacher's outputs for the run (cached, reused or per batch), its scores, and what trains."""
        if not self.active:
            return prepared
        start, spec, d = time.perf_counter(), self.spec, self.spec.distillation
        decision = prepared.decision
        views = decision.views if decision.enabled else 0
        random_inputs = spec.dataset.augment.any_random and not views
        per_batch = random_inputs or spec.training.feature_cache == "off"
        runner = teachers.Runner(self.teacher, inputs.preprocessing, env.frozen_compute, d.type == "feature")
        key = teachers.cache_key(inputs.splits, inputs.preprocessing, self.teacher, d.type, env.frozen_compute,
                                 views_key(spec, inputs.preprocessing) if views else None)
        on_disk = not dist.active  # like the feature cache: ranks may not share a writable volume
        found = teachers.load_store(inputs.output, key) if on_disk else None
        rows = len(inputs.splits.train) * max(views, 1)
        reuse = found is not None and (per_batch or (found["train"] is not None and len(found["train"]) == rows))
        if reuse:
            cached, scores, stored = found["train"], found["scores"], "reused"
        else:
            cached = None
            if needed and not per_batch:
                cached = teachers.train_outputs(runner, image_train, batch_size, dist, views, spec.training.seed)
            scores = dist.from_main(lambda: teachers.scores(runner, inputs.splits, inputs.preprocessing, batch_size))
            stored = teachers.save_store(inputs.output, key, cached, scores) if on_disk and dist.main else None
        outputs = "per batch" if per_batch else "cached"
        self.section = {"type": d.type, "temperature": d.temperature, "alpha": d.alpha, "teacher": {
            **self.teacher.identity, "renormalised": runner.renormalise is not None},
            "teacherOutputs": outputs, "stored": stored,
            **{f"teacher{k[0].upper()}{k[1:]}": v for k, v in scores.items()}}
        what = {"reused": "reused from " + str(teachers.store_path(inputs.output, key).relative_to(inputs.output)),
                "written": "computed once", None: "computed"}[stored]
        arch = self.teacher.identity["architecture"]
        how = "per batch" if per_batch else what
        reporter.event("message", level="info", text=(
            f"distillation ({d.type}, T={d.temperature}, alpha={d.alpha}): teacher {arch} outputs {how} "
            f"({time.perf_counter() - start:.1f}s); teacher val accuracy {scores['valAccuracy']:.1%}"))
        if not needed:
            return prepared
        loader = prepared.train_loader if per_batch else _indexed(prepared.train_loader)
        self.lesson = Lesson(loader, None if per_batch else cached.to(env.device), runner if per_batch else None)
        net = prepared.net
        if d.type == "feature":
            net = Student(net, self.student_linear, self.projection or nn.Identity())
        return dataclasses.replace(prepared, net=net, train_loader=self.lesson)

    def describe(self) -> dict:
        """model.json's `distillation` section (empty without distillation)."""
        return {"distillation": self.section} if self.section is not None else {}


def _indexed(loader: DataLoader) -> DataLoader:
    """The same loader (sampler, generator, collate, workers) over a dataset whose items carry their index."""
    return DataLoader(teachers.Indexed(loader.dataset), batch_size=loader.batch_size, sampler=loader.sampler,
                      generator=loader.generator, collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, persistent_workers=loader.persistent_workers,
                      drop_last=loader.drop_last)


def student_scores(best: dict, evaluation: dict | None) -> dict:
    """The distilled student's own scores, for model.json's distillation section."""
    test = evaluation["accuracy"] if evaluation and evaluation.get("split") == "test" else None
    return {"valAccuracy": best["valAccuracy"], "testAccuracy": test}


def record_baseline(export: Path, baseline: Path) -> dict:
    """Add the same student's accuracy without distillation (another export, trained by the demo or bench) to
    `export`'s model.json: distillation.withoutDistillation. Rewritten atomically; the weights are untouched."""
    meta, base = read_export(Path(export)), read_export(Path(baseline))
    if meta is None or base is None or "distillation" not in meta:
        raise JobFileError(f"record_baseline: {export} (distilled) and {baseline} must both hold exports")
    m = base["metrics"]
    meta["distillation"]["withoutDistillation"] = {"export": str(baseline), "valAccuracy": m["valAccuracy"],
                                                   "testAccuracy": m.get("testAccuracy")}
    atomic_write(Path(export) / META_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return meta

