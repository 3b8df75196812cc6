"""The frozen pass's fast paths (frozen_pass.FastPrefix, Bf16Weights): the prefix torch.fx cuts out computes the
boundary's input exactly; the TorchScript bf16 prefix and the bf16-weights prefix stay within bf16 tolerance of
fp32 eager; a prefix that disagrees with eager on the first batch is dropped for eager with the reason; fp32
never takes them."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.models import mobilenet_v3_small, resnet18
from trainer_util import tiny_spec

from finetune_trainer import frozen_pass
from finetune_trainer.engine import Compute, Precision
from finetune_trainer.feature_cache import _pass_path
from finetune_trainer.features import build_prefix, extract, folded_copy, frozen_pass_model
from finetune_trainer.fit import fit
from finetune_trainer.model import new_model
from finetune_trainer.report import Reporter

pytestmark = pytest.mark.unit

FP32 = Compute(torch.device("cpu"), Precision("fp32", None, "cpu"))
BF16 = Compute(torch.device("cpu"), Precision("bf16", torch.bfloat16, "cpu"), channels_last=True)
needs_bf16 = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not built in")


def _pretrained_like(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    for m in model.modules():  # non-trivial statistics, as a pretrained backbone has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _loader(n: int = 16, size: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.rand(n, 3, size, size, generator=g), torch.arange(n) % 3), batch_size=8)


CASES = [(lambda: resnet18(num_classes=5), "fc"), (lambda: resnet18(num_classes=5), "layer4"),
         (lambda: mobilenet_v3_small(num_classes=5), "classifier"),
         (lambda: new_model("test_efficientnet", "timm"), "classifier")]


@pytest.mark.parametrize("make,boundary", CASES, ids=["resnet-fc", "resnet-layer4", "mobilenet", "timm"])
def test_the_cut_out_prefix_computes_exactly_the_boundarys_input(make, boundary) -> None:
    model = _pretrained_like(make())
    prefix = build_prefix(model, boundary)
    assert prefix is not None
    hooked, _ = extract(model, boundary, _loader(), FP32)
    with torch.inference_mode():
        cut = torch.cat([prefix(x) for x, _ in _loader()])
    assert torch.equal(cut, hooked)
    assert all(a is b for a, b in zip(prefix.parameters(), model.parameters(), strict=False))  # shared, not copied


PATHS = [frozen_pass.FastPrefix, frozen_pass.Bf16Weights]


@needs_bf16
@pytest.mark.parametrize("kind", PATHS, ids=["torchscript", "bf16-weights"])
@pytest.mark.parametrize("make,boundary", CASES, ids=["resnet-fc", "resnet-layer4", "mobilenet", "timm"])
def test_every_bf16_fast_path_is_within_bf16_tolerance_of_fp32_eager(make, boundary, kind) -> None:
    model = _pretrained_like(make())
    reference, labels = extract(model, boundary, _loader(), FP32)
    frozen = frozen_pass_model(model, BF16.precision)
    fast = kind(build_prefix(frozen, boundary))
    got, got_labels = extract(frozen, boundary, _loader(), BF16, fast=fast)
    assert fast.describe()["path"] == kind.path, fast.reason
    assert torch.equal(got_labels, labels) and got.shape == reference.shape and got.dtype == torch.float32
    # bf16 keeps 8 mantissa bits: a few per cent of the largest activation after a dozen layers.
    assert (got - reference).abs().max() <= 0.05 * reference.abs().max()
    eager, _ = extract(frozen, boundary, _loader(), BF16)  # the eager bf16 pass: as close to fp32
    assert (got - eager).abs().max() <= frozen_pass.TOLERANCE * eager.abs().max()


@needs_bf16
@pytest.mark.parametrize("kind", PATHS, ids=["torchscript", "bf16-weights"])
def test_a_prefix_that_disagrees_with_eager_is_dropped_for_eager(monkeypatch, kind) -> None:
    model = _pretrained_like(resnet18(num_classes=5))
    frozen = frozen_pass_model(model, BF16.precision)
    eager, _ = extract(frozen, "fc", _loader(), BF16)
    fast = kind(build_prefix(frozen, "fc"))
    real = frozen_pass.FastPrefix.__call__
    monkeypatch.setattr(frozen_pass.FastPrefix, "__call__", lambda self, x: real(self, x) * 1.5)  # a broken kernel
    got, _ = extract(frozen, "fc", _loader(), BF16, fast=fast)
    assert torch.equal(got, eager)
    assert fast.describe()["path"] == "eager" and "disagreed with eager" in fast.reason


def test_a_prefix_that_cannot_be_compiled_leaves_the_pass_eager() -> None:
    model = _pretrained_like(resnet18(num_classes=5))
    frozen = folded_copy(model)
    fast = frozen_pass.FastPrefix(torch.nn.Module())  # no forward: tracing fails
    eager, _ = extract(frozen, "fc", _loader(), BF16)
    got, _ = extract(frozen, "fc", _loader(), BF16, fast=fast)
    assert torch.equal(got, eager) and {k: v for k, v in fast.describe().items() if k != "preparationSeconds"} == {
        "path": "eager", "reason": "TorchScript could not compile the frozen part (NotImplementedError)"}


def test_the_fast_path_applies_to_bf16_on_the_cpu_only() -> None:
    assert frozen_pass.intended(BF16)
    assert not frozen_pass.intended(FP32)
    assert not frozen_pass.intended(Compute(torch.device("cuda"), Precision("bf16", torch.bfloat16, "cuda")))


@pytest.mark.slow
@pytest.mark.parametrize("precision,choice,path,reason", [
    ("fp32", "auto", "eager", "fp32 (bit-for-bit"), ("fp32", "torchscript", "eager", "fp32 (bit-for-bit"),
    ("bf16", "auto", frozen_pass.WEIGHTS_PATH, "bf16-weights prefix, checked"),  # too short to compile
    ("bf16", "bf16-weights", frozen_pass.WEIGHTS_PATH, "bf16-weights prefix, checked"),
    ("fp32", "bf16-weights", "eager", "frozenPass bf16-weights applies to bf16 passes"),
    ("bf16", "torchscript", frozen_pass.PATH, "TorchScript bf16 prefix"),
    ("bf16", "eager", "eager", "training.frozenPass: eager")])
def test_model_json_records_how_the_frozen_pass_ran(tmp_path, precision, choice, path, reason) -> None:
    if precision == "bf16" and not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN is not built in")
    fit(tiny_spec(tmp_path, **{"training.precision": precision, "training.epochs": 1, "training.frozenPass": choice}),
        Reporter(), tmp_path)
    cache = json.loads((tmp_path / "model.json").read_text())["featureCache"]
    assert cache["frozenPass"]["path"] == path and reason in cache["frozenPass"]["reason"], cache


@needs_bf16
@pytest.mark.parametrize("fast_wins", [True, False])
def test_auto_races_the_paths_on_the_first_batch_and_keeps_the_faster(monkeypatch, fast_wins) -> None:
    model = _pretrained_like(resnet18(num_classes=5))
    frozen = frozen_pass_model(model, BF16.precision)
    eager, _ = extract(frozen, "fc", _loader(), BF16)
    compiled, _ = extract(frozen, "fc", _loader(), BF16, fast=frozen_pass.FastPrefix(build_prefix(frozen, "fc")))
    # The clock is the test's: the compiled prefix takes 10 ms a batch, eager 20 ms (or the other way round).
    monkeypatch.setattr(frozen_pass, "_seconds", lambda run, images: (
        0.010 if isinstance(run, frozen_pass.FastPrefix) == fast_wins else 0.020))
    fast = frozen_pass.FastPrefix(build_prefix(frozen, "fc"), race=True)
    got, _ = extract(frozen, "fc", _loader(), BF16, fast=fast)
    how = fast.describe()
    assert how["batchSeconds"] == ({frozen_pass.PATH: 0.01, "eager": 0.02} if fast_wins else
                                   {frozen_pass.PATH: 0.02, "eager": 0.01})
    if fast_wins:
        assert how["path"] == frozen_pass.PATH and "faster there: 10 ms against eager's 20 ms" in how["reason"]
        assert torch.equal(got, compiled)  # every row from the compiled prefix, the first batch's too
    else:
        assert how["path"] == "eager" and how["reason"].startswith("eager kept: the TorchScript bf16 prefix agreed")
        assert torch.equal(got, eager)  # every row from eager, the first batch's too


@needs_bf16
def test_an_explicit_torchscript_choice_is_not_raced(monkeypatch) -> None:
    model = _pretrained_like(resnet18(num_classes=5))
    frozen = frozen_pass_model(model, BF16.precision)
    monkeypatch.setattr(frozen_pass, "_seconds", lambda run, images: pytest.fail("timed without a race"))
    fast = frozen_pass.FastPrefix(build_prefix(frozen, "fc"))
    extract(frozen, "fc", _loader(), BF16, fast=fast)
    assert fast.describe()["path"] == frozen_pass.PATH and "batchSeconds" not in fast.describe()


@needs_bf16
def test_a_long_enough_auto_pass_records_its_race_in_model_json(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(frozen_pass, "MIN_IMAGES", 1)  # the tiny dataset counts as long: auto compiles and races
    monkeypatch.setattr(frozen_pass, "MIN_IMAGES_IN_STREAMS", 1)  # in streams too (2-3 torch threads)
    fit(tiny_spec(tmp_path, **{"training.precision": "bf16", "training.epochs": 1}), Reporter(), tmp_path)
    how = json.loads((tmp_path / "model.json").read_text())["featureCache"]["frozenPass"]
    times = how["batchSeconds"]
    assert set(times) == {frozen_pass.PATH, "eager"} and all(t > 0 for t in times.values()), how
    assert how["path"] == (frozen_pass.PATH if times[frozen_pass.PATH] < times["eager"] else "eager"), how
    assert how["preparationSeconds"] > 0


@pytest.mark.parametrize("images,streams,path", [
    (1000, 1, frozen_pass.WEIGHTS_PATH), (2000, 1, frozen_pass.PATH),  # one stream: compiling pays from 1024
    (2000, 2, frozen_pass.WEIGHTS_PATH), (5000, 2, frozen_pass.PATH)])  # in streams: from 4096
def test_auto_compiles_only_passes_long_enough_to_pay_for_it(tmp_path, images, streams, path) -> None:
    env = SimpleNamespace(frozen_compute=BF16)
    assert _pass_path(tiny_spec(tmp_path, **{"training.precision": "bf16"}), env, images, streams) == (path, "")
