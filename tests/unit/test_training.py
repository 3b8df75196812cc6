"""Short real training runs on CPU (resnet18 at 16 px on three digit classes)."""

import dataclasses
import io
import json

import pytest
import torch
from safetensors.torch import load_file
from trainer_util import tiny_spec

from finetune_api.errors import JobFileError, Preempted
from finetune_trainer import fit as fit_module
from finetune_trainer.checkpoint import latest_checkpoint
from finetune_trainer.data import load_splits
from finetune_trainer.fit import fit
from finetune_trainer.model import build_model
from finetune_trainer.predict import Predictor
from finetune_trainer.report import JsonLinesReporter, Reporter

pytestmark = [pytest.mark.unit, pytest.mark.slow]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    stream = io.StringIO()
    spec = tiny_spec(out, **{"training.epochs": 3})
    result = fit(spec, JsonLinesReporter(stream), out, name="tiny")
    return spec, result, out, [json.loads(line) for line in stream.getvalue().splitlines()]


def test_head_policy_keeps_backbone_parameters_and_bn_statistics_bit_identical(tmp_path):
    spec = tiny_spec(tmp_path, **{"training.epochs": 2})
    torch.manual_seed(spec.training.seed)
    before = build_model(spec, 3).model.state_dict()
    fit(spec, Reporter(), tmp_path)
    after = load_file(str(tmp_path / "model.safetensors"))
    backbone = [k for k in before if not k.startswith("fc.")]
    assert any("running_mean" in k for k in backbone)
    changed = [k for k in backbone if not torch.equal(before[k], after[k])]
    assert changed == []
    assert not torch.equal(before["fc.weight"], after["fc.weight"])


def test_export_and_model_json(trained):
    _spec, result, out, _ = trained
    meta = json.loads((out / "model.json").read_text())
    for key in ("architecture", "classes", "weightsFile", "sha256", "bestEpoch", "preprocessing", "spec"):
        assert key in meta
    assert meta["classes"] == ["0", "1", "2"]
    assert set(meta["metrics"]) >= {"valAccuracy", "valLoss", "trainLoss", "perClassAccuracy"}
    assert meta["metrics"]["valAccuracy"] == result.val_accuracy
    assert len(meta["history"]) == 3
    assert result.val_accuracy > 0.6  # three digit classes: chance is 0.33


def test_predict_reproduces_val_accuracy(trained):
    spec, result, out, _ = trained
    splits = load_splits(spec.dataset, spec.training.seed)
    predictor = Predictor.load(out)
    images = [s.load() for s in splits.val]
    preds = predictor.predict(images)
    correct = sum(p[0][0] == splits.classes[s.label] for p, s in zip(preds, splits.val, strict=True))
    assert correct / len(splits.val) == pytest.approx(result.val_accuracy, abs=1e-6)


def test_jsonl_events_have_step_epoch_and_end(trained):
    *_, events = trained
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all(isinstance(e["valAccuracy"], float) for e in epochs)
    assert any(e["event"] == "step" for e in events)


def test_rerun_after_success_does_not_retrain(trained):
    spec, result, out, _ = trained
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    again = fit(spec, Reporter(), out)
    assert again.reused_export and again.sha256 == result.sha256
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


class StopAfter(Reporter):
    """Asks the loop to stop during epoch `epochs + 1`, after its step `step` (a stand-in for SIGTERM)."""

    def __init__(self, epochs: int, step: int = 1):
        self.epochs, self.step, self.stop = epochs, step, False
        self.events: list[tuple[str, dict]] = []

    def event(self, kind, **f):
        self.events.append((kind, f))
        if kind == "step" and (f["epoch"], f["step"]) >= (self.epochs + 1, self.step):
            self.stop = True


class Recorder(Reporter):
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def event(self, kind, **f):
        self.events.append((kind, f))


@pytest.mark.parametrize("policy,step", [("head", 1), ("partial", 3), ("head-cached", 2), ("partial-cached", 1)])
def test_sigterm_mid_epoch_checkpoints_and_resume_matches_uninterrupted_run(tmp_path, policy, step):
    """Stopped after a step of epoch 2: the checkpoint holds that step; the resumed run skips the steps
    already trained, restores the random states, and ends bit-identical to a run never stopped."""
    # fp32: CPU bf16 kernels are not bitwise deterministic run to run, and bit equality is the claim here.
    extra = {"training.epochs": 3, "freeze.policy": policy.removesuffix("-cached"), "training.logEverySteps": 1,
             "dataset.augment.horizontalFlip": not policy.endswith("cached"), "head.dropout": 0.2,
             "training.precision": "fp32"}
    straight = fit(tiny_spec(tmp_path / "a", **extra), Reporter(), tmp_path / "a")
    interrupted = StopAfter(1, step)
    spec_b = tiny_spec(tmp_path / "b", **extra)
    with pytest.raises(Preempted, match=f"epoch 2 after step {step}"):
        fit(spec_b, interrupted, tmp_path / "b", should_stop=lambda: interrupted.stop)
    assert latest_checkpoint(tmp_path / "b").name == f"epoch-0002-step-{step:06d}.pt"
    saved = [f for k, f in interrupted.events if k == "checkpoint"]
    assert saved and saved[-1]["lastCheckpoint"]["step"] == step and saved[-1]["lastCheckpoint"]["epoch"] == 2
    assert not (tmp_path / "b" / "model.json").exists()
    seen = Recorder()
    resumed = fit(spec_b, seen, tmp_path / "b")
    assert resumed.resumed_from == 1
    start = next(f for k, f in seen.events if k == "start")
    assert start["resumeCount"] == 1 and start["lastCheckpoint"]["file"] == f"epoch-0002-step-{step:06d}.pt"
    first_step = next(f for k, f in seen.events if k == "step")
    assert (first_step["epoch"], first_step["step"]) == (2, step + 1), "the resumed epoch did not skip done steps"
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["valAccuracy"] for h in straight.history] == [h["valAccuracy"] for h in resumed.history]
    assert [h["trainLoss"] for h in straight.history] == pytest.approx([h["trainLoss"] for h in resumed.history])


def test_sigterm_at_an_epoch_end_resumes_from_that_epoch_and_counts_resumes(tmp_path):
    spec = tiny_spec(tmp_path, **{"training.epochs": 3, "training.logEverySteps": 1})

    class AtLastStep(StopAfter):
        def event(self, kind, **f):
            self.events.append((kind, f))
            if kind == "step" and f["epoch"] == 2 and f["step"] == f["totalSteps"]:
                self.stop = True

    stopper = AtLastStep(1)  # the request comes during epoch 2's last step: that epoch ends normally
    with pytest.raises(Preempted, match="after epoch 2"):
        fit(spec, stopper, tmp_path, should_stop=lambda: stopper.stop)
    assert latest_checkpoint(tmp_path).name == "epoch-0002.pt"
    again = StopAfter(2, step=1)
    with pytest.raises(Preempted):
        fit(spec, again, tmp_path, should_stop=lambda: again.stop)
    seen = Recorder()
    result = fit(spec, seen, tmp_path)
    assert result.epochs_run == 3
    assert next(f for k, f in seen.events if k == "start")["resumeCount"] == 2


def test_a_resumed_run_never_replaces_a_better_earlier_best_with_a_worse_model(tmp_path, monkeypatch):
    """Epoch 1 is the best when the run stops in epoch 2; after the resume every epoch evaluates worse
    (degraded on purpose): the export is still epoch 1's weights, restored from the checkpoint."""
    spec = tiny_spec(tmp_path, **{"training.epochs": 3, "training.logEverySteps": 1})
    stopper = StopAfter(1, step=1)
    with pytest.raises(Preempted):
        fit(spec, stopper, tmp_path, should_stop=lambda: stopper.stop)
    (first,) = [f for k, f in stopper.events if k == "epoch"]
    saved = torch.load(latest_checkpoint(tmp_path), map_location="cpu", weights_only=False)["best_state"]

    real_evaluate = fit_module.evaluate
    monkeypatch.setattr(fit_module, "evaluate", lambda *a, **kw: dataclasses.replace(
        real_evaluate(*a, **kw), accuracy=first["valAccuracy"] / 2))
    result = fit(spec, Reporter(), tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert result.best_epoch == meta["bestEpoch"] == 1
    assert meta["metrics"]["valAccuracy"] == first["valAccuracy"]
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert saved and all(torch.equal(exported[k], v) for k, v in saved.items())


def test_changed_spec_refuses_to_resume(tmp_path):
    stopper = StopAfter(1)
    with pytest.raises(Preempted):
        fit(tiny_spec(tmp_path, **{"training.epochs": 3, "training.logEverySteps": 1}), stopper, tmp_path,
            should_stop=lambda: stopper.stop)
    with pytest.raises(JobFileError, match="different spec"):
        fit(tiny_spec(tmp_path, **{"training.epochs": 3, "training.learningRate": 0.5}), Reporter(), tmp_path)


def test_early_stopping_on_target_accuracy(tmp_path):
    result = fit(tiny_spec(tmp_path, **{"training.epochs": 10, "training.earlyStopping.targetAccuracy": 0.5}),
                 Reporter(), tmp_path)
    assert result.epochs_run < 10 and result.val_accuracy >= 0.5


@pytest.mark.parametrize("optimizer,scheduler", [("sgd", "step"), ("adamw", "cosine")])
def test_optimizers_and_schedulers_train(tmp_path, optimizer, scheduler):
    result = fit(tiny_spec(tmp_path, **{"training.optimizer": optimizer, "training.scheduler": scheduler,
                                        "training.labelSmoothing": 0.1, "freeze.policy": "full",
                                        "training.learningRate": 0.01, "training.epochs": 2}),
                 Reporter(), tmp_path)
    assert result.val_accuracy > 0.34 and result.train_loss == result.train_loss  # not NaN


@pytest.mark.parametrize("policy", ["head", "partial"])
def test_feature_cache_trains_the_same_weights_as_the_plain_loop(tmp_path, policy):
    extra = {"training.epochs": 2, "head.dropout": 0.1, "freeze.policy": policy, "training.precision": "fp32"}
    cached = fit(tiny_spec(tmp_path / "c", **extra), Reporter(), tmp_path / "c")
    plain = fit(tiny_spec(tmp_path / "p", **extra, **{"training.featureCache": "off"}), Reporter(), tmp_path / "p")
    a, b = load_file(str(tmp_path / "c" / "model.safetensors")), load_file(str(tmp_path / "p" / "model.safetensors"))
    trained = ["fc.1.weight", "fc.1.bias"] + (["layer4.1.conv2.weight", "layer4.0.bn1.running_mean"]
                                             if policy == "partial" else [])
    for key in trained:
        assert torch.allclose(a[key], b[key], atol=1e-3), key
    assert cached.val_accuracy == pytest.approx(plain.val_accuracy, abs=0.01)
    meta_c = json.loads((tmp_path / "c" / "model.json").read_text())
    meta_p = json.loads((tmp_path / "p" / "model.json").read_text())
    assert meta_c["featureCache"]["enabled"] and not meta_p["featureCache"]["enabled"]
    assert meta_c["featureCache"]["boundary"] == ("fc" if policy == "head" else "layer4")


def test_feature_cache_falls_back_with_random_augmentation(tmp_path):
    fit(tiny_spec(tmp_path, **{"training.epochs": 1, "dataset.augment.randomResizedCrop": True}), Reporter(), tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert not meta["featureCache"]["enabled"] and "augmentation" in meta["featureCache"]["reason"]


def test_head_checkpoints_hold_only_what_trains_and_notice_a_replaced_weights_file(tmp_path):
    from torchvision import models as tvm

    weights = tmp_path / "backbone.pt"
    torch.save(tvm.resnet18().state_dict(), weights)
    extra = {"training.epochs": 3, "training.logEverySteps": 1,
             "model.weights": {"source": "file", "path": str(weights)}}
    stopper = StopAfter(1)
    with pytest.raises(Preempted):
        fit(tiny_spec(tmp_path / "o", **extra), stopper, tmp_path / "o", should_stop=lambda: stopper.stop)
    state = torch.load(latest_checkpoint(tmp_path / "o"), weights_only=False)
    assert set(state["model"]) == {"fc.weight", "fc.bias"}
    torch.save(tvm.resnet18().state_dict(), weights)  # a different backbone under the same name
    with pytest.raises(JobFileError, match="frozen weights differ"):
        fit(tiny_spec(tmp_path / "o", **extra), Reporter(), tmp_path / "o")
