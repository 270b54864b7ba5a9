"""`mlipctl validate`: defect energetics of a model against a reference calculator."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mlipctl.config.base import InputPath, StrictModel
from mlipctl.config.reference import ReferenceConfig, default_reference
from mlipctl.config.structures import CrystalKind

Check = Literal["vacancy", "interstitial", "divacancy", "surface", "bulk"]


class ValidateCrystalConfig(StrictModel):
    """Host crystal; unset fields are read from the model (element) or fitted (lattice constant)."""

    element: str | None = Field(
        default=None, description="Chemical symbol (None: the model's only element)."
    )
    structure: CrystalKind | None = Field(
        default=None, description="Crystal structure (None: ASE's reference state of the element)."
    )
    min_atoms: int = Field(
        default=250, ge=32, description="Smallest supercell used for defects (atoms)."
    )


class Thresholds(StrictModel):
    """Acceptance thresholds. Defaults follow common practice for transferable potentials."""

    vacancy_formation_ev: float = Field(
        default=0.05, gt=0, description="|ΔE_f| of the vacancy, eV (about 5 % of a typical 1 eV)."
    )
    migration_rel: float = Field(
        default=0.10, gt=0, description="|ΔE_m| / E_m(ref) of the vacancy hop (10 %)."
    )
    profile_shape_rel: float = Field(
        default=0.10,
        gt=0,
        description="RMS difference of the two NEB energy profiles, each divided by its own "
        "barrier (shape only: the height is judged by migration_rel).",
    )
    force_consistency_rel: float = Field(
        default=0.05,
        gt=0,
        description="Relative error between finite-difference dE/ds and −F·τ along the path.",
    )
    jump_ratio: float = Field(
        default=10.0,
        gt=1,
        description="Largest second difference along the dense path / the median one.",
    )
    defect_energy_ev: float = Field(
        default=0.10, gt=0, description="|ΔE| of interstitial and divacancy energies, eV."
    )
    surface_energy_rel: float = Field(
        default=0.10, gt=0, description="Relative error of surface energies (J/m²)."
    )
    lattice_constant_rel: float = Field(
        default=0.01, gt=0, description="Relative error of the lattice constant."
    )
    bulk_modulus_rel: float = Field(default=0.10, gt=0, description="Relative error of B.")
    elastic_rel: float = Field(default=0.15, gt=0, description="Relative error of C11, C12, C44.")


class ValidateConfig(StrictModel):
    """Config of `mlipctl validate`."""

    model: InputPath = Field(description="The .mlip model file to validate.")
    reference: ReferenceConfig = Field(
        default_factory=default_reference, description="Reference calculator (default EMT)."
    )
    crystal: ValidateCrystalConfig = Field(
        default_factory=ValidateCrystalConfig, description="Host crystal."
    )
    checks: list[Check] = Field(default_factory=lambda: ["vacancy"], description="Checks to run.")
    thresholds: Thresholds = Field(default_factory=Thresholds, description="Acceptance thresholds.")
    fmax: float = Field(default=0.01, gt=0, description="Relaxation tolerance, eV/Å.")
    neb_images: int = Field(default=7, ge=3, description="Intermediate NEB images.")
    neb_fmax: float = Field(default=0.01, gt=0, description="NEB convergence, eV/Å.")
    dense_points: int = Field(
        default=10, ge=10, description="Points between images for the force-smoothness check."
    )
    test_set: InputPath | None = Field(
        default=None, description="Labelled structures for E/F/S test-set metrics."
    )
    transferability: list[InputPath] = Field(
        default_factory=list,
        description="Structure files for the coordination/disorder error map (none: generate "
        "surfaces and a melt-quenched amorphous cell with the reference).",
    )
    output: str = Field(default="runs/validate", description="Output directory.")

    @model_validator(mode="after")
    def _check(self) -> ValidateConfig:
        if not self.checks:
            raise ValueError("checks must name at least one check")
        if len(set(self.checks)) != len(self.checks):
            raise ValueError("checks lists a check twice")
        if self.crystal.element is not None:
            from mlipctl.config.elements import check_symbol

            check_symbol(self.crystal.element)
        return self
