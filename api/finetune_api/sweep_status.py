"""FineTuneSweep.status: the typed model the CRD's status schema is generated from (as for FineTuneJob).

Everything here is derived, on every pass, from the trial FineTuneJobs that exist (plus the per-epoch
metrics seen so far, which only status remembers): a restarted operator loses nothing it needs.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import Field

from finetune_api.status import Condition, _int, _num, _Status, _str


class SweepPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class SweepReason(StrEnum):
    CREATED = "TrialsCreated"
    RUNNING = "Running"
    COMPLETED = "TrialsCompleted"  # every trial finished; best is set
    TARGET_REACHED = "TargetReached"  # a trial reached objective.target; the running ones are stopped
    INVALID_SPEC = "InvalidSpec"  # the spec, a parameter path or a range is invalid: no trial was created
    TOO_MANY_FAILED = "TooManyFailedTrials"  # more than trials.maxFailed trials failed
    NO_SUCCESSFUL_TRIAL = "NoSuccessfulTrial"  # every trial finished, none with the objective's metric


_VALUES = {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
           "description": "parameter path → value (strings, numbers, booleans)"}


class EpochMetric(_Status):
    epoch: int = Field(..., ge=0, json_schema_extra={"format": "int64"})
    value: float


class TrialStatus(_Status):
    name: str = Field(..., json_schema_extra={"description": "the trial FineTuneJob"})
    index: int | None = _int("its place in the sweep (0-based)")
    parameters: dict[str, Any] | None = Field(None, json_schema_extra=_VALUES)
    phase: str | None = _str("Pending | Running | Succeeded | Failed | Pruned")
    reason: str | None = _str("the trial FineTuneJob's status.reason")
    metric: float | None = _num("the objective's metric when it finished (or the latest epoch's while running)")
    epoch: int | None = _int("epochs completed, as last seen")
    history: list[EpochMetric] | None = Field(None, max_length=10000, json_schema_extra={
        "description": "the objective's metric per epoch as seen by the operator (pruning decides from it)"})


class BestModel(_Status):
    path: str | None = _str("the export's folder inside the trial's volume")
    volume: str | None = _str("the trial pod's volume holding it")
    weightsFile: str | None = _str()
    sha256: str | None = _str("digest of the exported weights")


class BestTrial(_Status):
    job: str | None = _str("the trial FineTuneJob with the best metric")
    parameters: dict[str, Any] | None = Field(None, json_schema_extra=_VALUES)
    metric: float | None = _num()
    model: BestModel | None = None


class FineTuneSweepStatus(_Status):
    phase: SweepPhase | None = Field(None, json_schema_extra={"description": "Pending | Running | Succeeded | "
                                                                            "Failed"})
    reason: str | None = _str("CamelCase reason for the phase")
    message: str | None = _str()
    conditions: list[Condition] | None = Field(None, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    observedGeneration: int | None = _int()
    startTime: str | None = _str(format="date-time")
    completionTime: str | None = _str(format="date-time")
    total: int | None = _int("trials the sweep runs in all")
    created: int | None = _int("trials created so far")
    running: int | None = _int("trials pending or running")
    succeeded: int | None = _int()
    failed: int | None = _int()
    pruned: int | None = _int()
    trialsText: str | None = _str("finished/total, for the Trials printer column")
    best: BestTrial | None = None
    trials: list[TrialStatus] | None = Field(None, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
