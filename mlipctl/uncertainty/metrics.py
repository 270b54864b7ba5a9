"""Calibration and ranking metrics of Gaussian predictive uncertainties.

All functions take flat arrays of errors ``r = y - mu`` (reference minus prediction; the sign never
matters here) and predicted standard deviations ``sigma``, shape ``(n,)``. Energies per structure or
per atom and force components all go through the same functions; flatten and mask padding first
(see :mod:`mlipctl.uncertainty.calibration` for helpers).

The calibration curve, ECE (mean absolute calibration error), RMS calibration error and
miscalibration area follow uncertainty-toolbox's ``prop_type="interval"`` definitions (centred
Gaussian intervals on the grid ``linspace(0, 1, n_quantiles)``); see ``docs/uncertainty.md``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from mlipctl.errors import UserInputError

_HALF_LOG_2PI = 0.5 * float(np.log(2.0 * np.pi))


def check_residuals_sigma(
    residuals: ArrayLike, sigma: ArrayLike, *, name: str = "errors"
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten errors and standard deviations.

    Args:
        residuals: errors ``y - mu``, any shape.
        sigma: predicted standard deviations, same shape as ``residuals``.
        name: what the arrays are, for error messages.

    Returns:
        ``(r, sigma)`` as flat float64 arrays of shape ``(n,)``.

    Raises:
        UserInputError: shapes differ, arrays are empty, contain NaN/inf, or ``sigma <= 0``.
    """
    r = np.asarray(residuals, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    if r.shape != s.shape:
        raise UserInputError(f"{name}: residuals have shape {r.shape} but sigma has {s.shape}")
    r = r.reshape(-1)
    s = s.reshape(-1)
    if r.size == 0:
        raise UserInputError(f"{name}: no values (empty arrays)")
    if not np.all(np.isfinite(r)):
        raise UserInputError(f"{name}: {int(np.sum(~np.isfinite(r)))} residuals are NaN or inf")
    if not np.all(np.isfinite(s)):
        raise UserInputError(f"{name}: {int(np.sum(~np.isfinite(s)))} sigmas are NaN or inf")
    if np.any(s <= 0.0):
        raise UserInputError(
            f"{name}: {int(np.sum(s <= 0.0))} sigmas are <= 0 (an ensemble whose members agree "
            "exactly has no spread to calibrate)"
        )
    return r, s


def interval_proportions(n_quantiles: int = 100) -> np.ndarray:
    """Expected proportions of the centred intervals: ``linspace(0, 1, n_quantiles)``, shape (Q,).

    This is uncertainty-toolbox's grid; the end points contribute (almost) nothing because the
    0-width interval holds no point and the infinite one holds all.
    """
    if n_quantiles < 2:
        raise UserInputError(f"n_quantiles must be >= 2, got {n_quantiles}")
    return np.linspace(0.0, 1.0, n_quantiles)


def calibration_curve(
    residuals: ArrayLike,
    sigma: ArrayLike,
    n_quantiles: int = 100,
    proportions: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Expected vs observed proportion of errors inside centred Gaussian intervals.

    For each expected proportion ``p`` the interval is ``[Phi^-1(0.5 - p/2), Phi^-1(0.5 + p/2)]``
    in units of sigma, closed on both ends; the observed proportion is the fraction of
    ``r / sigma`` inside it. Counting uses a sort and ``searchsorted``, so memory is O(n) rather
    than the (n, Q) boolean matrix of a broadcast comparison; the result is identical.

    Args:
        residuals: (n,) errors.
        sigma: (n,) standard deviations.
        n_quantiles: Q, number of grid points when ``proportions`` is None.
        proportions: optional (Q,) expected proportions in [0, 1] to use instead of the grid.

    Returns:
        ``(expected, observed)``, each shape (Q,).
    """
    r, s = check_residuals_sigma(residuals, sigma)
    if proportions is None:
        p = interval_proportions(n_quantiles)
    else:
        p = np.asarray(proportions, dtype=np.float64).reshape(-1)
        if p.size == 0 or np.any((p < 0.0) | (p > 1.0)) or not np.all(np.isfinite(p)):
            raise UserInputError("proportions must be a non-empty array of values in [0, 1]")
    z = np.sort(r / s)
    lower = stats.norm.ppf(0.5 - p / 2.0)
    upper = stats.norm.ppf(0.5 + p / 2.0)
    inside = np.searchsorted(z, upper, side="right") - np.searchsorted(z, lower, side="left")
    return p, inside / z.size


def mean_absolute_calibration_error(
    residuals: ArrayLike, sigma: ArrayLike, n_quantiles: int = 100
) -> float:
    """ECE: mean over the grid of ``|expected - observed|`` (0 = perfectly calibrated, max 0.5)."""
    p, obs = calibration_curve(residuals, sigma, n_quantiles)
    return float(np.mean(np.abs(p - obs)))


ece = mean_absolute_calibration_error


def rms_calibration_error(residuals: ArrayLike, sigma: ArrayLike, n_quantiles: int = 100) -> float:
    """Root mean square of ``expected - observed`` over the grid."""
    p, obs = calibration_curve(residuals, sigma, n_quantiles)
    return float(np.sqrt(np.mean((p - obs) ** 2)))


def miscalibration_area(residuals: ArrayLike, sigma: ArrayLike, n_quantiles: int = 100) -> float:
    """Area between the calibration curve (linear between grid points) and the diagonal.

    Segments where the curve crosses the diagonal are split at the crossing, so this is the exact
    integral of ``|observed(p) - p|`` for the piecewise-linear curve.
    """
    p, obs = calibration_curve(residuals, sigma, n_quantiles)
    return _area_between(p, obs - p)


def _area_between(x: np.ndarray, f: np.ndarray) -> float:
    """Integral of |f| for f piecewise linear through (x, f), shape (Q,)."""
    dx = np.diff(x)
    fl, fr = f[:-1], f[1:]
    same_side = fl * fr >= 0.0
    trapezoid = 0.5 * dx * np.abs(fl + fr)
    denom = np.abs(fl) + np.abs(fr)
    # Two triangles meeting at the zero crossing: dx * (fl^2 + fr^2) / (2 (|fl| + |fr|)).
    with np.errstate(invalid="ignore", divide="ignore"):
        hourglass = 0.5 * dx * (fl**2 + fr**2) / denom
    return float(np.sum(np.where(same_side, trapezoid, hourglass)))


def gaussian_nll(residuals: ArrayLike, sigma: ArrayLike) -> float:
    """Mean Gaussian negative log-likelihood with its constant:
    ``mean(0.5 log 2 pi + log sigma + r^2 / (2 sigma^2))`` (nats per value)."""
    r, s = check_residuals_sigma(residuals, sigma)
    return float(np.mean(_HALF_LOG_2PI + np.log(s) + 0.5 * (r / s) ** 2))


def student_t_nll(residuals: ArrayLike, sigma: ArrayLike, dof: float) -> float:
    """Mean negative log-likelihood of a location-scale Student-t with ``dof`` degrees of freedom
    and scale ``sigma`` (the predictive of a finite ensemble, see ``docs/uncertainty.md``)."""
    r, s = check_residuals_sigma(residuals, sigma)
    if not dof > 0:
        raise UserInputError(f"Student-t degrees of freedom must be > 0, got {dof}")
    return float(-np.mean(stats.t.logpdf(r / s, df=dof) - np.log(s)))


@dataclass(frozen=True)
class BinnedErrors:
    """RMSE vs RMV in bins of increasing sigma (equal-count bins).

    Attributes (shapes, M bins):
        rmv: (M,) root mean variance ``sqrt(mean sigma^2)`` per bin.
        rmse: (M,) root mean square error per bin.
        count: (M,) number of values per bin.
        sigma_min: (M,) smallest sigma in the bin.
        sigma_max: (M,) largest sigma in the bin.
    """

    rmv: np.ndarray
    rmse: np.ndarray
    count: np.ndarray
    sigma_min: np.ndarray
    sigma_max: np.ndarray

    def to_dict(self) -> dict[str, list[float]]:
        return {k: np.asarray(v).tolist() for k, v in asdict(self).items()}


def rmse_vs_rmv(residuals: ArrayLike, sigma: ArrayLike, n_bins: int = 10) -> BinnedErrors:
    """Sort by sigma, split into ``n_bins`` bins of (nearly) equal count, and compare each bin's RMSE
    with its RMV; a calibrated model has RMSE ≈ RMV in every bin.

    Raises:
        UserInputError: fewer values than bins.
    """
    r, s = check_residuals_sigma(residuals, sigma)
    if n_bins < 1:
        raise UserInputError(f"n_bins must be >= 1, got {n_bins}")
    if r.size < n_bins:
        raise UserInputError(f"{r.size} values cannot fill {n_bins} bins; use fewer bins")
    order = np.argsort(s, kind="stable")
    bins = np.array_split(order, n_bins)
    return BinnedErrors(
        rmv=np.array([np.sqrt(np.mean(s[b] ** 2)) for b in bins]),
        rmse=np.array([np.sqrt(np.mean(r[b] ** 2)) for b in bins]),
        count=np.array([b.size for b in bins]),
        sigma_min=np.array([s[b].min() for b in bins]),
        sigma_max=np.array([s[b].max() for b in bins]),
    )


def ence(residuals: ArrayLike, sigma: ArrayLike, n_bins: int = 10) -> float:
    """Expected normalised calibration error: mean over sigma-sorted bins of
    ``|RMV - RMSE| / RMV``. 0 when calibrated (up to sampling noise ~ 1/sqrt(2 n/M))."""
    b = rmse_vs_rmv(residuals, sigma, n_bins)
    return float(np.mean(np.abs(b.rmv - b.rmse) / b.rmv))


def sharpness(sigma: ArrayLike) -> float:
    """``sqrt(mean sigma^2)``: how confident the predictions are, irrespective of calibration."""
    s = np.asarray(sigma, dtype=np.float64).reshape(-1)
    check_residuals_sigma(np.zeros_like(s), s, name="sigma")
    return float(np.sqrt(np.mean(s**2)))


def spearman_error_sigma(residuals: ArrayLike, sigma: ArrayLike) -> float:
    """Spearman rank correlation between ``|r|`` and sigma (does a larger sigma mean a larger
    error?). NaN when either array is constant."""
    r, s = check_residuals_sigma(residuals, sigma)
    if r.size < 2 or np.all(s == s[0]) or np.all(np.abs(r) == abs(r[0])):
        return float("nan")
    return float(stats.spearmanr(np.abs(r), s).statistic)


def auroc(score: ArrayLike, label: ArrayLike) -> float:
    """Area under the ROC curve of ``score`` (higher = more suspicious) at detecting ``label``.

    Rank-based (Mann-Whitney U): the probability that a random positive scores above a random
    negative, ties counting one half (average ranks).

    Args:
        score: (n,) finite scores.
        label: (n,) booleans, True = positive.

    Raises:
        UserInputError: shapes differ, scores not finite, or only one class present.
    """
    x = np.asarray(score, dtype=np.float64).reshape(-1)
    y = np.asarray(label).reshape(-1)
    if x.shape != y.shape:
        raise UserInputError(f"auroc: score has shape {x.shape} but label has {y.shape}")
    if not np.all(np.isfinite(x)):
        raise UserInputError("auroc: scores contain NaN or inf")
    if y.dtype != np.bool_:
        if not np.all(np.isin(y, (0, 1))):
            raise UserInputError("auroc: labels must be boolean (or 0/1)")
        y = y.astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise UserInputError(
            f"auroc needs both classes; got {n_pos} positives and {n_neg} negatives"
        )
    ranks = stats.rankdata(x, method="average")
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass(frozen=True)
class UncertaintyMetrics:
    """All scalar metrics of one (r, sigma) set; see the individual functions."""

    n: int
    rmse: float
    sharpness: float
    ece: float
    rms_calibration_error: float
    miscalibration_area: float
    nll: float
    ence: float
    spearman: float
    z_rms: float  # sqrt(mean (r/sigma)^2): 1 when calibrated, the NLL-optimal rescaling factor
    binned: BinnedErrors

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["binned"] = self.binned.to_dict()
        return out


def evaluate(
    residuals: ArrayLike, sigma: ArrayLike, *, n_quantiles: int = 100, n_bins: int = 10
) -> UncertaintyMetrics:
    """Compute every metric of this module on one set of errors and standard deviations."""
    r, s = check_residuals_sigma(residuals, sigma)
    binned = rmse_vs_rmv(r, s, min(n_bins, r.size))
    return UncertaintyMetrics(
        n=int(r.size),
        rmse=float(np.sqrt(np.mean(r**2))),
        sharpness=sharpness(s),
        ece=mean_absolute_calibration_error(r, s, n_quantiles),
        rms_calibration_error=rms_calibration_error(r, s, n_quantiles),
        miscalibration_area=miscalibration_area(r, s, n_quantiles),
        nll=gaussian_nll(r, s),
        ence=float(np.mean(np.abs(binned.rmv - binned.rmse) / binned.rmv)),
        spearman=spearman_error_sigma(r, s),
        z_rms=float(np.sqrt(np.mean((r / s) ** 2))),
        binned=binned,
    )
