"""Inference passes as streams (pass_streams): the same outputs in the same order as one stream, unreadable
batches skipped, failures surfaced, views drawn as one stream draws them, torch's thread count given back,
and the plan's defaults (bf16 CPU passes below 4 threads only) recorded in model.json."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.models import resnet18
from trainer_util import tiny_spec

from finetune_trainer import pass_input, pass_streams
from finetune_trainer.data import ImageDataset, Preprocessing, Sample, load_splits, skip_broken
from finetune_trainer.engine import Compute, Precision
from finetune_trainer.features import extract, extract_splits
from finetune_trainer.fit import fit
from finetune_trainer.model_report import predict_probabilities
from finetune_trainer.report import Reporter

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")
FP32 = Compute(CPU, Precision("fp32", None, "cpu"))
BF16 = Compute(CPU, Precision("bf16", torch.bfloat16, "cpu"), channels_last=True)
PREP = Preprocessing(40, 32)


def _images(n: int = 14, transform=None, broken: str | None = None) -> ImageDataset:
    samples = load_splits(tiny_spec("/unused").dataset, 0).train[:n]
    if broken:  # an unreadable file in the middle
        samples.insert(n // 2, Sample(label=0, path=broken))
    return ImageDataset(samples, transform or PREP.eval_transform())


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return resnet18(num_classes=3).eval()


def _plan(streams: int, batch: int = 2) -> pass_input.Plan:
    return pass_input.Plan(batch, 0, False, streams, max(1, torch.get_num_threads() // streams))


@pytest.mark.parametrize("compute", [FP32, BF16], ids=["fp32", "bf16"])
def test_streams_compute_what_one_stream_does_in_the_same_order(compute) -> None:
    images, model = _images(), _model()
    one = extract(model, "fc", pass_input.pass_input(images, skip_broken, _plan(1)), compute)
    threads = torch.get_num_threads()
    two = extract(model, "fc", pass_input.pass_input(images, skip_broken, _plan(2)), compute)
    again = extract(model, "fc", pass_input.pass_input(images, skip_broken, _plan(2)), compute)
    assert torch.get_num_threads() == threads  # the pool's threads set their own; the caller keeps its count
    assert torch.equal(two[1], one[1]) and two[0].shape == one[0].shape
    tolerance = 1e-4 if compute is FP32 else 0.05  # a batch on fewer threads rounds its reductions differently
    assert (two[0] - one[0]).abs().max() <= tolerance * one[0].abs().max()
    assert torch.equal(again[0], two[0])  # each batch on the same thread count: the same numbers run to run


def test_unreadable_images_are_skipped_by_the_streams_as_by_one_stream(tmp_path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    images, model = _images(9, broken=str(bad)), _model()
    one = extract(model, "fc", pass_input.pass_input(images, skip_broken, _plan(1, batch=1)), FP32)
    two = extract(model, "fc", pass_input.pass_input(images, skip_broken, _plan(2, batch=1)), FP32)
    assert len(two[1]) == len(one[1]) == 9 and torch.equal(two[1], one[1])


def test_views_drawn_by_streams_are_the_views_one_stream_draws() -> None:
    from finetune_trainer import augment

    transform = augment.train_transform(PREP, tiny_spec("/unused", **{"dataset.augment": {
        "randomResizedCrop": True, "horizontalFlip": True, "rotation": 15}}).dataset.augment)
    images = _images(24, transform)
    model = _model()
    one = extract(model, "fc", pass_input.pass_input(images, skip_broken, _plan(1, 4), views=3, seed=5), FP32)
    two = extract(model, "fc", pass_input.pass_input(images, skip_broken, _plan(2, 4), views=3, seed=5), FP32)
    assert two[0].shape[:2] == (3, 24)
    # a view drawn under another image's seed would differ by far more than rounding
    assert (two[0] - one[0]).abs().max() <= 1e-4 * one[0].abs().max()


def test_a_failing_batch_surfaces_from_the_pass_and_the_thread_count_comes_back() -> None:
    images = _images()
    source = pass_input.pass_input(images, skip_broken, _plan(2))
    threads, calls = torch.get_num_threads(), []

    def fails_on_the_fourth(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return x.mean(dim=(1, 2, 3))

    with pytest.raises(RuntimeError, match="boom"):
        list(pass_streams.map_batches(source, FP32, fails_on_the_fourth, fails_on_the_fourth))
    assert torch.get_num_threads() == threads


def test_the_final_evaluation_through_streams_equals_one_stream() -> None:
    images, model = _images(), _model()
    one = predict_probabilities(model, pass_input.pass_input(images, skip_broken, _plan(1)), FP32)
    two = predict_probabilities(model, pass_input.pass_input(images, skip_broken, _plan(2)), FP32)
    assert (one[0] == two[0]).all() and abs(one[1] - two[1]).max() < 1e-5
    plain = predict_probabilities(model, DataLoader(images, batch_size=4, collate_fn=skip_broken), FP32)
    assert (plain[0] == one[0]).all()


def test_the_plan_runs_streams_for_bf16_cpu_passes_below_four_threads(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(pass_input.cpus, "usable_cores", lambda: 2)
    plan = pass_input.pass_plan
    assert plan(None, 32, None, 0, cpu, reduced=True) == pass_input.Plan(8, 0, False, 2, 1)
    assert plan(None, 32, None, 0, cpu) == pass_input.Plan(8, 0, False, 1, 2)  # fp32: bit-for-bit, one stream
    assert plan(None, 32, None, 0, cpu, streams=2) == pass_input.Plan(8, 0, False, 2, 1)  # asked for
    assert plan(None, 32, 1, 0, cpu, reduced=True) == pass_input.Plan(8, 1, False, 1, 2)  # workers decode
    assert plan(None, 32, 1, 0, cpu, streams=2, reduced=True) == pass_input.Plan(8, 0, False, 2, 1)
    assert plan(None, 32, None, 0, cpu, streams=8, reduced=True).streams == 2  # no more streams than threads
    assert plan(None, 32, None, 0, cuda, streams=2, reduced=True).streams == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    monkeypatch.setattr(pass_input.cpus, "usable_cores", lambda: 16)
    assert plan(None, 32, None, 0, cpu, reduced=True) == pass_input.Plan(64, 4, False, 1, 16)
    assert plan(None, 32, None, 0, cpu, streams=4, reduced=True) == pass_input.Plan(64, 0, False, 4, 4)


def test_fit_records_the_streams_of_its_frozen_pass(tmp_path) -> None:
    spec = tiny_spec(tmp_path / "out", **{"freeze.policy": "head", "training.epochs": 1, "training.precision": "fp32",
                                          "training.frozenPassStreams": 2})
    fit(spec, Reporter(), tmp_path / "out")
    how = json.loads((tmp_path / "out" / "model.json").read_text())["featureCache"]["frozenPass"]
    expected = min(2, torch.get_num_threads())
    assert how["streams"] == expected and how["workers"] == 0
    assert how.get("threadsPerStream") == (torch.get_num_threads() // 2 if expected == 2 else None)


@pytest.mark.parametrize("streams", [1, 2])
def test_splits_share_one_pipeline_and_come_back_as_each_alone(streams) -> None:
    train, val, model = _images(14), _images(5), _model()
    inputs = [pass_input.pass_input(d, skip_broken, _plan(streams)) for d in (train, val)]
    alone = [extract(model, "fc", one, FP32) for one in inputs]
    together = extract_splits(model, "fc", inputs, FP32)
    for (x, y), (x1, y1) in zip(together, alone, strict=True):
        assert torch.equal(y, y1) and torch.equal(x, x1)


@pytest.mark.parametrize("streams", [1, 2])
def test_decide_sees_the_first_batch_before_any_batch_is_computed(streams) -> None:
    source = pass_input.pass_input(_images(14), skip_broken, _plan(streams))
    seen: list[str] = []

    def decide(x: torch.Tensor) -> None:
        assert not seen  # no batch was computed yet: not even the first one
        seen.append("decided")

    def step(x: torch.Tensor) -> torch.Tensor:
        assert seen[0] == "decided"  # every stream waits for the choice, the first batch's too
        seen.append("step")
        return x.mean(dim=(1, 2, 3))

    outputs = list(pass_streams.map_batches(source, FP32, decide, step))
    assert seen.count("decided") == 1 and seen.count("step") == len(outputs) == 7  # 14 images, batches of 2


@pytest.mark.parametrize("streams", [1, 2])
@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_collector_is_off_during_a_pass_and_back_as_it_was_after(streams, enabled_before) -> None:
    import gc

    source = pass_input.pass_input(_images(6), skip_broken, _plan(streams))
    during: list[bool] = []

    def step(x: torch.Tensor) -> torch.Tensor:
        during.append(gc.isenabled())
        return x.mean(dim=(1, 2, 3))

    was = gc.isenabled()
    (gc.enable if enabled_before else gc.disable)()
    try:
        list(pass_streams.map_batches(source, FP32, None, step))
        after_pass = gc.isenabled()
        with pytest.raises(RuntimeError, match="boom"), pass_streams.gc_paused():
            with pass_streams.gc_paused():  # nested: the outer one still holds it off
                pass
            assert not gc.isenabled()
            raise RuntimeError("boom")
        after_failure = gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
    assert during == [False] * 3
    assert after_pass is after_failure is enabled_before
