"""`mlipctl uncertainty`: calibration, metrics and domain of applicability."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mlipctl.config.base import InputPath, StrictModel


class CalibrationConfig(StrictModel):
    """Global scale factor of the ensemble spread, fitted in closed form by NLL."""

    enabled: bool = Field(default=True, description="Fit and store a calibration scale.")
    finite_ensemble_correction: bool = Field(
        default=True, description="Correct the spread of a K-member ensemble for its finite size."
    )
    predictive: Literal["gaussian", "student_t"] = Field(
        default="gaussian",
        description="Predictive distribution whose scale is fitted: 'gaussian' (closed form) or "
        "'student_t' with K - 1 degrees of freedom (small ensembles, K <= 8, when intervals "
        "matter; needs finite_ensemble_correction).",
    )
    write_to_model: bool = Field(
        default=False, description="Store the fitted scale in the model file (atomically)."
    )

    @model_validator(mode="after")
    def _student_t_needs_correction(self) -> CalibrationConfig:
        if self.predictive == "student_t" and not self.finite_ensemble_correction:
            raise ValueError(
                "predictive 'student_t' is the finite-ensemble predictive itself: it needs "
                "finite_ensemble_correction: true"
            )
        return self


class MetricsConfig(StrictModel):
    """Calibration metrics."""

    n_quantiles: int = Field(default=100, ge=10, description="Centred intervals for ECE.")
    n_bins: int = Field(default=10, ge=2, description="Bins for ENCE and RMSE-vs-RMV.")
    auroc_force_rmse: float | None = Field(
        default=None,
        gt=0,
        description="Per-structure force RMSE (eV/Å) above which a labelled test structure "
        "counts as badly predicted; the report then gives each uncertainty score's AUROC at "
        "detecting such structures (None: no AUROC).",
    )


class DomainConfig(StrictModel):
    """Domain-of-applicability checks on the model's descriptors."""

    enabled: bool = Field(
        default=True, description="Fit the domain model on the training descriptors and run it."
    )
    hull_pca_dim: int = Field(
        default=3,
        ge=1,
        le=20,
        description="PCA dimension of the convex-hull test (3: in-distribution atoms stay inside; at 5+ a 32-atom frame is flagged most of the time, see docs/uncertainty.md).",
    )
    mahalanobis_alpha: float = Field(
        default=0.01, gt=0, lt=1, description="False-alarm rate of the Mahalanobis trigger."
    )
    sidak: bool = Field(default=True, description="Spread alpha over the atoms of a frame.")
    shrinkage: bool = Field(
        default=True,
        description="Ledoit-Wolf shrinkage of the Mahalanobis covariance (makes the F rule "
        "conservative; switch off for an exact false-alarm rate when n >> D).",
    )
    gamma: bool = Field(
        default=True,
        description="Fit the MaxVol extrapolation grade γ (needs D independent training "
        "descriptors per element).",
    )
    gamma_threshold: float = Field(
        default=1.5,
        gt=0,
        description="γ above which a structure counts as extrapolating in the report (γ <= 1: "
        "interpolation); use the same value for the MD gamma monitor.",
    )
    max_kernel_points: int | None = Field(
        default=20000,
        ge=10,
        description="Training atoms per element kept for the kernel distance (random subset; "
        "None: all).",
    )
    save_next_to_model: bool = Field(
        default=False,
        description="Also write the domain model next to the model file as "
        "'<model stem>.domain.npz' (it is always written to the output folder as domain.npz).",
    )


class UncertaintyConfig(StrictModel):
    """Config of `mlipctl uncertainty`."""

    model: InputPath = Field(description="The .mlip model file (an ensemble for spreads).")
    calibration_data: InputPath | None = Field(
        default=None,
        description="Labelled structures for calibration (extxyz). None: the validation split "
        "of the model's fit, rebuilt from the model file's metadata.",
    )
    test_data: InputPath | None = Field(
        default=None,
        description="Labelled structures to evaluate metrics on. None: the test split of the "
        "model's fit if it has one, else the calibration data (in-sample, said in the report).",
    )
    trajectory: InputPath | None = Field(
        default=None, description="Unlabelled trajectory to run the domain checks on."
    )
    training_data: InputPath | None = Field(
        default=None,
        description="Structures whose descriptors define the domain (extxyz). None: the "
        "training split of the model's fit, rebuilt from the model file's metadata and checked "
        "against its fingerprint.",
    )
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Calibration settings."
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Metric settings.")
    domain: DomainConfig = Field(default_factory=DomainConfig, description="Domain checks.")
    output: str = Field(default="runs/uncertainty", description="Output directory.")
