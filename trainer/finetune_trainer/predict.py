"""Classify images with an export: the model is rebuilt from model.json, never unpickled."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file

from finetune_trainer.data import Preprocessing
from finetune_trainer.errors import JobFileError
from finetune_trainer.export import META_FILE, sha256_file
from finetune_trainer.model import new_model, replace_head
from finetune_trainer.spec import Head


@dataclass
class Predictor:
    model: torch.nn.Module
    classes: list[str]
    preprocessing: Preprocessing

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> Predictor:
        folder = Path(folder)
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, ValueError) as err:
            raise JobFileError(f"--model: {folder} holds no readable {META_FILE} ({err})") from None
        weights = folder / meta["weightsFile"]
        if verify and sha256_file(weights) != meta["sha256"]:
            raise JobFileError(f"--model: {weights} does not match the sha256 in {META_FILE}")
        model = new_model(meta["architecture"])
        replace_head(model, meta["numClasses"], Head.model_validate(meta.get("head", {})))
        model.load_state_dict(load_file(str(weights)))
        model.eval()
        p = meta["preprocessing"]
        prep = Preprocessing(p["resize"], p["crop"], tuple(p["mean"]), tuple(p["std"]))
        return cls(model, meta["classes"], prep)

    @torch.inference_mode()
    def predict(self, images: list[Image.Image], top: int = 1) -> list[list[tuple[str, float]]]:
        tf = self.preprocessing.eval_transform()
        batch = torch.stack([tf(im.convert("RGB")) for im in images])
        probs = self.model(batch).softmax(dim=1)
        values, idx = probs.topk(min(top, probs.shape[1]), dim=1)
        return [[(self.classes[i], float(v)) for v, i in zip(vs, ix, strict=True)]
                for vs, ix in zip(values.tolist(), idx.tolist(), strict=True)]


def predict_files(model_dir: str, paths: list[str], top: int = 1, batch_size: int = 64) -> list[tuple[str, list]]:
    """(path, [(class, probability)...]) per image; unreadable images yield an empty list."""
    predictor = Predictor.load(model_dir)
    out: list[tuple[str, list]] = []
    for start in range(0, len(paths), batch_size):
        chunk, images = [], []
        for p in paths[start:start + batch_size]:
            try:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
                chunk.append(p)
            except (OSError, UnidentifiedImageError):
                out.append((p, []))
        if images:
            out += list(zip(chunk, predictor.predict(images, top), strict=True))
    return out
