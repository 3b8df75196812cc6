"""The feature cache on disk: what invalidates it, and a resumed run that reuses it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_training import Recorder, StopAfter
from trainer_util import make_image_folder, tiny_spec

from finetune_api.errors import Preempted
from finetune_api.spec import Dataset
from finetune_trainer import feature_store
from finetune_trainer.data import Preprocessing, load_splits
from finetune_trainer.fit import fit

pytestmark = pytest.mark.unit
PREP = Preprocessing(resize=16, crop=16)


def key_for(root, digest="w1", precision="bf16", prep=PREP, boundary="fc"):
    splits = load_splits(Dataset(path=str(root), imageSize=16), seed=0)
    return feature_store.cache_key(splits, prep, boundary, digest, precision, channels_last=True)


def test_the_key_changes_with_any_image_label_weights_or_preprocessing(tmp_path):
    root = make_image_folder(tmp_path / "data", {"cat": 6, "dog": 6})
    base = key_for(root)
    assert key_for(root) == base  # nothing changed: the same key, so a retry reuses the file
    assert key_for(root, digest="w2") != base  # another weights file (frozen digest)
    assert key_for(root, precision="fp32") != base
    assert key_for(root, prep=Preprocessing(resize=18, crop=16)) != base
    assert key_for(root, boundary="layer4.0") != base

    image = root / "cat" / "3.png"
    stat = image.stat()
    image.write_bytes(image.read_bytes() + b"\0")  # one image replaced (larger file)
    assert key_for(root) != base
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    image.write_bytes(image.read_bytes()[:-1])  # same size again, but a new mtime
    assert key_for(root) != base
    before_move = key_for(root)
    (root / "dog" / "5.png").rename(root / "cat" / "9.png")  # an image moved to another class
    assert key_for(root) != before_move


def test_a_broken_or_foreign_cache_file_is_ignored(tmp_path):
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    path = feature_store.save(tmp_path, "k" * 64, (x, y), (x, y))
    assert feature_store.load(tmp_path, "k" * 64)[0][0].equal(x)
    assert feature_store.load(tmp_path, "k" * 32 + "j" * 32) is None  # same file name prefix, other key
    path.write_bytes(path.read_bytes()[:100])  # truncated (a node died mid-write before atomic rename)
    assert feature_store.load(tmp_path, "k" * 64) is None
    feature_store.save(tmp_path, "m" * 64, (x, y), (x, y))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"features-{'m' * 32}.pt"]  # stale one gone


def test_a_resumed_run_reuses_the_cached_features_and_trains_the_same_head(tmp_path):
    extra = {"training.epochs": 3, "training.logEverySteps": 1}
    straight = fit(tiny_spec(tmp_path / "a", **extra), Recorder(), tmp_path / "a")
    stopper = StopAfter(1, step=1)
    spec = tiny_spec(tmp_path / "b", **extra)
    with pytest.raises(Preempted):
        fit(spec, stopper, tmp_path / "b", should_stop=lambda: stopper.stop)
    assert len(list((tmp_path / "b" / "cache").glob("features-*.pt"))) == 1, "the stopped run left no cache"

    seen = Recorder()
    fit(spec, seen, tmp_path / "b")
    texts = [f["text"] for k, f in seen.events if k == "message"]
    assert any("reused from cache/features-" in t for t in texts), texts
    assert not any("computed once" in t for t in texts), texts
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    assert meta["featureCache"]["stored"] == "reused"
    assert not (tmp_path / "b" / "cache").exists(), "the cache outlived the export"
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["valAccuracy"] for h in straight.history] == meta_history(tmp_path / "b")


def meta_history(output):
    return [h["valAccuracy"] for h in json.loads((output / "model.json").read_text())["history"]]


def test_the_folded_frozen_pass_computes_what_the_model_computes():
    """Conv+BatchNorm folding for the reduced-precision frozen pass: same outputs, BN gone, a copy."""
    from torchvision.models import resnet18

    from finetune_trainer.features import folded_copy

    torch.manual_seed(0)
    model = resnet18(num_classes=5).eval()
    for m in model.modules():  # non-trivial statistics, as a pretrained backbone has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    folded = folded_copy(model)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(folded(x), model(x), atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
