"""Moment-tensor potential (flax linen): the default architecture, ``kind: moment``.

Per directed edge i -> j with vector r_ij (length r, direction u = r_ij / r):

1. Radial basis phi_n(r), n < n_basis (Gaussians or Bessel), times a polynomial envelope
   f(r/r_c) = 1 - 10x^3 + 15x^4 - 6x^5 (``envelope_power`` p = 3; see :func:`envelope`) whose
   value, first and second derivatives vanish at r_c, so energy, forces and force derivatives
   are continuous when a neighbour crosses the cutoff.
2. Learned radial channels R_c(r) = f(r) * sum_n W[z_i, z_j, n, c] phi_n(r), c < n_radial, with
   a separate matrix W for each ordered species pair (and, with ``radial_per_order``, for each
   moment order, as in MTP; with ``radial_tie_decay`` > 0 as W + D_order, the training decaying
   the deviations D).
3. Moment tensors per atom and channel, summed over neighbours and divided by avg_num_neighbors:
   M0 = sum R, M1 = sum R u, M2 = sum R u(x)u, M3 = sum R u(x)u(x)u. The symmetric tensors are
   accumulated as their unique components (1 + 3 + 6 + 10) to halve the edge work, on the dense
   (atom, neighbour slot) layout of ``AtomsGraph.neighbors``.
4. Rotation invariants: M0; M1.M1, M2:M2, M3:M3 (all channel pairs c1 <= c2); the 4-body
   contractions M1.M2.M1, tr(M2 M2 M2), M1.M3:M2 and (M3:M3):M2 over channel triples.
5. Per-element affine standardisation of the invariants (set from data by
   ``fit_feature_scaling``), then a per-element MLP -> ``n_out`` numbers per atom (1, or the K
   heads of a shallow ensemble), plus (``linear_readout``) a per-element linear term.

Shapes: E edges, N atoms, K neighbour slots per atom, C = n_radial channels, F =
:func:`n_features`.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mlipctl.config.model import MomentModelConfig

Array = jax.Array

# --- symmetric tensor bookkeeping ------------------------------------------------------------

# Per moment order k: the unique components of a symmetric rank-k tensor (index tuples
# a <= b <= ...; 1, 3, 6, 10, 15 of them), the full-tensor index -> unique index table used to
# expand moments per atom (cheap), and how often each unique component occurs in the full
# tensor (M:M = sum_u mult_u m_u^2).
_UNIQUE = [list(itertools.combinations_with_replacement(range(3), k)) for k in range(5)]
_EXPAND = [
    np.array([_UNIQUE[k].index(tuple(sorted(t))) for t in itertools.product(range(3), repeat=k)])
    for k in range(5)
]
_MULT = [np.bincount(_EXPAND[k], minlength=len(_UNIQUE[k])).astype(float) for k in range(5)]


def n_features(n_radial: int, max_order: int) -> int:
    """Length F of the per-atom invariant descriptor."""
    c = n_radial
    pairs = c * (c + 1) // 2
    n = c  # M0
    if max_order >= 1:
        n += pairs  # M1.M1
    if max_order >= 2:
        n += pairs + c * pairs + c * (c + 1) * (c + 2) // 6  # M2:M2, M1.M2.M1, tr(M2^3)
    if max_order >= 3:
        n += pairs + c**3 + c * pairs  # M3:M3, M1.M3:M2, (M3:M3):M2
    if max_order >= 4:
        n += pairs + c * pairs  # M4::M4, (M4:M2):M2
    return n


# --- neighbour sums ----------------------------------------------------------------------------


def moment_sum(radial: Array, angular: Array, blocks: tuple[int, ...] | None = None) -> Array:
    """M[i, c, l] = sum over neighbour slots k of radial[i, k, s(l), c] * angular[i, k, l].

    Args:
        radial: (N, K, S, C) with S radial sets; angular: (N, K, L); blocks: sizes of the S
            contiguous blocks of angular components, set s serving block s (None: S = 1).
            Empty neighbour slots must be zero in ``radial``.

    Returns:
        (N, C, L).

    On the dense (atom, neighbour) layout each block is a batched matmul; a scatter over an
    edge list was ~5x slower on CPU (forward and gradient, 4000-atom cell).
    """
    if blocks is None:
        return jnp.einsum("nkc,nkl->ncl", radial[:, :, 0], angular)
    # Every set against every component in one product, then each component keeps its own
    # set's row: S x the flops of per-block products, but one matmul of S*C rows beats S
    # small ones (the L = 1 and 3 blocks especially) on CPU.
    n, k, n_sets, c = radial.shape
    full = jnp.einsum("nkr,nkl->nrl", radial.reshape(n, k, n_sets * c), angular)  # (N, S*C, L)
    bounds = np.cumsum((0, *blocks))
    return jnp.concatenate(
        [
            full[:, s * c : (s + 1) * c, lo:hi]
            for s, (lo, hi) in enumerate(itertools.pairwise(bounds))
        ],
        axis=2,
    )


# --- radial part ---------------------------------------------------------------------------


def envelope(x: Array, p: int = 3) -> Array:
    """Smooth cutoff on x = r / r_c: 1 at 0, 0 for x >= 1 with first and second derivatives 0.

    u(x) = 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2) (the polynomial envelope of
    DimeNet/NequIP); p = 3 is 1 - 10x^3 + 15x^4 - 6x^5. Larger p stays near 1 for longer.
    """
    x = jnp.clip(x, 0.0, 1.0)
    a, b, c = (p + 1) * (p + 2) / 2, p * (p + 2), p * (p + 1) / 2
    return 1.0 - x**p * (a - b * x + c * x * x)


def radial_basis(r: Array, cfg: MomentModelConfig) -> Array:
    """(E,) distances -> (E, n_basis) basis values times the envelope (0 beyond the cutoff)."""
    rc = cfg.cutoff
    n = cfg.n_basis
    if cfg.basis == "gaussian":
        centres = np.linspace(cfg.r_min, rc, n) if n > 1 else np.array([cfg.r_min])
        width = (rc - cfg.r_min) / max(n - 1, 1)
        z = (r[:, None] - jnp.asarray(centres, r.dtype)) / width
        phi = jnp.exp(-0.5 * z * z)
    else:
        k = jnp.arange(1, n + 1, dtype=r.dtype) * (math.pi / rc)
        # r >= ~0.5 Å for real edges (overlaps are rejected upstream); padding edges get r = 1.
        phi = math.sqrt(2.0 / rc) * jnp.sin(k * r[:, None]) / r[:, None]
    return phi * envelope(r / rc, cfg.envelope_power)[:, None]


def _activation(name: str) -> Callable[[Array], Array]:
    if name == "silu":
        return jax.nn.silu
    if name == "tanh":
        return jnp.tanh
    if name == "gelu":
        return jax.nn.gelu
    if name == "softplus":
        return jax.nn.softplus
    if name == "shifted_softplus":
        return lambda x: jax.nn.softplus(x) - math.log(2.0)
    raise ValueError(f"unknown activation {name!r}")


# --- invariants ----------------------------------------------------------------------------


def _selector(rows: int, picks: list[int], dtype: Any) -> Array:
    """(rows, len(picks)) 0/1 matrix whose column k picks row ``picks[k]``.

    Index selections are done as matmuls with such matrices: on CPU a gather's gradient is a
    scatter, which is much slower than a small matmul.
    """
    sel = np.zeros((rows, len(picks)))
    sel[np.asarray(picks), np.arange(len(picks))] = 1.0
    return jnp.asarray(sel, dtype)


def _expand(unique: Array, table: np.ndarray, shape: tuple[int, ...]) -> Array:
    """Unique symmetric components (..., k) -> full tensor (..., *shape)."""
    full = unique @ _selector(unique.shape[-1], [int(t) for t in table], unique.dtype)
    return full.reshape(*unique.shape[:-1], *shape)


def _upper(x: Array) -> Array:
    """(..., C, C) symmetric in the last two axes -> (..., C(C+1)/2) entries c1 <= c2."""
    c = x.shape[-1]
    picks = [i * c + j for i in range(c) for j in range(i, c)]
    return x.reshape(*x.shape[:-2], c * c) @ _selector(c * c, picks, x.dtype)


def _upper3(x: Array) -> Array:
    """(..., C, C, C) fully symmetric -> (..., C(C+1)(C+2)/6) entries c1 <= c2 <= c3."""
    c = x.shape[-1]
    picks = [
        i * c * c + j * c + k for i, j, k in itertools.combinations_with_replacement(range(c), 3)
    ]
    return x.reshape(*x.shape[:-3], c**3) @ _selector(c**3, picks, x.dtype)


def _contract_last(x: Array, y: Array) -> Array:
    """Broadcasting product summed over the last axis."""
    return jnp.sum(x * y, axis=-1)


def _gram_upper(x: Array, weights: np.ndarray) -> Array:
    """(N, C, X) -> (N, C(C+1)/2): sum_x weights[x] x[c1, x] x[c2, x] for c1 <= c2."""
    return _upper(_contract_last(x[:, :, None, :], (x * jnp.asarray(weights, x.dtype))[:, None]))


def invariants(moments: Array, n_radial: int, max_order: int) -> Array:
    """(N, C, n_components) unique moment components -> (N, F) rotation invariants.

    On CPU a per-atom tensor product written as a batched matmul costs ~2 us per atom however
    small it is; the Gram-type terms and M1.M2.M1 are therefore broadcast products summed
    over the last axis (~2-7x faster with the gradient, measured at 4000 atoms), while the
    larger M2/M3 contractions stay einsums, which were as fast or faster.
    """
    n_atoms = moments.shape[0]
    c = n_radial
    out = [moments[:, :, 0]]
    if max_order >= 1:
        m1 = moments[:, :, 1:4]
        out.append(_gram_upper(m1, _MULT[1]))
    if max_order >= 2:
        out.append(_gram_upper(moments[:, :, 4:10], _MULT[2]))
        m2 = _expand(moments[:, :, 4:10], _EXPAND[2], (3, 3))
        # M1[c1] . M2[c2] . M1[c3], symmetric in c1 <-> c3.
        m2m1 = _contract_last(m2[:, :, None], m1[:, None, :, None])  # (N, c2, c3, 3)
        t = _contract_last(m2m1[:, :, :, None], m1[:, None, None])  # (N, c2, c3, c1)
        out.append(_upper(t).reshape(n_atoms, -1))
        # tr(M2 M2 M2) is symmetric under any permutation of the channels (M2 symmetric).
        m2m2 = jnp.einsum("ncab,ndbe->ncdae", m2, m2)
        out.append(_upper3(jnp.einsum("ncdae,nfea->ncdf", m2m2, m2)))
    if max_order >= 3:
        out.append(_gram_upper(moments[:, :, 10:20], _MULT[3]))
        m3 = _expand(moments[:, :, 10:20], _EXPAND[3], (3, 3, 3))
        # M1[c1] . M3[c2] : M2[c3]
        m3m2 = jnp.einsum("ncabd,nebd->ncea", m3, m2)  # (N, c2, c3, 3)
        out.append(jnp.einsum("nfa,ncea->nfce", m1, m3m2).reshape(n_atoms, c**3))
        # (M3[c1] : M3[c2]) : M2[c3], symmetric in c1 <-> c2.
        m3m3 = jnp.einsum("ncaef,ndbef->ncdab", m3, m3)
        t = jnp.einsum("ncdab,neab->necd", m3m3, m2)  # (N, c3, c1, c2)
        out.append(_upper(t).reshape(n_atoms, -1))
    if max_order >= 4:
        out.append(_gram_upper(moments[:, :, 20:35], _MULT[4]))
        # (M4[c1] : M2[c2]) : M2[c3], symmetric in c2 <-> c3.
        m4 = _expand(moments[:, :, 20:35], _EXPAND[4], (9, 9))
        m2f = m2.reshape(n_atoms, c, 9)
        m4m2 = jnp.einsum("ncpq,ndq->ncdp", m4, m2f)  # (N, c1, c3, 9)
        t = _contract_last(m4m2[:, :, None], m2f[:, None, :, None])  # (N, c1, c2, c3)
        out.append(_upper(t).reshape(n_atoms, -1))
    return jnp.concatenate(out, axis=1)


# --- flax modules --------------------------------------------------------------------------


def _kernel_init() -> Callable[..., Array]:
    # LeCun-normal per species: axis 0 indexes the species and is not a fan dimension.
    return nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,)
    )


class ElementMLP(nn.Module):
    """One MLP per element; atoms pick theirs by species (all S are evaluated: cost S x)."""

    n_species: int
    hidden: tuple[int, ...]
    n_out: int
    activation: str
    dtype: Any
    linear: bool = False

    @nn.compact
    def __call__(self, x: Array, species: Array) -> Array:
        """x: (N, F), species: (N,) int -> (N, n_out)."""
        act = _activation(self.activation)
        widths = [*self.hidden, self.n_out]
        onehot = None
        if self.n_species > 1:
            onehot = (species[:, None] == jnp.arange(self.n_species)).astype(self.dtype)

        def per_element(h: Array, w: Array) -> Array:
            if onehot is None:
                return h @ w[0]
            return jnp.einsum("nso,ns->no", jnp.einsum("nf,sfo->nso", h, w), onehot)

        h = x
        for layer, width in enumerate(widths):
            w = self.param(
                f"kernel_{layer}", _kernel_init(), (self.n_species, h.shape[-1], width), self.dtype
            )
            b = self.param(
                f"bias_{layer}", nn.initializers.zeros, (self.n_species, width), self.dtype
            )
            h = per_element(h, w) + (b[0] if onehot is None else onehot @ b)
            if layer < len(widths) - 1:
                h = act(h)
        if self.linear:
            # Zero-initialised, so training starts from the plain MLP.
            w = self.param(
                "linear",
                nn.initializers.zeros,
                (self.n_species, x.shape[-1], self.n_out),
                self.dtype,
            )
            h = h + per_element(x, w)
        return h


class MomentModel(nn.Module):
    """Edge vectors + graph indices -> per-atom outputs (N, n_out), in ``dtype``."""

    config: MomentModelConfig
    n_species: int
    n_out: int
    dtype: Any

    def setup(self) -> None:
        cfg = self.config
        s2 = self.n_species * self.n_species
        n_sets = cfg.max_order + 1 if cfg.radial_per_order else 1
        tied = cfg.radial_tie_decay > 0  # the config allows it only with radial_per_order
        self.radial = self.param(
            "radial",
            nn.initializers.normal(stddev=1.0),
            (s2, cfg.n_basis, cfg.n_radial * (1 if tied else n_sets)),
            self.dtype,
        )
        if tied:
            # Zero-initialised: training starts from one radial set shared by all orders.
            self.radial_delta = self.param(
                "radial_delta",
                nn.initializers.zeros,
                (s2, cfg.n_basis, cfg.n_radial * n_sets),
                self.dtype,
            )
        n_feat = n_features(cfg.n_radial, cfg.max_order)
        # Affine standardisation of the invariants per element, set from data by
        # mlipctl.model.potential.fit_feature_scaling. Invariants span many orders of magnitude
        # (odd moments nearly vanish in crystals), which an MLP fits badly unscaled. These are
        # statistics in raw units: training should freeze them (Adam's ~lr steps would swamp
        # them); they sit in the params tree so the model file carries them.
        self.feature_shift = self.param(
            "feature_shift", nn.initializers.zeros, (self.n_species, n_feat), self.dtype
        )
        self.feature_scale = self.param(
            "feature_scale", nn.initializers.ones, (self.n_species, n_feat), self.dtype
        )
        self.readout = ElementMLP(
            n_species=self.n_species,
            hidden=tuple(int(h) for h in cfg.hidden),
            n_out=self.n_out,
            activation=cfg.activation,
            dtype=self.dtype,
            linear=cfg.linear_readout,
        )

    def raw_descriptor(
        self,
        vectors: Array,
        species: Array,
        neighbors: Array,
        receivers: Array,
        edge_mask: Array,
        atom_mask: Array,
    ) -> Array:
        """Invariant per-atom descriptor.

        Args:
            vectors: (E, 3) edge vectors r_ij in Å (model dtype).
            species: (N,) int species index; neighbors: (N, K) int edges sent by each atom,
            padded with E; receivers: (E,) int; edge_mask: (E,) bool; atom_mask: (N,) bool.

        Returns:
            (N, F) invariants before standardisation; rows of padding atoms are 0.
        """
        cfg = self.config
        n_atoms, n_slots = neighbors.shape

        def dense(x: Array) -> Array:
            """(E, ...) edge data -> (N, K, ...), padding slots from an appended zero row."""
            return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])[neighbors]

        # Component-major (3, N, K): the angular monomials below are then products of whole
        # arrays; slicing a trailing axis of 3 made their gradient a pad per monomial, which
        # cost ~8x the rest of the edge-side gradient (measured, 4000-atom cell).
        vec = jnp.concatenate([vectors.T, jnp.zeros((3, 1), vectors.dtype)], axis=1)[:, neighbors]
        r2 = jnp.sum(vec * vec, axis=0)
        valid = dense(edge_mask) & (r2 > 0.0)
        # Padding slots are zero vectors: keep sqrt away from 0 so no NaN reaches the gradient.
        r = jnp.sqrt(jnp.where(valid, r2, 1.0))
        u = vec / r  # (3, N, K)
        basis = radial_basis(r.reshape(-1), cfg)  # (N * K, n_basis)
        weights = self.radial  # (S^2, n_basis, C * sets)
        if cfg.radial_tie_decay > 0:
            weights = jnp.tile(weights, (1, 1, cfg.max_order + 1)) + self.radial_delta
        if self.n_species == 1:
            radial = basis @ weights[0]
        else:
            pair = species[:, None] * self.n_species + species[dense(receivers)]
            onehot = (pair.reshape(-1, 1) == jnp.arange(self.n_species**2)).astype(basis.dtype)
            # One matmul over (pair, basis) instead of a per-edge weight gather, whose
            # gradient would be a slow scatter on CPU.
            radial = (onehot[:, :, None] * basis[:, None, :]).reshape(basis.shape[0], -1) @ (
                weights.reshape(-1, weights.shape[-1])
            )
        # (N, K, S, C): S = max_order + 1 radial sets with radial_per_order, else 1.
        radial = radial.reshape(n_atoms, n_slots, -1, cfg.n_radial)
        radial = jnp.where(valid[..., None, None], radial, 0.0) / cfg.avg_num_neighbors

        # Angular monomials of each order: 1; u_a; u_a u_b (a <= b); ... up to max_order.
        # Each component is sliced once: a slice per use would add a pad per use to the gradient.
        uc = [u[0], u[1], u[2]]
        comps: list[list[Array]] = [[jnp.ones_like(r)]]
        for k in range(1, cfg.max_order + 1):
            comps.append([functools.reduce(operator.mul, (uc[a] for a in t)) for t in _UNIQUE[k]])
        angular = jnp.stack([x for block in comps for x in block], axis=-1)  # (N, K, L)
        blocks = tuple(len(block) for block in comps) if cfg.radial_per_order else None
        moments = moment_sum(radial, angular, blocks)  # (N, C, L)
        feats = invariants(moments, cfg.n_radial, cfg.max_order)
        return jnp.where(atom_mask[:, None], feats, 0.0)

    def descriptor(
        self,
        vectors: Array,
        species: Array,
        neighbors: Array,
        receivers: Array,
        edge_mask: Array,
        atom_mask: Array,
    ) -> Array:
        """Standardised invariants (N, F): ``(raw - shift[z]) * scale[z]``; padding rows 0."""
        raw = self.raw_descriptor(vectors, species, neighbors, receivers, edge_mask, atom_mask)
        if self.n_species == 1:
            shift, scale = self.feature_shift[0], self.feature_scale[0]
        else:
            onehot = (species[:, None] == jnp.arange(self.n_species)).astype(raw.dtype)
            shift, scale = onehot @ self.feature_shift, onehot @ self.feature_scale
        return jnp.where(atom_mask[:, None], (raw - shift) * scale, 0.0)

    def __call__(
        self,
        vectors: Array,
        species: Array,
        neighbors: Array,
        receivers: Array,
        edge_mask: Array,
        atom_mask: Array,
    ) -> Array:
        """Same inputs as :meth:`descriptor`; returns (N, n_out) raw per-atom outputs."""
        feats = self.descriptor(vectors, species, neighbors, receivers, edge_mask, atom_mask)
        return self.readout(feats, species)
