"""Migration paths for `validate`: CI-NEB barriers, profile shape and smoothness along the MEP.

* :func:`migration_path` runs a climbing-image NEB (the batched jitted band for models, ASE's NEB
  for any other calculator) between relaxed end points.
* :func:`profile_rms` compares two energy profiles on the normalised reaction coordinate
  s ∈ [0, 1] (each NEB's tangent-force spline interpolated onto a common grid), absolutely and
  each divided by its own barrier, so a model with the right barrier but the wrong shape (a
  shoulder, an intermediate minimum) is caught.
* :func:`path_smoothness` evaluates a calculator on a dense cubic-spline interpolation of a
  converged band and checks that the energy and the forces belong together (finite-difference
  dE/ds against −F·τ) and have no jumps (largest second difference against the median one).
  Both fail for a potential with a discontinuous cutoff, a bad neighbour list, or forces that
  are not the gradient of its energy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms

from mlipctl.engines.neb import NEBResult, make_band, run_neb_images
from mlipctl.engines.validate_bulk import Engine, evaluate_structures, resolve
from mlipctl.errors import UserInputError

_TINY = 1e-12
"""Floor of the median second difference (a perfectly linear signal would divide by zero)."""


def migration_path(
    calc_or_potential: Any,
    initial: Atoms,
    final: Atoms,
    *,
    n_images: int = 7,
    fmax: float = 0.01,
    max_steps: int = 2000,
    interpolation: str = "idpp",
) -> NEBResult:
    """Climbing-image NEB between two relaxed end points (same atoms, same order, same cell).

    Args:
        calc_or_potential: a Potential or JaxModel (batched jitted band), a calculator factory
            (one calculator per image of ASE's NEB) or an ASE calculator (shared by all images).
        initial, final: relaxed end points.
        n_images: intermediate images.
        fmax: convergence of the largest NEB force, eV/Å.
        max_steps: optimiser steps before giving up (``converged`` False).
        interpolation: 'idpp' or 'linear' initial band.
    """
    images = make_band(initial, final, n_images, interpolation)
    target = calc_or_potential.neb if isinstance(calc_or_potential, Engine) else calc_or_potential
    return run_neb_images(images, target, climb=True, fmax=fmax, max_steps=max_steps)


def normalised_profile(res: NEBResult) -> tuple[np.ndarray, np.ndarray]:
    """(s in [0, 1], E − E_initial) of the NEB's tangent-force spline."""
    x = np.asarray(res.spline_coordinate, dtype=np.float64)
    if x[-1] <= 0:
        raise UserInputError("the NEB path has zero length (identical end points?)")
    return x / x[-1], np.asarray(res.spline_energy, dtype=np.float64)


@dataclass
class ProfileComparison:
    """Two energy profiles on a common normalised coordinate.

    Attributes:
        rms: RMS difference of the profiles, eV.
        shape_rms: RMS difference of the profiles each divided by its own barrier (None when a
            barrier is below 1 meV: a flat profile has no shape to compare).
        s: common coordinate in [0, 1], shape (n,).
        energy_a, energy_b: E − E_initial of each profile on ``s``, eV, shape (n,).
    """

    rms: float
    shape_rms: float | None
    s: np.ndarray
    energy_a: np.ndarray
    energy_b: np.ndarray


def profile_rms(a: NEBResult, b: NEBResult, n: int = 201) -> ProfileComparison:
    """Compare two NEB energy profiles: absolute RMS, and shape apart from height.

    The shape judges every barrier height alike; the absolute RMS repeats the barrier error and
    is as many times stricter as a barrier is higher.
    """
    s = np.linspace(0.0, 1.0, n)
    sa, ea = normalised_profile(a)
    sb, eb = normalised_profile(b)
    ia, ib = np.interp(s, sa, ea), np.interp(s, sb, eb)
    ha, hb = float(a.barrier_forward), float(b.barrier_forward)
    shape = float(np.sqrt(np.mean((ia / ha - ib / hb) ** 2))) if min(ha, hb) > 1e-3 else None
    return ProfileComparison(float(np.sqrt(np.mean((ia - ib) ** 2))), shape, s, ia, ib)


# --------------------------------------------------------------------------------------------
# Smoothness along the path
# --------------------------------------------------------------------------------------------


@dataclass
class SmoothnessResult:
    """Energy/force consistency and smoothness along a dense path.

    Attributes:
        s: (P,) arc length along the interpolated path, Å.
        energy: (P,) energies relative to the first point, eV.
        fd_slope: (P,) central finite-difference dE/ds (NaN at the two ends), eV/Å.
        force_slope: (P,) −F·τ with τ the unit tangent of the interpolated path, eV/Å.
        consistency_rel: max |dE/ds − (−F·τ)| / max |F·τ| over interior points.
        consistency_abs: max |dE/ds − (−F·τ)|, eV/Å.
        energy_jump_ratio: max |Δ²E| / median |Δ²E|.
        force_jump_ratio: max ‖Δ²F‖ / median ‖Δ²F‖ (F the full 3N force vector).
        worst_index: index of the point with the largest consistency error.
        points_between_images: smallest number of dense points strictly between two images.
        n_evaluations: calculator evaluations (P).
        seconds: wall time.
    """

    s: np.ndarray
    energy: np.ndarray
    fd_slope: np.ndarray
    force_slope: np.ndarray
    consistency_rel: float
    consistency_abs: float
    energy_jump_ratio: float
    force_jump_ratio: float
    worst_index: int
    points_between_images: int
    n_evaluations: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "force_consistency_rel": self.consistency_rel,
            "force_consistency_abs": self.consistency_abs,
            "energy_jump_ratio": self.energy_jump_ratio,
            "force_jump_ratio": self.force_jump_ratio,
            "worst_s_fraction": float(self.s[self.worst_index] / self.s[-1]),
            "points_between_images": self.points_between_images,
            "n_points": self.n_evaluations,
        }


def unwrapped_path(images: Sequence[Atoms]) -> np.ndarray:
    """(M, N, 3) image positions made continuous by minimum-image steps between images."""
    from ase.geometry import find_mic

    out = [np.asarray(images[0].positions, dtype=np.float64)]
    cell, pbc = images[0].cell, images[0].pbc
    for im in images[1:]:
        step = np.asarray(im.positions, dtype=np.float64) - out[-1]
        if np.any(pbc):
            step, _ = find_mic(step.reshape(-1, 3), cell, pbc)
        out.append(out[-1] + step.reshape(-1, 3))
    return np.stack(out)


def dense_path(
    images: Sequence[Atoms], dense_points: int = 10, max_points: int = 2000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Points spaced uniformly in arc length on a cubic spline through the images.

    The spline runs through the images, parametrised by their cumulative distance; the spacing
    is chosen so that even the shortest image-to-image segment holds ≥ ``dense_points`` points
    strictly inside it.

    Returns:
        (positions (P, N, 3), unit tangents (P, N, 3), arc length s (P,), arc length of the
        images (M,), smallest number of points strictly between two images).
    """
    from scipy.interpolate import CubicSpline

    x = unwrapped_path(images)
    m, n = x.shape[0], x.shape[1]
    flat = x.reshape(m, -1)
    knots = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(flat, axis=0), axis=1))])
    if np.any(np.diff(knots) <= 1e-9):
        raise UserInputError("two consecutive path images coincide; the path cannot be splined")
    spline = CubicSpline(knots, flat, axis=0)
    deriv = spline.derivative()
    # Arc length of the spline (not the chord length of the knots) on a fine grid.
    t_fine = np.linspace(0.0, knots[-1], 64 * (m - 1) * (dense_points + 1) + 1)
    speed = np.linalg.norm(deriv(t_fine), axis=1)
    s_fine = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * np.diff(t_fine))])
    s_images = np.interp(knots, t_fine, s_fine)
    h = float(np.diff(s_images).min()) / (dense_points + 1)
    # Very uneven images (a poor model's band) would need more points than is worth evaluating:
    # cap the count; the shortest segment then holds fewer points, which the result reports.
    n_int = min(int(math.ceil(s_fine[-1] / h - 1e-9)), max_points - 1)
    s = np.linspace(0.0, s_fine[-1], n_int + 1)
    t = np.interp(s, s_fine, t_fine)
    pos = spline(t).reshape(-1, n, 3)
    tan = deriv(t)
    tan /= np.linalg.norm(tan, axis=1, keepdims=True)
    between = [int(np.sum((s > a + 1e-9) & (s < b - 1e-9))) for a, b in _pairs(s_images)]
    return pos, tan.reshape(-1, n, 3), s, s_images, min(between)


def _pairs(values: np.ndarray) -> list[tuple[float, float]]:
    """Consecutive pairs (v0, v1), (v1, v2), ..."""
    return [(float(a), float(b)) for a, b in zip(values[:-1], values[1:], strict=True)]


def _jump_ratio(second: np.ndarray) -> float:
    return float(np.max(second) / max(float(np.median(second)), _TINY))


def path_smoothness(
    calc_or_potential: Any, images: Sequence[Atoms], dense_points: int = 10
) -> SmoothnessResult:
    """Evaluate a calculator on a dense interpolation of a converged path (see module doc).

    Args:
        calc_or_potential: ASE calculator (or factory), Potential, JaxModel or Engine.
        images: the converged band, end points included.
        dense_points: minimum number of points strictly between two consecutive images.
    """
    t0 = time.perf_counter()
    pos, tan, s, _, between = dense_path(images, dense_points)
    template = images[0].copy()
    template.calc = None
    template.set_constraint()
    frames = []
    for x in pos:
        at = template.copy()
        at.positions = x
        frames.append(at)
    res = evaluate_structures(resolve(calc_or_potential, "model"), frames, batch=False)
    energies = np.array([r["energy"] for r in res])
    forces = np.stack([r["forces"] for r in res])
    energy = energies - energies[0]
    force_slope = -np.einsum("pnc,pnc->p", forces, tan)
    fd = np.full_like(energy, np.nan)
    h = s[1] - s[0]  # uniform in arc length
    fd[1:-1] = (energy[2:] - energy[:-2]) / (2.0 * h)
    err = np.abs(fd[1:-1] - force_slope[1:-1])
    scale = max(float(np.max(np.abs(force_slope))), _TINY)
    d2e = np.abs(energy[2:] - 2.0 * energy[1:-1] + energy[:-2])
    d2f = np.linalg.norm(
        (forces[2:] - 2.0 * forces[1:-1] + forces[:-2]).reshape(len(d2e), -1), axis=1
    )
    return SmoothnessResult(
        s=s,
        energy=energy,
        fd_slope=fd,
        force_slope=force_slope,
        consistency_rel=float(err.max() / scale),
        consistency_abs=float(err.max()),
        energy_jump_ratio=_jump_ratio(d2e),
        force_jump_ratio=_jump_ratio(d2f),
        worst_index=int(np.argmax(err)) + 1,
        points_between_images=between,
        n_evaluations=len(frames),
        seconds=time.perf_counter() - t0,
    )
