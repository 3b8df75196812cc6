"""Gradual unfreezing (freeze.schedule): which parameters train in each epoch, with the feature cache on and off;
the optimizer and checkpoints built once for the widest plan; a run stopped before or after an unfreeze resumes
bit-identically on CPU in fp32; and the spec's rules."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from trainer_util import StopAfterEpoch, tiny_spec

from finetune_api.errors import JobFileError, Preempted
from finetune_api.spec import parse_spec
from finetune_trainer import fit as fit_module
from finetune_trainer.checkpoint import latest_checkpoint
from finetune_trainer.fit import fit
from finetune_trainer.freeze import FreezeSchedule, describe_schedule, plan_freeze
from finetune_trainer.model import build_model
from finetune_trainer.report import Reporter

pytestmark = pytest.mark.unit

# resnet18's stages: conv1+bn1, layer1 .. layer4. Epoch 1 trains the head, epoch 2 also layer4, epoch 3 layer3 too.
SCHEDULE = [{"epoch": 2, "trainableStages": 1}, {"epoch": 3, "trainableStages": 2}]
EXPECTED = {1: ("fc",), 2: ("fc", "layer4"), 3: ("fc", "layer4", "layer3")}


def _spec(path, **extra):
    return tiny_spec(path, **{"training.epochs": 3, "freeze.schedule": SCHEDULE, "training.precision": "fp32",
                              "training.logEverySteps": 1, **extra})


def _stage(name: str) -> str:
    return name.split(".")[0]


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["auto", "off"])
def test_each_epoch_trains_exactly_the_scheduled_stages(tmp_path, monkeypatch, cache) -> None:
    changed: dict[int, set[str]] = {}
    real = fit_module.train_one_epoch
    models = []
    build = fit_module.build_model
    monkeypatch.setattr(fit_module, "build_model", lambda *a, **k: (built := build(*a, **k), models.append(built))[0])

    def recording(net, loader, optimizer, *args, **kwargs):
        model = models[0].model
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        stats = real(net, loader, optimizer, *args, **kwargs)
        after = model.state_dict()
        changed[len(changed) + 1] = {k for k, v in before.items() if not torch.equal(v, after[k])
                                     and not k.endswith("num_batches_tracked")}
        return stats

    monkeypatch.setattr(fit_module, "train_one_epoch", recording)
    messages = []

    class Rec(Reporter):
        def event(self, kind, **f):
            messages.append((kind, f))

    fit(_spec(tmp_path, **{"training.featureCache": cache}), Rec(), tmp_path)
    for epoch, stages in EXPECTED.items():
        assert {_stage(k) for k in changed[epoch]} == set(stages), epoch
    # Everything a trainable stage holds changes once it trains: weights and BatchNorm statistics alike.
    model = models[0].model
    layer3 = {k for k in model.state_dict() if k.startswith("layer3.") and not k.endswith("num_batches_tracked")}
    assert layer3 <= changed[3]
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["featureCache"]["enabled"] is (cache == "auto")
    if cache == "auto":  # one frozen pass serves every phase: the boundary is before the earliest stage to unfreeze
        assert meta["featureCache"]["boundary"] == "layer3"
    texts = [f["text"] for kind, f in messages if kind == "message" and "freeze.schedule" in f["text"]]
    assert texts == ["freeze.schedule, epoch 1: backbone frozen, training fc",
                     "freeze.schedule, epoch 2: training layer4 and fc",
                     "freeze.schedule, epoch 3: training layer3, layer4 and fc"]
    start = next(f for kind, f in messages if kind == "start")
    assert start["freeze"].startswith("epoch 1: backbone frozen, training fc; epoch 2: training layer4")


@pytest.mark.slow
def test_the_optimizer_holds_the_widest_plan_from_the_start(tmp_path, monkeypatch) -> None:
    groups_seen = []
    real = fit_module.train_one_epoch

    def recording(net, loader, optimizer, *args, **kwargs):
        groups_seen.append([(g["name"], len(g["params"]), g["lr"]) for g in optimizer.param_groups])
        return real(net, loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(fit_module, "train_one_epoch", recording)
    fit(_spec(tmp_path, **{"freeze.layerwiseLrDecay": 0.5, "freeze.backboneLrScale": 0.1}), Reporter(), tmp_path)
    assert len(groups_seen) == 3 and groups_seen[0] == groups_seen[1] == groups_seen[2]
    assert [(n, lr) for n, _, lr in groups_seen[0]] == [("head", 0.01), ("layer4", pytest.approx(0.001)),
                                                        ("layer3", pytest.approx(0.0005))]
    saved = torch.load(latest_checkpoint(tmp_path), map_location="cpu", weights_only=True)
    assert {_stage(k) for k in saved["model"]} == {"fc", "layer3", "layer4"}
    assert {_stage(k) for k in saved["best_state"]} == {"fc", "layer3", "layer4"}


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [1, 2])
@pytest.mark.parametrize("cache", ["auto", "off"])
def test_a_run_stopped_around_an_unfreeze_resumes_bit_identically(tmp_path, stop_after, cache) -> None:
    extra = {"training.featureCache": cache, "training.scheduler": "cosine", "training.optimizer": "sgd",
             "dataset.augment.horizontalFlip": cache == "off"}
    fit(_spec(tmp_path / "a", **extra), Reporter(), tmp_path / "a")
    stopper = StopAfterEpoch(stop_after)
    spec_b = _spec(tmp_path / "b", **extra)
    with pytest.raises(Preempted, match=f"after epoch {stop_after}"):
        fit(spec_b, stopper, tmp_path / "b", should_stop=lambda: stopper.stop)
    resumed = fit(spec_b, Reporter(), tmp_path / "b")
    assert resumed.resumed_from == stop_after
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = (json.loads((p / "model.json").read_text())["history"] for p in (tmp_path / "a", tmp_path / "b"))
    assert [h["valLoss"] for h in ha] == [h["valLoss"] for h in hb]


def test_the_schedule_applies_each_epochs_plan(tmp_path) -> None:
    spec = _spec(tmp_path)
    built = build_model(spec, 3)
    schedule = FreezeSchedule(built.model, built.head_name, spec.freeze)
    assert schedule.plan.trainable_stages == ["layer3", "layer4"]  # before any epoch: the widest plan
    trains = {}
    for epoch in (1, 2, 3):
        note = schedule.enter(epoch)
        assert note is not None and note.startswith(f"freeze.schedule, epoch {epoch}")
        trains[epoch] = {_stage(n) for n, p in built.model.named_parameters() if p.requires_grad}
        assert schedule.enter(epoch) is None  # entering the same epoch again changes nothing
    assert trains == {e: set(s) for e, s in EXPECTED.items()}
    assert describe_schedule(built.model, built.head_name, spec.freeze) == (
        "epoch 1: backbone frozen, training fc; epoch 2: training layer4 and fc; "
        "epoch 3: training layer3, layer4 and fc")


def test_a_schedule_past_the_backbones_stages_is_refused(tmp_path) -> None:
    spec = _spec(tmp_path, **{"freeze.schedule": [{"epoch": 2, "trainableStages": 6}]})
    built = build_model(spec, 3)
    with pytest.raises(JobFileError, match=r"^freeze.schedule: 6 exceeds the 5 stages"):
        plan_freeze(built.model, built.head_name, spec.freeze)


def test_without_a_schedule_plans_are_what_they_were(tmp_path) -> None:
    spec = tiny_spec(tmp_path, **{"freeze.policy": "partial", "freeze.trainableStages": 2})
    built = build_model(spec, 3)
    assert plan_freeze(built.model, built.head_name, spec.freeze, epoch=5).trainable_stages == ["layer3", "layer4"]
    assert FreezeSchedule(built.model, built.head_name, spec.freeze).enter(1) is None


DIGITS = {"builtin": "digits"}


@pytest.mark.parametrize("freeze,training,message", [
    ({"policy": "full", "schedule": [{"epoch": 2, "trainableStages": 1}]}, {}, "only valid with freeze.policy"),
    ({"schedule": [{"epoch": 1, "trainableStages": 1}]}, {}, "spec.freeze.schedule.0.epoch"),
    ({"schedule": [{"epoch": 2, "trainableStages": 0}]}, {}, "spec.freeze.schedule.0.trainableStages"),
    ({"schedule": [{"epoch": 2}]}, {}, "spec.freeze.schedule.0.trainableStages"),
    ({"schedule": [{"epoch": 3, "trainableStages": 2}, {"epoch": 2, "trainableStages": 3}]}, {}, "must increase"),
    ({"schedule": [{"epoch": 2, "trainableStages": 2}, {"epoch": 3, "trainableStages": 2}]}, {}, "must increase"),
    ({"policy": "partial", "trainableStages": 2, "schedule": [{"epoch": 2, "trainableStages": 1}]}, {},
     "must increase"),
    ({"schedule": [{"epoch": 4, "trainableStages": 1}]}, {"epochs": 3}, "after the last of training.epochs"),
    ({"schedule": []}, {}, "spec.freeze.schedule"),
    ({"schedule": {"epoch": 2}}, {}, "spec.freeze.schedule"),
])
def test_bad_schedules_are_refused_with_one_line(freeze, training, message) -> None:
    with pytest.raises(JobFileError) as err:
        parse_spec({"dataset": DIGITS, "freeze": freeze, "training": training})
    assert "\n" not in str(err.value) and message in str(err.value), str(err.value)


def test_layerwise_decay_is_allowed_with_a_head_schedule() -> None:
    spec = parse_spec({"dataset": DIGITS, "freeze": {"layerwiseLrDecay": 0.5, "schedule": SCHEDULE}})
    assert spec.freeze.most_stages == 2 and spec.freeze.stages_at(1) == 0 and spec.freeze.stages_at(9) == 2


def test_no_schedule_keeps_the_resume_fingerprint_and_a_schedule_changes_it() -> None:
    base = parse_spec({"dataset": DIGITS})
    assert base.resume_fingerprint() == "b426e86a89538dc6"  # what the trainer before this field wrote
    scheduled = parse_spec({"dataset": DIGITS, "freeze": {"schedule": SCHEDULE}})
    assert scheduled.resume_fingerprint() != base.resume_fingerprint()
