"""`mlipctl relax`: geometry (and optionally cell) optimisation."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from mlipctl.config.base import StrictModel
from mlipctl.config.calculator import CalculatorConfig, ModelFileConfig
from mlipctl.config.structures import StructureSource


class FireConfig(StrictModel):
    """ASE's FIRE optimiser."""

    kind: Literal["fire"] = Field(default="fire", description="ASE FIRE.")
    maxstep: float = Field(default=0.2, gt=0, description="Largest step of any atom, Å.")
    dt: float = Field(default=0.1, gt=0, description="Initial FIRE time step (ASE units).")


class BFGSConfig(StrictModel):
    """ASE's BFGS optimiser."""

    kind: Literal["bfgs"] = Field(default="bfgs", description="ASE BFGS.")
    maxstep: float = Field(default=0.2, gt=0, description="Largest step of any atom, Å.")
    alpha: float = Field(default=70.0, gt=0, description="Initial Hessian guess, eV/Å².")


class LBFGSConfig(StrictModel):
    """ASE's LBFGS optimiser."""

    kind: Literal["lbfgs"] = Field(default="lbfgs", description="ASE LBFGS.")
    maxstep: float = Field(default=0.2, gt=0, description="Largest step of any atom, Å.")
    memory: int = Field(default=100, ge=1, description="Number of steps kept for the Hessian.")


class JaxFireConfig(StrictModel):
    """FIRE compiled with JAX, for mlipctl models only (all steps run on the device)."""

    kind: Literal["jax_fire"] = Field(default="jax_fire", description="Jitted FIRE (models only).")
    dt: float = Field(
        default=0.05, gt=0, description="Initial time step, ASE units (Å·sqrt(u/eV))."
    )
    dt_max: float = Field(default=0.5, gt=0, description="Largest time step.")
    maxstep: float = Field(default=0.2, gt=0, description="Largest step of any atom, Å.")


OptimizerConfig = Annotated[
    FireConfig | BFGSConfig | LBFGSConfig | JaxFireConfig, Field(discriminator="kind")
]


class FixedCellConfig(StrictModel):
    """Keep the cell fixed; relax positions only."""

    kind: Literal["fixed"] = Field(default="fixed", description="Fixed cell.")


class VariableCellConfig(StrictModel):
    """Relax positions and cell with ASE's FrechetCellFilter."""

    kind: Literal["variable"] = Field(default="variable", description="Variable cell.")
    pressure_gpa: float = Field(default=0.0, description="Target hydrostatic pressure, GPa.")
    hydrostatic_strain: bool = Field(
        default=False, description="Only allow a uniform scaling of the cell."
    )


CellConfig = Annotated[FixedCellConfig | VariableCellConfig, Field(discriminator="kind")]


class RelaxConfig(StrictModel):
    """Config of `mlipctl relax`."""

    calculator: CalculatorConfig = Field(description="Model file or reference calculator.")
    structure: StructureSource = Field(description="Structure to relax.")
    optimizer: OptimizerConfig = Field(default_factory=FireConfig, description="Optimiser.")
    cell: CellConfig = Field(
        default_factory=FixedCellConfig, description="Cell degrees of freedom."
    )
    fmax: float = Field(default=0.01, gt=0, description="Convergence: max force, eV/Å.")
    max_steps: int = Field(
        default=1000, ge=1, description="Give up (and fail) after this many steps."
    )
    fixed_atoms: list[int] = Field(default_factory=list, description="Indices of atoms kept fixed.")
    trajectory_interval: int = Field(
        default=1, ge=1, description="Write every n-th step to the trajectory."
    )
    output: str = Field(default="runs/relax", description="Output directory.")

    @model_validator(mode="after")
    def _check(self) -> RelaxConfig:
        if isinstance(self.optimizer, JaxFireConfig):
            if not isinstance(self.calculator, ModelFileConfig):
                raise ValueError("optimizer jax_fire needs calculator kind 'mlip' (a model file)")
            if not isinstance(self.cell, FixedCellConfig):
                raise ValueError(
                    "optimizer jax_fire supports a fixed cell only; use fire/bfgs/lbfgs"
                )
        if any(i < 0 for i in self.fixed_atoms):
            raise ValueError("fixed_atoms must be non-negative atom indices")
        return self
