"""MLP heads (layers, activation, norm), warm-up, layer-wise learning-rate decay, gradient clipping and the
weight average (EMA): what each builds, what the optimizer sees epoch by epoch, what is exported, and that
a resumed run stays bit-identical."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from trainer_util import StopAfterEpoch, tiny_spec

from finetune_api.errors import JobFileError, Preempted
from finetune_api.spec import Head, Training, parse_spec
from finetune_trainer import fit as fit_module
from finetune_trainer.checkpoint import latest_checkpoint
from finetune_trainer.data import load_splits
from finetune_trainer.engine import Compute, Precision, train_one_epoch
from finetune_trainer.fit import fit
from finetune_trainer.freeze import apply_freeze, param_groups, plan_freeze
from finetune_trainer.model import build_model, make_head, new_model, replace_head
from finetune_trainer.predict import Predictor
from finetune_trainer.report import Reporter
from finetune_trainer.runtime import build_optimizer, build_scheduler
from finetune_trainer.train_state import TrainState

pytestmark = pytest.mark.unit

CPU = Compute(torch.device("cpu"), Precision("fp32", None, "cpu"))


def _kinds(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module] if isinstance(module, nn.Sequential) else [type(module).__name__]


# ---------------------------------------------------------------------------------------------- heads
def test_the_integer_form_builds_exactly_what_it_built_before() -> None:
    assert _kinds(make_head(8, 3, Head())) == ["Linear"]
    assert _kinds(make_head(8, 3, Head(dropout=0.2))) == ["Dropout", "Linear"]
    assert _kinds(make_head(8, 3, Head(hidden_units=16))) == ["Linear", "ReLU", "Linear"]
    head = make_head(8, 3, Head(hidden_units=16, dropout=0.3))
    assert _kinds(head) == ["Linear", "ReLU", "Dropout", "Linear"]
    assert list(head.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]  # old exports still load
    assert head[1].inplace and head[2].p == 0.3 and (head[0].out_features, head[3].in_features) == (16, 16)
    assert _kinds(make_head(8, 3, Head(layers=[16], dropout=0.3))) == _kinds(head)


@pytest.mark.parametrize("library,arch,head_name", [("torchvision", "resnet18", "fc"),
                                                    ("timm", "test_efficientnet", "classifier")])
@pytest.mark.parametrize("norm,activation,norm_type,act_type", [("layernorm", "gelu", nn.LayerNorm, nn.GELU),
                                                                ("batchnorm", "silu", nn.BatchNorm1d, nn.SiLU)])
def test_a_list_head_builds_the_layers_asked_for(library, arch, head_name, norm, activation, norm_type,
                                                 act_type) -> None:
    model = new_model(arch, library)
    width = model.get_submodule(head_name).in_features
    cfg = Head(layers=[32, 16], activation=activation, norm=norm, dropout=0.25)
    assert replace_head(model, 5, cfg) == head_name
    head = model.get_submodule(head_name)
    expected = [nn.Linear, norm_type, act_type, nn.Dropout] * 2 + [nn.Linear]
    assert [type(m) for m in head] == expected
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [(width, 32), (32, 16),
                                                                                          (16, 5)]
    assert [m.normalized_shape[0] if norm == "layernorm" else m.num_features for m in head
            if isinstance(m, norm_type)] == [32, 16]
    assert all(m.p == 0.25 for m in head if isinstance(m, nn.Dropout))
    model.eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.slow
@pytest.mark.parametrize("library,arch", [("torchvision", "resnet18"), ("timm", "test_efficientnet")])
def test_predict_rebuilds_a_list_head_from_model_json(tmp_path, library, arch) -> None:
    spec = tiny_spec(tmp_path, **{"model.library": library, "model.architecture": arch, "training.epochs": 1,
                                  "dataset.imageSize": 32, "training.precision": "fp32",
                                  "head.layers": [24, 12], "head.activation": "gelu", "head.norm": "layernorm",
                                  "head.dropout": 0.1})
    fit(spec, Reporter(), tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["head"] == {"hiddenUnits": 0, "layers": [24, 12], "activation": "gelu", "norm": "layernorm",
                            "dropout": 0.1}
    predictor = Predictor.load(tmp_path)  # strict load: a head built differently would not fit the weights
    head = predictor.model.get_submodule(meta["freeze"]["headModule"])
    assert [type(m) for m in head] == [nn.Linear, nn.LayerNorm, nn.GELU, nn.Dropout] * 2 + [nn.Linear]
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(v, exported[k]) for k, v in predictor.model.state_dict().items())


def test_batchnorm_heads_refuse_a_last_batch_of_one_image(tmp_path) -> None:
    # a batch one smaller than the training split leaves one image for the last batch
    train = len(load_splits(tiny_spec(tmp_path).dataset, 0).train)
    spec = tiny_spec(tmp_path, **{"head.hiddenUnits": 8, "head.norm": "batchnorm", "training.batchSize": train - 1})
    with pytest.raises(JobFileError, match=r"^head\.norm: batchnorm cannot train on the last batch of 1 image"):
        fit(spec, Reporter(), tmp_path)
    assert not any(tmp_path.iterdir()), "a refused job leaves nothing behind"


# ------------------------------------------------------------------------------------------ schedules
def _lrs_by_epoch(opt: torch.optim.Optimizer, scheduler, epochs: int) -> list[list[float]]:
    out = []
    for _ in range(epochs):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("scheduler,after", [
    ("none", [1.0, 1.0, 1.0]),
    ("cosine", [1.0, (1 + math.cos(math.pi / 3)) / 2, (1 + math.cos(2 * math.pi / 3)) / 2]),  # T_max = 5 - 2
    ("step", [1.0, 1.0, 0.5]),  # stepSize 2 counted after the warm-up
])
def test_warmup_ramps_linearly_then_hands_over_to_the_schedule(scheduler, after) -> None:
    t = Training(epochs=5, warmup_epochs=2, scheduler=scheduler, learning_rate=0.3, step_size=2, gamma=0.5)
    opt = build_optimizer([{"name": "head", "params": [nn.Parameter(torch.zeros(1))], "lr": 0.3}], t)
    lrs = [g[0] for g in _lrs_by_epoch(opt, build_scheduler(opt, t), 5)]
    assert lrs == pytest.approx([0.3 * f for f in [1 / 3, 2 / 3, *after]], rel=1e-12, abs=0)


def test_no_warmup_keeps_the_schedules_of_before() -> None:
    t = Training(epochs=4, scheduler="cosine")
    opt = build_optimizer([{"params": [nn.Parameter(torch.zeros(1))]}], t)
    assert type(build_scheduler(opt, t)).__name__ == "CosineAnnealingLR"
    assert build_scheduler(opt, Training(scheduler="none")) is None


@pytest.mark.parametrize("policy,stages,expected", [
    ("partial", 3, ["head", "layer4", "layer3", "layer2"]),
    ("full", None, ["head", "layer4", "layer3", "layer2", "layer1", "conv1"]),
])
def test_layerwise_decay_gives_each_stage_its_own_group(policy, stages, expected) -> None:
    spec = tiny_spec("/tmp/unused", **{"freeze.policy": policy, "freeze.backboneLrScale": 0.1,
                                       "freeze.layerwiseLrDecay": 0.5, "training.learningRate": 0.02,
                                       **({"freeze.trainableStages": stages} if stages else {})})
    built = build_model(spec, 3)
    plan = plan_freeze(built.model, built.head_name, spec.freeze)
    apply_freeze(built.model, plan)
    groups = param_groups(built.model, plan, spec.training, 0.1, spec.freeze.layerwise_lr_decay)
    assert [g["name"] for g in groups] == expected
    assert [g["lr"] for g in groups] == pytest.approx([0.02] + [0.002 * 0.5 ** d for d in range(len(expected) - 1)],
                                                      rel=1e-12, abs=0)
    trains = [p for p in built.model.parameters() if p.requires_grad]
    assert sorted(map(id, trains)) == sorted(id(p) for g in groups for p in g["params"]), "each param in one group"
    same = param_groups(built.model, plan, spec.training, 0.1)  # decay 1: the two groups of before
    assert [g["name"] for g in same] == ["head", "backbone"]


def test_layerwise_decay_follows_timms_stages() -> None:
    spec = tiny_spec("/tmp/unused", **{"model.library": "timm", "model.architecture": "test_efficientnet",
                                       "freeze.policy": "partial", "freeze.trainableStages": 2,
                                       "freeze.layerwiseLrDecay": 0.5})
    built = build_model(spec, 3)
    plan = plan_freeze(built.model, built.head_name, spec.freeze)
    apply_freeze(built.model, plan)
    groups = param_groups(built.model, plan, spec.training, 0.1, 0.5)
    assert [g["name"] for g in groups] == ["head", *plan.trainable_stages[::-1]]
    assert [g["lr"] for g in groups[1:]] == pytest.approx([0.001, 0.0005], rel=1e-12, abs=0)


@pytest.mark.slow
def test_warmup_and_layerwise_decay_show_in_the_optimizers_groups_epoch_by_epoch(tmp_path, monkeypatch) -> None:
    seen: list[dict[str, float]] = []
    real = fit_module.train_one_epoch

    def recording(model, loader, optimizer, *args, **kwargs):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        return real(model, loader, optimizer, *args, **kwargs)

    monkeypatch.setattr(fit_module, "train_one_epoch", recording)
    spec = tiny_spec(tmp_path, **{"training.epochs": 4, "training.warmupEpochs": 2, "training.scheduler": "cosine",
                                  "training.learningRate": 0.01, "freeze.policy": "partial",
                                  "freeze.trainableStages": 2, "freeze.backboneLrScale": 0.1,
                                  "freeze.layerwiseLrDecay": 0.5, "training.precision": "fp32"})
    fit(spec, Reporter(), tmp_path)
    factors = [1 / 3, 2 / 3, 1.0, 0.5]  # warm-up e/(N+1), then cosine over the 2 epochs left
    for got, f in zip(seen, factors, strict=True):
        assert list(got) == ["head", "layer4", "layer3"]
        assert list(got.values()) == pytest.approx([0.01 * f, 0.001 * f, 0.0005 * f], rel=1e-12, abs=0)


# ---------------------------------------------------------------------------------------- grad clipping
def _norms_at_step(clip: float | None) -> list[float]:
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.randn(8, 6) * 50, torch.randint(0, 3, (8,))) for _ in range(4)]
    norms: list[float] = []
    step = opt.step

    def recording_step(*args, **kwargs):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
        return step(*args, **kwargs)

    opt.step = recording_step
    train_one_epoch(model, loader, opt, nn.CrossEntropyLoss(), torch.amp.GradScaler("cpu", enabled=False), CPU,
                    clip_norm=clip)
    return norms


def test_grad_clipping_bounds_the_gradient_norm_at_every_step() -> None:
    unclipped, clipped = _norms_at_step(None), _norms_at_step(0.5)
    assert len(clipped) == 4 and min(unclipped) > 0.5, "the inputs must produce large gradients"
    assert max(clipped) <= 0.5 * (1 + 1e-5)


# ------------------------------------------------------------------------------------------------ EMA
def _ema_spec(path, **extra):
    return tiny_spec(path, **{"training.epochs": 3, "training.ema": {"decay": 0.9}, "training.precision": "fp32",
                              "training.logEverySteps": 1, **extra})


@pytest.mark.slow
@pytest.mark.parametrize("ema_better", [True, False])
def test_the_weight_average_is_exported_when_it_scores_better(tmp_path, monkeypatch, ema_better) -> None:
    averages = []
    attach = TrainState.attach_ema
    monkeypatch.setattr(TrainState, "attach_ema", lambda self, net, decay: (attach(self, net, decay),
                                                                            averages.append(self))[0])
    real_evaluate = fit_module.evaluate

    def forced(net, *args, **kwargs):  # the average scores 0.9 or 0.5, the raw weights the other
        is_ema = net is averages[0].ema.module
        # a constant loss too: every later epoch ties, so both bests stay at epoch 1
        return dataclasses.replace(real_evaluate(net, *args, **kwargs), accuracy=0.9 if is_ema == ema_better else 0.5,
                                   loss=1.0)

    monkeypatch.setattr(fit_module, "evaluate", forced)
    result = fit(_ema_spec(tmp_path), Reporter(), tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["ema"] == {"decay": 0.9, "exported": "ema" if ema_better else "raw",
                           "emaValAccuracy": 0.9 if ema_better else 0.5, "emaBestEpoch": 1,
                           "rawValAccuracy": 0.5 if ema_better else 0.9, "rawBestEpoch": 1}
    assert meta["metrics"]["valAccuracy"] == result.val_accuracy == 0.9
    assert [h["emaValAccuracy"] for h in meta["history"]] == [0.9 if ema_better else 0.5] * 3
    saved = torch.load(latest_checkpoint(tmp_path), map_location="cpu", weights_only=True)
    ema_best, raw_best = saved["ema"]["bestState"], saved["best_state"]
    assert set(ema_best) == set(raw_best) and any(not torch.equal(ema_best[k], raw_best[k]) for k in raw_best)
    exported = load_file(str(tmp_path / "model.safetensors"))
    chosen = ema_best if ema_better else raw_best
    assert all(torch.equal(exported[k], v) for k, v in chosen.items())


@pytest.mark.slow
@pytest.mark.parametrize("policy,flip", [("head", False), ("partial", False), ("partial", True)],
                         ids=["cached-head", "cached-fx-tail", "whole-model"])
def test_ema_and_warmup_resume_after_epoch_1_bit_identical(tmp_path, policy, flip) -> None:
    extra = {"training.warmupEpochs": 1, "training.scheduler": "cosine", "training.gradClipNorm": 1.0,
             "freeze.policy": policy, "dataset.augment.horizontalFlip": flip, "head.layers": [16],
             "head.norm": "layernorm", "head.dropout": 0.2}
    straight = fit(_ema_spec(tmp_path / "a", **extra), Reporter(), tmp_path / "a")
    stopper = StopAfterEpoch(1)
    spec_b = _ema_spec(tmp_path / "b", **extra)
    with pytest.raises(Preempted, match="after epoch 1"):
        fit(spec_b, stopper, tmp_path / "b", should_stop=lambda: stopper.stop)
    resumed = fit(spec_b, Reporter(), tmp_path / "b")
    assert resumed.resumed_from == 1
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = (torch.load(latest_checkpoint(p), map_location="cpu", weights_only=True)["ema"]
              for p in (tmp_path / "a", tmp_path / "b"))
    assert ca["nAveraged"] == cb["nAveraged"] > 0
    assert ca["model"] and all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    for key in ("valAccuracy", "emaValAccuracy", "emaValLoss"):
        assert [h[key] for h in straight.history] == [h[key] for h in resumed.history]


# -------------------------------------------------------------------------------------------- the spec
DIGITS = {"builtin": "digits"}


@pytest.mark.parametrize("spec,field", [
    ({"head": {"layers": []}}, "spec.head.layers"),
    ({"head": {"layers": [0]}}, "spec.head.layers.0"),
    ({"head": {"layers": [8] * 9}}, "spec.head.layers"),
    ({"head": {"layers": "64"}}, "spec.head.layers"),
    ({"head": {"layers": [8], "hiddenUnits": 8}}, "head.layers or head.hiddenUnits"),
    ({"head": {"activation": "tanh", "hiddenUnits": 8}}, "spec.head.activation"),
    ({"head": {"norm": "groupnorm", "hiddenUnits": 8}}, "spec.head.norm"),
    ({"head": {"activation": "gelu"}}, "head.activation and head.norm need hidden layers"),
    ({"head": {"norm": "layernorm"}}, "head.activation and head.norm need hidden layers"),
    ({"training": {"warmupEpochs": -1}}, "spec.training.warmupEpochs"),
    ({"training": {"warmupEpochs": 10}}, "training.warmupEpochs (10) must be below training.epochs"),
    ({"training": {"gradClipNorm": 0}}, "spec.training.gradClipNorm"),
    ({"training": {"gradClipNorm": "big"}}, "spec.training.gradClipNorm"),
    ({"training": {"ema": {"decay": 1.0}}}, "spec.training.ema.decay"),
    ({"training": {"ema": {"decay": 0}}}, "spec.training.ema.decay"),
    ({"training": {"ema": {"rate": 0.9}}}, "spec.training.ema.rate"),
    ({"training": {"ema": 0.999}}, "spec.training.ema"),
    ({"freeze": {"policy": "full", "layerwiseLrDecay": 0}}, "spec.freeze.layerwiseLrDecay"),
    ({"freeze": {"policy": "full", "layerwiseLrDecay": 1.5}}, "spec.freeze.layerwiseLrDecay"),
    ({"freeze": {"layerwiseLrDecay": 0.5}}, "freeze.layerwiseLrDecay is only valid with freeze.policy"),
])
def test_bad_values_are_refused_with_one_line_naming_the_field(spec, field) -> None:
    with pytest.raises(JobFileError) as err:
        parse_spec({"dataset": DIGITS, **spec})
    message = str(err.value)
    assert "\n" not in message and field in message, message


def test_new_fields_at_their_defaults_keep_the_resume_fingerprint() -> None:
    base = parse_spec({"dataset": DIGITS})
    explicit = parse_spec({"dataset": DIGITS, "head": {"activation": "relu", "norm": "none"},
                           "freeze": {"layerwiseLrDecay": 1.0}, "training": {"warmupEpochs": 0}})
    assert explicit.resume_fingerprint() == base.resume_fingerprint()
    for changed in ({"head": {"layers": [8]}}, {"training": {"warmupEpochs": 1}},
                    {"training": {"gradClipNorm": 1.0}}, {"training": {"ema": {}}},
                    {"freeze": {"policy": "full"}}):
        other = parse_spec({"dataset": DIGITS, **changed})
        assert other.resume_fingerprint() != base.resume_fingerprint(), changed
    full = parse_spec({"dataset": DIGITS, "freeze": {"policy": "full"}})
    decayed = parse_spec({"dataset": DIGITS, "freeze": {"policy": "full", "layerwiseLrDecay": 0.8}})
    assert decayed.resume_fingerprint() != full.resume_fingerprint()
    assert parse_spec({"dataset": DIGITS, "training": {"ema": {}}}).training.ema.decay == 0.999


@pytest.mark.parametrize("spec,fingerprint", [
    ({"dataset": DIGITS}, "b426e86a89538dc6"),
    ({"dataset": {"builtin": "digits", "imageSize": 16}, "head": {"hiddenUnits": 64, "dropout": 0.2},
      "freeze": {"policy": "partial", "trainableStages": 2, "backboneLrScale": 0.5},
      "training": {"scheduler": "cosine", "optimizer": "sgd", "learningRate": 0.01}}, "841dfe819c16ec21"),
    ({"dataset": {"path": "/data", "augment": {"horizontalFlip": True}}, "freeze": {"policy": "full"}},
     "fac7ecfa483db143"),
])
def test_outputs_of_the_trainer_before_these_fields_still_resume(spec, fingerprint) -> None:
    """The fingerprints the trainer before heads-as-stacks and schedules wrote into its checkpoints."""
    assert parse_spec(spec).resume_fingerprint() == fingerprint
