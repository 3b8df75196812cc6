"""The checkpoint format: what a checkpoint file holds, its version, atomic writes and safe reads.

A checkpoint is `{"format": FORMAT, "version": VERSION, "spec": …, "fingerprint": …, **TrainState}`
of tensors and plain values. Loading uses `torch.load(weights_only=True)`: a file planted in an output
folder can hold pickled code, and the restricted unpickler refuses it instead of running it. A file that
is not a checkpoint of ours, or one of another format version, is refused with one clear line.

Every file is written atomically (safe_io.atomic_write): a kill or a full disk at any instant leaves the
old file or the new one, never half of one. The last two checkpoints are kept; a resume that finds the
newest unreadable, foreign or of another format moves it aside (`*.unreadable`, never deleted) and falls
back to the one before, or starts fresh, saying so.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from finetune_api.errors import JobFileError
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer.safe_io import atomic_write, quarantine, regular_file

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# epoch-0003.pt: epoch 3 finished. epoch-0004-step-000012.pt: epoch 4 stopped after its step 12 (SIGTERM).
_NAME = re.compile(r"^epoch-(\d{4,})(?:-step-(\d{6,}))?\.pt$")
KEEP_LAST = 2
# What TrainState.load_state_dict reads unconditionally: a file without them is not a resumable checkpoint.
_FIELDS = {"epoch": int, "model": dict, "optimizer": dict, "best": dict, "history": list, "fingerprint": str}
FORMAT = "finetune-operator/checkpoint"
VERSION = 2  # 1: the unversioned files of trainers before 0.2 (they held numpy objects; not readable now)


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
    payload["digest"] = content_digest(payload)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    _prune(output / CHECKPOINT_DIR)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of ours, read without unpickling anything but tensors and plain values."""
    try:
        state = torch.load(regular_file(path, "checkpoint"), map_location="cpu", weights_only=True)
    except JobFileError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError,
            KeyError, IndexError, UnicodeDecodeError, MemoryError, OverflowError, RecursionError) as err:
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise JobFileError(f"{path} is not a checkpoint this trainer can read ({first})") from None
    if isinstance(state, dict) and "format" not in state and "fingerprint" in state:
        state = {**state, "format": FORMAT, "version": 1}  # an older trainer's: refused by version below
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise JobFileError(f"{path} is not a finetune-operator checkpoint")
    if state.get("version") != VERSION:
        raise JobFileError(f"{path} has checkpoint format version {state.get('version')!r}, this trainer reads "
                           f"version {VERSION}")
    # torch's zip reader checks no CRC: a flipped bit in a tensor would otherwise resume silently.
    if "digest" in state and state["digest"] != content_digest({k: v for k, v in state.items() if k != "digest"}):
        raise JobFileError(f"{path} is a damaged checkpoint (its content does not match the digest saved with it)")
    wrong = [k for k, kind in _FIELDS.items() if not isinstance(state.get(k), kind)]
    if wrong or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise JobFileError(f"{path} is a damaged checkpoint (missing or mistyped: {wrong or ['model tensors']})")
    return state


def content_digest(value: Any) -> str:
    """sha256 over a checkpoint's whole content: tensors by dtype, shape and bytes, the rest by type and repr,
    mappings in key order (what the file held, whatever order a loader gives it back in)."""
    h = hashlib.sha256()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            items = sorted(v.items(), key=lambda kv: (type(kv[0]).__name__, str(kv[0])))
            h.update(f"D{len(items)}".encode())
            for k, item in reversed(items):
                stack.extend([item, k])
        elif isinstance(v, list | tuple):
            h.update(f"{type(v).__name__[0]}{len(v)}".encode())
            stack.extend(reversed(v))
        else:
            h.update(f"{type(v).__name__}:{v!r};".encode())
    return h.hexdigest()


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


def latest_readable(output: Path, say: Callable[[str], None] = log.warning) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, and its content. An unreadable one (truncated, foreign, planted, of
    another format version) is moved aside with one message naming it, so the one before is tried — and a
    later save cannot prune the good one in favour of a broken file; none left: a fresh start, said so."""
    for path in reversed(_checkpoints(output / CHECKPOINT_DIR)):
        try:
            return path, load_checkpoint(path)
        except JobFileError as err:
            moved = quarantine(path)
            left = any(p != path for p in _checkpoints(output / CHECKPOINT_DIR))
            say(f"{err}; {f'moved aside to {moved.name}' if moved else 'skipped'}, "
                f"{'resuming from the one before' if left else 'starting fresh'}")
    return None


def load_for_resume(path: Path, spec: FineTuneJobSpec, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint (or take its loaded `state`) and refuse it, clearly, when the spec changed in a way
    resuming can't honour: that run is kept, not overwritten."""
    state = load_checkpoint(path) if state is None else state
    old = state.get("fingerprint")
    if old != spec.resume_fingerprint():
        raise JobFileError(
            f"output.path already holds a run with a different spec ({path.parent}); changing model, "
            "dataset, freeze, head or optimisation settings cannot resume — use a new output path "
            "or delete the checkpoints"
        )
    return state
