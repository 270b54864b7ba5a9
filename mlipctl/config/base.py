"""Base class of every config model: strict, documented, immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Unknown keys are errors; every field must carry a ``description`` (a test enforces it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
