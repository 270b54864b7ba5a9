"""Calibration plots (matplotlib Agg, written atomically as PNG).

Both plots take one set of errors and one or more named sigma arrays (e.g. ``{"raw": sigma,
"calibrated": cal.apply(sigma)}``) so before/after calibration share one figure.
matplotlib is imported inside the functions: importing this module stays cheap.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from mlipctl.errors import UserInputError
from mlipctl.uncertainty.metrics import (
    calibration_curve,
    mean_absolute_calibration_error,
    rmse_vs_rmv,
)


def _new_figure(size: tuple[float, float]) -> tuple[Any, Any]:
    # Figure + Agg canvas directly (no pyplot): no global state, no GUI backend, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save_png(fig: Any, path: str | Path) -> Path:
    from mlipctl.reports.base import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _check_sigmas(sigmas: Mapping[str, ArrayLike]) -> None:
    if not sigmas:
        raise UserInputError("plots need at least one named sigma array")


def plot_reliability(
    path: str | Path,
    residuals: ArrayLike,
    sigmas: Mapping[str, ArrayLike],
    *,
    n_quantiles: int = 100,
    title: str = "Reliability diagram",
) -> Path:
    """Expected vs observed proportion inside centred Gaussian intervals, one curve per sigma.

    Args:
        path: output PNG path (parent directories are created).
        residuals: (n,) errors.
        sigmas: name -> (n,) standard deviations.
        n_quantiles: grid size of the curve.
        title: axes title.

    Returns:
        The written path.
    """
    _check_sigmas(sigmas)
    fig, ax = _new_figure((4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="0.5", lw=1, ls="--", label="ideal")
    for name, s in sigmas.items():
        p, obs = calibration_curve(residuals, s, n_quantiles)
        ece = mean_absolute_calibration_error(residuals, s, n_quantiles)
        ax.plot(p, obs, lw=1.8, label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("expected proportion in interval")
    ax.set_ylabel("observed proportion in interval")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return _save_png(fig, path)


def plot_rmse_vs_rmv(
    path: str | Path,
    residuals: ArrayLike,
    sigmas: Mapping[str, ArrayLike],
    *,
    n_bins: int = 10,
    unit: str = "",
    title: str = "RMSE vs RMV",
) -> Path:
    """Per-bin RMSE against RMV (bins of increasing sigma), log-log, one series per sigma.

    Args:
        path: output PNG path.
        residuals: (n,) errors.
        sigmas: name -> (n,) standard deviations.
        n_bins: number of equal-count bins.
        unit: unit label of errors, e.g. "eV/Å".
        title: axes title.
    """
    _check_sigmas(sigmas)
    fig, ax = _new_figure((4.6, 4.2))
    lo, hi = np.inf, 0.0
    for name, s in sigmas.items():
        b = rmse_vs_rmv(residuals, s, n_bins)
        ax.plot(b.rmv, b.rmse, "o-", ms=4, lw=1.2, label=name)
        both = np.concatenate([b.rmv, b.rmse])
        both = both[both > 0]
        if both.size:
            lo, hi = min(lo, float(both.min())), max(hi, float(both.max()))
    if np.isfinite(lo) and hi > 0:
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=1, ls="--", label="ideal")
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        ax.set_yscale("log")
        # Labels at 1-2-5 steps in plain numbers: default minor labels of a short range overlap.
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
    u = f" ({unit})" if unit else ""
    ax.set_xlabel(f"RMV{u}")
    ax.set_ylabel(f"RMSE{u}")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    return _save_png(fig, path)
