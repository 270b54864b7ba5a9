"""`mlipctl md`: molecular dynamics with on-the-fly monitors."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from mlipctl.config.base import InputPath, StrictModel
from mlipctl.config.calculator import CalculatorConfig
from mlipctl.config.structures import StructureSource


class NVEConfig(StrictModel):
    """Microcanonical velocity Verlet."""

    kind: Literal["nve"] = Field(default="nve", description="NVE, velocity Verlet.")


class LangevinConfig(StrictModel):
    """Langevin thermostat (BAOAB-style splitting)."""

    kind: Literal["langevin"] = Field(default="langevin", description="NVT, Langevin.")
    temperature_k: float = Field(gt=0, description="Target temperature, K.")
    friction_per_ps: float = Field(default=1.0, gt=0, description="Friction coefficient, 1/ps.")


class NoseHooverChainConfig(StrictModel):
    """Nosé–Hoover chain thermostat."""

    kind: Literal["nose_hoover_chain"] = Field(
        default="nose_hoover_chain", description="NVT, Nosé–Hoover chain."
    )
    temperature_k: float = Field(gt=0, description="Target temperature, K.")
    tdamp_fs: float = Field(default=100.0, gt=0, description="Thermostat time constant, fs.")
    chain_length: int = Field(default=3, ge=1, description="Number of thermostats in the chain.")


class BussiConfig(StrictModel):
    """Bussi–Donadio–Parrinello stochastic velocity rescaling."""

    kind: Literal["bussi"] = Field(default="bussi", description="NVT, Bussi velocity rescaling.")
    temperature_k: float = Field(gt=0, description="Target temperature, K.")
    taut_fs: float = Field(default=100.0, gt=0, description="Thermostat time constant, fs.")


class BerendsenNPTConfig(StrictModel):
    """Isotropic Berendsen barostat with a Berendsen thermostat (equilibration, not sampling)."""

    kind: Literal["npt_berendsen"] = Field(
        default="npt_berendsen", description="NPT, isotropic Berendsen."
    )
    temperature_k: float = Field(gt=0, description="Target temperature, K.")
    pressure_gpa: float = Field(default=0.0, description="Target pressure, GPa.")
    taut_fs: float = Field(default=100.0, gt=0, description="Thermostat time constant, fs.")
    taup_fs: float = Field(default=1000.0, gt=0, description="Barostat time constant, fs.")
    compressibility_per_gpa: float = Field(
        default=0.01, gt=0, description="Isothermal compressibility estimate, 1/GPa."
    )


EnsembleConfig = Annotated[
    NVEConfig | LangevinConfig | NoseHooverChainConfig | BussiConfig | BerendsenNPTConfig,
    Field(discriminator="kind"),
]


class MaxForceMonitor(StrictModel):
    """Flags frames whose largest atomic force exceeds a threshold."""

    kind: Literal["max_force"] = Field(default="max_force", description="Max |F| monitor.")
    threshold: float = Field(gt=0, description="Trigger when max |F| exceeds this, eV/Å.")


class TemperatureMonitor(StrictModel):
    """Flags frames whose instantaneous temperature exceeds a threshold."""

    kind: Literal["temperature"] = Field(default="temperature", description="Temperature monitor.")
    threshold_k: float = Field(gt=0, description="Trigger when T exceeds this, K.")


class EnsembleStdMonitor(StrictModel):
    """Flags frames whose calibrated ensemble spread exceeds a threshold (models with K >= 2).

    The spread is multiplied by the calibration factor stored in the model file (fitted by
    `mlipctl uncertainty`). ``forces``: the largest per-atom ``sqrt(sum_c sigma_c^2)`` over the
    Cartesian components (an extra backward pass per member on monitor steps); ``energy``: the
    spread of the total energy divided by the number of atoms.
    """

    kind: Literal["ensemble_std"] = Field(
        default="ensemble_std", description="Calibrated ensemble-spread monitor."
    )
    quantity: Literal["forces", "energy"] = Field(
        default="forces", description="Spread of the forces (per atom) or of the energy."
    )
    threshold: float = Field(
        gt=0, description="Trigger above this spread: eV/Å (forces) or eV/atom (energy)."
    )


class MahalanobisMonitor(StrictModel):
    """Flags frames with an atom outside the training descriptor distribution (Mahalanobis
    distance above the F-rule threshold for a frame false-alarm rate ``alpha``)."""

    kind: Literal["mahalanobis"] = Field(
        default="mahalanobis", description="Mahalanobis distance of the model's descriptors."
    )
    domain_model: InputPath = Field(
        description="domain.npz written by `mlipctl uncertainty` for this model."
    )
    alpha: float = Field(
        default=0.01, gt=0, lt=1, description="False-alarm rate per in-distribution frame."
    )
    sidak: bool = Field(
        default=True, description="Šidák correction over the atoms of the frame (frame rate)."
    )


class GammaMonitor(StrictModel):
    """Flags frames whose MaxVol extrapolation grade γ exceeds a threshold (γ <= 1: inside
    the active set's parallelotope, interpolation)."""

    kind: Literal["gamma"] = Field(default="gamma", description="Extrapolation grade γ.")
    domain_model: InputPath = Field(
        description="domain.npz written by `mlipctl uncertainty` for this model."
    )
    threshold: float = Field(
        default=1.5, gt=0, description="Trigger when the largest per-atom γ exceeds this."
    )


class HullMonitor(StrictModel):
    """Flags frames with an atom outside the convex hull of the training descriptors in the
    domain model's PCA space (qhull facet inequalities)."""

    kind: Literal["hull"] = Field(default="hull", description="Convex-hull test.")
    domain_model: InputPath = Field(
        description="domain.npz written by `mlipctl uncertainty` for this model."
    )
    tolerance: float = Field(
        default=0.0,
        ge=0,
        description="Trigger when the largest facet violation exceeds this (PCA units; a "
        "1e-8 round-off allowance is always added, as in the report's hull test).",
    )


MonitorConfig = Annotated[
    MaxForceMonitor
    | TemperatureMonitor
    | EnsembleStdMonitor
    | MahalanobisMonitor
    | GammaMonitor
    | HullMonitor,
    Field(discriminator="kind"),
]


class MonitoringConfig(StrictModel):
    """How monitors run and what a trigger does."""

    interval: int = Field(default=10, ge=1, description="Evaluate monitors every k steps.")
    monitors: list[MonitorConfig] = Field(default_factory=list, description="Monitors to run.")
    on_trigger: Literal["stop", "continue"] = Field(
        default="continue", description="Stop the run at the first trigger, or flag and go on."
    )
    cooldown_steps: int = Field(
        default=100, ge=0, description="After a flagged frame, flag no other for this many steps."
    )
    hysteresis: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Re-arm only once the value has dropped below hysteresis × threshold.",
    )


class BlowUpConfig(StrictModel):
    """Limits beyond which the run is declared unstable, stopped and reported."""

    max_temperature_k: float = Field(default=1.0e4, gt=0, description="Largest credible T, K.")
    max_force: float = Field(default=50.0, gt=0, description="Largest credible |F|, eV/Å.")


class MDConfig(StrictModel):
    """Config of `mlipctl md`."""

    calculator: CalculatorConfig = Field(description="Model file or reference calculator.")
    structure: StructureSource = Field(description="Starting structure.")
    ensemble: EnsembleConfig = Field(
        default_factory=NVEConfig, description="Thermodynamic ensemble."
    )
    timestep_fs: float = Field(default=1.0, gt=0, le=10, description="Time step, fs.")
    steps: int = Field(default=1000, ge=1, description="Number of MD steps.")
    initial_temperature_k: float = Field(
        default=300.0,
        ge=0,
        description="Maxwell–Boltzmann temperature of the initial velocities, K.",
    )
    seed: int = Field(default=0, description="Random seed (velocities, stochastic thermostats).")
    chunk_steps: int = Field(
        default=100, ge=1, description="Steps per compiled chunk (models only)."
    )
    skin: float = Field(default=1.0, ge=0, description="Neighbour-list skin, Å.")
    trajectory_interval: int = Field(default=100, ge=1, description="Write a frame every n steps.")
    log_interval: int = Field(default=10, ge=1, description="Write a thermo line every n steps.")
    checkpoint_interval: int = Field(
        default=1000, ge=1, description="Write a restart checkpoint every n steps."
    )
    monitoring: MonitoringConfig = Field(
        default_factory=MonitoringConfig, description="On-the-fly monitors."
    )
    blow_up: BlowUpConfig = Field(default_factory=BlowUpConfig, description="Instability limits.")
    output: str = Field(default="runs/md", description="Output directory.")

    @model_validator(mode="after")
    def _check(self) -> MDConfig:
        if self.trajectory_interval > self.steps:
            raise ValueError(
                f"trajectory_interval ({self.trajectory_interval}) exceeds steps ({self.steps}): "
                "no frame would be written"
            )
        return self
