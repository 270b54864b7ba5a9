"""Uncertainty: calibration of ensemble spreads, calibration metrics, domain of applicability.

Pure numpy/scipy (JAX only inside the ``jax_*`` monitors of :mod:`.domain`), independent of the
model code: callers pass arrays of errors, spreads and per-atom descriptors.

* :mod:`.calibration` — :func:`fit_scale` (closed-form NLL scale), finite-ensemble correction,
  :func:`fit_scale_student_t`, flattening of energy/force errors.
* :mod:`.metrics` — ECE, RMS calibration error, miscalibration area, NLL, ENCE, RMSE vs RMV,
  sharpness, Spearman, AUROC; :func:`evaluate` computes them all.
* :mod:`.domain` — :class:`DomainModel` (convex hull, kernel distance, Mahalanobis with
  Ledoit-Wolf and an F-distribution threshold, MaxVol γ) and JAX monitors.
* :mod:`.plots` — reliability diagram and RMSE-vs-RMV plots.

Names are re-exported lazily so that ``import mlipctl.uncertainty`` does not load scipy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Calibration": "calibration",
    "ensemble_mean_std": "calibration",
    "ensemble_variance_factor": "calibration",
    "energy_errors": "calibration",
    "fit_scale": "calibration",
    "fit_scale_student_t": "calibration",
    "force_component_errors": "calibration",
    "UncertaintyMetrics": "metrics",
    "auroc": "metrics",
    "calibration_curve": "metrics",
    "ece": "metrics",
    "ence": "metrics",
    "evaluate": "metrics",
    "gaussian_nll": "metrics",
    "miscalibration_area": "metrics",
    "rms_calibration_error": "metrics",
    "rmse_vs_rmv": "metrics",
    "sharpness": "metrics",
    "spearman_error_sigma": "metrics",
    "DomainModel": "domain",
    "first_exit": "domain",
    "jax_gamma": "domain",
    "jax_hull_excess": "domain",
    "jax_mahalanobis": "domain",
    "mahalanobis_threshold": "domain",
    "per_structure_all": "domain",
    "per_structure_max": "domain",
    "sidak_alpha": "domain",
    "plot_reliability": "plots",
    "plot_rmse_vs_rmv": "plots",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
