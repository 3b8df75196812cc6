"""spec.head: the new classifier that replaces the backbone's, one Linear or an MLP.

Part of the FineTuneJob spec (re-exported by finetune_api.spec); like it, no torch here. The list of
hidden widths is a field of its own (`layers`) rather than a second type of `hiddenUnits`: the CRD is
generated from this model, and a Kubernetes structural schema gives an int-or-list field no type, which
leaves the API server unable to check it and CEL rules unable to see it. Rules between the fields are
mirrored as CEL rules in finetune_operator.crd.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from finetune_api.base import _Model


class Head(_Model):
    """The new classifier: one Linear, or an MLP of hidden layers (Linear, norm, activation, dropout each)
    before the output Linear. `hiddenUnits: N` is the one-hidden-layer form of `layers: [N]`."""

    hidden_units: int = Field(0, ge=0, le=65536, description="0 = one Linear layer; N = one hidden layer of N "
                              "units (the same head as layers: [N])")
    layers: list[Annotated[int, Field(ge=1, le=65536)]] | None = Field(
        None, min_length=1, max_length=8,
        description="widths of the hidden layers, input side first (an MLP head); instead of hiddenUnits",
    )
    activation: Literal["relu", "gelu", "silu"] = Field("relu", description="after each hidden layer")
    norm: Literal["none", "batchnorm", "layernorm"] = Field(
        "none", description="after each hidden Linear, before the activation")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="before the output Linear (and every Linear after "
                           "the first in an MLP head)")

    @model_validator(mode="after")
    def _one_form(self) -> Head:
        if self.layers is not None and self.hidden_units:
            raise ValueError("set one of head.layers or head.hiddenUnits (hiddenUnits N is layers [N])")
        if not self.widths and (self.activation != "relu" or self.norm != "none"):
            raise ValueError("head.activation and head.norm need hidden layers (head.layers or head.hiddenUnits)")
        return self

    @property
    def widths(self) -> list[int]:
        """Hidden-layer widths, input side first ([] = one Linear)."""
        if self.layers is not None:
            return list(self.layers)
        return [self.hidden_units] if self.hidden_units else []
