"""Global recalibration of ensemble spreads: one scale factor fitted in closed form by NLL.

The calibrated standard deviation is ``sigma_cal = s * sqrt(c) * sigma`` where ``c`` is the
finite-ensemble variance factor (``(K + 1) / K`` for a K-member ensemble whose spread is the
ddof=1 sample standard deviation; 1 when the correction is off) and ``s`` minimises the Gaussian
NLL on a calibration split:

    d/ds sum_i [log(s sqrt(c) sigma_i) + r_i^2 / (2 s^2 c sigma_i^2)] = 0
    =>  s = sqrt(mean(r^2 / (c sigma^2)))

``docs/uncertainty.md`` derives ``c`` and the Student-t alternative (:func:`fit_scale_student_t`).
Errors can be energies per structure, energies per atom, or force components; see
:func:`energy_errors` and :func:`force_component_errors` for flattening with padding masks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, stats

from mlipctl.errors import UserInputError
from mlipctl.uncertainty.metrics import check_residuals_sigma, gaussian_nll, student_t_nll

Predictive = Literal["gaussian", "student_t"]


def ensemble_variance_factor(ensemble_size: int, ddof: int = 1) -> float:
    """Factor ``c`` that turns an ensemble's sample variance into the predictive variance of a new
    draw around the ensemble mean.

    If the K members and the truth are exchangeable draws with variance tau^2, then
    ``Var(y - mean) = tau^2 (1 + 1/K)``. The ddof=1 sample variance estimates tau^2 without bias,
    so ``c = (K + 1) / K``; the ddof=0 (``np.std`` default) variance is ``(K - 1) / K`` times
    smaller, so ``c = (K + 1) / (K - 1)``.

    Args:
        ensemble_size: K >= 2.
        ddof: 1 if sigma is the unbiased sample std (``std(ddof=1)``), 0 if ``std(ddof=0)``.
    """
    if ensemble_size < 2:
        raise UserInputError(
            f"the finite-ensemble correction needs an ensemble of >= 2 members, got {ensemble_size}"
        )
    if ddof == 1:
        return (ensemble_size + 1) / ensemble_size
    if ddof == 0:
        return (ensemble_size + 1) / (ensemble_size - 1)
    raise UserInputError(f"ddof must be 0 or 1, got {ddof}")


@dataclass(frozen=True)
class Calibration:
    """A fitted global scale and its diagnostics.

    Attributes:
        scale: s; calibrated sigma is ``scale * sqrt(variance_factor) * sigma``.
        variance_factor: c, the finite-ensemble factor (1 when not applied).
        predictive: "gaussian" or "student_t" (then ``dof`` degrees of freedom).
        dof: Student-t degrees of freedom (K - 1), or 0 for the Gaussian.
        ensemble_size: K, or 0 when unknown/not applied.
        target: what the values are ("energy_per_atom", "forces", ...), for reports.
        n: number of calibration values.
        nll_before: mean Gaussian NLL of the raw sigma.
        nll_after: mean NLL of the calibrated predictive (Gaussian or Student-t).
        z_rms_before: ``sqrt(mean (r / sigma)^2)`` of the raw sigma (the scale without c).
        scale_stderr: standard error of s assuming independent Gaussian values, ``s / sqrt(2 n)``
            (force components of one structure are correlated: treat it as a lower bound).
        coverage_68: observed fraction of ``|r| <= 1 sigma_cal`` (Gaussian: 0.683 expected).
        coverage_95: observed fraction inside the calibrated central 95 % interval.
    """

    scale: float
    variance_factor: float
    predictive: str
    dof: float
    ensemble_size: int
    target: str
    n: int
    nll_before: float
    nll_after: float
    z_rms_before: float
    scale_stderr: float
    coverage_68: float
    coverage_95: float

    @property
    def sigma_factor(self) -> float:
        """Multiplier of the raw sigma: ``scale * sqrt(variance_factor)``."""
        return self.scale * float(np.sqrt(self.variance_factor))

    def apply(self, sigma: ArrayLike) -> np.ndarray:
        """Calibrated scale parameter of the predictive, same shape as ``sigma``."""
        return np.asarray(sigma, dtype=np.float64) * self.sigma_factor

    def to_dict(self) -> dict[str, Any]:
        """JSON/msgpack-friendly dict (plain floats, ints and strings)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        names = {f.name for f in fields(cls)}
        missing = names - set(data)
        unknown = set(data) - names
        if missing or unknown:
            raise UserInputError(
                f"calibration record: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}"
            )
        cal = cls(**data)
        if not (np.isfinite(cal.scale) and cal.scale > 0 and cal.variance_factor >= 1.0):
            raise UserInputError(
                f"calibration record: invalid scale {cal.scale} or variance factor "
                f"{cal.variance_factor}"
            )
        return cal


def _variance_factor(
    ensemble_size: int | None, finite_ensemble_correction: bool, ddof: int
) -> tuple[float, int]:
    if not finite_ensemble_correction:
        return 1.0, int(ensemble_size or 0)
    if ensemble_size is None:
        raise UserInputError(
            "finite_ensemble_correction needs ensemble_size (the number of members K)"
        )
    return ensemble_variance_factor(ensemble_size, ddof), int(ensemble_size)


def _coverage(z: np.ndarray, predictive: str, dof: float) -> tuple[float, float]:
    """Fractions of |z| inside the central 68.27 % and 95 % intervals of the predictive."""
    if predictive == "student_t":
        q68, q95 = stats.t.ppf([0.5 + 0.6826894921 / 2, 0.975], df=dof)
    else:
        q68, q95 = 1.0, stats.norm.ppf(0.975)
    a = np.abs(z)
    return float(np.mean(a <= q68)), float(np.mean(a <= q95))


def fit_scale(
    residuals: ArrayLike,
    sigma: ArrayLike,
    *,
    ensemble_size: int | None = None,
    finite_ensemble_correction: bool = True,
    ddof: int = 1,
    target: str = "values",
) -> Calibration:
    """Fit the NLL-optimal global scale of a Gaussian predictive in closed form.

    Args:
        residuals: errors ``y - mu`` on the calibration split, any shape (flattened).
        sigma: predicted (raw ensemble) standard deviations, same shape.
        ensemble_size: K members; required when ``finite_ensemble_correction``.
        finite_ensemble_correction: multiply sigma^2 by ``(K + 1) / K`` (ddof=1) before fitting.
        ddof: how sigma was computed from the members (see :func:`ensemble_variance_factor`).
        target: label stored in the result.

    Returns:
        :class:`Calibration`; ``scale`` ≈ 1 means the (corrected) spread was already calibrated,
        ``scale`` = 2 means errors are twice as large as the spread says.
    """
    r, s = check_residuals_sigma(residuals, sigma, name=f"calibration ({target})")
    c, k = _variance_factor(ensemble_size, finite_ensemble_correction, ddof)
    z2 = (r / s) ** 2
    scale = float(np.sqrt(np.mean(z2) / c))
    if scale == 0.0:
        raise UserInputError(
            f"calibration ({target}): all residuals are zero, the scale is undefined"
        )
    s_cal = s * scale * np.sqrt(c)
    cov68, cov95 = _coverage(r / s_cal, "gaussian", 0.0)
    return Calibration(
        scale=scale,
        variance_factor=float(c),
        predictive="gaussian",
        dof=0.0,
        ensemble_size=k,
        target=target,
        n=int(r.size),
        nll_before=gaussian_nll(r, s),
        nll_after=gaussian_nll(r, s_cal),
        z_rms_before=float(np.sqrt(np.mean(z2))),
        scale_stderr=scale / float(np.sqrt(2.0 * r.size)),
        coverage_68=cov68,
        coverage_95=cov95,
    )


def fit_scale_student_t(
    residuals: ArrayLike,
    sigma: ArrayLike,
    *,
    ensemble_size: int,
    ddof: int = 1,
    target: str = "values",
) -> Calibration:
    """Fit the global scale of the Student-t predictive of a K-member ensemble.

    The predictive is ``y = mean + s sqrt(c) sigma T`` with ``T ~ t(K - 1)``: exact when the
    members and the truth are exchangeable Gaussian draws (then s = 1). The NLL in ``u = log s`` has
    derivative ``1 - (nu + 1) mean(z^2 / (nu e^{2u} + z^2))``, which increases monotonically, so the
    optimum is the unique root, found by bracketing and Brent's method.
    """
    r, s = check_residuals_sigma(residuals, sigma, name=f"calibration ({target})")
    c = ensemble_variance_factor(ensemble_size, ddof)
    nu = float(ensemble_size - 1)
    z2 = (r / s) ** 2 / c
    nonzero = float(np.mean(z2 > 0.0))
    if (nu + 1.0) * nonzero <= 1.0:
        raise UserInputError(
            f"calibration ({target}): too many zero residuals for a Student-t scale fit"
        )

    def grad(u: float) -> float:
        return 1.0 - (nu + 1.0) * float(np.mean(z2 / (nu * np.exp(2.0 * u) + z2)))

    u0 = 0.5 * float(np.log(np.mean(z2)))  # Gaussian estimate: a good centre for the bracket
    lo, hi = u0 - 1.0, u0 + 1.0
    while grad(lo) > 0.0:
        lo -= 2.0
    while grad(hi) < 0.0:
        hi += 2.0
    scale = float(np.exp(optimize.brentq(grad, lo, hi, xtol=1e-12)))
    s_cal = s * scale * np.sqrt(c)
    cov68, cov95 = _coverage(r / s_cal, "student_t", nu)
    return Calibration(
        scale=scale,
        variance_factor=float(c),
        predictive="student_t",
        dof=nu,
        ensemble_size=int(ensemble_size),
        target=target,
        n=int(r.size),
        nll_before=gaussian_nll(r, s),
        nll_after=student_t_nll(r, s_cal, nu),
        z_rms_before=float(np.sqrt(np.mean((r / s) ** 2))),
        # Fisher information of log s for a t(nu) is 2 nu / (nu + 3) per value.
        scale_stderr=scale * float(np.sqrt((nu + 3.0) / (2.0 * nu * r.size))),
        coverage_68=cov68,
        coverage_95=cov95,
    )


def ensemble_mean_std(members: ArrayLike, ddof: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation over the leading (member) axis.

    Args:
        members: (K, ...) predictions of K >= 2 members.
        ddof: 1 for the unbiased variance (what :func:`ensemble_variance_factor` assumes by default).

    Returns:
        ``(mean, std)``, each of shape ``members.shape[1:]``.
    """
    m = np.asarray(members, dtype=np.float64)
    if m.ndim < 1 or m.shape[0] < 2:
        raise UserInputError(f"an ensemble needs >= 2 members on axis 0, got shape {m.shape}")
    return m.mean(axis=0), m.std(axis=0, ddof=ddof)


def energy_errors(
    predicted: ArrayLike,
    sigma: ArrayLike,
    reference: ArrayLike,
    n_atoms: ArrayLike,
    *,
    per_atom: bool = True,
    mask: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Energy errors per structure, optionally per atom.

    Dividing both r and sigma by the atom count leaves ``r / sigma`` (and so the fitted scale)
    unchanged; it changes the units of RMSE, NLL and the plots to eV/atom.

    Args:
        predicted: (B,) ensemble-mean energies, eV.
        sigma: (B,) ensemble spreads, eV.
        reference: (B,) reference energies, eV.
        n_atoms: (B,) atom counts.
        per_atom: divide by ``n_atoms``.
        mask: optional (B,) bool, True for real structures (drops padding slots).

    Returns:
        ``(r, sigma)`` flat arrays over the kept structures.
    """
    mu = np.asarray(predicted, dtype=np.float64).reshape(-1)
    s = np.asarray(sigma, dtype=np.float64).reshape(-1)
    y = np.asarray(reference, dtype=np.float64).reshape(-1)
    n = np.asarray(n_atoms, dtype=np.float64).reshape(-1)
    if not (mu.shape == s.shape == y.shape == n.shape):
        raise UserInputError(
            f"energy errors: shapes differ (predicted {mu.shape}, sigma {s.shape}, "
            f"reference {y.shape}, n_atoms {n.shape})"
        )
    keep = np.ones(mu.shape, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    if keep.shape != mu.shape:
        raise UserInputError(f"energy errors: mask has shape {keep.shape}, expected {mu.shape}")
    mu, s, y, n = mu[keep], s[keep], y[keep], n[keep]
    if per_atom:
        if np.any(n < 1):
            raise UserInputError("energy errors: a kept structure has n_atoms < 1")
        return (y - mu) / n, s / n
    return y - mu, s


def force_component_errors(
    predicted: ArrayLike,
    sigma: ArrayLike,
    reference: ArrayLike,
    *,
    mask: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Force errors per Cartesian component, flattened over real atoms.

    Args:
        predicted: (N, 3) ensemble-mean forces, eV/Å.
        sigma: (N, 3) per-component spreads, or (N,) one spread per atom (broadcast).
        reference: (N, 3) reference forces.
        mask: optional (N,) bool, True for real atoms (padding atoms would add exact zeros).

    Returns:
        ``(r, sigma)`` of shape (3 n_real,).
    """
    mu = np.asarray(predicted, dtype=np.float64)
    y = np.asarray(reference, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 2 or mu.shape[1] != 3 or y.shape != mu.shape:
        raise UserInputError(
            f"force errors: predicted {mu.shape} and reference {y.shape} must both be (N, 3)"
        )
    if s.shape == (mu.shape[0],):
        s = np.repeat(s[:, None], 3, axis=1)
    if s.shape != mu.shape:
        raise UserInputError(f"force errors: sigma has shape {s.shape}, expected (N, 3) or (N,)")
    keep = np.ones(mu.shape[0], bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    if keep.shape != (mu.shape[0],):
        raise UserInputError(f"force errors: mask has shape {keep.shape}, expected (N,)")
    return (y[keep] - mu[keep]).reshape(-1), s[keep].reshape(-1)
