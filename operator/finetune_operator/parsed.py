"""A FineTuneJob as one reconcile pass sees it, read from the API object once at the top of the pass.

Builders, admission, drift and derive_status take this value rather than the raw dict, so the spec is
validated once per pass and every spec default comes from the model (finetune_api.spec) alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from finetune_api.errors import JobFileError
from finetune_api.spec import API_GROUP, API_VERSION, KIND, FineTuneJobSpec, Output, RunPolicy, Training, parse_spec
from finetune_api.status import STOP_ANNOTATION
from finetune_operator.settings import Settings

# Kubernetes objects: as a builder makes them (Obj), and as a pass reads them (ObjView: kopf bodies and
# API answers are read-only mappings).
Obj = dict[str, Any]
ObjView = Mapping[str, Any]

Section = TypeVar("Section", bound=BaseModel)


@dataclass(frozen=True)
class FineTuneJob:
    """Metadata, the stored status and the validated spec (or why it did not validate). Read-only."""

    api_version: str
    name: str
    namespace: str
    uid: str
    generation: int
    labels: Mapping[str, str]
    created: str | None  # metadata.creationTimestamp
    status: Mapping[str, Any]  # as stored: derive_status starts from it
    spec: FineTuneJobSpec | None
    error: str | None  # the field-naming message when spec is None
    # The spec as its digest sees it (drift): resolved (defaults filled in) when it validates, else as written.
    wire_spec: Mapping[str, Any]
    # The sections status derivation reads (epochs, deadlines, output path). They come from the spec; when
    # the spec as a whole does not validate (a cross-field rule), each section on its own, so the status of
    # a Job created before the spec broke still shows the user's epochs and deadlines.
    training: Training
    run_policy: RunPolicy
    output: Output
    stop: str | None = None  # the finetune.dev/stop annotation: stop this job (a sweep pruned it, or a person)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> FineTuneJob:
        meta = body.get("metadata") or {}
        written = body.get("spec")
        try:
            spec, error = parse_spec(written), None
        except JobFileError as err:
            spec, error = None, str(err)
        raw = written if isinstance(written, Mapping) else {}
        return cls(
            api_version=body.get("apiVersion") or f"{API_GROUP}/{API_VERSION}",
            name=meta["name"],
            namespace=meta.get("namespace") or "",
            uid=meta.get("uid") or "",
            generation=meta.get("generation", 0),
            labels=dict(meta.get("labels") or {}),
            created=meta.get("creationTimestamp"),
            status=body.get("status") or {},
            spec=spec,
            error=error,
            wire_spec=spec.to_wire() if spec is not None else raw,
            training=spec.training if spec is not None else spec_section(Training, raw, "training"),
            run_policy=spec.run_policy if spec is not None else spec_section(RunPolicy, raw, "runPolicy"),
            output=spec.output if spec is not None else spec_section(Output, raw, "output"),
            stop=(meta.get("annotations") or {}).get(STOP_ANNOTATION),
        )

    def valid_spec(self) -> FineTuneJobSpec:
        """The validated spec; raises JobFileError with the one-line, field-naming message when it is invalid."""
        if self.spec is None:
            raise JobFileError(self.error or "spec: did not validate")
        return self.spec

    def owner(self) -> dict[str, Any]:
        """What owner references and Events need of the FineTuneJob (kopf.append_owner_reference reads these)."""
        return {
            "apiVersion": self.api_version,
            "kind": KIND,
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
        }

    def startup_deadline_seconds(self, settings: Settings) -> int:
        """spec.runPolicy.startupDeadlineSeconds, else the operator's setting."""
        return self.run_policy.startup_deadline_seconds or settings.startup_deadline_seconds


def spec_section(model: type[Section], spec: Mapping[str, Any] | None, key: str) -> Section:
    """One top-level section of a spec dict validated on its own; the model's defaults when it does not validate."""
    try:
        return model.model_validate((spec or {}).get(key) or {})
    except ValidationError:
        return model()
