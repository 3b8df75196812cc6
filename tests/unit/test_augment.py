"""spec.dataset.augment: torchvision v2 transforms on the train split only, seeded per epoch, each field validated."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torchvision.transforms import v2 as T
from trainer_util import tiny_spec

from finetune_api.errors import JobFileError, Preempted
from finetune_api.spec import Augment, load_job, parse_spec
from finetune_trainer import augment
from finetune_trainer.data import Preprocessing, build_dataloaders, load_splits
from finetune_trainer.distributed import Dist
from finetune_trainer.fit import _begin_epoch, fit
from finetune_trainer.report import Reporter

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).parents[2] / "examples/augmentation-cpu.yaml"

PREP = Preprocessing(resize=16, crop=16)
# Every per-image technique at once (mixup/cutmix are batch-level and tested on their own too).
PER_IMAGE = {
    "randomResizedCrop": True, "randomResizedCropScale": [0.5, 1.0], "randomResizedCropRatio": [0.8, 1.25],
    "horizontalFlip": True, "verticalFlip": True, "rotation": 15,
    "affine": {"translate": 0.1, "scale": [0.9, 1.1], "shear": 5},
    "colorJitterDetail": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.05},
    "randomGrayscale": 0.2, "gaussianBlur": {"kernelSize": 3, "sigma": [0.1, 1.0], "probability": 0.5},
    "autoAugment": {"policy": "randAugment", "numOps": 2, "magnitude": 9}, "randomErasing": 0.25,
}
MIX = {"mixupAlpha": 0.4, "cutmixAlpha": 1.0}


def _loaders(tmp_path, augment_spec: dict, num_workers: int = 0, batch: int = 16):
    spec = tiny_spec(tmp_path, **{"dataset.augment": augment_spec, "dataset.numWorkers": num_workers})
    return build_dataloaders(load_splits(spec.dataset, spec.training.seed), PREP, spec.dataset, batch)


def _epoch(loader, seed: int, batches: int = 2) -> list:
    """The first batches of an epoch seeded exactly as fit() seeds it."""
    _begin_epoch(SimpleNamespace(begin=None, rng=None), loader, seed, Dist())
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == batches:
            break
    return out


def _same(a: list, b: list) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


def test_augmentation_changes_training_images_and_never_val_images(tmp_path) -> None:
    plain_train, plain_val = _loaders(tmp_path, {})
    aug_train, aug_val = _loaders(tmp_path, {**PER_IMAGE, **MIX})
    # Same seed, so the same images in the same order: only the augmentation differs.
    plain, aug = _epoch(plain_train, 1), _epoch(aug_train, 1)
    assert not torch.equal(plain[0][0], aug[0][0])
    assert aug[0][1].dtype == torch.float32 and aug[0][1].shape == (16, 3)  # mixed: soft targets
    val_plain = list(plain_val)
    for seed in (1, 2):
        _epoch(aug_train, seed)  # reseeding for an epoch must not reach the val images either
        val_aug = list(aug_val)
        assert _same(val_plain, val_aug)
        assert val_aug[0][1].dtype == torch.int64
    assert aug_val.dataset.transform is not aug_train.dataset.transform


def test_val_and_test_transform_is_the_eval_transform_whatever_the_augmentation(tmp_path) -> None:
    spec = tiny_spec(tmp_path, **{"dataset.augment": PER_IMAGE, "dataset.testFraction": 0.2})
    splits = load_splits(spec.dataset, spec.training.seed)
    _, val = build_dataloaders(splits, PREP, spec.dataset, 8)
    names = [type(t).__name__ for t in val.dataset.transform.transforms]
    assert names == [type(t).__name__ for t in PREP.eval_transform().transforms]
    assert splits.test, "the test split exists (finish.py evaluates it with data.eval_loader: eval transform only)"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_same_seed_gives_the_same_augmented_batches_and_another_seed_different_ones(tmp_path,
                                                                                        num_workers) -> None:
    train, _ = _loaders(tmp_path, {**PER_IMAGE, **MIX}, num_workers=num_workers)
    first, again, other = _epoch(train, 5), _epoch(train, 5), _epoch(train, 6)
    assert _same(first, again)
    assert not torch.equal(first[0][0], other[0][0])
    rebuilt, _ = _loaders(tmp_path, {**PER_IMAGE, **MIX}, num_workers=num_workers)  # a new process's loader
    assert _same(first, _epoch(rebuilt, 5))


def test_the_batch_mix_runs_in_the_main_process_so_workers_do_not_change_it(tmp_path) -> None:
    """Mixing draws from the main process's per-epoch stream, which fit() seeds and checkpoints."""
    zero, _ = _loaders(tmp_path, MIX, num_workers=0)
    two, _ = _loaders(tmp_path, MIX, num_workers=2)
    assert isinstance(zero, augment.MixingLoader)
    assert _same(_epoch(zero, 3), _epoch(two, 3))


@pytest.mark.parametrize("mix", [{"mixupAlpha": 0.4}, {"cutmixAlpha": 1.0}, MIX], ids=["mixup", "cutmix", "both"])
def test_mixed_targets_are_probability_distributions(tmp_path, mix) -> None:
    train, _ = _loaders(tmp_path, mix, batch=32)
    batches = _epoch(train, 0, batches=3)
    for images, targets in batches:
        assert images.shape[1:] == (3, 16, 16)
        assert targets.shape == (images.shape[0], 3) and targets.dtype == torch.float32
        assert (targets >= 0).all()
        assert torch.allclose(targets.sum(dim=1), torch.ones(images.shape[0]), atol=1e-6)
    assert any((t.max(dim=1).values < 1).any() for _, t in batches), "some targets are really mixed"


def _types(transform) -> list[type]:
    return [type(t) for t in transform.transforms]


def test_the_first_v1alpha1_fields_build_the_transform_they_always_built() -> None:
    a = Augment.model_validate({"randomResizedCrop": True, "horizontalFlip": True, "colorJitter": 0.3})
    built = augment.train_transform(PREP, a)
    assert _types(built) == [T.ToImage, T.RandomResizedCrop, T.RandomHorizontalFlip, T.ColorJitter, T.ToDtype,
                             T.Normalize]
    crop, jitter = built.transforms[1], built.transforms[3]
    assert crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.7, 1.3))
    assert jitter.hue is None
    assert _types(augment.train_transform(PREP, Augment())) == [T.ToImage, T.Resize, T.CenterCrop, T.ToDtype,
                                                                T.Normalize]


@pytest.mark.parametrize(
    ("field", "check"),
    [
        ({"randomResizedCrop": True, "randomResizedCropScale": [0.5, 0.9], "randomResizedCropRatio": [0.8, 1.2]},
         lambda t: isinstance(t, T.RandomResizedCrop) and t.scale == (0.5, 0.9) and t.ratio == (0.8, 1.2)),
        ({"verticalFlip": True}, lambda t: isinstance(t, T.RandomVerticalFlip)),
        ({"rotation": 20}, lambda t: isinstance(t, T.RandomRotation) and t.degrees == [-20.0, 20.0]),
        ({"rotation": 20, "affine": {"translate": 0.1, "scale": [0.8, 1.2], "shear": 10}},
         lambda t: isinstance(t, T.RandomAffine) and t.degrees == [-20.0, 20.0] and t.translate == (0.1, 0.1)
         and t.scale == (0.8, 1.2) and t.shear == [-10.0, 10.0]),
        ({"colorJitterDetail": {"contrast": 0.2, "hue": 0.1}},
         lambda t: isinstance(t, T.ColorJitter) and t.brightness is None and t.hue == pytest.approx((-0.1, 0.1))),
        ({"randomGrayscale": 0.3}, lambda t: isinstance(t, T.RandomGrayscale) and t.p == 0.3),
        ({"gaussianBlur": {"kernelSize": 5, "sigma": [0.5, 1.5], "probability": 0.4}},
         lambda t: isinstance(t, T.RandomApply) and t.p == 0.4 and tuple(t.transforms[0].kernel_size) == (5, 5)
         and list(t.transforms[0].sigma) == [0.5, 1.5]),
        ({"autoAugment": {"policy": "randAugment", "numOps": 3, "magnitude": 12}},
         lambda t: isinstance(t, T.RandAugment) and t.num_ops == 3 and t.magnitude == 12),
        ({"autoAugment": {"policy": "randAugment"}},
         lambda t: isinstance(t, T.RandAugment) and t.num_ops == 2 and t.magnitude == 9),
        ({"autoAugment": {"policy": "trivialAugmentWide"}}, lambda t: isinstance(t, T.TrivialAugmentWide)),
        ({"autoAugment": {"policy": "autoAugmentImageNet"}},
         lambda t: isinstance(t, T.AutoAugment) and t.policy == T.AutoAugmentPolicy.IMAGENET),
        ({"randomErasing": 0.5}, lambda t: isinstance(t, T.RandomErasing) and t.p == 0.5),
    ],
    ids=["crop-ranges", "vflip", "rotation", "affine", "jitter-detail", "grayscale", "blur", "randaugment",
         "randaugment-defaults", "trivialaugment", "autoaugment", "erasing"],
)
def test_each_field_adds_its_torchvision_transform_and_changes_training_images(field, check) -> None:
    a = Augment.model_validate(field)
    built = augment.train_transform(PREP, a)
    assert any(check(t) for t in built.transforms), _types(built)
    assert a.any_random
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    plain = augment.train_transform(PREP, Augment())(image)
    torch.manual_seed(0)
    outs = [built(image) for _ in range(16)]
    assert all(o.shape == (3, 16, 16) and o.dtype == torch.float32 for o in outs)
    assert any(not torch.equal(o, plain) for o in outs)


@pytest.mark.parametrize("field", ["mixupAlpha", "cutmixAlpha"])
def test_mix_fields_are_random_and_build_their_batch_transform(field) -> None:
    a = Augment.model_validate({field: 0.5})
    assert a.any_random and a.random_fields == [field]
    assert isinstance(augment.batch_mix(a, 3), T.MixUp if field == "mixupAlpha" else T.CutMix)
    assert augment.batch_mix(Augment(), 3) is None


def test_nothing_on_is_not_random() -> None:
    for off in ({}, {"affine": {}}, {"colorJitterDetail": {}}, {"rotation": 0, "randomErasing": 0.0}):
        assert not Augment.model_validate(off).any_random, off


@pytest.mark.parametrize(
    ("augment_spec", "expected"),
    [
        ({"rotation": -1}, "spec.dataset.augment.rotation: Input should be greater than or equal to 0"),
        ({"rotation": 181}, "spec.dataset.augment.rotation: Input should be less than or equal to 180"),
        ({"verticalFlip": "sometimes"}, "spec.dataset.augment.verticalFlip: Input should be a valid boolean"),
        ({"randomResizedCrop": True, "randomResizedCropScale": [0.9, 0.5]},
         "spec.dataset.augment.randomResizedCropScale: must be [min, max] with min <= max"),
        ({"randomResizedCrop": True, "randomResizedCropScale": [0.0, 1.0]},
         "spec.dataset.augment.randomResizedCropScale.0: Input should be greater than 0"),
        ({"randomResizedCrop": True, "randomResizedCropScale": [0.5, 1.5]},
         "spec.dataset.augment.randomResizedCropScale.1: Input should be less than or equal to 1"),
        ({"randomResizedCrop": True, "randomResizedCropScale": [0.5]},
         "spec.dataset.augment.randomResizedCropScale: List should have at least 2 items"),
        ({"randomResizedCrop": True, "randomResizedCropRatio": [2.0, 0.5]},
         "spec.dataset.augment.randomResizedCropRatio: must be [min, max]"),
        ({"randomResizedCropScale": [0.5, 1.0]}, "need dataset.augment.randomResizedCrop: true"),
        ({"affine": {"translate": 1.5}}, "spec.dataset.augment.affine.translate: Input should be less than"),
        ({"affine": {"scale": [1.2, 0.8]}}, "spec.dataset.augment.affine.scale: must be [min, max]"),
        ({"affine": {"shear": -5}}, "spec.dataset.augment.affine.shear: Input should be greater than"),
        ({"affine": {"zoom": 2}}, "spec.dataset.augment.affine.zoom: Extra inputs are not permitted"),
        ({"colorJitterDetail": {"hue": 0.6}}, "spec.dataset.augment.colorJitterDetail.hue: Input should be less"),
        ({"colorJitterDetail": {"brightness": -0.1}}, "spec.dataset.augment.colorJitterDetail.brightness: Input"),
        ({"colorJitter": 0.2, "colorJitterDetail": {"hue": 0.1}},
         "dataset.augment.colorJitterDetail replaces dataset.augment.colorJitter"),
        ({"randomGrayscale": 1.5}, "spec.dataset.augment.randomGrayscale: Input should be less than or equal to 1"),
        ({"gaussianBlur": {"kernelSize": 4}}, "spec.dataset.augment.gaussianBlur.kernelSize: must be odd"),
        ({"gaussianBlur": {"kernelSize": 0}}, "spec.dataset.augment.gaussianBlur.kernelSize: Input should be greater"),
        ({"gaussianBlur": {"kernelSize": 17}},
         "dataset.augment.gaussianBlur.kernelSize (17) must be at most dataset.imageSize (16)"),
        ({"gaussianBlur": {"sigma": [2.0, 0.1]}}, "spec.dataset.augment.gaussianBlur.sigma: must be [min, max]"),
        ({"gaussianBlur": {"probability": 0}}, "spec.dataset.augment.gaussianBlur.probability: Input should be"),
        ({"autoAugment": {"policy": "augMix"}}, "spec.dataset.augment.autoAugment.policy: Input should be"),
        ({"autoAugment": {}}, "spec.dataset.augment.autoAugment.policy: Field required"),
        ({"autoAugment": {"policy": "randAugment", "magnitude": 31}},
         "spec.dataset.augment.autoAugment.magnitude: Input should be less than or equal to 30"),
        ({"autoAugment": {"policy": "randAugment", "numOps": 0}},
         "spec.dataset.augment.autoAugment.numOps: Input should be greater than or equal to 1"),
        ({"autoAugment": {"policy": "trivialAugmentWide", "numOps": 2}},
         "dataset.augment.autoAugment.numOps and magnitude are only valid with policy 'randAugment'"),
        ({"randomErasing": 2}, "spec.dataset.augment.randomErasing: Input should be less than or equal to 1"),
        ({"mixupAlpha": -0.1}, "spec.dataset.augment.mixupAlpha: Input should be greater than or equal to 0"),
        ({"cutmixAlpha": 11}, "spec.dataset.augment.cutmixAlpha: Input should be less than or equal to 10"),
    ],
)
def test_bad_values_are_refused_with_one_line_naming_the_field(augment_spec, expected) -> None:
    with pytest.raises(JobFileError) as err:
        parse_spec({"dataset": {"builtin": "digits", "imageSize": 16, "augment": augment_spec}})
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_new_fields_round_trip_on_the_wire() -> None:
    spec = parse_spec({"dataset": {"builtin": "digits", "augment": {**PER_IMAGE, **MIX}}})
    wire = spec.to_wire()["dataset"]["augment"]
    assert wire["autoAugment"] == {"policy": "randAugment", "numOps": 2, "magnitude": 9}
    assert wire["randomResizedCropScale"] == [0.5, 1.0] and wire["mixupAlpha"] == 0.4
    assert parse_spec(spec.to_wire()) == spec


@pytest.mark.slow
def test_a_short_fit_with_augmentations_and_mixup_exports_with_the_cache_off_and_why(tmp_path) -> None:
    spec = tiny_spec(tmp_path, **{"dataset.augment": {**PER_IMAGE, **MIX}, "dataset.numWorkers": 2,
                                  "training.epochs": 2, "training.labelSmoothing": 0.1})
    result = fit(spec, Reporter(), tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert (tmp_path / "model.safetensors").is_file() and meta["sha256"]
    assert math.isfinite(result.train_loss) and math.isfinite(meta["metrics"]["valLoss"])
    cache = meta["featureCache"]
    assert cache["enabled"] is False
    assert "augmentation" in cache["reason"] and "mixupAlpha" in cache["reason"] and "autoAugment" in cache["reason"]


def test_the_augmentation_example_uses_several_techniques_on_the_bundled_digits_on_cpu() -> None:
    spec = load_job(EXAMPLE).spec
    assert spec.dataset.builtin == "digits" and spec.training.device == "cpu" and spec.training.precision == "fp32"
    assert len(spec.dataset.augment.random_fields) >= 5 and spec.dataset.augment.mixes_batches
    assert {"randomResizedCrop", "rotation", "affine"} <= set(spec.dataset.augment.random_fields)


class _StopInEpoch2(Reporter):
    """Asks fit() to stop after step 1 of epoch 2 (a stand-in for SIGTERM)."""

    stop = False

    def event(self, kind, **f):
        self.stop = self.stop or (kind == "step" and (f["epoch"], f["step"]) >= (2, 1))


@pytest.mark.slow
@pytest.mark.parametrize(("augment_spec", "num_workers"), [({**PER_IMAGE, **MIX}, 0), (MIX, 2)],
                         ids=["everything-in-process", "mix-with-workers"])
def test_a_run_stopped_mid_epoch_resumes_to_the_same_weights_with_augmentation(tmp_path, augment_spec,
                                                                                num_workers) -> None:
    """The mid-epoch checkpoint's random state covers what runs in the main process: per-image transforms
    without workers, and the batch mix always (it never runs in a worker)."""
    extra = {"dataset.augment": augment_spec, "dataset.numWorkers": num_workers, "training.epochs": 2,
             "training.logEverySteps": 1, "training.precision": "fp32"}  # fp32: bit equality is the claim
    fit(tiny_spec(tmp_path / "a", **extra), Reporter(), tmp_path / "a")
    stopper = _StopInEpoch2()
    with pytest.raises(Preempted, match="epoch 2 after step 1"):
        fit(tiny_spec(tmp_path / "b", **extra), stopper, tmp_path / "b", should_stop=lambda: stopper.stop)
    fit(tiny_spec(tmp_path / "b", **extra), Reporter(), tmp_path / "b")
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_geometric_augmentation_works_with_a_bicubic_model_preprocessing() -> None:
    """timm models often resize bicubic, which torchvision refuses for rotations and policies on tensors."""
    prep = Preprocessing(resize=18, crop=16, interpolation="bicubic")
    a = Augment.model_validate({"rotation": 10, "affine": {"shear": 5},
                                "autoAugment": {"policy": "autoAugmentImageNet"}})
    torch.manual_seed(0)
    out = augment.train_transform(prep, a)(torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8))
    assert out.shape == (3, 16, 16)
