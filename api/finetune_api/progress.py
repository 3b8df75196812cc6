"""The progress event a trainer pushes to the operator: the one definition of its wire format.

The trainer's HttpReporter builds its body from this model and the operator's server parses it with the
same model (Kubeflow KEP-2779 style: trainers push with a per-job token and hold no Kubernetes rights).
Unknown keys are ignored, so a newer trainer can talk to an older operator; wrong types are refused.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_BODY_BYTES = 8192
EVENTS = ("start", "step", "epoch", "end")


class CheckpointNote(BaseModel):
    """The trainer's latest checkpoint, as status.lastCheckpoint shows it."""

    model_config = ConfigDict(extra="ignore")

    epoch: int = Field(..., ge=0, le=1_000_000)
    step: int | None = Field(None, ge=0, le=100_000_000)
    time: str | None = Field(None, max_length=40, pattern=r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
    file: str | None = Field(None, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")


class ProgressEvent(BaseModel):
    """What a trainer may send about its run."""

    model_config = ConfigDict(extra="ignore")

    event: Literal[EVENTS] = "step"  # type: ignore[valid-type]
    epoch: int = Field(0, ge=0, le=1_000_000)
    totalEpochs: int = Field(..., ge=1, le=1_000_000)
    step: int = Field(0, ge=0, le=100_000_000)
    totalSteps: int = Field(0, ge=0, le=100_000_000)
    trainLoss: float | None = Field(None, ge=0)
    valLoss: float | None = Field(None, ge=0)
    valAccuracy: float | None = Field(None, ge=0, le=1)
    bestValAccuracy: float | None = Field(None, ge=0, le=1)
    samplesPerSecond: float | None = Field(None, ge=0)
    resumeCount: int | None = Field(None, ge=0, le=1_000_000)
    lastCheckpoint: CheckpointNote | None = None

    @field_validator("trainLoss", "valLoss", "samplesPerSecond")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


# Every field but the event kind: what a trainer remembers between pushes and sends each time.
PROGRESS_FIELDS = tuple(name for name in ProgressEvent.model_fields if name != "event")


def parse_event(raw: bytes) -> ProgressEvent:
    """Validate a request body; raises ValueError with a one-line reason."""
    if len(raw) > MAX_BODY_BYTES:
        raise ValueError(f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        return ProgressEvent.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        raise ValueError(f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}") from None
