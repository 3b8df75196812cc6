"""Knowledge distillation (spec.distillation): the losses against hand-computed references, a teacher that
cannot teach refused before anything is written, cached teacher outputs reused (the teacher never runs again)
and equal to per-batch ones, and a distilled student beating the same student without distillation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from trainer_util import tiny_spec

from finetune_api.errors import JobFileError, Preempted
from finetune_trainer import distill, teacher
from finetune_trainer.data import Preprocessing
from finetune_trainer.fit import fit
from finetune_trainer.report import Reporter

pytestmark = [pytest.mark.unit]

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 2.0]]
TEACHER = [[3.0, 1.0, 0.0], [0.5, 0.5, 4.0]]


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def test_soft_loss_is_the_kl_divergence_of_softened_outputs_times_t_squared() -> None:
    t = 4.0
    expected = 0.0
    for s, q in zip(STUDENT, TEACHER, strict=True):
        ps, pt = _softmax(s, t), _softmax(q, t)
        expected += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    expected = expected / len(STUDENT) * t * t  # batchmean, x T^2
    got = distill.soft_loss(torch.tensor(STUDENT), torch.tensor(TEACHER), t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert distill.soft_loss(torch.tensor(TEACHER), torch.tensor(TEACHER), t).item() == pytest.approx(0.0, abs=1e-6)


def test_hard_loss_is_cross_entropy_on_the_teachers_top_class() -> None:
    top = [row.index(max(row)) for row in TEACHER]  # [0, 2]
    expected = -sum(math.log(_softmax(s)[k]) for s, k in zip(STUDENT, top, strict=True)) / len(STUDENT)
    assert distill.hard_loss(torch.tensor(STUDENT), torch.tensor(TEACHER)).item() == pytest.approx(expected, rel=1e-5)


def test_feature_loss_is_the_mean_squared_error() -> None:
    a, b = [[1.0, 2.0], [3.0, 4.0]], [[0.0, 2.5], [3.0, 1.0]]
    expected = ((1 - 0) ** 2 + (2 - 2.5) ** 2 + 0 + (4 - 1) ** 2) / 4
    assert distill.feature_loss(torch.tensor(a), torch.tensor(b)).item() == pytest.approx(expected)


def test_the_total_is_one_minus_alpha_task_plus_alpha_distillation_and_the_task_alone_outside_training() -> None:
    lesson = distill.Lesson(loader=None, cached=None, runner=None)  # type: ignore[arg-type]
    loss = distill.DistillLoss(nn.CrossEntropyLoss(), lesson, "soft", temperature=2.0, alpha=0.3)
    logits, labels = torch.tensor(STUDENT), torch.tensor([1, 2])
    task = -(math.log(_softmax(STUDENT[0])[1]) + math.log(_softmax(STUDENT[1])[2])) / 2
    soft = distill.soft_loss(logits, torch.tensor(TEACHER), 2.0).item()
    lesson.current = torch.tensor(TEACHER)
    assert loss(logits, labels).item() == pytest.approx(0.7 * task + 0.3 * soft, rel=1e-5)
    assert lesson.current is None  # taken once: evaluate() after the epoch gets the task loss
    assert loss(logits, labels).item() == pytest.approx(task, rel=1e-5)


def test_renormalising_the_students_batch_gives_the_teachers_normalisation_and_size() -> None:
    pixels = torch.rand(2, 3, 8, 8)
    student = Preprocessing(8, 8, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    other = Preprocessing(4, 4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    s_mean, s_std = torch.tensor(student.mean).view(1, 3, 1, 1), torch.tensor(student.std).view(1, 3, 1, 1)
    renorm = teacher.renormaliser(student, other)
    out = renorm((pixels - s_mean) / s_std)
    want = torch.nn.functional.interpolate((pixels - 0.5) / 0.5, size=(4, 4), mode="bilinear", antialias=True)
    assert out.shape == (2, 3, 4, 4) and torch.allclose(out, want, atol=1e-5)
    assert teacher.renormaliser(student, student) is None


# ---------------------------------------------------------------- runs on the bundled digits


@pytest.fixture(scope="module")
def teacher_export(tmp_path_factory) -> Path:
    """A resnet18 fine-tuned on digits 0-2: the teacher of the runs below."""
    out = tmp_path_factory.mktemp("teacher")
    fit(tiny_spec(out, **{"training.epochs": 3, "freeze.policy": "full", "training.precision": "fp32",
                          "training.learningRate": 0.003}), Reporter(), out)
    return out


def student(output: Path, export: Path, **extra):
    kind = extra.pop("type", "soft")
    return tiny_spec(output, **{"training.precision": "fp32", "training.epochs": 2, **extra,
                                "distillation": {"teacher": {"fromJob": str(export)}, "type": kind}})


@pytest.mark.slow
@pytest.mark.parametrize("classes", [["0", "2", "1"], ["0", "1", "3"]], ids=["order", "names"])
def test_a_teacher_with_other_classes_is_refused_before_the_output_is_touched(tmp_path, teacher_export, classes):
    out = tmp_path / "student"
    with pytest.raises(JobFileError, match=r"teacher's classes \['0', '1', '2'\] are not the student's") as err:
        fit(student(out, teacher_export, **{"dataset.classes": classes}), Reporter(), out)
    assert "\n" not in str(err.value)
    assert not out.exists()


@pytest.mark.slow
def test_teachers_that_cannot_teach_are_one_line_each(tmp_path, teacher_export):
    out = tmp_path / "s"
    with pytest.raises(JobFileError, match="holds no export"):
        fit(student(out, tmp_path / "nowhere"), Reporter(), out)
    with pytest.raises(JobFileError, match="classes must be known"):
        fit(tiny_spec(out, distillation={"teacher": {"model": {"architecture": "resnet18"}}}), Reporter(), out)
    with pytest.raises(JobFileError, match="feature loss cannot teach it"):
        fit(student(out, teacher_export, type="feature"), Reporter(), out)  # head policy, one Linear
    assert not out.exists()
    # teacher.model with its export's model.json beside the weights file is the same teacher
    weights = {"source": "file", "path": str(teacher_export / "model.safetensors")}
    spec = tiny_spec(out, **{"training.epochs": 1, "distillation": {"teacher": {"model": {
        "architecture": "resnet18", "weights": weights}}}})
    fit(spec, Reporter(), out)
    section = json.loads((out / "model.json").read_text())["distillation"]
    assert section["teacher"]["sha256"] == json.loads((teacher_export / "model.json").read_text())["sha256"]


class StopAfterEpoch(Reporter):
    def __init__(self, epochs: int):
        self.epochs, self.stop = epochs, False

    def event(self, kind, **f):
        if kind == "step" and f["epoch"] > self.epochs:
            self.stop = True


@pytest.mark.slow
@pytest.mark.parametrize("kind,policy", [("soft", "head"), ("feature", "partial")])
def test_cached_teacher_outputs_are_reused_on_resume_and_the_teacher_never_runs_again(tmp_path, teacher_export,
                                                                                      monkeypatch, kind, policy):
    extra = {"training.epochs": 3, "training.logEverySteps": 1, "freeze.policy": policy, "type": kind}
    straight = fit(student(tmp_path / "a", teacher_export, **extra), Reporter(), tmp_path / "a")
    spec = student(tmp_path / "b", teacher_export, **extra)
    stopper = StopAfterEpoch(1)
    with pytest.raises(Preempted):
        fit(spec, stopper, tmp_path / "b", should_stop=lambda: stopper.stop)
    assert len(list((tmp_path / "b" / "cache").glob("teacher-*.pt"))) == 1, "the stopped run left no teacher cache"

    def never(self, images, logits=True):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(teacher.Runner, "__call__", never)
    resumed = fit(spec, Reporter(), tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    assert meta["distillation"]["stored"] == "reused" and meta["distillation"]["teacherOutputs"] == "cached"
    assert meta["resumedFromEpoch"] == 1
    assert not (tmp_path / "b" / "cache").exists(), "the teacher cache outlived the export"
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history[-1]["valAccuracy"] == straight.history[-1]["valAccuracy"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["soft", "feature"])
def test_cached_teacher_outputs_train_what_per_batch_outputs_train_in_fp32(tmp_path, teacher_export, kind):
    """freeze.policy full: the student trains on images either way; featureCache off runs the teacher per batch."""
    extra = {"freeze.policy": "full", "type": kind}
    fit(student(tmp_path / "cached", teacher_export, **extra), Reporter(), tmp_path / "cached")
    fit(student(tmp_path / "batch", teacher_export, **extra, **{"training.featureCache": "off"}), Reporter(),
        tmp_path / "batch")
    metas = [json.loads((tmp_path / d / "model.json").read_text()) for d in ("cached", "batch")]
    assert [m["distillation"]["teacherOutputs"] for m in metas] == ["cached", "per batch"]
    a = load_file(str(tmp_path / "cached" / "model.safetensors"))
    b = load_file(str(tmp_path / "batch" / "model.safetensors"))
    for k in ("fc.weight", "layer4.1.conv2.weight", "conv1.weight"):
        assert torch.allclose(a[k], b[k], atol=1e-4), k
    assert metas[0]["history"][-1]["trainLoss"] == pytest.approx(metas[1]["history"][-1]["trainLoss"], rel=1e-4)


# ---------------------------------------------------------------- the point of it all

DIGITS = [str(d) for d in range(10)]
FEW = 5  # labelled training images per class for the student
MARGIN = 0.03  # val accuracy the distilled student must gain (3 points), on each seed


@pytest.fixture(scope="module")
def strong_teacher(tmp_path_factory) -> Path:
    """resnet18 (random frozen stem and layers 1-3, cached) whose layer4 + head learnt the ten digits from 60
    images per class — twelve times the student's labels."""
    out = tmp_path_factory.mktemp("strong")
    fit(tiny_spec(out, **{"dataset.classes": DIGITS, "dataset.maxImagesPerClass": 60, "freeze.policy": "partial",
                          "training.epochs": 5, "training.learningRate": 0.003, "training.precision": "fp32"}),
        Reporter(), out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_distilled_student_beats_the_same_student_without_distillation(tmp_path, strong_teacher, seed):
    """The regime distillation is for (Hinton et al. 2015: soft targets let a student learn from much less
    data): a student with only FEW labels per class, a teacher that learnt from many more. Same student, data,
    seed and schedule; the only difference is spec.distillation (soft, T=4, alpha=0.5: the defaults)."""
    common = {"dataset.classes": DIGITS, "dataset.maxImagesPerClass": FEW, "freeze.policy": "partial",
              "training.epochs": 20, "training.batchSize": 16, "training.learningRate": 0.003,
              "training.precision": "fp32", "training.seed": seed}
    plain = fit(tiny_spec(tmp_path / "plain", **common), Reporter(), tmp_path / "plain")
    taught = fit(tiny_spec(tmp_path / "kd", **common, distillation={"teacher": {"fromJob": str(strong_teacher)}}),
                 Reporter(), tmp_path / "kd")
    section = json.loads((tmp_path / "kd" / "model.json").read_text())["distillation"]
    assert section["teacherValAccuracy"] > taught.val_accuracy
    assert section["student"]["valAccuracy"] == taught.val_accuracy
    assert taught.val_accuracy >= plain.val_accuracy + MARGIN, (plain.val_accuracy, taught.val_accuracy)


def test_the_example_pair_parses_and_the_student_points_at_the_teachers_output() -> None:
    import yaml

    from finetune_api.spec import parse_job

    root = Path(__file__).resolve().parents[2] / "examples" / "distillation"
    teacher_job, student_job = (parse_job(yaml.safe_load((root / f).read_text())) for f in ("teacher.yaml",
                                                                                             "student.yaml"))
    assert student_job.spec.distillation.teacher.from_job == teacher_job.spec.output.path
    assert student_job.spec.model.weights.source == "none" and teacher_job.spec.model.library == "timm"
