"""`mlipctl uncertainty`: calibration, metrics and domain of applicability."""

from __future__ import annotations

from pydantic import Field

from mlipctl.config.base import InputPath, StrictModel


class CalibrationConfig(StrictModel):
    """Global scale factor of the ensemble spread, fitted in closed form by NLL."""

    enabled: bool = Field(default=True, description="Fit and store a calibration scale.")
    finite_ensemble_correction: bool = Field(
        default=True, description="Correct the spread of a K-member ensemble for its finite size."
    )
    write_to_model: bool = Field(
        default=False, description="Store the fitted scale in the model file (atomically)."
    )


class MetricsConfig(StrictModel):
    """Calibration metrics."""

    n_quantiles: int = Field(default=100, ge=10, description="Centred intervals for ECE.")
    n_bins: int = Field(default=10, ge=2, description="Bins for ENCE and RMSE-vs-RMV.")


class DomainConfig(StrictModel):
    """Domain-of-applicability checks on the model's descriptors."""

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


class UncertaintyConfig(StrictModel):
    """Config of `mlipctl uncertainty`."""

    model: InputPath = Field(description="The .mlip model file (an ensemble for spreads).")
    calibration_data: InputPath | None = Field(
        default=None, description="Labelled structures for calibration (extxyz)."
    )
    test_data: InputPath | None = Field(
        default=None, description="Labelled structures to evaluate metrics on."
    )
    trajectory: InputPath | None = Field(
        default=None, description="Unlabelled trajectory to run the domain checks on."
    )
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Calibration settings."
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="Metric settings.")
    domain: DomainConfig = Field(default_factory=DomainConfig, description="Domain checks.")
    output: str = Field(default="runs/uncertainty", description="Output directory.")
