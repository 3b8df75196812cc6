"""FineTuneJob.status: phases, reasons, condition types and the typed status model.

The CRD's status schema is generated from `FineTuneJobStatus` (finetune_operator.crd), so a field the
operator writes is declared exactly once, here; a strict schema would silently prune anything else.
The operator derives status as plain dicts (they are JSON merge patches) and a unit test checks every
status it derives against the generated schema.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from finetune_api.serving import ServingStatus


class Phase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


PHASES = tuple(p.value for p in Phase)
TERMINAL_PHASES = (Phase.SUCCEEDED.value, Phase.FAILED.value)


class ConditionType(StrEnum):
    READY = "Ready"  # kstatus
    RECONCILING = "Reconciling"  # kstatus
    STALLED = "Stalled"  # kstatus
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SPEC_CHANGE_REFUSED = "SpecChangeRefused"
    SERVED = "Served"  # spec.serving: the export is served and promoted (finetune_operator.serving)


CONDITION_TYPES = tuple(c.value for c in ConditionType)


class Reason(StrEnum):
    """status.reason values the operator sets itself (Kubernetes' own words — ImagePullBackOff, Unschedulable,
    BackoffLimitExceeded … — pass through as Kubernetes spells them)."""

    CREATING = "Creating"
    STARTING = "Starting"
    RETRYING = "Retrying"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    SUSPENDED = "Suspended"
    INVALID_SPEC = "InvalidSpec"  # the spec failed the model's validation: nothing was created
    INVALID_JOB_FILE = "InvalidJobFile"  # the trainer refused its job file or data (exit 2)
    TRAINER_ERROR = "TrainerError"
    DISK_FULL = "DiskFull"  # the trainer ran out of space writing a checkpoint or the export (exit 1, retried)
    OOM_KILLED = "OOMKilled"
    PREEMPTED = "Preempted"  # SIGTERM, checkpoint saved (exit 75)
    EVICTED = "Evicted"
    POD_FAILED = "PodFailed"
    POD_CREATION_FAILED = "PodCreationFailed"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    JOB_FAILED = "JobFailed"
    NO_PROGRESS = "NoProgress"
    SPEC_CHANGE_REFUSED = "SpecChangeRefused"
    # spec.distillation.teacher.fromJob on a cluster (no Job is created until the teacher's export is there)
    WAITING_FOR_TEACHER = "WaitingForTeacher"  # Pending: the teacher FineTuneJob has not succeeded yet
    TEACHER_NOT_FOUND = "TeacherNotFound"  # no FineTuneJob of that name in the namespace (re-checked on create)
    TEACHER_FAILED = "TeacherFailed"  # the teacher FineTuneJob failed
    TEACHER_NOT_MOUNTABLE = "TeacherNotMountable"  # its output is not on a PVC the student's pod can mount
    PRUNED = "Pruned"  # a FineTuneSweep trial stopped early by the sweep's pruning rule (annotation finetune.dev/stop)
    STOPPED = "Stopped"  # a trial stopped because its sweep ended (target reached, too many failures), or by hand


# Set on a FineTuneJob (by its FineTuneSweep, or by hand) to stop it: "Pruned: <why>" or "Stopped: <why>". The
# operator deletes its Job and the job ends Failed with reason Pruned or Stopped; a finished job stays finished.
STOP_ANNOTATION = "finetune.dev/stop"
STOP_REASONS = (Reason.PRUNED.value, Reason.STOPPED.value)


class ServingReason(StrEnum):
    """Reasons of the Served condition (spec.serving); the training's phase and reason never depend on them."""

    KSERVE_NOT_INSTALLED = "KServeNotInstalled"  # no serving.kserve.io/v1beta1 InferenceService in the API
    EXPORT_NOT_SERVABLE = "ExportNotServable"  # the export is not on a PVC KServe can read
    NAME_TAKEN = "InferenceServiceNotOwned"  # an InferenceService of that name exists, made by someone else
    WAITING_FOR_READY = "WaitingForInferenceService"  # created/updated; KServe has not reported it Ready
    SMOKE_TESTING = "SmokeTesting"  # the smoke-test Job runs
    SMOKE_TEST_FAILED = "SmokeTestFailed"  # accuracy below smokeTest.minAccuracy: not promoted
    SMOKE_TEST_ERROR = "SmokeTestError"  # the smoke test could not run (endpoint errors, no images)
    PROMOTED = "Promoted"


# Failed without ever creating a Job: re-judged from what exists on every pass (a fixed spec, a teacher that
# appears), unlike a finished training, which stays finished.
NOT_STARTED_REASONS = (Reason.INVALID_SPEC.value, Reason.TEACHER_NOT_FOUND.value, Reason.TEACHER_FAILED.value,
                       Reason.TEACHER_NOT_MOUNTABLE.value)

_TIME: dict[str, Any] = {"format": "date-time"}
_INT64: dict[str, Any] = {"format": "int64"}


def _int(description: str = "", minimum: int | None = 0) -> Any:
    extra = {**_INT64, **({"description": description} if description else {})}
    return Field(None, ge=minimum, json_schema_extra=extra) if minimum is not None else \
        Field(None, json_schema_extra=extra)


def _str(description: str = "", **extra: Any) -> Any:
    return Field(None, json_schema_extra={**extra, **({"description": description} if description else {})})


def _num(description: str = "") -> Any:
    return Field(None, json_schema_extra={"description": description} if description else None)


class _Status(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(_Status):
    type: str = Field(..., json_schema_extra={
        "description": "Ready, Reconciling, Stalled (kstatus), Running, Succeeded, Failed, SpecChangeRefused, "
                       "Served (spec.serving)"})
    status: str = Field(..., json_schema_extra={"enum": ["True", "False", "Unknown"]})
    reason: str | None = _str("CamelCase reason")
    message: str | None = _str("human-readable detail")
    lastTransitionTime: str | None = _str("when status last changed", **_TIME)
    observedGeneration: int | None = _int("metadata.generation the condition was computed from")


class Progress(_Status):
    """training progress; epochText is the Epoch printer column (e.g. 3/10)"""

    epoch: int | None = _int("epochs completed")
    totalEpochs: int | None = _int()
    epochText: str | None = _str("epoch/totalEpochs, for the Epoch printer column")
    step: int | None = _int()
    totalSteps: int | None = _int()
    percent: float | None = _num()
    trainLoss: float | None = _num()
    valLoss: float | None = _num()
    valAccuracy: float | None = _num()
    bestValAccuracy: float | None = _num()
    samplesPerSecond: float | None = _num()
    etaSeconds: float | None = _num("estimated seconds to finish, from the observed rate")
    etaText: str | None = _str("etaSeconds for people (e.g. 12m30s), for the ETA printer column")
    lastUpdateTime: str | None = _str(**_TIME)


class SourceRecord(_Status):
    """a source fetched before training (dataset.uri, model.weights.uri): its lineage, also in model.json"""

    field: str | None = _str("the spec field it came from, e.g. dataset")
    uri: str | None = _str("the URI (a query string cut off)")
    sha256: str | None = _str("digest of the fetched file, archive or manifest")
    size: int | None = _int("bytes fetched")


class Output(_Status):
    """where the trained model is, once the job succeeded"""

    path: str | None = _str("spec.output.path inside the trainer container")
    volume: str | None = _str("the pod volume holding the output")
    ephemeral: bool | None = Field(None, json_schema_extra={"description": "true: an emptyDir, gone with the pod"})
    weightsFile: str | None = _str()
    sha256: str | None = _str()
    bestEpoch: int | None = _int()
    valAccuracy: float | None = _num()
    testAccuracy: float | None = _num("accuracy on the held-out test split with the best weights (when the job "
                                      "has one)")
    valLoss: float | None = _num("validation loss of the best epoch")
    sources: list[SourceRecord] | None = Field(None, json_schema_extra={
        "description": "what dataset.uri / weights.uri fetched, verified: uri, sha256, size"})


class LastCheckpoint(_Status):
    """the latest checkpoint the trainer saved (a restarted pod resumes from it)"""

    epoch: int | None = _int("the epoch it belongs to (1-based)")
    step: int | None = _int("set when saved mid-epoch (on SIGTERM): the steps of that epoch it covers")
    time: str | None = _str("when it was written", **_TIME)
    file: str | None = _str("file name under <output>/checkpoints")


class Worker(_Status):
    index: int = Field(..., ge=0, json_schema_extra={
        **_INT64, "description": "the worker's completion index (its torchrun node rank)"})
    pod: str | None = _str("its newest pod")
    phase: str | None = _str("that pod's phase: Pending | Running | Succeeded | Failed | Terminating, or Missing")
    restarts: int | None = _int("failed pods of this worker so far (each replaced by the Job)")
    lastFailure: str | None = _str("reason of its latest failed pod, e.g. OOMKilled or TrainerError")


class Teacher(_Status):
    """the teacher FineTuneJob of spec.distillation.teacher.fromJob, as resolved for this job's pod"""

    job: str | None = _str("the teacher FineTuneJob (same namespace)")
    phase: str | None = _str("its phase when last checked (while this job waits for it)")
    path: str | None = _str("where this job's trainer reads the teacher's export (mounted read-only)")
    claim: str | None = _str("the PersistentVolumeClaim holding the teacher's export")
    subPath: str | None = _str("the export's folder inside that claim")
    weightsFile: str | None = _str()
    sha256: str | None = _str("the teacher's weights digest, from its status.output")
    valAccuracy: float | None = _num("the teacher's validation accuracy")


class Distillation(_Status):
    """knowledge distillation (spec.distillation)"""

    teacher: Teacher | None = None


class FineTuneJobStatus(_Status):
    phase: Phase | None = Field(None, json_schema_extra={"description": "Pending | Running | Succeeded | Failed | "
                                                                        "Suspended"})
    conditions: list[Condition] | None = Field(None, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    observedGeneration: int | None = _int("metadata.generation this status was computed from")
    startTime: str | None = _str("when the Job started running pods", **_TIME)
    completionTime: str | None = _str("when the job succeeded or failed", **_TIME)
    reason: str | None = _str("CamelCase reason for the phase, e.g. OOMKilled or ImagePullBackOff")
    message: str | None = _str("human-readable detail for the phase")
    jobName: str | None = _str("the batch/v1 Job running the trainer")
    attempts: int | None = _int("trainer pods started so far (failed + active + succeeded)")
    resumeCount: int | None = _int("times training resumed from a checkpoint")
    lastCheckpoint: LastCheckpoint | None = None
    progress: Progress | None = None
    output: Output | None = None
    distillation: Distillation | None = None
    serving: ServingStatus | None = None
    workers: list[Worker] | None = Field(None, json_schema_extra={
        "description": "multi-worker jobs (spec.workers > 1): one entry per worker pod",
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["index"]})
