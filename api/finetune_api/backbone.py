"""spec.model: the backbone — which library and architecture, and where its pretrained weights come from.

Part of the FineTuneJob spec (re-exported by finetune_api.spec; the distillation teacher reuses it);
like it, no torch here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from finetune_api.architectures import ARCHITECTURES
from finetune_api.base import PathStr, _Model, _no_parent_segments
from finetune_api.source import RemoteSource


class Weights(RemoteSource):
    """Where the pretrained backbone comes from (uri: a file fetched and verified before training)."""

    # Unset means "the library's own pretrained weights" (torchvision, or timm for a timm model); the model
    # resolves it, so the CRD carries no default the API server would fill in for a timm model.
    source: Literal["torchvision", "timm", "file", "none"] | None = Field(
        None,
        description="torchvision: a named weights enum; timm: timm's pretrained weights (hub download and cache); "
        "file: a local state_dict (path) or one fetched from uri; none: random init. Default: the model.library's "
        "own weights (file when uri is set)",
    )
    name: str = Field(
        "DEFAULT",
        max_length=64,
        pattern=r"^[A-Za-z0-9_]+$",
        description="torchvision: weights enum member, e.g. IMAGENET1K_V1; timm: pretrained tag, e.g. in1k; "
        "DEFAULT: the library's default weights",
    )
    path: PathStr | None = Field(None, description="file: a state_dict, checkpoint or .safetensors file")

    @model_validator(mode="after")
    def _path_rules(self) -> Weights:
        _no_parent_segments(self.path)
        self.check_source_fields("weights")
        if self.uri is not None:
            if self.path is not None:
                raise ValueError("weights: set one of weights.path or weights.uri")
            if self.source not in (None, "file"):
                raise ValueError(f"weights.uri needs weights.source 'file' (got {self.source!r})")
            if self.source is None:  # (assignment re-runs this validator: only when it changes something)
                self.source = "file"  # the fetched file is loaded like a path
        if self.source == "file" and not (self.path or self.uri):
            raise ValueError("weights.path is required when weights.source is 'file' (or weights.uri)")
        return self


LIBRARIES = ("torchvision", "timm")
# timm model names: lower-case words, digits and underscores (the pretrained tag goes in weights.name).
TIMM_NAME_PATTERN = r"^[a-z0-9][a-z0-9_]*$"


class ModelSpec(_Model):
    library: Literal[LIBRARIES] = Field(  # type: ignore[valid-type]
        "torchvision", description="where the architecture comes from: torchvision or timm"
    )
    architecture: str = Field(
        "resnet18",
        min_length=1,
        max_length=128,
        pattern=TIMM_NAME_PATTERN,
        description="torchvision: a torchvision classification model name; timm: any timm classification model",
    )
    weights: Weights = Field(default_factory=Weights)

    @field_validator("architecture")
    @classmethod
    def _known_torchvision_name(cls, value: str, info: ValidationInfo) -> str:
        # timm names are checked by the trainer, which has timm (the operator does not).
        if info.data.get("library", "torchvision") == "torchvision" and value not in ARCHITECTURES:
            sample = ", ".join(ARCHITECTURES[:8])
            raise ValueError(f"Input should be one of {len(ARCHITECTURES)} torchvision names such as {sample}, … "
                             "(or set model.library: timm)")
        return value

    @model_validator(mode="after")
    def _weights_match_library(self) -> ModelSpec:
        if self.weights.source is None:
            self.weights.source = self.library
        if self.weights.source in LIBRARIES and self.weights.source != self.library:
            raise ValueError(f"model.weights.source {self.weights.source!r} needs model.library "
                             f"{self.weights.source!r} (got {self.library!r})")
        return self
