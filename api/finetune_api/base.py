"""What every part of the spec model shares: the camelCase base model, path rules and Kubernetes patterns."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Kubernetes quantities such as "500m", "4", "16Gi", "1.5".
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
# DNS-1123 label: volume names, container names.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_PATH = 1024
MAX_NAME = 253


def _no_parent_segments(path: str | None) -> str | None:
    """Reject '..' path segments and control characters: paths end up in pod specs and file I/O."""
    if path is None:
        return None
    if any(part == ".." for part in re.split(r"[\\/]", path)):
        raise ValueError("must not contain '..' segments")
    if any(ord(c) < 32 for c in path):
        raise ValueError("must not contain control characters")
    return path


PathStr = Annotated[str, Field(min_length=1, max_length=MAX_PATH)]


class _Model(BaseModel):
    """Base: camelCase aliases, unknown fields rejected, assignment validated."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        frozen=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict as it appears in YAML and in the CRD."""
        return self.model_dump(by_alias=True, mode="json", exclude_none=True)
