"""Kubernetes Events about a FineTuneJob, posted through the API.

Posted directly rather than with kopf.event(): kopf's poster only works inside its
per-object handler context, and the resync loop (deadlines) runs outside it.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from collections.abc import Mapping
from typing import Any

from finetune_operator.kube import ApiError, Kube
from finetune_operator.observe import format_time

COMPONENT = "finetune-operator"
MAX_MESSAGE = 1024
logger = logging.getLogger(__name__)


def build_event(ftj: Mapping[str, Any], kind: str, reason: str, message: str, now: dt.datetime) -> dict[str, Any]:
    """A core/v1 Event about `ftj`; the random suffix is what `kubectl` and kopf use too."""
    meta = ftj["metadata"]
    stamp = format_time(now)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": ftj.get("apiVersion", "finetune.dev/v1alpha1"),
            "kind": ftj.get("kind", "FineTuneJob"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
        },
        "type": kind,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def post_event(kube: Kube, ftj: Mapping[str, Any], kind: str, reason: str, message: str, now: dt.datetime) -> None:
    """Best effort: an event that cannot be posted is logged, never a reason to fail a reconcile."""
    event = build_event(ftj, kind, reason, message, now)
    try:
        kube.create(f"/api/v1/namespaces/{event['metadata']['namespace']}/events", event)
    except ApiError as err:
        logger.warning(f"could not post event {reason} for {ftj['metadata']['name']}: {err}")
