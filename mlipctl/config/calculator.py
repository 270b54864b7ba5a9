"""What computes energies in an engine: an mlipctl model file or any registry reference calculator."""

from __future__ import annotations

import typing
from typing import Annotated, Literal

from pydantic import Field

from mlipctl.config.base import InputPath, StrictModel
from mlipctl.config.reference import ReferenceConfig


class ModelFileConfig(StrictModel):
    """A trained mlipctl potential (``.mlip`` file), run through its jitted functions."""

    kind: Literal["mlip"] = Field(default="mlip", description="Use an mlipctl model file.")
    path: InputPath = Field(description="Path of the .mlip model file written by `mlipctl fit`.")


def _reference_variants() -> tuple[type, ...]:
    union = typing.get_args(ReferenceConfig)[0]
    return typing.get_args(union) or (union,)


CalculatorConfig = Annotated[
    typing.Union[(ModelFileConfig, *_reference_variants())],  # noqa: UP007 - built at runtime
    Field(discriminator="kind"),
]
"""``{kind: mlip, path: m.mlip}`` or any reference kind (``emt``, ``lj``, ``eam``, ``import``...)."""
