"""timm as a model library: names, heads, stages, freezing, the feature cache, export and predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from trainer_util import tiny_spec, write_job

from finetune_api.errors import JobFileError
from finetune_api.spec import parse_spec
from finetune_trainer.fit import fit
from finetune_trainer.freeze import apply_freeze, param_groups, plan_freeze
from finetune_trainer.model import build_model
from finetune_trainer.predict import Predictor
from finetune_trainer.report import Reporter

pytestmark = pytest.mark.unit
TRAINER = Path(sys.executable).with_name("finetune-train")
LITE0 = "tf_efficientnet_lite0"


def timm_spec(output: Path, arch: str = "test_efficientnet", **overrides):
    return tiny_spec(output, **{"model.library": "timm", "model.architecture": arch, "dataset.imageSize": 32,
                                "training.precision": "fp32", **overrides})


def random_weights_file(path: Path, arch: str = "test_efficientnet", seed: int = 3) -> Path:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False)
    # Non-trivial BatchNorm statistics, so a moved running mean would show.
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.uniform_(-0.5, 0.5)
        elif name.endswith("running_var"):
            buf.uniform_(0.5, 2.0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_timm_model_defaults_to_timm_weights_and_a_wrong_name_lists_close_matches(tmp_path: Path) -> None:
    spec = parse_spec({"model": {"library": "timm", "architecture": LITE0}, "dataset": {"builtin": "digits"}})
    assert spec.model.weights.source == "timm"
    bad = timm_spec(tmp_path, arch="tf_efficientnet_lite00", **{"model.weights.source": "none"})
    with pytest.raises(JobFileError, match=r"close matches: .*tf_efficientnet_lite0"):
        build_model(bad, 3)
    with pytest.raises(JobFileError, match=r"needs model\.library 'torchvision'"):
        parse_spec({"model": {"library": "timm", "architecture": LITE0, "weights": {"source": "torchvision"}},
                    "dataset": {"builtin": "digits"}})


def test_the_head_is_replaced_through_timm_and_preprocessing_comes_from_the_pretrained_config(tmp_path: Path) -> None:
    spec = timm_spec(tmp_path, arch=LITE0, **{"model.weights.source": "none", "dataset.imageSize": 128,
                                             "head.hiddenUnits": 64, "head.dropout": 0.2})
    built = build_model(spec, 7)
    assert built.head_name == "classifier"
    head = built.model.get_submodule("classifier")
    assert isinstance(head, torch.nn.Sequential) and head[0].in_features == 1280 and head[-1].out_features == 7
    assert built.model(torch.zeros(2, 3, 128, 128)).shape == (2, 7)
    prep = built.preprocessing
    cfg = timm.create_model(LITE0).pretrained_cfg
    assert (prep.mean, prep.std, prep.interpolation) == (cfg["mean"], cfg["std"], cfg["interpolation"])
    assert (prep.crop, prep.resize) == (128, round(128 / cfg["crop_pct"]))


def test_partial_finds_timms_stages_and_trains_exactly_them(tmp_path: Path) -> None:
    spec = timm_spec(tmp_path, arch=LITE0, **{"model.weights.source": "none", "freeze.policy": "partial",
                                             "freeze.trainableStages": 2})
    built = build_model(spec, 3)
    plan = plan_freeze(built.model, built.head_name, spec.freeze)
    assert [s.name for s in plan.stages] == ["bn1+conv_stem", *[f"blocks.{i}" for i in range(6)],
                                             "blocks.6+bn2+conv_head"]
    apply_freeze(built.model, plan)
    trains = {n for n, p in built.model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in built.model.named_parameters()
                if n.startswith(("blocks.5.", "blocks.6.", "conv_head.", "bn2.", "classifier."))}
    assert trains == expected
    groups = {g["name"]: g for g in param_groups(built.model, plan, spec.training, 0.1)}
    assert sum(len(g["params"]) for g in groups.values()) == len(trains)
    assert groups["backbone"]["lr"] == pytest.approx(spec.training.learning_rate * 0.1)

    full = timm_spec(tmp_path, arch=LITE0, **{"model.weights.source": "none", "freeze.policy": "full"})
    built = build_model(full, 3)
    apply_freeze(built.model, plan_freeze(built.model, built.head_name, full.freeze))
    assert all(p.requires_grad for p in built.model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["auto", "off"])
def test_head_only_keeps_every_frozen_parameter_and_buffer_bit_identical(tmp_path: Path, cache: str) -> None:
    weights = random_weights_file(tmp_path / "w.safetensors")
    spec = timm_spec(tmp_path / "out", **{"model.weights.source": "file", "model.weights.path": str(weights),
                                          "training.featureCache": cache, "head.dropout": 0.3})
    fit(spec, Reporter(), tmp_path / "out")
    before, after = load_file(str(weights)), load_file(str(tmp_path / "out" / "model.safetensors"))
    frozen = [k for k in after if not k.startswith("classifier.")]
    assert frozen and set(frozen) <= set(before)
    moved = [k for k in frozen if not torch.equal(before[k], after[k])]
    assert moved == [], f"frozen tensors changed: {moved[:5]}"
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["library"] == "timm" and meta["featureCache"]["enabled"] == (cache == "auto")


@pytest.mark.slow
def test_partial_with_the_feature_cache_trains_like_the_plain_loop_and_the_export_predicts(tmp_path: Path) -> None:
    weights = random_weights_file(tmp_path / "w.safetensors")
    common = {"model.weights.source": "file", "model.weights.path": str(weights), "freeze.policy": "partial",
              "freeze.trainableStages": 1}
    results = {}
    for cache in ("auto", "off"):
        out = tmp_path / cache
        results[cache] = fit(timm_spec(out, **common, **{"training.featureCache": cache}), Reporter(), out)
    meta = json.loads((tmp_path / "auto" / "model.json").read_text())
    assert meta["featureCache"]["enabled"] and meta["featureCache"]["boundary"].startswith("blocks.")
    assert [h["trainLoss"] for h in results["auto"].history] == pytest.approx(
        [h["trainLoss"] for h in results["off"].history], rel=1e-4)

    predictor = Predictor.load(tmp_path / "auto")
    spec = timm_spec(tmp_path / "auto", **common)
    from finetune_trainer.data import eval_loader, load_splits

    splits = load_splits(spec.dataset, spec.training.seed)
    images, _ = next(iter(eval_loader(splits.val[:8], predictor.preprocessing, 8)))
    exported = load_file(str(tmp_path / "auto" / "model.safetensors"))
    reference = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
    reference.load_state_dict(exported)
    with torch.no_grad():
        assert torch.allclose(predictor.model(images), reference.eval()(images), atol=1e-6)


@pytest.mark.slow
def test_a_timm_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    weights = random_weights_file(tmp_path / "w.safetensors")
    common = {"model.weights.source": "file", "model.weights.path": str(weights), "freeze.policy": "partial",
              "freeze.trainableStages": 1, "training.epochs": 3}
    straight = fit(timm_spec(tmp_path / "a", **common), Reporter(), tmp_path / "a")
    fit(timm_spec(tmp_path / "b", **{**common, "training.epochs": 1}), Reporter(), tmp_path / "b")
    (tmp_path / "b" / "model.json").unlink()  # as if stopped after epoch 1
    resumed = fit(timm_spec(tmp_path / "b", **common), Reporter(), tmp_path / "b")
    assert resumed.resumed_from == 1
    assert [h["trainLoss"] for h in resumed.history] == [h["trainLoss"] for h in straight.history]


def test_timm_pretrained_weights_offline_fail_with_one_line_and_exit_1(tmp_path: Path) -> None:
    job = write_job(tmp_path / "job.yaml", {
        "model": {"library": "timm", "architecture": "test_efficientnet"},
        "dataset": {"builtin": "digits", "imageSize": 16}, "output": {"path": str(tmp_path / "out")}})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([str(TRAINER), "-f", str(job)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 1, run.stderr
    error = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "timm pretrained weights" in error[0] and "Traceback" not in run.stderr
