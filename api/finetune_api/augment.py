"""spec.dataset.augment: random changes to training images, as torchvision.transforms.v2 implements them.

Part of the FineTuneJob spec (re-exported by finetune_api.spec); like it, no torch here. Every
augmentation is off by default, and the first three fields keep their v1alpha1 meaning exactly. A
[min, max] pair is a two-item list, not a tuple or a union: the CRD is generated from this model and
Kubernetes structural schemas need one type per field. Pairs must be ordered; rules between fields
are mirrored as CEL rules in finetune_operator.crd.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from finetune_api.base import _Model


def _range(lo: float, hi: float):
    """A [min, max] pair, each value in (lo, hi]."""
    return Annotated[list[Annotated[float, Field(gt=lo, le=hi)]], Field(min_length=2, max_length=2)]


AreaRange = _range(0.0, 1.0)
FactorRange = _range(0.0, 10.0)
SigmaRange = _range(0.0, 100.0)


def _ordered(value: list[float] | None) -> list[float] | None:
    if value is not None and value[0] > value[1]:
        raise ValueError("must be [min, max] with min <= max")
    return value


class Affine(_Model):
    """RandomAffine on training images; each part is off at its default."""

    translate: float = Field(0.0, ge=0.0, le=1.0, description="largest shift, as a fraction of width and height "
                             "(0 = none)")
    scale: FactorRange | None = Field(None, description="[min, max] zoom factor, e.g. [0.9, 1.1] (unset = none)")
    shear: float = Field(0.0, ge=0.0, le=90.0, description="largest shear along x in degrees (0 = none)")

    _scale_ordered = field_validator("scale")(_ordered)

    @property
    def active(self) -> bool:
        return self.translate > 0 or self.scale is not None or self.shear > 0


class ColorJitterDetail(_Model):
    """ColorJitter with a strength per component (torchvision's meaning); instead of colorJitter, not with it."""

    brightness: float = Field(0.0, ge=0.0, le=1.0, description="factor drawn from [1 - b, 1 + b] (0 = off)")
    contrast: float = Field(0.0, ge=0.0, le=1.0, description="factor drawn from [1 - c, 1 + c] (0 = off)")
    saturation: float = Field(0.0, ge=0.0, le=1.0, description="factor drawn from [1 - s, 1 + s] (0 = off)")
    hue: float = Field(0.0, ge=0.0, le=0.5, description="hue shift drawn from [-h, h] (0 = off)")

    @property
    def active(self) -> bool:
        return max(self.brightness, self.contrast, self.saturation, self.hue) > 0


class GaussianBlur(_Model):
    """GaussianBlur applied to a share of the training images."""

    kernel_size: int = Field(3, ge=1, le=99, description="odd side of the blur kernel in pixels, at most "
                             "dataset.imageSize")
    sigma: SigmaRange = Field([0.1, 2.0], description="[min, max] standard deviation of the blur in pixels")
    probability: float = Field(0.5, gt=0.0, le=1.0, description="share of training images blurred")

    _sigma_ordered = field_validator("sigma")(_ordered)

    @field_validator("kernel_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd")
        return value


AUTO_AUGMENT_POLICIES = ("randAugment", "trivialAugmentWide", "autoAugmentImageNet")
# torchvision's RandAugment defaults, used when numOps / magnitude are not set.
RAND_AUGMENT_NUM_OPS = 2
RAND_AUGMENT_MAGNITUDE = 9


class AutoAugment(_Model):
    """One automatic augmentation policy, as torchvision implements it."""

    policy: Literal[AUTO_AUGMENT_POLICIES] = Field(  # type: ignore[valid-type]
        description="randAugment (numOps, magnitude) | trivialAugmentWide | autoAugmentImageNet (AutoAugment's "
        "ImageNet policy)")
    num_ops: int | None = Field(None, ge=1, le=16,
                                description=f"randAugment: transforms per image (default {RAND_AUGMENT_NUM_OPS})")
    magnitude: int | None = Field(None, ge=0, le=30, description="randAugment: strength on torchvision's 0-30 scale "
                                  f"(default {RAND_AUGMENT_MAGNITUDE})")

    @model_validator(mode="after")
    def _rand_augment_only(self) -> AutoAugment:
        if self.policy != "randAugment" and (self.num_ops is not None or self.magnitude is not None):
            raise ValueError("dataset.augment.autoAugment.numOps and magnitude are only valid with policy "
                             "'randAugment'")
        return self


class Augment(_Model):
    """Random changes to training images (val and test images are never augmented); all off by default."""

    random_resized_crop: bool = Field(False, description="RandomResizedCrop on training images")
    random_resized_crop_scale: AreaRange | None = Field(
        None, description="randomResizedCrop: [min, max] share of the image area kept (default [0.08, 1.0])")
    random_resized_crop_ratio: FactorRange | None = Field(
        None, description="randomResizedCrop: [min, max] aspect ratio of the crop (default [0.75, 1.333])")
    horizontal_flip: bool = Field(False, description="RandomHorizontalFlip on training images")
    vertical_flip: bool = Field(False, description="RandomVerticalFlip on training images")
    rotation: float = Field(0.0, ge=0.0, le=180.0, description="random rotation within +/- rotation degrees (0 = off)")
    affine: Affine | None = Field(None, description="random shift, zoom and shear (RandomAffine)")
    color_jitter: float = Field(0.0, ge=0.0, le=1.0, description="ColorJitter strength (0 = off)")
    color_jitter_detail: ColorJitterDetail | None = Field(
        None, description="ColorJitter per component, hue included (instead of colorJitter)")
    random_grayscale: float = Field(0.0, ge=0.0, le=1.0, description="probability of a grey image (0 = off)")
    gaussian_blur: GaussianBlur | None = Field(None, description="random Gaussian blur")
    auto_augment: AutoAugment | None = Field(None, description="an automatic augmentation policy")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="probability of erasing a random rectangle "
                                  "(0 = off)")
    mixup_alpha: float = Field(0.0, ge=0.0, le=10.0, description="MixUp of whole batches, Beta(alpha, alpha) "
                               "weights; soft targets (0 = off)")
    cutmix_alpha: float = Field(0.0, ge=0.0, le=10.0, description="CutMix of whole batches, Beta(alpha, alpha) "
                                "areas; soft targets (0 = off; with mixupAlpha, one of the two per batch)")

    _crop_ranges_ordered = field_validator("random_resized_crop_scale", "random_resized_crop_ratio")(_ordered)

    @model_validator(mode="after")
    def _consistent(self) -> Augment:
        if not self.random_resized_crop and (self.random_resized_crop_scale or self.random_resized_crop_ratio):
            raise ValueError("dataset.augment.randomResizedCropScale and randomResizedCropRatio need "
                             "dataset.augment.randomResizedCrop: true")
        # Both would be two meanings for the same three strengths: colorJitter keeps exactly its own.
        if self.color_jitter_detail is not None and self.color_jitter > 0:
            raise ValueError("dataset.augment.colorJitterDetail replaces dataset.augment.colorJitter: set one of them")
        return self

    @property
    def random_fields(self) -> list[str]:
        """Wire names of the augmentations that are on (each one random), e.g. for the feature cache's reason."""
        on = {
            "random_resized_crop": self.random_resized_crop,
            "horizontal_flip": self.horizontal_flip,
            "vertical_flip": self.vertical_flip,
            "rotation": self.rotation > 0,
            "affine": self.affine is not None and self.affine.active,
            "color_jitter": self.color_jitter > 0,
            "color_jitter_detail": self.color_jitter_detail is not None and self.color_jitter_detail.active,
            "random_grayscale": self.random_grayscale > 0,
            "gaussian_blur": self.gaussian_blur is not None,
            "auto_augment": self.auto_augment is not None,
            "random_erasing": self.random_erasing > 0,
            "mixup_alpha": self.mixup_alpha > 0,
            "cutmix_alpha": self.cutmix_alpha > 0,
        }
        return [type(self).model_fields[name].alias for name, active in on.items() if active]

    @property
    def any_random(self) -> bool:
        return bool(self.random_fields)

    @property
    def mixes_batches(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


# Fields added after v1alpha1's first release (which had the first three), with their defaults: at these
# values they leave a spec's resume fingerprint as an earlier trainer computed it.
ADDED_FIELDS = {name: field.default for name, field in Augment.model_fields.items()
                if name not in ("random_resized_crop", "horizontal_flip", "color_jitter")}
