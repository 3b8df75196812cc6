"""The distillation teacher: loaded once, frozen, run in the frozen pass's precision on the student's batches.

The teacher is an export folder (`teacher.fromJob`: model.safetensors + model.json, rebuilt by the same code
as `predict`) or `teacher.model` with a weights file whose model.json (an export's) lies beside it — the
teacher's classes must be known and equal the student's, names and order, or the job fails before training.

Renormalisation: the teacher sees the student's batch, mapped to the teacher's preprocessing. Normalisation
is an affine map per channel, so `x_t = x_s * std_s / std_t + (mean_s - mean_t) / std_t` is exactly the
image normalised with the teacher's mean/std; a different crop size is resized (bilinear, antialiased) to
the teacher's crop. The field of view stays the student's (its resize and crop), so both models judge the
same pixels. The same map runs whether the outputs are cached or computed per batch, so they agree.

Its outputs on the train set are kept on disk like frozen features (`<output>/cache/teacher-<key>.pt`, the
key made by feature_store.cache_key with the teacher's digest and preprocessing in place of the frozen
weights'), together with its val/test accuracy, so a resumed run never runs the teacher again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from finetune_api.errors import JobFileError
from finetune_api.spec import Head, Teacher
from finetune_trainer import feature_store, features
from finetune_trainer.cached_views import SeededViews
from finetune_trainer.checkpoint import atomic_write
from finetune_trainer.data import Preprocessing, Splits, eval_loader
from finetune_trainer.distributed import Dist, shard
from finetune_trainer.engine import Compute
from finetune_trainer.export import META_FILE, WEIGHTS_FILE, read_export, sha256_file
from finetune_trainer.model import find_head, new_model, read_state_dict, replace_head
from finetune_trainer.predict import rebuild_model

PREFIX = "teacher-"
log = logging.getLogger(__name__)


@dataclass
class LoadedTeacher:
    model: nn.Module  # eval mode, requires_grad False, on the CPU until `runner` places it
    classes: list[str]
    preprocessing: Preprocessing
    identity: dict  # model.json's distillation.teacher: where it came from, architecture, library, sha256

    @property
    def digest(self) -> str:
        return self.identity["sha256"]


def load(teacher: Teacher, student_prep: Preprocessing) -> LoadedTeacher:
    """The teacher of `spec.distillation.teacher`; a bad one is one JobFileError line."""
    if teacher.from_job is not None:
        loaded = _from_export(Path(teacher.from_job))
    else:
        loaded = _from_model_spec(teacher.model, student_prep)
    loaded.model.eval().requires_grad_(False)
    return loaded


def _from_export(folder: Path) -> LoadedTeacher:
    where = f"distillation.teacher.fromJob: {folder}"
    meta = read_export(folder)
    if meta is None:
        raise JobFileError(f"{where} holds no export ({META_FILE} + {WEIGHTS_FILE}, as a finished job writes)")
    weights = folder / meta["weightsFile"]
    digest = sha256_file(weights)
    if digest != meta.get("sha256"):
        raise JobFileError(f"{where}: {weights.name} does not match the sha256 in {META_FILE}")
    try:
        model = rebuild_model(meta, weights)
    except Exception as err:  # an export of another trainer version, a renamed architecture, ...
        raise JobFileError(f"{where}: cannot rebuild the model ({type(err).__name__}: {str(err)[:160]})") from None
    identity = {"fromJob": str(folder), "library": meta.get("library", "torchvision"),
                "architecture": meta["architecture"], "weightsFile": str(weights), "sha256": digest}
    return LoadedTeacher(model, list(meta["classes"]), Preprocessing.from_json(meta["preprocessing"]), identity)


def _from_model_spec(spec, student_prep: Preprocessing) -> LoadedTeacher:
    where = "distillation.teacher.model"
    if spec.weights.source != "file":
        raise JobFileError(f"{where}: the teacher's classes must be known — use weights.source file with the "
                           f"{META_FILE} of its export beside the weights file, or teacher.fromJob")
    path = Path(spec.weights.path)
    try:
        meta = json.loads((path.parent / META_FILE).read_text())
        classes = [str(c) for c in meta["classes"]]
        model = new_model(spec.architecture, spec.library)
        replace_head(model, len(classes), Head.model_validate(meta.get("head", {})))
        prep = Preprocessing.from_json(meta["preprocessing"]) if "preprocessing" in meta else student_prep
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # pydantic's too
        raise JobFileError(f"{where}: no readable {META_FILE} with the teacher's classes beside {path}") from None
    state = read_state_dict(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0][:160]
        raise JobFileError(f"{where}: {path} does not fit {spec.architecture} with {len(classes)} classes "
                           f"({first})") from None
    identity = {"model": spec.model_dump(mode="json"), "library": spec.library, "architecture": spec.architecture,
                "weightsFile": str(path), "sha256": sha256_file(path)}
    return LoadedTeacher(model, classes, prep, identity)


def check_classes(teacher: list[str], student: list[str]) -> None:
    """Names and order: the teacher's output k must mean the student's class k."""
    if teacher == student:
        return
    at = next((i for i, (a, b) in enumerate(zip(teacher, student, strict=False)) if a != b), min(len(teacher),
                                                                                                  len(student)))
    raise JobFileError(f"distillation.teacher: the teacher's classes {_short(teacher)} are not the student's "
                       f"{_short(student)} (names and order must be equal; first difference at position {at})")


def _short(names: list[str]) -> str:
    return str(names) if len(names) <= 12 else f"{names[:12]}… ({len(names)})"


def last_linear(head: nn.Module) -> nn.Linear | None:
    """The head's output Linear: its input is the model's pooled pre-logits features."""
    found = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return found[-1] if found else None


def renormaliser(student: Preprocessing, teacher: Preprocessing):
    """x normalised for the student → for the teacher (see the module docstring); None when they agree."""
    s_mean, s_std = torch.tensor(student.mean), torch.tensor(student.std)
    t_mean, t_std = torch.tensor(teacher.mean), torch.tensor(teacher.std)
    same_norm = torch.equal(s_mean, t_mean) and torch.equal(s_std, t_std)
    if same_norm and student.crop == teacher.crop:
        return None
    scale, shift = (s_std / t_std).view(1, 3, 1, 1), ((s_mean - t_mean) / t_std).view(1, 3, 1, 1)

    def renormalise(x: torch.Tensor) -> torch.Tensor:
        if not same_norm:
            x = x * scale.to(x.device) + shift.to(x.device)
        if x.shape[-1] != teacher.crop or x.shape[-2] != teacher.crop:
            x = F.interpolate(x, size=(teacher.crop, teacher.crop), mode="bilinear", antialias=True,
                              align_corners=False)
        return x

    return renormalise


class _Stop(Exception):
    """Raised by the pre-logits hook when the logits are not needed."""


class Runner:
    """The teacher placed for the frozen pass: `__call__(images)` → (logits, pooled pre-logits or None)."""

    def __init__(self, teacher: LoadedTeacher, student_prep: Preprocessing, compute: Compute, want_features: bool):
        model = features.frozen_pass_model(teacher.model, compute.precision).to(compute.device)
        if compute.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.compute, self.want_features = model, compute, want_features
        self.linear = last_linear(model.get_submodule(find_head(model)))
        self.renormalise = renormaliser(student_prep, teacher.preprocessing)

    @torch.no_grad()  # not inference_mode: the outputs meet the student's graph in the loss
    def __call__(self, images: torch.Tensor, logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x = self.compute.batch(images)
        if self.renormalise is not None:
            x = self.renormalise(x)
        seen: list[torch.Tensor] = []

        def grab(module, args):
            seen.append(args[0].float())
            if not logits:
                raise _Stop

        handle = self.linear.register_forward_pre_hook(grab) if self.want_features else None
        out = None
        try:
            with self.compute.precision.autocast(), contextlib.suppress(_Stop):
                out = self.model(x).float()
        finally:
            if handle is not None:
                handle.remove()
        return out, (seen[-1] if seen else None)

    def signal(self, images: torch.Tensor) -> torch.Tensor:
        """What the distillation loss compares with: logits, or pooled pre-logits for `feature`."""
        out, feats = self(images, logits=not self.want_features)
        return feats if self.want_features else out


class Indexed(Dataset):
    """A dataset whose items carry their index, so each batch knows which cached teacher rows are its own."""

    def __init__(self, items: Dataset):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        item = self.items[i]
        return None if item is None else (*item, i)


def train_outputs(runner: Runner, loader: DataLoader, batch_size: int, dist: Dist, views: int = 0,
                  seed: int = 0) -> torch.Tensor:
    """The teacher's signal for every training image, in dataset order: (N, D), or with cached views
    (K*N, D) in ViewsDataset's flat order (view k of image i at row k*N + i, view k under SeededViews).

    Data parallel: each rank computes a contiguous shard; the rows are gathered on every rank."""
    dataset = loader.dataset
    n = len(dataset)

    def one_pass(data: Dataset) -> torch.Tensor:
        order = {"sampler": shard(n, dist.world, dist.rank)} if dist.active else {"shuffle": False}
        rows, index = [], []
        for batch in DataLoader(Indexed(data), batch_size=batch_size, collate_fn=loader.collate_fn,
                                num_workers=loader.num_workers, **order):
            if batch is None:
                continue
            rows.append(runner.signal(batch[0]).cpu())
            index.append(batch[-1])
        rows_t, index_t = torch.cat(rows), torch.cat(index)
        if dist.active:
            rows_t, index_t = dist.concat_rows(rows_t), dist.concat_rows(index_t)
        out = rows_t.new_zeros((n, rows_t.shape[1]))  # a broken image's row stays zero: it never trains
        out[index_t] = rows_t
        return out

    if not views:
        return one_pass(dataset)
    with torch.random.fork_rng(devices=[]):  # the per-image seeds leave the run's own stream as it was
        return torch.cat([one_pass(SeededViews(dataset, seed, k)) for k in range(views)])


def accuracy(runner: Runner, loader: DataLoader) -> float | None:
    """Top-1 accuracy of the teacher on `loader` (the student's preprocessing, renormalised)."""
    hits = total = 0
    for batch in loader:
        if batch is None:
            continue
        logits, _ = runner(batch[0])
        hits += int((logits.argmax(1).cpu() == batch[1]).sum())
        total += len(batch[1])
    return hits / total if total else None


def scores(runner: Runner, splits: Splits, prep: Preprocessing, batch_size: int) -> dict:
    """The teacher's val (and test, when there is a test split) accuracy on this job's data."""
    out = {"valAccuracy": accuracy(runner, eval_loader(splits.val, prep, batch_size))}
    if splits.test:
        out["testAccuracy"] = accuracy(runner, eval_loader(splits.test, prep, batch_size))
    return out


def cache_key(splits: Splits, prep: Preprocessing, teacher: LoadedTeacher, kind: str, compute: Compute,
              views: dict | None) -> str:
    """feature_store's key rules: every image (val and test too: their scores are stored), labels, classes,
    the student's preprocessing, the teacher's weights digest and preprocessing, precision, layout, views."""
    every = dataclasses.replace(splits, val=splits.val + splits.test)
    who = f"{teacher.digest}/{json.dumps(teacher.preprocessing.to_json(), sort_keys=True)}"
    return feature_store.cache_key(every, prep, f"teacher/{kind}", who, compute.precision.name,
                                   compute.channels_last, views=views)


def store_path(output: Path, key: str) -> Path:
    return output / feature_store.CACHE_DIR / f"{PREFIX}{key[:32]}.pt"


def load_store(output: Path, key: str) -> dict | None:
    """{"train": tensor | None, "scores": {...}} for `key`, or None (absent, unreadable, another key)."""
    path = store_path(output, key)
    if not path.exists():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        return data if data.get("key") == key else None
    except Exception as err:  # a broken file only costs the teacher pass, never the run
        log.warning("teacher cache %s unreadable (%s): computing it again", path.name, type(err).__name__)
        return None


def save_store(output: Path, key: str, train: torch.Tensor | None, scores_: dict) -> str | None:
    """Written atomically; files of other keys deleted. A full or read-only volume costs a retry the pass."""
    path = store_path(output, key)
    try:
        atomic_write(path, lambda tmp: torch.save({"key": key, "train": train, "scores": scores_}, tmp))
        for old in path.parent.glob(f"{PREFIX}*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
    except OSError as err:
        log.warning("teacher cache not saved (%s): a retry computes it again", err)
        return None
    return "written"
