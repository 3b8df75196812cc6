"""spec.serving: the hand-off of a finished export to KServe (an InferenceService, a smoke test, promotion).

Part of the FineTuneJob spec (re-exported by finetune_api.spec); like it, no torch or kubernetes here.
Nothing in it is part of the resume fingerprint or of the Job's spec digest: it acts after training, so
changing it never invalidates a checkpoint nor counts as a refused spec change.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from finetune_api.base import DNS_LABEL_PATTERN, PathStr, _Model, _no_parent_segments

# KServe's own limit on InferenceService names (DNS-1035 labels that leave room for its revision suffixes).
MAX_ISVC_NAME = 45
RUNTIME = "finetune-serve"  # examples/serving/servingruntime.yaml: the ClusterServingRuntime on the serve image
MODEL_FORMAT = "finetune-export"  # the format that runtime declares


class InferenceServiceSpec(_Model):
    name: str | None = Field(None, max_length=MAX_ISVC_NAME, pattern=DNS_LABEL_PATTERN,
                             description="the InferenceService (same namespace; default: the FineTuneJob's name). "
                             "Several FineTuneJobs naming one InferenceService are its successive revisions")
    runtime: str = Field(RUNTIME, min_length=1, max_length=253,
                         description="the (Cluster)ServingRuntime serving the export")
    model_format: str = Field(MODEL_FORMAT, min_length=1, max_length=63,
                              description="predictor.model.modelFormat.name")
    min_replicas: int | None = Field(None, ge=0, le=1000, description="predictor.minReplicas (default: KServe's)")
    max_replicas: int | None = Field(None, ge=1, le=1000, description="predictor.maxReplicas (default: KServe's)")
    service_account_name: str | None = Field(None, max_length=253, pattern=DNS_LABEL_PATTERN,
                                             description="predictor.serviceAccountName (default: KServe's)")

    @model_validator(mode="after")
    def _replicas_ordered(self) -> InferenceServiceSpec:
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("serving.inferenceService.minReplicas must be at most maxReplicas")
        return self


class SmokeTest(_Model):
    data_path: PathStr = Field(
        ..., description="ImageFolder of held-out labelled images (<class>/<image>, class folders named as the "
        "model's classes) inside one of spec.volumes; the smoke-test pod mounts that volume read-only")
    samples: int = Field(200, ge=1, le=100000, description="images sent to the endpoint (a seeded sample)")
    min_accuracy: float = Field(0.0, ge=0.0, le=1.0,
                                description="below this accuracy the new revision is not promoted")
    timeout_seconds: int = Field(600, ge=10, le=86400, description="activeDeadlineSeconds of the smoke-test Job")

    @model_validator(mode="after")
    def _safe(self) -> SmokeTest:
        try:
            _no_parent_segments(self.data_path)
        except ValueError as err:
            raise ValueError(f"serving.smokeTest.dataPath {err}") from None
        if not self.data_path.startswith("/"):
            raise ValueError("serving.smokeTest.dataPath must be an absolute path")
        return self


class Serving(_Model):
    inference_service: InferenceServiceSpec = Field(default_factory=InferenceServiceSpec)
    canary_traffic_percent: int | None = Field(
        None, ge=0, le=100,
        description="roll the new export out as a canary taking this share of the traffic; promoted to 100 when "
        "the smoke test passes, rolled back (0: the previous revision takes it all) when it fails. Default: the "
        "InferenceService is updated in place and, on a failed smoke test, its previous storageUri restored")
    smoke_test: SmokeTest | None = Field(
        None, description="send held-out images over the Open Inference Protocol v2 before promoting (default: "
        "promoted once Ready)")


def within(path: str, mount_path: str) -> bool:
    """`path` is the mount path or below it (/data/x is within /data, /database is not). Literal, no
    normalisation: the CRD's CEL rule (finetune_operator.cel_rules) says exactly the same."""
    return path == mount_path or path.startswith(mount_path if mount_path.endswith("/") else mount_path + "/")


class ServingStatus(_Model):
    """the InferenceService serving this job's export (spec.serving) and what its smoke test said"""

    name: str | None = Field(None, description="the InferenceService")
    url: str | None = Field(None, description="its status.url, once KServe reports one")
    ready: bool | None = Field(None, description="its Ready condition is True for this job's export")
    storage_uri: str | None = Field(None, description="the export as KServe reads it (pvc://<claim>/<folder>)")
    previous_storage_uri: str | None = Field(
        None, description="what the InferenceService served before this job (restored, or kept by the canary "
        "rollback, when the smoke test fails)")
    smoke_job: str | None = Field(None, description="the batch/v1 Job running the smoke test")
    smoke_url: str | None = Field(
        None, description="where the smoke test sent its images: with a canary, the new revision's own URL "
        "(KServe's tag routing, the traffic target tagged latest) when KServe reports one, else the "
        "InferenceService's address (then it measures the traffic mix)")
    smoke_accuracy: float | None = Field(None, description="accuracy of the served model on the held-out images")
    smoke_samples: int | None = Field(None, ge=0, json_schema_extra={"format": "int64"},
                                      description="images the smoke test sent")
    promoted: bool | None = Field(
        None, description="true: this export takes the InferenceService's traffic; false: it was not promoted "
        "(the Served condition says why); absent while undecided")
