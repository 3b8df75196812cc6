"""Classify images with an export: the model is rebuilt from model.json, never unpickled."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from finetune_api.errors import JobFileError
from finetune_api.spec import Head
from finetune_trainer.data import Preprocessing
from finetune_trainer.export import MAX_META_BYTES, META_FILE, export_problem, sha256_file
from finetune_trainer.model import new_model, replace_head
from finetune_trainer.safe_io import first_line, read_bytes, regular_file


def rebuild_model(meta: dict, weights: Path) -> torch.nn.Module:
    """The exported network from model.json's architecture, library and head, with its weights, in eval mode."""
    model = new_model(meta["architecture"], meta.get("library", "torchvision"))
    replace_head(model, meta["numClasses"], Head.model_validate(meta.get("head", {})))
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def read_meta(folder: Path, where: str = "--model") -> tuple[dict, Path]:
    """model.json and the weights file it names, checked: a hostile or broken export is one JobFileError."""
    try:
        meta = json.loads(read_bytes(folder / META_FILE, MAX_META_BYTES, where))
    except OSError as err:
        raise JobFileError(f"{where}: {folder} holds no readable {META_FILE} ({err.strerror})") from None
    except (ValueError, RecursionError) as err:
        raise JobFileError(f"{where}: {folder / META_FILE} is not valid JSON ({first_line(err)})") from None
    problem = export_problem(meta, folder)
    if problem:
        raise JobFileError(f"{where}: {folder} is not a usable export: {problem}")
    return meta, regular_file(folder / meta["weightsFile"], where)


def rebuild_checked(meta: dict, weights: Path, where: str = "--model") -> tuple[torch.nn.Module, Preprocessing]:
    """rebuild_model and the preprocessing, any failure of a file that parses but does not fit as one line."""
    try:
        return rebuild_model(meta, weights), Preprocessing.from_json(meta["preprocessing"])
    except JobFileError:
        raise
    except Exception as err:  # unknown architecture, a head or tensors that do not fit, a corrupt safetensors
        raise JobFileError(f"{where}: cannot rebuild the model of {weights.parent} ({type(err).__name__}: "
                           f"{first_line(err)})") from None


@dataclass
class Predictor:
    model: torch.nn.Module
    classes: list[str]
    preprocessing: Preprocessing

    @classmethod
    def load(cls, folder: str | Path, verify: bool = True) -> Predictor:
        meta, weights = read_meta(Path(folder))
        if verify and sha256_file(weights) != meta["sha256"]:
            raise JobFileError(f"--model: {weights} does not match the sha256 in {META_FILE}")
        model, prep = rebuild_checked(meta, weights)
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
                with Image.open(regular_file(Path(p), "image")) as im:  # a FIFO would block the open
                    images.append(im.convert("RGB"))
                chunk.append(p)
            except Exception:  # not an image, a bomb, a FIFO, or one of the many errors PIL raises for crafted data
                out.append((p, []))
        if images:
            out += list(zip(chunk, predictor.predict(images, top), strict=True))
    return out


def evaluate_folder(model_dir: Path, data: Path, report_dir: str | Path | None = None,
                    batch_size: int = 64) -> dict:
    """The export's evaluation report on an ImageFolder whose class folders are (some of) the model's classes."""
    from finetune_trainer.data import folder_samples_for
    from finetune_trainer.engine import Compute, Precision
    from finetune_trainer.model_report import predict_probabilities, write_report
    from finetune_trainer.pass_input import eval_input

    predictor = Predictor.load(model_dir)
    samples, skipped = folder_samples_for(data, predictor.classes)
    folder = Path(report_dir) if report_dir else model_dir / f"eval-{data.resolve().name}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise JobFileError(f"--report-dir: cannot create {folder} ({err.strerror})") from None
    cpu = Compute(torch.device("cpu"), Precision("fp32", None, "cpu"))
    loader = eval_input(samples, predictor.preprocessing, batch_size, 0, cpu.device)
    labels, probs = predict_probabilities(predictor.model, loader, cpu)
    summary = write_report(folder, labels, probs, predictor.classes, split=f"folder:{data}",
                           extra={"model": str(model_dir), "skippedImages": skipped})
    return {**summary, "reportDir": str(folder)}
