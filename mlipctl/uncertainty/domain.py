"""Domain of applicability on per-atom descriptors: convex hull, kernel novelty, Mahalanobis, γ.

Every check works per species on descriptor arrays ``desc`` of shape (N, D) with integer species
``species`` of shape (N,) (indices into the model's species table). A :class:`DomainModel` is
fitted once from the training descriptors, stored as a flat dict of numpy arrays (``.npz`` or inside
the model file; never pickled), and evaluated on new atoms:

* convex hull: PCA to a few dimensions (fitted per species), then "is the point a convex
  combination of training points" — by LP (``scipy.optimize.linprog``) or, equivalently and much
  faster, by the hull's facet inequalities from qhull;
* kernel novelty: ``d = sqrt(2 - 2 max_j k(x, x_j))`` with a Gaussian kernel on standardised
  descriptors, computed in memory-bounded chunks;
* Mahalanobis distance with Ledoit-Wolf shrinkage, with a false-alarm-rate threshold from
  Hotelling's T² prediction region (F distribution) and a Šidák correction over the atoms of a
  frame;
* extrapolation grade γ from a MaxVol active set (as in MTP / pacemaker).

``jax_mahalanobis``, ``jax_gamma`` and ``jax_hull_excess`` are pure JAX functions of
``(params, desc, species)`` for use inside a compiled MD loop. The maths and the choice of
defaults are in ``docs/uncertainty.md``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike
from scipy import linalg, optimize, spatial, stats

from mlipctl.errors import UserInputError

FORMAT_VERSION = 1
HULL_TOL = 1e-8  # facet violation (PCA units, O(1)) still counted as inside: round-off only
_QHULL_MAX_DIM = 6  # 7-D hulls of 10^4 points have >3e5 facets and take ~20 s; use the LP above
_QHULL_MAX_FACETS = 200_000

HullMethod = Literal["auto", "facets", "lp"]
ThresholdRule = Literal["f", "chi2"]


# --------------------------------------------------------------------------------------------
# Input checks and per-structure helpers
# --------------------------------------------------------------------------------------------


def _check_desc_species(
    desc: ArrayLike, species: ArrayLike, *, n_species: int | None = None, dim: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(desc, dtype=np.float64)
    sp = np.asarray(species)
    if x.ndim != 2:
        raise UserInputError(f"descriptors must have shape (N, D), got {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise UserInputError(f"descriptors have D = {x.shape[1]}, the domain model expects {dim}")
    if sp.shape != (x.shape[0],):
        raise UserInputError(f"species must have shape ({x.shape[0]},), got {sp.shape}")
    if sp.size and not np.issubdtype(sp.dtype, np.integer):
        raise UserInputError(f"species must be integer indices, got dtype {sp.dtype}")
    sp = sp.astype(np.int64)
    if sp.size and sp.min() < 0:
        raise UserInputError("species indices must be >= 0")
    if n_species is not None and sp.size and sp.max() >= n_species:
        raise UserInputError(
            f"species index {int(sp.max())} is outside the model's {n_species} species"
        )
    if not np.all(np.isfinite(x)):
        bad = np.unique(np.nonzero(~np.isfinite(x))[0])
        raise UserInputError(f"descriptors contain NaN or inf (atoms {bad[:10].tolist()} ...)")
    return x, sp


def per_structure_max(values: ArrayLike, structure: ArrayLike, n_structures: int) -> np.ndarray:
    """Max of per-atom values over the atoms of each structure.

    Args:
        values: (N,) per-atom values (e.g. kernel distance, γ).
        structure: (N,) int structure index of each atom.
        n_structures: B.

    Returns:
        (B,) maxima; ``-inf`` for a structure with no atoms.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    st = np.asarray(structure, dtype=np.int64).reshape(-1)
    out = np.full(n_structures, -np.inf)
    np.maximum.at(out, st, v)
    return out


def per_structure_all(flags: ArrayLike, structure: ArrayLike, n_structures: int) -> np.ndarray:
    """(B,) True iff every atom of the structure is flagged True (e.g. inside the hull)."""
    f = np.asarray(flags, dtype=bool).reshape(-1)
    st = np.asarray(structure, dtype=np.int64).reshape(-1)
    bad = np.zeros(n_structures, dtype=np.int64)
    np.add.at(bad, st, (~f).astype(np.int64))
    return bad == 0


def first_exit(inside: ArrayLike) -> int | None:
    """Index of the first frame of a trajectory that is not inside, or None if all are.

    Args:
        inside: (T,) bool per frame (e.g. from :func:`per_structure_all`).
    """
    f = np.asarray(inside, dtype=bool).reshape(-1)
    out = np.flatnonzero(~f)
    return int(out[0]) if out.size else None


def _offsets_slices(offsets: np.ndarray) -> Iterator[slice]:
    for a, b in zip(offsets[:-1], offsets[1:], strict=True):
        yield slice(int(a), int(b))


# --------------------------------------------------------------------------------------------
# Convex hull
# --------------------------------------------------------------------------------------------


def convex_hull(points: ArrayLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Extreme points and facet inequalities of the convex hull of ``points`` (n, d), one qhull run.

    Returns:
        ``(vertices, equations)``: vertices (V, d) — the unique points when qhull cannot be used
        (d > 6, too few or degenerate points); equations (F, d + 1), rows ``[a, b]`` with
        ``a·x + b <= 0`` inside and ``|a| = 1``, or None when there is no full-dimensional hull
        or it has more than 200 000 facets.
    """
    p = np.unique(np.asarray(points, dtype=np.float64), axis=0)
    n, d = p.shape
    if n == 0:
        return p, None
    if d == 1:
        lo, hi = p[:, 0].min(), p[:, 0].max()
        eq = np.array([[1.0, -hi], [-1.0, lo]]) if hi > lo else None
        return np.array([[lo], [hi]]), eq
    if d > _QHULL_MAX_DIM or n < d + 1:
        return p, None
    try:
        hull = spatial.ConvexHull(p)
    except spatial.QhullError:
        return p, None
    eq = np.asarray(hull.equations, dtype=np.float64)
    return p[hull.vertices], (eq if eq.shape[0] <= _QHULL_MAX_FACETS else None)


def hull_facets(points: ArrayLike) -> np.ndarray | None:
    """Facet inequalities (F, d + 1) of the hull of ``points`` (n, d), or None; see
    :func:`convex_hull`."""
    return convex_hull(points)[1]


def hull_vertices(points: ArrayLike) -> np.ndarray:
    """The extreme points of ``points`` (n, d) if qhull can find them, else the unique points."""
    return convex_hull(points)[0]


def inside_hull_facets(
    query: ArrayLike, equations: np.ndarray, tol: float = HULL_TOL, *, max_block: int = 1 << 21
) -> np.ndarray:
    """(M,) bool: query points (M, d) satisfy every facet inequality (F, d + 1) up to ``tol``.

    Evaluated in blocks of at most ``max_block`` point×facet values to bound memory.
    """
    q = np.asarray(query, dtype=np.float64)
    out = np.zeros(q.shape[0], dtype=bool)
    if q.shape[0] == 0 or equations.shape[0] == 0:
        return out
    normals = np.ascontiguousarray(equations[:, :-1].T)
    offsets = equations[:, -1]
    step = max(1, max_block // equations.shape[0])
    for i0 in range(0, q.shape[0], step):
        excess = q[i0 : i0 + step] @ normals
        excess += offsets
        out[i0 : i0 + step] = excess.max(axis=1) <= tol
    return out


def inside_hull_lp(query: ArrayLike, points: ArrayLike, tol: float = HULL_TOL) -> np.ndarray:
    """(M,) bool: each query point (M, d) is a convex combination of ``points`` (n, d).

    One LP feasibility problem per point (``sum_i l_i p_i = q``, ``sum_i l_i = 1``, ``l >= 0``,
    solved by HiGHS); points outside the bounding box are rejected without an LP.
    """
    q = np.asarray(query, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64)
    out = np.zeros(q.shape[0], dtype=bool)
    if p.shape[0] == 0 or q.shape[0] == 0:
        return out
    lo, hi = p.min(axis=0) - tol, p.max(axis=0) + tol
    in_box = np.all((q >= lo) & (q <= hi), axis=1)
    a_eq = np.vstack([p.T, np.ones((1, p.shape[0]))])
    cost = np.zeros(p.shape[0])
    for i in np.flatnonzero(in_box):
        res = optimize.linprog(
            cost,
            A_eq=a_eq,
            b_eq=np.append(q[i], 1.0),
            bounds=(0.0, None),
            method="highs",
        )
        out[i] = res.status == 0
    return out


# --------------------------------------------------------------------------------------------
# Kernel novelty
# --------------------------------------------------------------------------------------------


def min_sq_distance(
    query: ArrayLike, train: ArrayLike, *, max_block: int = 1 << 21
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest training point of each query point, in memory-bounded blocks.

    Blocks of at most ``max_block`` query×train pairs (16 MB of float64 by default) use
    ``|q|² + |t|² - 2 q·t``; the distance to the winner is then recomputed directly, so a query
    equal to a training point gets exactly 0 instead of round-off.

    Args:
        query: (M, D).
        train: (n, D), n >= 1.

    Returns:
        ``(d2, index)``: (M,) squared distances and (M,) indices into ``train``.
    """
    q = np.asarray(query, dtype=np.float64)
    t = np.asarray(train, dtype=np.float64)
    m, n = q.shape[0], t.shape[0]
    if n == 0:
        raise UserInputError("no training descriptors to compare with")
    best = np.full(m, np.inf)
    arg = np.zeros(m, dtype=np.int64)
    if m == 0:
        return best, arg
    t_sq = np.einsum("ij,ij->i", t, t)
    q_sq = np.einsum("ij,ij->i", q, q)
    tb = max(1, min(n, max_block // max(1, min(m, 1024))))
    qb = max(1, min(m, max_block // tb))
    for q0 in range(0, m, qb):
        qs = slice(q0, q0 + qb)
        for t0 in range(0, n, tb):
            ts = slice(t0, t0 + tb)
            # In place, so one block of memory is live at a time.
            d2 = q[qs] @ t[ts].T
            d2 *= -2.0
            d2 += q_sq[qs, None]
            d2 += t_sq[None, ts]
            j = np.argmin(d2, axis=1)
            v = d2[np.arange(d2.shape[0]), j]
            better = v < best[qs]
            best[qs] = np.where(better, v, best[qs])
            arg[qs] = np.where(better, j + t0, arg[qs])
            del d2  # free the block before the next one is allocated
    best = np.einsum("ij,ij->i", q - t[arg], q - t[arg])
    return best, arg


def kernel_distance_from_sq(d2: ArrayLike, length_scale: float) -> np.ndarray:
    """``sqrt(2 - 2 k)`` with ``k = exp(-d2 / (2 l²))``: 0 on a training point, sqrt(2) far away."""
    k = np.exp(-np.asarray(d2, dtype=np.float64) / (2.0 * length_scale**2))
    return np.sqrt(np.maximum(2.0 - 2.0 * k, 0.0))


# --------------------------------------------------------------------------------------------
# Mahalanobis with Ledoit-Wolf shrinkage
# --------------------------------------------------------------------------------------------


def ledoit_wolf_shrinkage(x: ArrayLike) -> float:
    """Ledoit-Wolf (2004) optimal shrinkage intensity towards ``m I``, ``m = tr(S)/D``.

    With centred rows x_k and ``S = X^T X / n`` (norms ``||A||² = tr(A A^T) / D``):
    ``d² = ||S - m I||²``, ``b̄² = (1/n²) sum_k ||x_k x_k^T - S||²``, ``b² = min(b̄², d²)``,
    intensity ``b² / d²``. The sum uses ``sum_k ||x_k x_k^T - S||²_F = sum_k |x_k|⁴ - n ||S||²_F``.

    Args:
        x: (n, D) samples (centred here with their mean).

    Returns:
        Intensity in [0, 1]; 0 when ``S`` is already proportional to the identity.
    """
    a = np.asarray(x, dtype=np.float64)
    n, dim = a.shape
    if n < 2:
        raise UserInputError("Ledoit-Wolf shrinkage needs at least 2 samples")
    a = a - a.mean(axis=0)
    s = a.T @ a / n
    m = np.trace(s) / dim
    d2 = (np.sum(s**2) - 2.0 * m * np.trace(s) + m * m * dim) / dim
    if d2 <= 0.0:
        return 0.0
    row4 = np.einsum("ij,ij->i", a, a) ** 2
    b2_bar = (np.sum(row4) / n - np.sum(s**2)) / (n * dim)
    return float(min(max(b2_bar, 0.0), d2) / d2)


def shrunk_covariance(x: ArrayLike, shrinkage: bool = True) -> tuple[np.ndarray, float]:
    """Unbiased sample covariance (ddof=1), optionally Ledoit-Wolf-shrunk towards ``m I``.

    The Ledoit-Wolf intensity δ is applied to the ddof=1 covariance: ``δ m I + (1 - δ) S_u``.
    This is ``n / (n - 1)`` times the paper's estimator and keeps the unshrunk case equal to the
    covariance for which the Hotelling F threshold is exact.

    Args:
        x: (n, D) samples, n >= 2.

    Returns:
        ``(cov (D, D), delta)``.
    """
    a = np.asarray(x, dtype=np.float64)
    n, dim = a.shape
    if n < 2:
        raise UserInputError(f"a covariance needs at least 2 samples, got {n}")
    c = np.cov(a, rowvar=False, ddof=1).reshape(dim, dim)
    if not shrinkage:
        return c, 0.0
    delta = ledoit_wolf_shrinkage(a)
    m = np.trace(c) / dim
    return delta * m * np.eye(dim) + (1.0 - delta) * c, delta


def sidak_alpha(alpha: float, n_tests: int) -> float:
    """Per-test false-alarm rate so that ``n_tests`` independent tests alarm with rate ``alpha``:
    ``1 - (1 - alpha)^(1/n)``."""
    if not 0.0 < alpha < 1.0:
        raise UserInputError(f"alpha must be in (0, 1), got {alpha}")
    if n_tests < 1:
        raise UserInputError(f"the number of tests must be >= 1, got {n_tests}")
    return float(-math.expm1(math.log1p(-alpha) / n_tests))


def mahalanobis_threshold(n: int, dim: int, alpha: float, rule: ThresholdRule = "f") -> float:
    """Squared-distance threshold exceeded with probability ``alpha`` by a new in-distribution
    point, for mean and ddof=1 covariance estimated from ``n`` Gaussian samples in ``dim`` dims.

    ``rule="f"``: Hotelling's prediction region,
    ``T² ~ (n + 1)(n - 1) D / (n (n - D)) F(D, n - D)``, exact for every ``n > D``; with
    ``n <= D`` it does not exist and the chi-square rule is used. ``rule="chi2"``: the
    large-``n`` limit ``chi2(D)``, which raises too many alarms for small ``n``.
    """
    if not 0.0 < alpha < 1.0:
        raise UserInputError(f"alpha must be in (0, 1), got {alpha}")
    if rule == "f" and n > dim:
        factor = (n + 1) * (n - 1) * dim / (n * (n - dim))
        return float(factor * stats.f.isf(alpha, dim, n - dim))
    if rule not in ("f", "chi2"):
        raise UserInputError(f"unknown threshold rule {rule!r} (use 'f' or 'chi2')")
    return float(stats.chi2.isf(alpha, dim))


# --------------------------------------------------------------------------------------------
# Extrapolation grade (MaxVol)
# --------------------------------------------------------------------------------------------


def maxvol(
    x: ArrayLike, *, tol: float = 1e-6, max_iter: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Greedy MaxVol: D rows of ``x`` (n, D) spanning a (locally) maximal-volume submatrix A.

    Start from the rows chosen by QR with column pivoting of ``x^T``, then repeatedly swap in the
    row i that maximises ``|(x A^-1)_ij|`` for the active row j while that exceeds ``1 + tol``;
    each swap multiplies ``|det A|`` by that factor, so the loop terminates. At the end every row
    has ``max_j |(x A^-1)_j| <= 1 + tol``.

    Returns:
        ``(active (D,) row indices, A^-1 (D, D))``.

    Raises:
        UserInputError: fewer than D rows or rank-deficient ``x``.
    """
    a = np.asarray(x, dtype=np.float64)
    n, dim = a.shape
    if n < dim:
        raise UserInputError(
            f"γ needs at least D = {dim} training descriptors per species, got {n}"
        )
    _, r, piv = linalg.qr(a.T, mode="economic", pivoting=True)
    diag = np.abs(np.diag(r))
    if diag[dim - 1] <= 1e-10 * diag[0]:
        rank = int(np.sum(diag > 1e-10 * diag[0]))
        raise UserInputError(
            f"training descriptors have rank {rank} < D = {dim}: γ needs D linearly independent "
            "descriptors (more varied training structures, or fit without gamma)"
        )
    idx = np.sort(piv[:dim])
    b = linalg.solve(a[idx].T, a.T).T  # B = x A^-1
    limit = max_iter if max_iter is not None else 100 * dim
    for it in range(limit):
        flat = int(np.argmax(np.abs(b)))
        i, j = divmod(flat, dim)
        if abs(b[i, j]) <= 1.0 + tol:
            break
        idx[j] = i
        # Rank-1 update of B after replacing active row j by row i.
        bj = b[:, j].copy()
        row = b[i].copy()
        row[j] -= 1.0
        b -= np.outer(bj / b[i, j], row)
        if (it + 1) % 50 == 0:  # refresh to stop round-off from accumulating
            b = linalg.solve(a[idx].T, a.T).T
    a_inv = linalg.inv(a[idx])
    return idx, a_inv


# --------------------------------------------------------------------------------------------
# The fitted domain model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # arrays: identity equality only
class DomainModel:
    """Per-species domain-of-applicability model fitted on training descriptors.

    Shapes: S species slots, D descriptor components, d = hull PCA dimension, ragged per-species
    arrays concatenated with ``*_offsets`` (S + 1,) so that species s owns rows
    ``offsets[s]:offsets[s + 1]``.

    Attributes:
        fitted: (S,) bool, species seen in training (others are always out of domain).
        n_train: (S,) int training atoms per species.
        mean: (S, D) training mean; std: (S, D) training std (ddof=1; constant components 1).
        hull_components: (S, d, D) PCA axes in standardised space.
        hull_points: (P, d) projected training points (hull vertices where qhull could find them).
        hull_offsets: (S + 1,).
        hull_equations: (F, d + 1) facets ``a·y + b <= 0``; hull_equation_offsets: (S + 1,);
            a species without facets (degenerate or d > 8) is checked by LP only.
        kernel_points: (M, D) standardised training descriptors; kernel_offsets: (S + 1,).
        length_scale: () Gaussian-kernel length in standardised units.
        whiten: (S, D, D) ``W`` with ``W^T W = C^-1`` for the (shrunk) covariance C of the
            standardised descriptors; shrinkage: (S,) Ledoit-Wolf intensity (0 when off).
        gamma_inv: (S, D, D) ``A^-1`` of the MaxVol active set (raw descriptors);
            gamma_active: (S, D) active rows (indices into the species' training rows);
            gamma_available: (S,) bool; gamma_train_max: (S,) max γ over the training atoms.
    """

    fitted: np.ndarray
    n_train: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    hull_components: np.ndarray
    hull_points: np.ndarray
    hull_offsets: np.ndarray
    hull_equations: np.ndarray
    hull_equation_offsets: np.ndarray
    kernel_points: np.ndarray
    kernel_offsets: np.ndarray
    length_scale: np.ndarray
    whiten: np.ndarray
    shrinkage: np.ndarray
    gamma_inv: np.ndarray
    gamma_active: np.ndarray
    gamma_available: np.ndarray
    gamma_train_max: np.ndarray

    # ---------------------------------------------------------------- shape helpers
    @property
    def n_species(self) -> int:
        return int(self.fitted.shape[0])

    @property
    def dim(self) -> int:
        """D, descriptor length."""
        return int(self.mean.shape[1])

    @property
    def hull_dim(self) -> int:
        """d, PCA dimension of the hull test."""
        return int(self.hull_components.shape[1])

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        desc: ArrayLike,
        species: ArrayLike,
        *,
        n_species: int | None = None,
        hull_dim: int = 3,
        length_scale: float | None = None,
        shrinkage: bool = True,
        gamma: bool = True,
        max_kernel_points: int | None = None,
        seed: int = 0,
    ) -> DomainModel:
        """Fit every check on training descriptors.

        Args:
            desc: (N, D) training descriptors.
            species: (N,) species indices.
            n_species: S, size of the species table (default ``max(species) + 1``).
            hull_dim: PCA dimension of the hull test (capped at D). 3 keeps the chance that an
                in-distribution atom falls outside the hull of 10^4 training atoms at ~0.5 %
                (3 % in 5-D, 50 % in 8-D at 10^3 atoms); see ``docs/uncertainty.md``.
            length_scale: kernel length in standardised units; default ``sqrt(D)`` (a typical
                pair of training points, ``|z - z'|² ≈ 2 D``, then has ``k ≈ e^-1``).
            shrinkage: Ledoit-Wolf shrinkage of the Mahalanobis covariance.
            gamma: fit the MaxVol active set (needs >= D independent descriptors per species).
            max_kernel_points: keep at most this many training points per species for the kernel
                distance (random subset with ``seed``); None keeps all.
            seed: random seed of that subset.
        """
        x, sp = _check_desc_species(desc, species)
        n_atoms, dim = x.shape
        if n_atoms == 0 or dim == 0:
            raise UserInputError(f"no training descriptors (shape {x.shape})")
        n_sp = int(sp.max()) + 1 if n_species is None else int(n_species)
        _check_desc_species(x, sp, n_species=n_sp)
        if hull_dim < 1:
            raise UserInputError(f"hull_dim must be >= 1, got {hull_dim}")
        d = min(hull_dim, dim)
        ell = float(np.sqrt(dim)) if length_scale is None else float(length_scale)
        if not ell > 0:
            raise UserInputError(f"length_scale must be > 0, got {length_scale}")
        rng = np.random.default_rng(seed)

        fitted = np.zeros(n_sp, bool)
        n_train = np.zeros(n_sp, np.int64)
        mean = np.zeros((n_sp, dim))
        std = np.ones((n_sp, dim))
        comps = np.zeros((n_sp, d, dim))
        hull_pts: list[np.ndarray] = []
        hull_eqs: list[np.ndarray] = []
        kern: list[np.ndarray] = []
        whiten = np.zeros((n_sp, dim, dim))
        shrink = np.zeros(n_sp)
        g_inv = np.zeros((n_sp, dim, dim))
        g_act = np.zeros((n_sp, dim), np.int64)
        g_ok = np.zeros(n_sp, bool)
        g_max = np.full(n_sp, np.nan)

        for s in range(n_sp):
            xs = x[sp == s]
            n = xs.shape[0]
            n_train[s] = n
            if n == 0:
                hull_pts.append(np.zeros((0, d)))
                hull_eqs.append(np.zeros((0, d + 1)))
                kern.append(np.zeros((0, dim)))
                continue
            if n < 2:
                raise UserInputError(
                    f"species {s} has a single training atom: a domain needs at least 2"
                )
            fitted[s] = True
            mean[s] = xs.mean(axis=0)
            sd = xs.std(axis=0, ddof=1)
            # A component constant in training keeps unit scale: any change in it is novel.
            sd[sd <= 1e-12 * max(1.0, float(np.abs(xs).max()))] = 1.0
            std[s] = sd
            z = (xs - mean[s]) / sd

            # PCA for the hull: right singular vectors of the centred, standardised data.
            _, _, vt = np.linalg.svd(z, full_matrices=False)
            k = min(d, vt.shape[0])
            comps[s, :k] = vt[:k]
            y = z @ comps[s].T
            verts, eq = convex_hull(y)
            hull_eqs.append(np.zeros((0, d + 1)) if eq is None else eq)
            hull_pts.append(verts)

            if max_kernel_points is not None and n > max_kernel_points:
                kern.append(z[rng.choice(n, max_kernel_points, replace=False)])
            else:
                kern.append(z)

            cov, shrink[s] = shrunk_covariance(z, shrinkage)
            try:
                chol = linalg.cholesky(cov, lower=True)
            except linalg.LinAlgError as exc:
                raise UserInputError(
                    f"species {s}: the descriptor covariance is singular ({n} atoms, D = {dim}); "
                    "fit with shrinkage"
                ) from exc
            whiten[s] = linalg.solve_triangular(chol, np.eye(dim), lower=True)

            if gamma:
                try:
                    act, a_inv = maxvol(xs)
                except UserInputError as exc:
                    raise UserInputError(f"species {s}: {exc}") from exc
                g_act[s], g_inv[s], g_ok[s] = act, a_inv, True
                g_max[s] = float(np.max(np.abs(xs @ a_inv)))

        def pack(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            offs = np.zeros(len(parts) + 1, np.int64)
            offs[1:] = np.cumsum([p.shape[0] for p in parts])
            return np.concatenate(parts, axis=0), offs

        hp, ho = pack(hull_pts)
        he, heo = pack(hull_eqs)
        kp, ko = pack(kern)
        return cls(
            fitted=fitted,
            n_train=n_train,
            mean=mean,
            std=std,
            hull_components=comps,
            hull_points=hp,
            hull_offsets=ho,
            hull_equations=he,
            hull_equation_offsets=heo,
            kernel_points=kp,
            kernel_offsets=ko,
            length_scale=np.asarray(ell),
            whiten=whiten,
            shrinkage=shrink,
            gamma_inv=g_inv,
            gamma_active=g_act,
            gamma_available=g_ok,
            gamma_train_max=g_max,
        )

    # ---------------------------------------------------------------- evaluation
    def _check(self, desc: ArrayLike, species: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        return _check_desc_species(desc, species, n_species=self.n_species, dim=self.dim)

    def standardise(self, desc: ArrayLike, species: ArrayLike) -> np.ndarray:
        """(N, D) descriptors standardised with their species' training mean and std."""
        x, sp = self._check(desc, species)
        return (x - self.mean[sp]) / self.std[sp]

    def hull_project(self, desc: ArrayLike, species: ArrayLike) -> np.ndarray:
        """(N, d) PCA coordinates used by the hull test."""
        z = self.standardise(desc, species)
        sp = np.asarray(species, dtype=np.int64)
        return np.einsum("nD,ndD->nd", z, self.hull_components[sp])

    def hull_inside(
        self, desc: ArrayLike, species: ArrayLike, *, method: HullMethod = "auto"
    ) -> np.ndarray:
        """(N,) bool: atom lies inside its species' training hull in PCA space.

        ``method``: "facets" (qhull inequalities, vectorised), "lp" (one LP per atom) or "auto"
        (facets where available, else LP). Atoms of species without training data are outside.
        """
        x, sp = self._check(desc, species)
        y = self.hull_project(x, sp)
        out = np.zeros(x.shape[0], dtype=bool)
        for s in range(self.n_species):
            sel = np.flatnonzero(sp == s)
            if sel.size == 0 or not self.fitted[s]:
                continue
            eq = self.hull_equations[
                self.hull_equation_offsets[s] : self.hull_equation_offsets[s + 1]
            ]
            pts = self.hull_points[self.hull_offsets[s] : self.hull_offsets[s + 1]]
            if method == "facets" or (method == "auto" and eq.shape[0] > 0):
                if eq.shape[0] == 0:
                    raise UserInputError(
                        f"species {s} has no hull facets (degenerate training set or hull "
                        f"dimension {self.hull_dim} > {_QHULL_MAX_DIM}); use method='lp'"
                    )
                out[sel] = inside_hull_facets(y[sel], eq)
            elif method in ("lp", "auto"):
                out[sel] = inside_hull_lp(y[sel], pts)
            else:
                raise UserInputError(f"unknown hull method {method!r} (auto, facets or lp)")
        return out

    def kernel_distance(
        self, desc: ArrayLike, species: ArrayLike, *, max_block: int = 1 << 21
    ) -> np.ndarray:
        """(N,) ``min_j sqrt(2 - 2 k(x, x_j))`` over the same-species training atoms; sqrt(2)
        (the maximum) for species without training data."""
        x, sp = self._check(desc, species)
        z = (x - self.mean[sp]) / self.std[sp]
        out = np.full(x.shape[0], np.sqrt(2.0))
        ell = float(self.length_scale)
        for s in range(self.n_species):
            sel = np.flatnonzero(sp == s)
            if sel.size == 0 or not self.fitted[s]:
                continue
            train = self.kernel_points[self.kernel_offsets[s] : self.kernel_offsets[s + 1]]
            d2, _ = min_sq_distance(z[sel], train, max_block=max_block)
            out[sel] = kernel_distance_from_sq(d2, ell)
        return out

    def mahalanobis_sq(self, desc: ArrayLike, species: ArrayLike) -> np.ndarray:
        """(N,) squared Mahalanobis distance to the species' training distribution (inf for
        species without training data)."""
        x, sp = self._check(desc, species)
        z = (x - self.mean[sp]) / self.std[sp]
        out = np.full(x.shape[0], np.inf)
        for s in range(self.n_species):
            sel = np.flatnonzero(sp == s)
            if sel.size and self.fitted[s]:
                w = z[sel] @ self.whiten[s].T
                out[sel] = np.einsum("ij,ij->i", w, w)
        return out

    def mahalanobis_thresholds(
        self,
        alpha: float,
        *,
        n_atoms: int = 1,
        sidak: bool = True,
        rule: ThresholdRule = "f",
    ) -> np.ndarray:
        """(S,) squared-distance thresholds for a frame false-alarm rate ``alpha``.

        With ``sidak`` the per-atom rate is ``1 - (1 - alpha)^(1/n_atoms)``. Species without
        training data get threshold 0 (their distance is inf, so they always alarm).
        """
        a = sidak_alpha(alpha, n_atoms) if sidak else alpha
        if not 0.0 < a < 1.0:
            raise UserInputError(f"alpha must be in (0, 1), got {alpha}")
        out = np.zeros(self.n_species)
        for s in range(self.n_species):
            if self.fitted[s]:
                out[s] = mahalanobis_threshold(int(self.n_train[s]), self.dim, a, rule)
        return out

    def mahalanobis_alarm(
        self,
        desc: ArrayLike,
        species: ArrayLike,
        alpha: float,
        *,
        sidak: bool = True,
        rule: ThresholdRule = "f",
    ) -> tuple[bool, np.ndarray]:
        """Alarm for one frame: ``(any atom exceeds, (N,) per-atom exceedance)``."""
        x, sp = self._check(desc, species)
        thr = self.mahalanobis_thresholds(alpha, n_atoms=max(1, x.shape[0]), sidak=sidak, rule=rule)
        exceed = self.mahalanobis_sq(x, sp) > thr[sp]
        return bool(exceed.any()), exceed

    def gamma(self, desc: ArrayLike, species: ArrayLike) -> np.ndarray:
        """(N,) extrapolation grade ``max_j |(x A^-1)_j|`` (<= 1: interpolation); inf for species
        without training data or a γ active set."""
        x, sp = self._check(desc, species)
        out = np.full(x.shape[0], np.inf)
        for s in range(self.n_species):
            sel = np.flatnonzero(sp == s)
            if sel.size and self.gamma_available[s]:
                out[sel] = np.max(np.abs(x[sel] @ self.gamma_inv[s]), axis=1)
        return out

    # ---------------------------------------------------------------- JAX parameters
    def jax_params(self) -> dict[str, np.ndarray]:
        """Fixed-shape arrays for :func:`jax_mahalanobis`, :func:`jax_gamma` and
        :func:`jax_hull_excess` (pass them as traced inputs of the compiled loop).

        The ragged hull facets are padded to (S, F_max, d + 1) with rows ``[0, ..., 0, -1]``,
        which every point satisfies.
        """
        n_sp, d = self.n_species, self.hull_dim
        counts = np.diff(self.hull_equation_offsets)
        f_max = max(1, int(counts.max()) if counts.size else 1)
        eq = np.zeros((n_sp, f_max, d + 1))
        eq[:, :, -1] = -1.0
        for s, sl in enumerate(_offsets_slices(self.hull_equation_offsets)):
            eq[s, : sl.stop - sl.start] = self.hull_equations[sl]
        return {
            "fitted": self.fitted.copy(),
            "mean": self.mean.copy(),
            "std": self.std.copy(),
            "whiten": self.whiten.copy(),
            "gamma_inv": self.gamma_inv.copy(),
            "gamma_available": self.gamma_available.copy(),
            "hull_components": self.hull_components.copy(),
            "hull_equations": eq,
            "hull_available": self.fitted & (counts > 0),
        }

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, np.ndarray]:
        """Flat dict of numpy arrays (keys are the field names plus ``format_version``)."""
        out = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)}
        out["format_version"] = np.asarray(FORMAT_VERSION)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DomainModel:
        """Inverse of :meth:`to_dict`; checks keys, version and shapes."""
        names = [f.name for f in fields(cls)]
        missing = sorted(set(names + ["format_version"]) - set(data))
        if missing:
            raise UserInputError(f"domain model: missing arrays {missing}")
        version = int(np.asarray(data["format_version"]))
        if version != FORMAT_VERSION:
            raise UserInputError(
                f"domain model format version {version} is not supported (expected "
                f"{FORMAT_VERSION})"
            )
        arrays = {k: np.asarray(data[k]) for k in names}
        for k, v in arrays.items():
            if v.dtype == object:
                raise UserInputError(f"domain model: array {k!r} has object dtype")
        model = cls(**arrays)
        model._validate_shapes()
        return model

    def _validate_shapes(self) -> None:
        n_sp, dim, d = self.n_species, self.dim, self.hull_dim
        expect = {
            "n_train": (n_sp,),
            "mean": (n_sp, dim),
            "std": (n_sp, dim),
            "hull_components": (n_sp, d, dim),
            "hull_offsets": (n_sp + 1,),
            "hull_equation_offsets": (n_sp + 1,),
            "kernel_offsets": (n_sp + 1,),
            "length_scale": (),
            "whiten": (n_sp, dim, dim),
            "shrinkage": (n_sp,),
            "gamma_inv": (n_sp, dim, dim),
            "gamma_active": (n_sp, dim),
            "gamma_available": (n_sp,),
            "gamma_train_max": (n_sp,),
        }
        bad = [
            f"{k}: {getattr(self, k).shape} != {v}"
            for k, v in expect.items()
            if getattr(self, k).shape != v
        ]
        ragged = [
            ("hull_points", self.hull_offsets, d),
            ("hull_equations", self.hull_equation_offsets, d + 1),
            ("kernel_points", self.kernel_offsets, dim),
        ]
        for name, offs, width in ragged:
            arr = getattr(self, name)
            if arr.ndim != 2 or arr.shape[1] != width or (offs.size and offs[-1] != arr.shape[0]):
                bad.append(f"{name}: shape {arr.shape} does not match its offsets/width {width}")
        if bad:
            raise UserInputError("domain model arrays are inconsistent: " + "; ".join(bad))

    def save(self, path: str | Path) -> Path:
        """Write an uncompressed ``.npz`` atomically (temporary file + ``os.replace``)."""
        from mlipctl.reports.base import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, **self.to_dict())
        atomic_write_bytes(path, buf.getvalue())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> DomainModel:
        """Read a model written by :meth:`save` (``allow_pickle=False``)."""
        p = Path(path)
        if not p.is_file():
            raise UserInputError(f"domain model file not found: {p}")
        try:
            with np.load(p, allow_pickle=False) as data:
                return cls.from_dict({k: data[k] for k in data.files})
        except (ValueError, OSError) as exc:
            if isinstance(exc, UserInputError):
                raise
            raise UserInputError(f"cannot read domain model {p}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Pure JAX monitors (params from DomainModel.jax_params())
# --------------------------------------------------------------------------------------------


def jax_mahalanobis(params: dict[str, Any], desc: Any, species: Any) -> Any:
    """(N,) squared Mahalanobis distances, inf for species without training data.

    Args:
        params: :meth:`DomainModel.jax_params` (arrays, traced).
        desc: (N, D) descriptors.
        species: (N,) int species indices (padding atoms: any valid index; mask them outside).
    """
    import jax.numpy as jnp

    z = (desc - params["mean"][species]) / params["std"][species]
    d2 = jnp.zeros(desc.shape[0], dtype=z.dtype)
    # Loop over the (static, few) species rather than gathering an (N, D, D) matrix per atom.
    for s in range(params["whiten"].shape[0]):
        w = z @ params["whiten"][s].T
        d2 = jnp.where(species == s, jnp.sum(w * w, axis=-1), d2)
    return jnp.where(params["fitted"][species], d2, jnp.inf)


def jax_gamma(params: dict[str, Any], desc: Any, species: Any) -> Any:
    """(N,) extrapolation grade ``max_j |(x A^-1)_j|``, inf where no active set exists."""
    import jax.numpy as jnp

    g = jnp.zeros(desc.shape[0], dtype=desc.dtype)
    for s in range(params["gamma_inv"].shape[0]):
        g = jnp.where(species == s, jnp.max(jnp.abs(desc @ params["gamma_inv"][s]), axis=-1), g)
    return jnp.where(params["gamma_available"][species], g, jnp.inf)


def jax_hull_excess(params: dict[str, Any], desc: Any, species: Any) -> Any:
    """(N,) largest facet violation in PCA space: ``<= HULL_TOL`` inside the training hull;
    inf for species without training data, NaN where the hull has no facets (LP-only)."""
    import jax.numpy as jnp

    z = (desc - params["mean"][species]) / params["std"][species]
    ex = jnp.zeros(desc.shape[0], dtype=z.dtype)
    for s in range(params["hull_equations"].shape[0]):
        y = z @ params["hull_components"][s].T
        eq = params["hull_equations"][s]
        v = jnp.max(y @ eq[:, :-1].T + eq[:, -1], axis=-1)
        ex = jnp.where(species == s, v, ex)
    ex = jnp.where(params["hull_available"][species], ex, jnp.nan)
    return jnp.where(params["fitted"][species], ex, jnp.inf)
