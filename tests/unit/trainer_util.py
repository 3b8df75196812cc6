"""Helpers shared by the trainer tests: tiny jobs on the bundled digits and image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from finetune_api.spec import FineTuneJobSpec, parse_spec
from finetune_trainer.report import Reporter


def tiny_spec(output: Path | str, **overrides) -> FineTuneJobSpec:
    """resnet18 at 16 px on three digit classes: seconds per epoch on two CPU cores."""
    spec = {
        "model": {"architecture": "resnet18", "weights": {"source": "none"}},
        "dataset": {"builtin": "digits", "classes": ["0", "1", "2"], "imageSize": 16, "maxImagesPerClass": 40},
        "training": {"epochs": 2, "batchSize": 32, "learningRate": 0.01, "device": "cpu", "seed": 0},
        "output": {"path": str(output)},
    }
    for dotted, value in overrides.items():
        node = spec
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_spec(spec)


class StopAfterEpoch(Reporter):
    """Asks fit() to stop once epoch `epoch` has ended (a stand-in for SIGTERM between epochs)."""

    def __init__(self, epoch: int):
        self.epoch, self.stop = epoch, False

    def event(self, kind, **f):
        if kind == "epoch" and f["epoch"] == self.epoch:
            self.stop = True


def write_job(path: Path, spec: dict, name: str = "t") -> Path:
    doc = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
    path.write_text(yaml.safe_dump(doc))
    return path


def make_image_folder(root: Path, classes: dict[str, int], size: int = 12, seed: int = 0) -> Path:
    """Class folders of small PNGs whose brightness pattern depends on the class (learnable)."""
    rng = np.random.default_rng(seed)
    for k, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            img[:, k * 3:(k + 1) * 3] = 250
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root
