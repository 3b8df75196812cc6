"""Spec drift: which fields of a FineTuneJob changed after its Job was created.

A Job's pod template is immutable, so such a change is not applied. The Job carries a short hash per
top-level spec field (its digest annotation), and status names the fields whose hash no longer matches.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from finetune_api.spec import API_GROUP
from finetune_operator.naming import short_hash
from finetune_operator.parsed import FineTuneJob

ANNOTATION_DIGEST = f"{API_GROUP}/spec-digest"
# Spec fields that may change after the Job exists (propagated, not refused).
MUTABLE_FIELDS = {"runPolicy": ("suspend",)}
# Spec fields acted on after training (spec.serving: serving.py), never part of the Job: not drift.
AFTER_TRAINING_FIELDS = frozenset({"serving"})


def spec_digest(spec: Mapping[str, Any]) -> dict[str, str]:
    """A short hash per top-level field of the resolved spec, minus the fields that may change.

    Hashing the resolved spec (not the stored one) keeps a new server-side default from looking like a change.
    """
    digest = {}
    for key, value in spec.items():
        if key in AFTER_TRAINING_FIELDS:
            continue
        if isinstance(value, Mapping) and key in MUTABLE_FIELDS:
            value = {k: v for k, v in value.items() if k not in MUTABLE_FIELDS[key]}
        digest[key] = short_hash(json.dumps(value, sort_keys=True, default=str))
    return digest


def digest_annotation(ftj: FineTuneJob) -> dict[str, str]:
    """The annotation the Job is created with."""
    return {ANNOTATION_DIGEST: json.dumps(spec_digest(ftj.wire_spec), sort_keys=True)}


def changed_fields(ftj: FineTuneJob, job: Mapping[str, Any]) -> list[str]:
    """Top-level spec fields changed since the Job was created (empty when unknown)."""
    raw = ((job.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_DIGEST)
    try:
        before = json.loads(raw) if raw else None
    except ValueError:
        before = None
    if not isinstance(before, dict):
        return []
    now = spec_digest(ftj.wire_spec)
    return sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))


def changed_fields_message(ftj: FineTuneJob, job: Mapping[str, Any]) -> str | None:
    """The SpecChangeRefused condition's message, or None when the spec matches the Job."""
    changed = changed_fields(ftj, job)
    if not changed:
        return None
    fields = ", ".join(f"spec.{name}" for name in changed)
    return (
        f"{fields} changed after Job {job['metadata']['name']} was created and is not applied "
        "(a Job's pod template is immutable); only spec.runPolicy.suspend is. Delete and re-create "
        "the FineTuneJob to run with the new spec"
    )
