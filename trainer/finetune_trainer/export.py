"""The export: `model.safetensors` (+ the portable formats) + `model.json`, each written atomically, model.json last.

model.json is the commit marker: a reader that finds it can trust the weights file next to it
(its sha256 is inside). A run killed mid-export leaves the previous export intact or none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import __version__
from finetune_trainer.checkpoint import atomic_write
from finetune_trainer.data import Preprocessing

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
FORMAT_VERSION = 1


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


def read_export(output: Path) -> dict[str, Any] | None:
    """The committed model.json of `output`, or None when there is no complete export."""
    try:
        meta = json.loads((output / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    weights = output / meta.get("weightsFile", WEIGHTS_FILE)
    return meta if weights.is_file() else None


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
    atomic_write(weights, lambda tmp: save_file(tensors, tmp, metadata={"architecture": spec.model.architecture}))
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
        "sha256": sha256_file(weights),
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
    atomic_write(output / META_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return meta
