"""The final evaluation of a head-only job through a shared feature cache: the frozen part runs once per
sweep, not once per trial.

A head-only export is the frozen backbone (the same in every job whose frozen weights have the same
digest) plus its own head, so its predictions on the held-out split are the head applied to the
backbone's outputs for those images. With `training.featureCacheDir` set (a sweep's trials), those
outputs are computed once, in the precision and layout of the evaluation itself, and kept in the shared
folder under a key of their own (feature_store.cache_key with the boundary `eval/<head>`): the second
trial's report costs a pass of its head. The numbers are those of running the whole model: the head sees
exactly the tensor it would see inside it (a test compares the two).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from finetune_api.spec import FineTuneJobSpec
from finetune_trainer import feature_store, features
from finetune_trainer.data import Preprocessing, Sample
from finetune_trainer.engine import Compute

log = logging.getLogger(__name__)


def shared_head_eval(model: nn.Module, head_name: str, loader, samples: list[Sample], classes: list[str],
                     prep: Preprocessing, compute: Compute, spec: FineTuneJobSpec, frozen_digest: str,
                     output: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, probabilities) through the shared cache, or None where it does not apply (no shared folder,
    something besides the head trains, no digest of the frozen weights)."""
    if not spec.training.feature_cache_dir or spec.freeze.policy != "head" or not frozen_digest:
        return None
    shared = Path(spec.training.feature_cache_dir)
    key = feature_store.cache_key(SimpleNamespace(classes=classes, train=samples, val=[]), prep, f"eval/{head_name}",
                                  frozen_digest, compute.precision.name, compute.channels_last)
    with feature_store.computing(shared, key):
        found = feature_store.load(output, key, shared)
        if found is not None:
            (x, y), _ = found
            log.info("evaluation: frozen-part outputs of %d images reused from %s", len(y),
                     feature_store.path_for(output, key, shared))
        else:
            x, y = features.extract(model, head_name, loader, compute)
            try:
                feature_store.save(output, key, (x, y), (x[:0], y[:0]), shared)
            except OSError as err:  # the report does not depend on it: the next trial computes them again
                log.warning("evaluation features not shared (%s)", err)
    head = model.get_submodule(head_name).eval()
    device = next(head.parameters()).device
    probs = []
    with torch.inference_mode(), compute.precision.autocast():
        for chunk in x.split(1024):
            # Under autocast the head casts its input as it would inside the model: x holds the boundary's
            # input widened to float32 exactly, so the result is the whole model's.
            probs.append(head(chunk.to(device)).float().softmax(dim=1).cpu())
    return y.numpy().astype(np.int64), torch.cat(probs).double().numpy()
