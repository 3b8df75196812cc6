"""What the objects of one FineTuneJob are called, and the labels and annotations that find them.

Every name comes from the FineTuneJob's name and every selector from its uid, so a restarted operator
recognises what it created before. Names too long for Kubernetes are shortened with a hash of the whole
(still unique).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from finetune_api.spec import API_GROUP
from finetune_operator.parsed import FineTuneJob

# Selection label: the FineTuneJob's uid (always a valid label value, unlike long names).
LABEL_UID = f"{API_GROUP}/finetunejob-uid"
LABEL_NAME = f"{API_GROUP}/finetunejob"  # for humans; hashed when the name is too long
ANNOTATION_NAME = f"{API_GROUP}/finetunejob"  # the full name, never truncated
MANAGED_BY = "finetune-operator"
# Labels copied from the FineTuneJob to the Job so that queueing (Kueue) sees them.
PASSTHROUGH_LABELS = ("kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class")
MAX_JOB_NAME = 63  # the Job controller copies the name into a label value
MAX_HOSTNAME = 63  # the Job controller names each pod's host <job>-<index>: a DNS label
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # Service names
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Object names such as a FineTuneJob's (DNS-1123 subdomain): dot-separated DNS labels, 253 characters at most.
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MAX_NAME = 253


def short_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def fit(name: str, limit: int) -> str:
    """`name` if it fits, else a truncated prefix plus a hash of the whole (still unique)."""
    if len(name) <= limit:
        return name
    return f"{name[: limit - 9].rstrip('-.')}-{short_hash(name)}"


def job_name(name: str) -> str:
    """The Job's name for the FineTuneJob `name`: the same, hashed down to 63 characters if longer."""
    return fit(name, MAX_JOB_NAME)


def configmap_name(name: str) -> str:
    return f"{job_name(name)}-spec"


def token_secret_name(name: str) -> str:
    return f"{job_name(name)}-progress"


def service_name(name: str) -> str:
    """The headless Service of a multi-worker job, also its pods' subdomain: the Job's name when that
    is a valid Service name (DNS-1035: starts with a letter), else prefixed."""
    job = job_name(name)
    return job if DNS_1035.match(job) else fit(f"ftj-{job}", MAX_JOB_NAME)


def master_address(name: str) -> str:
    """Worker 0's stable DNS name (resolved through the pod's namespace search path)."""
    return f"{job_name(name)}-0.{service_name(name)}"


def selector_labels(uid: str) -> dict[str, str]:
    """Labels that find a FineTuneJob's Job and pods (the API server filters by them)."""
    return {LABEL_UID: uid}


def common_labels(ftj: FineTuneJob) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "finetune-trainer",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_NAME: fit(ftj.name, 63),
        **selector_labels(ftj.uid),
        **{k: ftj.labels[k] for k in PASSTHROUGH_LABELS if k in ftj.labels},
    }


def child_metadata(ftj: FineTuneJob, name: str, annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Metadata every child carries: its name, the FineTuneJob's namespace, selection labels, full name."""
    return {
        "name": name,
        "namespace": ftj.namespace,
        "labels": common_labels(ftj),
        "annotations": {ANNOTATION_NAME: ftj.name, **(annotations or {})},
    }
