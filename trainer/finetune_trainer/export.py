"""The export: `model.safetensors` (+ the portable formats) + `model.json`, each written atomically, model.json last.

model.json is the commit marker: a reader that finds it can trust the weights file next to it
(its sha256 is inside). A run killed mid-export leaves the previous export intact or none.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from finetune_api.errors import JobFileError
from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import __version__
from finetune_trainer.data import Preprocessing
from finetune_trainer.safe_io import atomic_write, read_bytes

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 1
MAX_META_BYTES = 64 << 20  # history and evaluation included, a model.json is kilobytes
_META_FIELDS = {"weightsFile": str, "sha256": str, "classes": list, "numClasses": int, "architecture": str,
                "preprocessing": dict, "metrics": dict, "bestEpoch": int}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _test_metrics(evaluation: dict[str, Any] | None) -> dict[str, Any]:
    if not evaluation or evaluation.get("split") != "test":
        return {}
    return {"testAccuracy": evaluation["accuracy"], "testTopK": evaluation["topK"]}


def export_problem(meta: object, folder: Path) -> str | None:
    """What makes a model.json unusable (None: nothing): readers index these fields without looking, so a
    hostile or truncated file is refused here with one line instead of a KeyError deep in a loader."""
    if not isinstance(meta, dict):
        return f"{META_FILE} is not a JSON object"
    wrong = [k for k, kind in _META_FIELDS.items() if not isinstance(meta.get(k), kind)]
    if wrong:
        return f"{META_FILE} lacks or mistypes {wrong}"
    name = meta["weightsFile"]
    if Path(name).name != name or name in ("", ".", ".."):  # a plain file name: never a path out of the export
        return f"{META_FILE} names weights outside the export folder ({name!r})"
    classes = meta["classes"]
    if not classes or not all(isinstance(c, str) for c in classes) or meta["numClasses"] != len(classes):
        return f"{META_FILE} has no usable class list (numClasses {meta['numClasses']!r}, {len(classes)} names)"
    if not all(isinstance(meta["metrics"].get(k), int | float) for k in ("valAccuracy", "valLoss", "trainLoss")):
        return f"{META_FILE} lacks its metrics"
    return None


def read_export(output: Path) -> dict[str, Any] | None:
    """The committed model.json of `output`, or None when there is no complete, well-formed export."""
    try:
        meta = json.loads(read_bytes(output / META_FILE, MAX_META_BYTES, META_FILE))
    except (OSError, ValueError, RecursionError, JobFileError):
        return None
    if export_problem(meta, output) is not None:
        return None
    return meta if (output / meta["weightsFile"]).is_file() else None


def write_export(
    output: Path,
    model: nn.Module,
    *,
    name: str,
    spec: FineTuneJobSpec,
    classes: list[str],
    preprocessing: Preprocessing,
    best: dict[str, Any],
    history: list[dict],
    extra: dict[str, Any],
    evaluation: dict[str, Any] | None = None,
    formats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`formats`: the portable graphs already written and parity-checked (portable.write_graphs); with any,
    model.json lists them and a MODEL_CARD.md is written before model.json commits the export."""
    weights = output / WEIGHTS_FILE
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # The new weights stay under a temp name until model.json is written too: a full disk at either leaves
    # an earlier export's weights and model.json together, as they were.
    staged = output / f".{WEIGHTS_FILE}.staged"
    atomic_write(staged, lambda tmp: save_file(tensors, tmp, metadata={"architecture": spec.model.architecture}))
    meta = {
        "formatVersion": FORMAT_VERSION,
        "name": name,
        "library": spec.model.library,
        "architecture": spec.model.architecture,
        "numClasses": len(classes),
        "classes": classes,
        "head": spec.head.to_wire(),
        "preprocessing": preprocessing.to_json(),
        "weightsFile": WEIGHTS_FILE,
        "sha256": sha256_file(staged),
        "bestEpoch": best["epoch"],
        "metrics": {
            "valAccuracy": best["valAccuracy"],
            "valLoss": best["valLoss"],
            "trainLoss": best["trainLoss"],
            "valTop5": best.get("valTop5"),
            "perClassAccuracy": dict(zip(classes, best["perClassAccuracy"], strict=True)),
            **_test_metrics(evaluation),
        },
        **({"evaluation": evaluation} if evaluation else {}),
        "history": [{k: v for k, v in h.items() if k != "perClassAccuracy"} for h in history],
        "fingerprint": spec.resume_fingerprint(),
        "trainerVersion": __version__,
        "spec": spec.to_wire(),
        **extra,
    }
    if formats:
        from finetune_trainer.model_card import write_card

        meta["formats"] = {"safetensors": {"file": WEIGHTS_FILE, "sha256": meta["sha256"]}, **formats}
        meta["modelCard"] = write_card(output, meta)
    try:
        atomic_write(output / f".{META_FILE}.staged",
                     lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    try:  # renames need no space: the pair is committed weights first, model.json last
        os.replace(staged, weights)
        os.replace(output / f".{META_FILE}.staged", output / META_FILE)
    except OSError as err:  # e.g. a directory where model.json should be: name it, leave no staged file
        for left in (staged, output / f".{META_FILE}.staged"):
            left.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(output / META_FILE)) from None
    return meta
