"""Cached augmented views: the feature cache with random per-image augmentation (training.featureCacheViews)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_training import Recorder, StopAfter
from trainer_util import tiny_spec

from finetune_api.errors import JobFileError, Preempted, TrainingError
from finetune_trainer import feature_store, features
from finetune_trainer.cached_views import ViewSampler, ViewsDataset
from finetune_trainer.data import build_dataloaders, load_splits
from finetune_trainer.distributed import Dist
from finetune_trainer.feature_cache import CacheInputs, prepare
from finetune_trainer.fit import fit
from finetune_trainer.freeze import apply_freeze, plan_freeze
from finetune_trainer.model import build_model
from finetune_trainer.runtime import Env, seed_everything
from finetune_trainer.train_state import frozen_digest

pytestmark = pytest.mark.unit
AUG = {"randomResizedCrop": True, "horizontalFlip": True, "colorJitter": 0.3}


def views_spec(output, views=4, **extra):
    return tiny_spec(output, **{"dataset.augment": dict(AUG), "training.featureCacheViews": views,
                                "training.precision": "fp32", **extra})


def prepared(spec, output):
    """What fit() trains on for `spec`, stopped before the epoch loop."""
    seed_everything(spec.training.seed)
    splits = load_splits(spec.dataset, spec.training.seed)
    built = build_model(spec, len(splits.classes))
    plan = plan_freeze(built.model, built.head_name, spec.freeze)
    apply_freeze(built.model, plan)
    env = Env.create(spec, built.model, device=torch.device("cpu"))
    loaders = build_dataloaders(splits, built.preprocessing, spec.dataset, spec.training.batch_size)
    inputs = CacheInputs(splits, built.preprocessing, frozen_digest(built.model), output)
    return prepare(spec, built.model, plan, loaders, env, spec.training.batch_size, Dist(), inputs), built, plan


def test_views_differ_from_each_other_and_from_the_unaugmented_features(tmp_path):
    got, _, _ = prepared(views_spec(tmp_path / "v"), tmp_path / "v")
    data = got.train_loader.dataset
    assert isinstance(data, ViewsDataset) and data.features.shape[:2] == (4, len(data.labels))
    assert got.decision.enabled and got.decision.views == 4 and got.stored == "written"
    assert "4 augmented views per training image" in got.decision.reason
    for a in range(4):
        for b in range(a + 1, 4):
            assert not torch.allclose(data.features[a], data.features[b]), (a, b)
    plain, _, _ = prepared(tiny_spec(tmp_path / "p", **{"training.precision": "fp32"}), tmp_path / "p")
    fixed = plain.train_loader.dataset.tensors
    assert torch.equal(fixed[1], data.labels)
    assert all(not torch.allclose(view, fixed[0]) for view in data.features)
    # Val is computed once without augmentation, as with the plain cache.
    assert all(torch.equal(a, b) for a, b in zip(got.val_loader.dataset.tensors, plain.val_loader.dataset.tensors,
                                                  strict=True))


def test_the_same_seed_gives_the_same_views_whatever_the_workers_and_another_seed_others(tmp_path):
    one, _, _ = prepared(views_spec(tmp_path / "a", views=2), tmp_path / "a")
    two, _, _ = prepared(views_spec(tmp_path / "b", views=2, **{"dataset.numWorkers": 2}), tmp_path / "b")
    other, _, _ = prepared(views_spec(tmp_path / "c", views=2, **{"training.seed": 1}), tmp_path / "c")
    assert torch.equal(one.train_loader.dataset.features, two.train_loader.dataset.features)
    assert not torch.allclose(one.train_loader.dataset.features[0], other.train_loader.dataset.features[0])


def test_each_epoch_samples_one_view_per_image_and_epochs_pick_differently():
    n, k = 50, 4
    sampler = ViewSampler(n, k)
    picks = []
    for epoch in (1, 2):
        sampler.reseed(epoch)
        flat = list(sampler)
        assert sorted(i % n for i in flat) == list(range(n))  # every image once per epoch
        assert all(0 <= i // n < k for i in flat)
        picks.append({i % n: i // n for i in flat})
        assert len(set(picks[-1].values())) > 1  # not one view for everyone
    assert picks[0] != picks[1]
    sampler.reseed(2)
    full = list(sampler)
    sampler.reseed(2, skip=10)  # a mid-epoch resume: the rest of the same epoch, same views
    assert list(sampler) == full[10:]
    halves = [ViewSampler(n, k, 2, r) for r in (0, 1)]
    for s in halves:
        s.reseed(2)
    assert set(list(halves[0]) + list(halves[1])) == set(full)  # ranks share the epoch's choice


@pytest.mark.slow
def test_a_resumed_run_reuses_the_stored_views_and_matches_an_uninterrupted_run(tmp_path):
    extra = {"training.epochs": 3, "training.logEverySteps": 1, "head.dropout": 0.2}
    straight = fit(views_spec(tmp_path / "a", **extra), Recorder(), tmp_path / "a")
    stopper = StopAfter(1, step=1)
    spec = views_spec(tmp_path / "b", **extra)
    with pytest.raises(Preempted):
        fit(spec, stopper, tmp_path / "b", should_stop=lambda: stopper.stop)
    assert len(list((tmp_path / "b" / "cache").glob("features-*.pt"))) == 1
    seen = Recorder()
    fit(spec, seen, tmp_path / "b")
    texts = [f["text"] for k, f in seen.events if k == "message"]
    assert any("4 augmented views each) reused from cache/features-" in t for t in texts), texts
    meta = json.loads((tmp_path / "b" / "model.json").read_text())
    cache = meta["featureCache"]
    assert cache["enabled"] and cache["stored"] == "reused" and cache["views"] == 4 and cache["boundary"] == "fc"
    assert "random augmentation" in cache["reason"] and "4 augmented views" in cache["reason"]
    assert not (tmp_path / "b" / "cache").exists(), "the cache outlived the export"
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["valAccuracy"] for h in straight.history] == [h["valAccuracy"] for h in meta["history"]]


def decision(spec):
    built = build_model(spec, 3)
    return features.decide(spec, built.model, plan_freeze(built.model, built.head_name, spec.freeze))


def test_pixel_mixing_falls_back_to_the_plain_loop_with_the_reason(tmp_path):
    spec = tiny_spec(tmp_path, **{"dataset.augment": {**AUG, "mixupAlpha": 0.2}, "training.featureCacheViews": 4})
    got = decision(spec)
    assert not got.enabled and got.views == 0 and "MixUp/CutMix" in got.reason and "mixupAlpha" in got.reason


def test_no_views_keeps_random_augmentation_turning_the_cache_off(tmp_path):
    got = decision(tiny_spec(tmp_path, **{"dataset.augment": AUG}))
    assert not got.enabled and "changes backbone inputs every epoch" in got.reason
    full = decision(views_spec(tmp_path, **{"freeze.policy": "full"}))
    assert not full.enabled and "full" in full.reason
    fixed = decision(tiny_spec(tmp_path, **{"training.featureCacheViews": 4}))  # nothing random: one view
    assert fixed.enabled and fixed.views == 0
    partial = decision(views_spec(tmp_path, **{"freeze.policy": "partial"}))
    assert partial.enabled and partial.views == 4 and partial.boundary.startswith("layer4")


def test_views_over_the_memory_budget_fail_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "MAX_CACHE_BYTES", 64 << 10)
    with pytest.raises(TrainingError, match=r"fewer training.featureCacheViews \(now 4\)"):
        prepared(views_spec(tmp_path), tmp_path)


def test_the_store_key_covers_the_views_and_the_augmentation(tmp_path):
    spec = views_spec(tmp_path)
    built = build_model(spec, 3)
    splits = load_splits(spec.dataset, 0)

    def key(s):
        views = feature_store.views_key(s, built.preprocessing) if s.training.feature_cache_views else None
        return feature_store.cache_key(splits, built.preprocessing, "fc", "w", "fp32", False, views=views)

    base = key(spec)
    assert key(views_spec(tmp_path)) == base
    assert key(views_spec(tmp_path, views=3)) != base
    assert key(views_spec(tmp_path, **{"training.seed": 1})) != base
    assert key(views_spec(tmp_path, **{"dataset.augment.colorJitter": 0.2})) != base
    assert key(tiny_spec(tmp_path)) not in (base, key(views_spec(tmp_path, views=1)))


@pytest.mark.parametrize("bad", [-1, 65, "four"])
def test_the_views_count_is_validated(tmp_path, bad):
    with pytest.raises(JobFileError, match="featureCacheViews") as err:
        tiny_spec(tmp_path, **{"training.featureCacheViews": bad})
    assert "\n" not in str(err.value)
