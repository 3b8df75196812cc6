"""The frozen pass's input pipeline (pass_input): uint8 per image and float per batch gives bit-for-bit the
per-image float images; views are decoded once and are exactly SeededViews' views; loader workers and the
pass's own batch size change nothing in the cache; what the pass did is recorded in model.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.models import resnet18
from trainer_util import tiny_spec

from finetune_api.errors import JobFileError
from finetune_api.spec import parse_spec
from finetune_trainer import augment, pass_input, startup
from finetune_trainer.cached_views import SeededViews
from finetune_trainer.data import ImageDataset, Preprocessing, load_splits, skip_broken
from finetune_trainer.engine import Compute, Precision
from finetune_trainer.features import extract
from finetune_trainer.fit import fit
from finetune_trainer.report import Reporter

pytestmark = pytest.mark.unit

FP32 = Compute(torch.device("cpu"), Precision("fp32", None, "cpu"))
PREP = Preprocessing(40, 32)
AUG = {"randomResizedCrop": True, "horizontalFlip": True, "colorJitter": 0.3, "rotation": 10}


def _images(transform, n: int = 12) -> ImageDataset:
    splits = load_splits(tiny_spec("/unused").dataset, 0)
    return ImageDataset(splits.train[:n], transform)


def _augment(**fields):
    return augment.train_transform(PREP, tiny_spec("/unused", **{"dataset.augment": {**AUG, **fields}}).dataset.augment)


def test_the_float_tail_is_split_off_only_when_it_is_exactly_to_dtype_and_normalize() -> None:
    pixels, tail = pass_input.split_tail(PREP.eval_transform())
    assert tail is not None and len(pixels.transforms) == 3
    whole, none = pass_input.split_tail(_augment(randomErasing=0.5))  # erasing runs after Normalize, per image
    assert none is None and len(whole.transforms) == len(_augment(randomErasing=0.5).transforms)
    assert pass_input.split_tail(lambda image: image)[1] is None


@pytest.mark.parametrize("make", [PREP.eval_transform, _augment], ids=["eval", "augmented"])
def test_uint8_per_image_then_float_per_batch_is_bit_identical(make) -> None:
    images = _images(make())
    pixels, tail = pass_input.split_tail(images.transform)
    torch.manual_seed(3)
    reference = torch.stack([images[i][0] for i in range(len(images))])
    torch.manual_seed(3)
    uint8 = torch.stack([pass_input.Pixels(images, pixels)[i][0] for i in range(len(images))])
    assert uint8.dtype == torch.uint8
    assert torch.equal(tail(uint8), reference)


def test_views_are_decoded_once_and_are_seeded_views_views(monkeypatch) -> None:
    images = _images(_augment())
    pixels, tail = pass_input.split_tail(images.transform)
    views = pass_input.Views(images, pixels, seed=7, views=3)
    loads = []
    sample_type = type(images.samples[0])
    original = sample_type.load
    monkeypatch.setattr(sample_type, "load", lambda self: loads.append(1) or original(self))
    stacked, label = views[5]
    assert len(loads) == 1 and stacked.shape[0] == 3 and label == images.samples[5].label
    expected = torch.stack([SeededViews(images, 7, k)[5][0] for k in range(3)])
    assert torch.equal(tail(stacked), expected)
    assert not torch.equal(expected[0], expected[1])  # the views differ


def _head_boundary_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return resnet18(num_classes=3).eval()


@pytest.mark.parametrize("workers,batch", [(0, 8), (2, 5)])
def test_views_pass_equals_one_pass_per_view_whatever_the_workers_and_batch(workers, batch) -> None:
    images = _images(_augment())
    model = _head_boundary_model()
    per_view = [extract(model, "fc", DataLoader(SeededViews(images, 7, k), batch_size=4, collate_fn=skip_broken),
                        FP32) for k in range(3)]
    plan = pass_input.Plan(batch, workers)
    got, labels = extract(model, "fc", pass_input.pass_input(images, skip_broken, plan, views=3, seed=7), FP32)
    assert got.shape[:2] == (3, len(images))
    assert torch.equal(got, torch.stack([x for x, _ in per_view]))
    assert torch.equal(labels, per_view[0][1])


def test_the_pass_plan_defaults_and_overrides(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(pass_input.cpus, "usable_cores", lambda: 2)
    assert pass_input.pass_plan(None, 32, None, 0, cpu) == pass_input.Plan(8, 0, False, 1, 2)  # small, no worker
    assert pass_input.pass_plan(None, 256, None, 2, cpu) == pass_input.Plan(8, 2, False, 1, 2)  # dataset.numWorkers
    assert pass_input.pass_plan(16, 256, 0, 3, cpu) == pass_input.Plan(16, 0, False, 1, 2)  # frozenPassWorkers: 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    monkeypatch.setattr(pass_input.cpus, "usable_cores", lambda: 16)
    assert pass_input.pass_plan(None, 32, None, 0, cpu) == pass_input.Plan(64, 4, False, 1, 16)
    assert pass_input.pass_plan(None, 32, None, 0, cuda) == pass_input.Plan(128, 4, True, 1, 16)


def test_fit_records_how_the_frozen_pass_loaded(tmp_path) -> None:
    spec = tiny_spec(tmp_path / "out", **{"freeze.policy": "head", "training.epochs": 1,
                                          "training.precision": "fp32", "training.frozenPassBatchSize": 20,
                                          "training.frozenPassWorkers": 1})
    messages = []

    class Messages(Reporter):
        def event(self, kind, **f):
            if kind == "message":
                messages.append(f["text"])

    fit(spec, Messages(), tmp_path / "out")
    assert sum(m.startswith("start-up: first batch") for m in messages) == 1, messages
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    how = meta["featureCache"]["frozenPass"]
    assert (how["batchSize"], how["workers"], how["inputs"]) == (20, 1, "uint8 per image, float per batch")
    assert how["path"] == "eager" and how["imagesPerSecond"] > 0 and how["seconds"] > 0
    # start-up: the first batch came after fit() began, which came after this (long-lived) process started
    t = meta["timings"]
    assert 0 < t["fitToFirstBatchSeconds"] < t["processStartToFirstBatchSeconds"]


def test_process_age_counts_from_the_process_start() -> None:
    older = startup.process_age()
    child = subprocess.run([sys.executable, "-c", "from finetune_trainer import startup; print(startup.process_age())"],
                           capture_output=True, text=True, check=True)
    younger = float(child.stdout)
    assert older is not None and 0 <= younger < older + 0.05  # the child started after this process


def test_a_bad_frozen_pass_batch_size_is_one_clear_line() -> None:
    base = {"model": {"architecture": "resnet18", "weights": {"source": "none"}}, "dataset": {"builtin": "digits"},
            "output": {"path": "/tmp/x"}}
    with pytest.raises(JobFileError) as err:
        parse_spec({**base, "training": {"frozenPassBatchSize": 0}})
    assert "frozenPassBatchSize" in str(err.value) and "\n" not in str(err.value)


def test_keep_freed_memory_sets_glibcs_thresholds_in_its_own_process() -> None:
    code = "from finetune_trainer import startup; print(startup.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ("True" if os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") or
                           os.path.exists("/usr/lib/x86_64-linux-gnu/libc.so.6") else out.strip())


def test_long_lived_imports_pause_the_collector_and_freeze_what_they_made_in_their_own_process() -> None:
    code = ("import gc, json\nfrom finetune_trainer import startup\nbefore = gc.get_freeze_count()\n"
            "with startup.long_lived_imports():\n    paused = not gc.isenabled()\n    import email.mime.text\n"
            "after = gc.get_freeze_count()\nleft = gc.isenabled()\ngc.disable()\n"
            "with startup.long_lived_imports():\n    pass\n"
            "print(json.dumps([paused, before, after, left, gc.isenabled()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    paused, before, after, left, enabled_after_off = json.loads(out)
    assert paused and after > before and left  # paused inside, the imported objects frozen, the collector back on
    assert not enabled_after_off  # a collector that was off before stays off
