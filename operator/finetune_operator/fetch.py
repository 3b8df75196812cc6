"""The fetch init container of a trainer pod whose spec has dataset.uri or model.weights.uri.

It is the trainer container with another command (`finetune-train fetch`): same image, job file, volumes and
security context, so it writes the verified sources into the cache under spec.output.path, where the
trainer finds them (and only re-hashes them). The Secrets named by `credentials.secretName` are mounted into
this container alone — the training process never sees them.
"""

from __future__ import annotations

import copy

from finetune_api.source import SECRETS_DIR_ENV
from finetune_api.spec import FineTuneJobSpec
from finetune_operator.parsed import Obj

FETCH_CONTAINER = "fetch"
SECRETS_DIR = "/var/run/finetune/secrets"  # finetune_trainer.remote.DEFAULT_SECRETS_DIR
VOL_SECRET_PREFIX = "finetune-credentials-"
# What the init container does not need from the trainer container: the progress push and its token.
_TRAINER_ONLY_ENV = ("FINETUNE_PROGRESS_URL", "FINETUNE_PROGRESS_TOKEN_FILE")


def secret_names(spec: FineTuneJobSpec) -> list[str]:
    """The Secrets the sources reference, once each, in spec order."""
    names = [s.credentials.secret_name for s in (spec.dataset, spec.model.weights)
             if s.uri is not None and s.credentials is not None]
    return list(dict.fromkeys(names))


def fetch_init_container(spec: FineTuneJobSpec, trainer: Obj) -> tuple[list[Obj], list[Obj]] | None:
    """([the init container], [its Secret volumes]) for a spec with sources, else None."""
    if spec.dataset.uri is None and spec.model.weights.uri is None:
        return None
    job_file = trainer["args"][trainer["args"].index("-f") + 1]
    container = copy.deepcopy(trainer)
    container.pop("ports", None)
    container.update(name=FETCH_CONTAINER, command=["finetune-train"], args=["fetch", "-f", job_file])
    container["env"] = [e for e in container["env"] if e["name"] not in _TRAINER_ONLY_ENV]
    container["env"].append({"name": SECRETS_DIR_ENV, "value": SECRETS_DIR})
    limits = container.get("resources", {}).get("limits", {})
    limits.pop("nvidia.com/gpu", None)  # downloading needs no GPU; the pod still gets the trainer's
    if not limits:
        container.get("resources", {}).pop("limits", None)
    volumes = []
    for i, name in enumerate(secret_names(spec)):
        volume = f"{VOL_SECRET_PREFIX}{i}"
        # 0440 with the pod's fsGroup: readable by the non-root fetcher, by nothing else in the pod.
        volumes.append({"name": volume, "secret": {"secretName": name, "defaultMode": 0o440}})
        container["volumeMounts"].append({"name": volume, "mountPath": f"{SECRETS_DIR}/{name}", "readOnly": True})
    return [container], volumes
