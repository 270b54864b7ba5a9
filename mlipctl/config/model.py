"""Model settings of `mlipctl fit`: architecture (a discriminated union on ``kind``), ensemble, dtype.

No jax/flax imports here: configs must import fast and stay usable without the model layer.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from mlipctl.config.base import StrictModel


class MomentModelConfig(StrictModel):
    """Moment-tensor potential (Gaussian-moment / MTP-like): learned species-pair radial functions,
    moment tensors up to order 3 contracted to rotation invariants, per-element MLP readout."""

    kind: Literal["moment"] = Field(
        default="moment", description="Moment-tensor descriptor + per-element MLP readout."
    )
    cutoff: float = Field(
        default=5.0, gt=0, le=15.0, description="Neighbour cutoff radius r_c in Å."
    )
    n_basis: int = Field(
        default=8, ge=1, le=64, description="Number of radial basis functions (before mixing)."
    )
    basis: Literal["gaussian", "bessel"] = Field(
        default="gaussian",
        description="Radial basis: Gaussians with centres evenly spaced on [r_min, cutoff], or "
        "spherical Bessel functions sin(n*pi*r/r_c)/r. Both are multiplied by a polynomial "
        "envelope whose value and first two derivatives vanish at the cutoff.",
    )
    envelope_power: int = Field(
        default=3,
        ge=2,
        le=12,
        description="p of the polynomial cutoff envelope 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) "
        "- p(p+1)/2 x^(p+2), x = r / cutoff (value, first and second derivative 0 at the "
        "cutoff). 3: 1 - 10x^3 + 15x^4 - 6x^5, already 0.5 at half the cutoff; larger p keeps "
        "it near 1 further out (p = 6: 0.86 at half the cutoff).",
    )
    r_min: float = Field(
        default=0.5,
        ge=0,
        description="Centre of the first Gaussian in Å (unused by the Bessel basis).",
    )
    n_radial: int = Field(
        default=6,
        ge=1,
        le=16,
        description="Number of learned radial channels (species-pair-dependent linear "
        "combinations of the basis). The descriptor size grows roughly as n_radial**3.",
    )
    radial_per_order: bool = Field(
        default=False,
        description="Give each moment order (0..max_order) its own n_radial learned radial "
        "channels, as MTP does, instead of one set shared by all orders. Same descriptor "
        "size; (max_order + 1) x the radial weights, ~1.2-1.35x the inference time.",
    )
    radial_tie_decay: float = Field(
        default=0.0,
        ge=0.0,
        description="With radial_per_order: > 0 writes each order's radial weights as one shared "
        "set plus a per-order deviation, and the deviations decay towards zero at this rate "
        "(decoupled, AdamW-style: d <- d - lr * rate * d each step), so the orders share their "
        "radial functions unless the data pull them apart. 0: independent sets per order.",
    )
    max_order: int = Field(
        default=3,
        ge=0,
        le=4,
        description="Highest moment-tensor order (0: radial only, 2-body; 1: + vector moments, "
        "3-body; 2 and 3: + matrix and rank-3 moments and their 4-body contractions; 4: + "
        "rank-4 moments, finer 3-body angles (l <= 4) and (M4:M2):M2).",
    )
    hidden: tuple[int, ...] = Field(
        default=(64, 64),
        description="Hidden-layer widths of the per-element readout MLP (may be empty: linear "
        "readout).",
    )
    activation: Literal["silu", "tanh", "gelu", "softplus", "shifted_softplus"] = Field(
        default="silu",
        description="Activation of the readout MLP (smooth, so forces are continuous).",
    )
    linear_readout: bool = Field(
        default=True,
        description="Add a linear term w_z . x of the standardised descriptor to each element's "
        "MLP output. It lets the readout extrapolate linearly where descriptors lie far outside "
        "the bulk-dominated training distribution (surface atoms), which an MLP alone fits badly.",
    )
    avg_num_neighbors: float = Field(
        default=30.0,
        gt=0,
        description="Moments are divided by this number so that descriptor entries are O(1); "
        "set it to the typical neighbour count within the cutoff.",
    )

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(int(h) < 1 for h in v):
            raise ValueError(f"hidden layer widths must be >= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _tie_needs_per_order(self) -> MomentModelConfig:
        if self.radial_tie_decay > 0 and not self.radial_per_order:
            raise ValueError("radial_tie_decay > 0 needs radial_per_order: true")
        return self

    @model_validator(mode="after")
    def _r_min_below_cutoff(self) -> MomentModelConfig:
        if self.basis == "gaussian" and self.r_min >= self.cutoff:
            raise ValueError(f"r_min ({self.r_min} Å) must be below the cutoff ({self.cutoff} Å)")
        return self


# A discriminated union with one member today; new architectures add a variant with their own kind.
ArchitectureConfig = Annotated[Union[MomentModelConfig], Field(discriminator="kind")]  # noqa: UP007


class EnsembleConfig(StrictModel):
    """Committee of models whose spread estimates the uncertainty."""

    kind: Literal["none", "deep", "shallow"] = Field(
        default="none",
        description="none: one model; deep: `size` independently initialised models (size x cost); "
        "shallow: one shared descriptor and hidden layers with `size` output heads (cheap).",
    )
    size: int = Field(
        default=1, ge=1, le=64, description="Number of members (1 for none, >= 2 otherwise)."
    )

    @model_validator(mode="after")
    def _size_matches_kind(self) -> EnsembleConfig:
        if self.kind == "none" and self.size != 1:
            raise ValueError(f"ensemble kind 'none' needs size 1, got {self.size}")
        if self.kind != "none" and self.size < 2:
            raise ValueError(f"ensemble kind {self.kind!r} needs size >= 2, got {self.size}")
        return self


class ModelConfig(StrictModel):
    """Architecture, ensemble and floating-point precision of the potential."""

    architecture: ArchitectureConfig = Field(
        default_factory=MomentModelConfig, description="Architecture (selected by `kind`)."
    )
    ensemble: EnsembleConfig = Field(
        default_factory=EnsembleConfig, description="Ensemble for uncertainty estimates."
    )
    dtype: Literal["float32", "float64"] = Field(
        default="float32",
        description="Precision of parameters and network arithmetic; edge vectors and energy "
        "sums are always float64.",
    )
