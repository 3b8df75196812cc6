"""The checkpoint format: what a checkpoint file holds, its version, atomic writes and safe reads.

A checkpoint is `{"format": FORMAT, "version": VERSION, "spec": …, "fingerprint": …, **TrainState}`
of tensors and plain values. Loading uses `torch.load(weights_only=True)`: a file planted in an output
folder can hold pickled code, and the restricted unpickler refuses it instead of running it. A file that
is not a checkpoint of ours, or one of another format version, is refused with one clear line.

Every file is written to a temp name in the same directory and `os.replace`d, so a kill at any
instant leaves either the old file or the new one — never half of one.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from finetune_api.errors import JobFileError
from finetune_api.spec import FineTuneJobSpec

CHECKPOINT_DIR = "checkpoints"
# epoch-0003.pt: epoch 3 finished. epoch-0004-step-000012.pt: epoch 4 stopped after its step 12 (SIGTERM).
_NAME = re.compile(r"^epoch-(\d{4,})(?:-step-(\d{6,}))?\.pt$")
KEEP_LAST = 2
FORMAT = "finetune-operator/checkpoint"
VERSION = 2  # 1: the unversioned files of trainers before 0.2 (they held numpy objects; not readable now)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) then rename it over `path`; the temp file never outlives a failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; exports are read by other users (serving pods)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_path(output: Path, epoch: int, step: int | None = None) -> Path:
    """`epoch` finished, or — with `step` — `epoch` in progress, stopped after `step`."""
    suffix = f"-step-{step:06d}" if step is not None else ""
    return output / CHECKPOINT_DIR / f"epoch-{epoch:04d}{suffix}.pt"


def save_checkpoint(output: Path, epoch: int, state: dict[str, Any], spec: FineTuneJobSpec,
                    step: int | None = None) -> Path:
    """Write `state` (a TrainState.state_dict(), plus any mid-epoch data) with the format header and spec."""
    path = checkpoint_path(output, epoch, step)
    payload = {"format": FORMAT, "version": VERSION, "spec": spec.to_wire(),
               "fingerprint": spec.resume_fingerprint(), **state}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    _prune(output / CHECKPOINT_DIR)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of ours, read without unpickling anything but tensors and plain values."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise JobFileError(f"{path} is not a checkpoint this trainer can read ({first}); delete it or use "
                           "a new output path") from None
    if isinstance(state, dict) and "format" not in state and "fingerprint" in state:
        state = {**state, "format": FORMAT, "version": 1}  # an older trainer's: refused by version below
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise JobFileError(f"{path} is not a finetune-operator checkpoint; delete it or use a new output path")
    if state.get("version") != VERSION:
        raise JobFileError(f"{path} has checkpoint format version {state.get('version')!r}, this trainer reads "
                           f"version {VERSION}; delete the checkpoints or use a new output path")
    return state


def position(path: Path) -> tuple[int, int, int]:
    """Training order: epoch 4 stopped at any step comes after epoch 3 finished, before epoch 4 finished."""
    m = _NAME.match(path.name)
    assert m is not None
    epoch, step = int(m[1]), m[2]
    return (epoch, 0, int(step)) if step is not None else (epoch, 1, 0)


def _checkpoints(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _NAME.match(p.name)), key=position)


def _prune(folder: Path) -> None:
    for old in _checkpoints(folder)[:-KEEP_LAST]:
        old.unlink(missing_ok=True)


def latest_checkpoint(output: Path) -> Path | None:
    found = _checkpoints(output / CHECKPOINT_DIR)
    return found[-1] if found else None


def load_for_resume(path: Path, spec: FineTuneJobSpec) -> dict[str, Any]:
    """Load a checkpoint and refuse it, clearly, when the spec changed in a way resuming can't honour."""
    state = load_checkpoint(path)
    old = state.get("fingerprint")
    if old != spec.resume_fingerprint():
        raise JobFileError(
            f"output.path already holds a run with a different spec ({path.parent}); changing model, "
            "dataset, freeze, head or optimisation settings cannot resume — use a new output path "
            "or delete the checkpoints"
        )
    return state
