"""Training data: files, label keys, weights, splits and per-element reference energies."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from mlipctl.config.base import InputPath, StrictModel


class LeastSquaresReference(StrictModel):
    """Fit one energy per element to the training energies (E ~ sum_Z n_Z e_Z)."""

    kind: Literal["least_squares"] = Field(
        default="least_squares",
        description="Per-element reference energies by linear least squares on the training set.",
    )


class IsolatedAtomsReference(StrictModel):
    """Reference energies given explicitly, e.g. isolated-atom DFT energies."""

    kind: Literal["isolated_atoms"] = Field(
        default="isolated_atoms", description="Use the given per-element energies."
    )
    energies: dict[str, float] = Field(
        description="Energy in eV of one isolated atom per element symbol, e.g. {Cu: -0.2}."
    )

    @field_validator("energies")
    @classmethod
    def _symbols_known(cls, value: dict[str, float]) -> dict[str, float]:
        from mlipctl.config.elements import check_symbol

        if not value:
            raise ValueError("give at least one element energy")
        for symbol in value:
            check_symbol(symbol)
        return value


class NoReference(StrictModel):
    """No per-element offset: the model learns total energies directly."""

    kind: Literal["none"] = Field(default="none", description="Do not subtract reference energies.")


ReferenceEnergies = Annotated[
    LeastSquaresReference | IsolatedAtomsReference | NoReference, Field(discriminator="kind")
]


class DataConfig(StrictModel):
    """Where labelled structures come from and how they are weighted and split."""

    path: InputPath = Field(description="Training structures (extxyz or any ASE-readable file).")
    valid_path: InputPath | None = Field(
        default=None,
        description="Separate validation file. None: split valid_fraction off the training file.",
    )
    test_path: InputPath | None = Field(
        default=None,
        description="Separate test file. None: split test_fraction off the training file.",
    )
    index: str = Field(
        default=":", description="ASE index selector applied to every file: ':' all, '0:100:2'."
    )
    energy_key: str = Field(default="energy", description="info key of the total energy (eV).")
    forces_key: str = Field(default="forces", description="arrays key of the forces (eV/Å).")
    stress_key: str = Field(
        default="stress",
        description="info key of the stress (eV/Å³, ASE sign: positive = tensile), 3x3 or Voigt 6.",
    )
    config_type_key: str = Field(
        default="config_type", description="info key of a structure's group label."
    )
    weight_key: str | None = Field(
        default=None, description="info key of a per-structure weight (None: weight 1)."
    )
    config_type_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Weight per config_type, multiplied into each structure's weight; "
        "types not listed get 1.0.",
    )
    valid_fraction: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Fraction of the training file held out for validation (ignored with valid_path).",
    )
    test_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Fraction of the training file held out for testing (ignored with test_path).",
    )
    stratify: bool = Field(
        default=True,
        description="Split each config_type separately so small groups appear in every split.",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the train/valid/test split.")
    reference_energies: ReferenceEnergies = Field(
        default_factory=LeastSquaresReference,
        description="Per-element energy offsets: least_squares, isolated_atoms or none.",
    )

    @field_validator("config_type_weights")
    @classmethod
    def _weights_non_negative(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not v >= 0.0}
        if bad:
            raise ValueError(f"config_type weights must be >= 0, got {bad}")
        return value

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        valid = 0.0 if self.valid_path is not None else self.valid_fraction
        test = 0.0 if self.test_path is not None else self.test_fraction
        if valid + test >= 1.0:
            raise ValueError(
                f"valid_fraction + test_fraction must be < 1 to leave training data, got "
                f"{self.valid_fraction} + {self.test_fraction}"
            )
        return self
