"""`mlipctl quickstart`: the main job (EMT by default, or any registry reference), in one command."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mlipctl.config.base import StrictModel
from mlipctl.config.reference import ReferenceConfig, default_reference


class QuickstartConfig(StrictModel):
    """Generate reference-labelled structures, fit an ensemble, validate it on the vacancy."""

    element: str = Field(
        default="Cu",
        description="Element; its crystal is ASE's reference state (EMT knows Al Ni Cu Pd Ag Pt Au).",
    )
    reference: ReferenceConfig = Field(
        default_factory=default_reference,
        description="Reference that labels the data and that the model is validated against.",
    )
    scale: Literal["full", "ci"] = Field(
        default="full",
        description="full: the real job (about 10 minutes on 2 cores); ci: a reduced smoke run "
        "of every step (a few minutes), whose verdict is not meaningful.",
    )
    cutoff: float | None = Field(
        default=None,
        gt=0,
        description="Model cutoff in Å. None: 5 Å scaled by the element's nearest-neighbour "
        "distance relative to Cu's, so every element's model sees the same neighbour shells.",
    )
    ensemble_size: int = Field(default=3, ge=2, le=8, description="Deep-ensemble members.")
    max_epochs: int | None = Field(
        default=None, ge=1, description="Training epochs (None: the scale's default)."
    )
    until: Literal["generate", "label", "fit", "validate"] = Field(
        default="validate", description="Last step to run (the steps run in this order)."
    )
    seed: int = Field(default=0, ge=0, description="Seed of generation, splits and training.")
    output: str = Field(default="quickstart", description="Output directory (one folder a step).")

    @field_validator("element")
    @classmethod
    def _element_known(cls, value: str) -> str:
        from mlipctl.config.elements import check_symbol

        return check_symbol(value)
