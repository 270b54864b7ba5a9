"""`mlipctl fit`: data, model and training settings, and where the results go.

Rules that need the data itself (e.g. a stress weight > 0 requires stress labels) are checked when
the fit reads the data, with a message naming the file and the key.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator, model_validator

from mlipctl.config.base import StrictModel
from mlipctl.config.data import DataConfig
from mlipctl.config.model import ModelConfig
from mlipctl.config.training import ReduceOnPlateauSchedule, TrainingConfig

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class FitConfig(StrictModel):
    """Config of `mlipctl fit`."""

    data: DataConfig = Field(description="Labelled structures, splits and reference energies.")
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Architecture, ensemble and precision."
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="Optimiser, schedule, loss and stopping."
    )
    output: str = Field(
        default="runs/fit",
        description="Output folder: model.mlip, metrics.csv, plots, results.json, checkpoint.",
    )
    name: str = Field(
        default="mlip",
        description="Name stored in the model file's metadata (letters, digits, '_', '.', '-').",
    )

    @field_validator("name")
    @classmethod
    def _simple_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                f"name must start with a letter or digit and contain only letters, digits, "
                f"'_', '.' and '-', got {value!r}"
            )
        return value

    @field_validator("output")
    @classmethod
    def _output_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("output must name a folder")
        return value

    @model_validator(mode="after")
    def _check_training(self) -> FitConfig:
        t = self.training
        if t.refit is not None and self.model.ensemble.kind == "shallow":
            raise ValueError(
                "training.refit does not work with a shallow ensemble: its heads share the "
                "features, so an exact refit would make them equal; use a deep ensemble"
            )
        has_valid = self.data.valid_path is not None or self.data.valid_fraction > 0
        if has_valid:
            return self
        if t.refit is not None and t.refit.ridge is None:
            raise ValueError(
                "training.refit without a ridge chooses it on validation data: set "
                "data.valid_fraction > 0 or data.valid_path, or set training.refit.ridge"
            )
        if t.early_stopping.enabled:
            raise ValueError(
                "training.early_stopping needs validation data: set data.valid_fraction > 0 or "
                "data.valid_path, or set training.early_stopping.enabled: false"
            )
        if isinstance(t.schedule, ReduceOnPlateauSchedule):
            raise ValueError(
                "schedule reduce_on_plateau needs validation data: set data.valid_fraction > 0 "
                "or data.valid_path, or choose another schedule"
            )
        return self
