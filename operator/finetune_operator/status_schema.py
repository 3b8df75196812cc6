"""The OpenAPI schema of FineTuneJob.status: every field the operator writes is declared here.

A strict schema prunes undeclared fields silently, so a unit test walks every status
`derive_status` produces and fails on a key missing from this schema.
"""

from __future__ import annotations

from typing import Any

PHASES = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Running", "Succeeded", "Failed", "SpecChangeRefused")


def _s(description: str = "", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string", **extra}
    if description:
        out["description"] = description
    return out


def _int(description: str = "", minimum: int | None = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "integer", "format": "int64"}
    if minimum is not None:
        out["minimum"] = minimum
    if description:
        out["description"] = description
    return out


def _num(description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "number"}
    if description:
        out["description"] = description
    return out


_TIME = {"format": "date-time"}

CONDITION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": _s("Ready, Reconciling, Stalled (kstatus), Running, Succeeded, Failed, SpecChangeRefused"),
        "status": _s(enum=["True", "False", "Unknown"]),
        "reason": _s("CamelCase reason"),
        "message": _s("human-readable detail"),
        "lastTransitionTime": _s("when status last changed", **_TIME),
        "observedGeneration": _int("metadata.generation the condition was computed from"),
    },
}

PROGRESS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "training progress; epochText is the Epoch printer column (e.g. 3/10)",
    "properties": {
        "epoch": _int("epochs completed"),
        "totalEpochs": _int(),
        "epochText": _s("epoch/totalEpochs, for the Epoch printer column"),
        "step": _int(),
        "totalSteps": _int(),
        "percent": _num(),
        "trainLoss": _num(),
        "valLoss": _num(),
        "valAccuracy": _num(),
        "bestValAccuracy": _num(),
        "samplesPerSecond": _num(),
        "etaSeconds": _num("estimated seconds to finish, from the observed rate"),
        "etaText": _s("etaSeconds for people (e.g. 12m30s), for the ETA printer column"),
        "lastUpdateTime": _s(**_TIME),
    },
}

OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "where the trained model is, once the job succeeded",
    "properties": {
        "path": _s("spec.output.path inside the trainer container"),
        "volume": _s("the pod volume holding the output"),
        "ephemeral": {"type": "boolean", "description": "true: an emptyDir, gone with the pod"},
        "weightsFile": _s(),
        "sha256": _s(),
        "bestEpoch": _int(),
        "valAccuracy": _num(),
        "testAccuracy": _num("accuracy on the held-out test split with the best weights (when the job has one)"),
    },
}

CHECKPOINT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "the latest checkpoint the trainer saved (a restarted pod resumes from it)",
    "properties": {
        "epoch": _int("the epoch it belongs to (1-based)"),
        "step": _int("set when saved mid-epoch (on SIGTERM): the steps of that epoch it covers"),
        "time": _s("when it was written", **_TIME),
        "file": _s("file name under <output>/checkpoints"),
    },
}

WORKER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["index"],
    "properties": {
        "index": _int("the worker's completion index (its torchrun node rank)"),
        "pod": _s("its newest pod"),
        "phase": _s("that pod's phase: Pending | Running | Succeeded | Failed | Terminating, or Missing"),
        "restarts": _int("failed pods of this worker so far (each replaced by the Job)"),
        "lastFailure": _s("reason of its latest failed pod, e.g. OOMKilled or TrainerError"),
    },
}

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "phase": _s("Pending | Running | Succeeded | Failed | Suspended", enum=list(PHASES)),
        "conditions": {
            "type": "array",
            "items": CONDITION_SCHEMA,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
        "observedGeneration": _int("metadata.generation this status was computed from"),
        "startTime": _s("when the Job started running pods", **_TIME),
        "completionTime": _s("when the job succeeded or failed", **_TIME),
        "reason": _s("CamelCase reason for the phase, e.g. OOMKilled or ImagePullBackOff"),
        "message": _s("human-readable detail for the phase"),
        "jobName": _s("the batch/v1 Job running the trainer"),
        "attempts": _int("trainer pods started so far (failed + active + succeeded)"),
        "resumeCount": _int("times training resumed from a checkpoint"),
        "lastCheckpoint": CHECKPOINT_SCHEMA,
        "progress": PROGRESS_SCHEMA,
        "output": OUTPUT_SCHEMA,
        "workers": {
            "type": "array",
            "description": "multi-worker jobs (spec.workers > 1): one entry per worker pod",
            "items": WORKER_SCHEMA,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["index"],
        },
    },
}
