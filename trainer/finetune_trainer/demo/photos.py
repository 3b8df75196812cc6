"""A small natural-image task from photographs that ship inside the scikit-image wheel (no download).

Eleven photos — an astronaut, a cat, a coffee cup, a rocket launch, a motorcycle, deep-field galaxies,
coins, tissue under a microscope, and grass, brick and gravel textures — each become a class; the
images are random square patches of them. The task is "which photo is this patch from", made honest:

- patches for train come from the left 60 % of each photo, val from the top and test from the bottom
  half of the right 40 %, so val and test show parts of each scene that training never saw;
- every patch gets random colour jitter and, at random, loses its colour, so the class cannot be read
  off a colour histogram: it takes features that know what fur, cups, sky or coins look like.

Written as an ImageFolder (`<root>/{train,val,test}/<class>/*.png`) that a FineTuneJob reads with
`dataset.path`; deterministic for a seed (numpy for geometry, a forked torch generator for colour).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T


def _photos() -> dict[str, Callable[[], np.ndarray]]:
    from skimage import data

    return {
        "astronaut": data.astronaut, "cat": data.chelsea, "coffee": data.coffee, "rocket": data.rocket,
        "motorcycle": lambda: data.stereo_motorcycle()[0], "galaxies": data.hubble_deep_field,
        "coins": data.coins, "tissue": data.immunohistochemistry, "grass": data.grass, "brick": data.brick,
        "gravel": data.gravel,
    }


# (x0, x1, y0, y1) as fractions of the photo: disjoint regions per split.
REGIONS = {"train": (0.0, 0.6, 0.0, 1.0), "val": (0.6, 1.0, 0.0, 0.5), "test": (0.6, 1.0, 0.5, 1.0)}
COUNTS = {"train": 40, "val": 15, "test": 15}
SIZE = 146  # the timm eval transform resizes to imageSize / crop_pct = 128 / 0.875 and crops 128
VERSION = 1  # bump when the recipe changes: a folder written by another recipe is rebuilt


def _patches(photo: Image.Image, region: tuple[float, float, float, float], n: int,
             rng: np.random.Generator) -> list[Image.Image]:
    w, h = photo.size
    x0, x1, y0, y1 = region[0] * w, region[1] * w, region[2] * h, region[3] * h
    most = min(x1 - x0, y1 - y0)
    out = []
    for _ in range(n):
        side = most * rng.uniform(0.5, 1.0)
        x, y = rng.uniform(x0, x1 - side), rng.uniform(y0, y1 - side)
        patch = photo.crop((round(x), round(y), round(x + side), round(y + side)))
        patch = patch.resize((SIZE, SIZE), Image.Resampling.BICUBIC)
        out.append(patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else patch)
    return out


def build(root: Path, seed: int = 0, counts: dict[str, int] | None = None) -> Path:
    """Write the ImageFolder under `root` (reused when a complete one of this recipe and seed is there)."""
    counts = counts or COUNTS
    stamp = root / "dataset.json"
    recipe = {"recipe": "skimage-photo-patches", "version": VERSION, "seed": seed, "counts": counts, "size": SIZE}
    if stamp.is_file() and json.loads(stamp.read_text()).get("recipe_args") == recipe:
        return root
    colour = T.Compose([T.ColorJitter(0.4, 0.4, 0.4, 0.1), T.RandomGrayscale(0.3)])
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, load in _photos().items():
            photo = Image.fromarray(load()).convert("RGB")
            for split, n in counts.items():
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                for i, patch in enumerate(_patches(photo, REGIONS[split], n, rng)):
                    colour(patch).save(folder / f"{name}-{i:03d}.png")
    stamp.write_text(json.dumps({"recipe_args": recipe, "classes": sorted(_photos())}, indent=2) + "\n")
    return root
