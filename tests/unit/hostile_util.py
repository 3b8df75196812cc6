"""The tiny runs the hostile-file and disk-full tests start from (made once per module: a few seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from trainer_util import StopAfterEpoch, tiny_spec

from finetune_api.errors import Preempted
from finetune_trainer.fit import fit


def make_runs(root: Path) -> dict:
    """`midrun`: 3 epochs stopped after the 2nd (checkpoints 1 and 2, the feature cache, no export);
    `export`: the same run finished at 2 epochs (model.json + model.safetensors, checkpoints 1 and 2);
    `spec`: the midrun's spec on the wire (3 epochs)."""
    spec = tiny_spec(root / "midrun", **{"training.epochs": 3})
    stop = StopAfterEpoch(2)
    with pytest.raises(Preempted):
        fit(spec, stop, root / "midrun", should_stop=lambda: stop.stop)
    shutil.copytree(root / "midrun", root / "export")
    fit(tiny_spec(root / "export"), StopAfterEpoch(99), root / "export")
    assert (root / "export" / "model.json").is_file() and len(list((root / "midrun" / "cache").glob("*.pt"))) == 1
    return {"midrun": root / "midrun", "export": root / "export", "spec": spec.to_wire()}
