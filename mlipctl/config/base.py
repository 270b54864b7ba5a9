"""Base class and shared field types of every config model: strict, documented, immutable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo


class StrictModel(BaseModel):
    """Unknown keys are errors; every field must carry a ``description`` (a test enforces it)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_exists(path: Path, info: ValidationInfo) -> Path:
    # Existence is checked only when a real run loads the config (context check_files=True), so
    # `mlipctl template` and `schema` work on machines without the data.
    if info.context and info.context.get("check_files") and not Path(path).expanduser().exists():
        raise ValueError(f"file not found: {path} (relative paths are resolved from {Path.cwd()})")
    return path


InputPath = Annotated[Path, AfterValidator(_check_exists)]
"""A path that must exist when the config is loaded for a run."""
