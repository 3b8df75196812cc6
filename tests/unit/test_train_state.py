"""TrainState and the checkpoint format: a round trip resumes bit for bit, and nothing in a checkpoint
file can run code or pass for ours."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn
from trainer_util import tiny_spec

from finetune_api.errors import JobFileError
from finetune_trainer import checkpoint as ckpt
from finetune_trainer.engine import EpochStats, EvalResult
from finetune_trainer.fit import fit
from finetune_trainer.report import Reporter
from finetune_trainer.train_state import TrainState, rng_state, set_rng_state

pytestmark = pytest.mark.unit


def _state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    model[0].requires_grad_(False)  # a frozen part, left out of the checkpoint
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return TrainState(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), frozen_digest="d")


def _steps(state: TrainState, n: int) -> None:
    """Random data and dropout drawn from the global streams: a resume must restore them to match."""
    state.model.train()
    for _ in range(n):
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        loss = nn.functional.cross_entropy(state.model(x), y)
        state.optimizer.zero_grad()
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    state.scheduler.step()


def test_a_train_state_round_trip_resumes_bit_for_bit(tmp_path: Path) -> None:
    spec = tiny_spec(tmp_path)
    straight, saved = _state(), _state()
    torch.manual_seed(1)
    _steps(straight, 5)
    torch.manual_seed(1)
    _steps(saved, 5)
    saved.end_epoch(1, EpochStats(0.5, 80, 1.0, 0), EvalResult(0.4, 0.7, None, [0.7, 0.6, 0.8], 30))
    straight.end_epoch(1, EpochStats(0.5, 80, 1.0, 0), EvalResult(0.4, 0.7, None, [0.7, 0.6, 0.8], 30))
    data = saved.state_dict()
    streams = rng_state()
    data["inEpoch"] = {"rng": streams}
    path = ckpt.save_checkpoint(tmp_path, 1, data, spec)

    loaded = ckpt.load_checkpoint(path)
    resumed = _state(seed=99)  # different initial weights: everything that trains must come from the file
    resumed.model[0].load_state_dict(_state(seed=0).model[0].state_dict())  # frozen: from the weights source
    resumed.load_state_dict(loaded)
    set_rng_state(loaded["inEpoch"]["rng"])
    _steps(resumed, 4)
    set_rng_state(streams)  # the uninterrupted run continues from the same streams
    _steps(straight, 4)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        if not name.startswith("0."):  # the frozen Linear is rebuilt from the weights source, not the file
            assert torch.equal(a, b), name
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    assert (resumed.epoch, resumed.best_epoch, resumed.resume_count) == (1, 1, 1)
    assert set(loaded["model"]) == {"1.weight", "1.bias", "1.running_mean", "1.running_var",
                                    "1.num_batches_tracked", "4.weight", "4.bias"}


class _Planted:
    """Unpickling this runs code: what a checkpoint planted in an output folder could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_a_checkpoint_whose_pickle_would_run_code_is_moved_aside_without_running_it(tmp_path: Path) -> None:
    out, marker = tmp_path / "out", tmp_path / "code-ran"
    folder = out / ckpt.CHECKPOINT_DIR
    folder.mkdir(parents=True)
    with open(folder / "epoch-0001.pt", "wb") as f:
        pickle.dump({"format": ckpt.FORMAT, "version": ckpt.VERSION, "x": _Planted(marker)}, f)
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION, "x": _Planted(marker)}, folder / "epoch-0002.pt")
    for name in ("epoch-0001.pt", "epoch-0002.pt"):
        with pytest.raises(JobFileError, match="is not a checkpoint this trainer can read"):
            ckpt.load_checkpoint(folder / name)
    said = Said()
    fit(tiny_spec(out), said, out)  # neither can be used: both moved aside, saying so, and a fresh start
    assert not marker.exists(), "the planted code ran"
    assert sorted(p.name for p in folder.glob("*.unreadable")) == ["epoch-0001.pt.unreadable",
                                                                    "epoch-0002.pt.unreadable"]
    assert next(t for t in said.warnings if "epoch-0002.pt is not a checkpoint" in t).endswith("the one before")
    assert next(t for t in said.warnings if "epoch-0001.pt is not a checkpoint" in t).endswith("starting fresh")
    assert ckpt.load_checkpoint(folder / "epoch-0002.pt")["epoch"] == 2  # the fresh run's own


class Said(Reporter):
    def __init__(self) -> None:
        self.warnings: list[str] = []

    def event(self, kind, **f):
        if kind == "message" and f.get("level") == "warning":
            self.warnings.append(f["text"])


def test_foreign_and_old_files_are_refused_with_one_line(tmp_path: Path) -> None:
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "weights.pt")
    with pytest.raises(JobFileError, match="is not a finetune-operator checkpoint"):
        ckpt.load_checkpoint(tmp_path / "weights.pt")
    torch.save({"epoch": 1, "fingerprint": "abc", "model": {}}, tmp_path / "old.pt")  # before format versions
    with pytest.raises(JobFileError, match=r"format version 1, this trainer reads version 2"):
        ckpt.load_checkpoint(tmp_path / "old.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip, not a pickle")
    with pytest.raises(JobFileError) as err:
        ckpt.load_checkpoint(tmp_path / "junk.pt")
    assert "\n" not in str(err.value)
