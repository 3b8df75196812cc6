"""The cluster-only part of a FineTuneJob spec: resources, volumes, scheduling, run policy (ignored locally)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from finetune_api.base import DNS_LABEL_PATTERN, MAX_NAME, QUANTITY_PATTERN, PathStr, _Model, _no_parent_segments


class Resources(_Model):
    gpus: int = Field(0, ge=0, le=16, description="nvidia.com/gpu per worker")
    cpu: str | None = Field(None, max_length=32, pattern=QUANTITY_PATTERN, description="CPU request and limit")
    memory: str | None = Field(None, max_length=32, pattern=QUANTITY_PATTERN, description="memory request and limit")


# Volume sources users may mount; each is passed through to the pod spec as Kubernetes defines it.
VOLUME_SOURCES = ("persistentVolumeClaim", "emptyDir", "configMap", "secret", "nfs", "csi", "hostPath", "ephemeral")
K8sObject = dict[str, Any]


class Volume(_Model):
    name: str = Field(..., max_length=63, pattern=DNS_LABEL_PATTERN)
    mount_path: PathStr = Field(..., description="absolute path inside the trainer container")
    read_only: bool = False
    persistent_volume_claim: K8sObject | None = None
    empty_dir: K8sObject | None = None
    config_map: K8sObject | None = None
    secret: K8sObject | None = None
    nfs: K8sObject | None = None
    csi: K8sObject | None = None
    host_path: K8sObject | None = None
    ephemeral: K8sObject | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Volume:
        _no_parent_segments(self.mount_path)
        if not self.mount_path.startswith("/"):
            raise ValueError("volumes[].mountPath must be an absolute path")
        wire = self.to_wire()
        given = [k for k in VOLUME_SOURCES if k in wire]
        if len(given) != 1:
            raise ValueError(f"volume {self.name!r} needs exactly one source of {', '.join(VOLUME_SOURCES)}")
        return self

    def source(self) -> dict[str, Any]:
        """The pod-spec volume: name plus its one source."""
        wire = self.to_wire()
        return {"name": self.name, **{k: wire[k] for k in VOLUME_SOURCES if k in wire}}


class Scheduling(_Model):
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[K8sObject] = Field(default_factory=list, max_length=64)
    priority_class_name: str = Field("", max_length=MAX_NAME)


class RunPolicy(_Model):
    backoff_limit: int = Field(2, ge=0, le=100, description="pod retries before the job fails")
    active_deadline_seconds: int | None = Field(None, ge=1, description="wall-clock limit for the whole job")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, description="delete the Job (not the FineTuneJob) this long after it finishes"
    )
    suspend: bool = Field(False, description="create/keep the Job suspended (Kueue-compatible)")
    progress_deadline_seconds: int | None = Field(
        None, ge=1, description="no progress for this long marks the job Stalled"
    )
    startup_deadline_seconds: int | None = Field(
        None, ge=1, description="Pending this long with an image or scheduling problem fails the job"
    )
