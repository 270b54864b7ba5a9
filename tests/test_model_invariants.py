"""The moment invariants against plain full-tensor formulas (float64) and under rotation."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from mlipctl.model.moment import invariants, n_features

jax.config.update("jax_enable_x64", True)

N_ATOMS, N_NEIGH, C = 3, 9, 3


def _full_moments(u: np.ndarray, w: np.ndarray) -> list[np.ndarray]:
    """u: (N, K, 3) unit vectors, w: (N, K, C) -> [M0 (N,C), M1 (N,C,3), ..., M4 (N,C,3,3,3,3)]."""
    out, power = [], np.ones(u.shape[:2])
    for _ in range(5):
        out.append(np.einsum("nkc,nk...->nc...", w, power))
        power = power[..., None] * u.reshape(*u.shape[:2], *([1] * (power.ndim - 2)), 3)
    return out


def _unique(m: np.ndarray, order: int) -> np.ndarray:
    """(N, C, 3, ..., 3) symmetric -> (N, C, n_unique) at sorted index tuples."""
    idx = list(itertools.combinations_with_replacement(range(3), order))
    return np.stack([m[(slice(None), slice(None), *t)] for t in idx], axis=-1)


def _upper(x: np.ndarray) -> np.ndarray:
    c = x.shape[-1]
    return np.stack([x[..., i, j] for i in range(c) for j in range(i, c)], axis=-1)


def _reference(ms: list[np.ndarray], max_order: int) -> np.ndarray:
    m0, m1, m2, m3, m4 = ms
    n = m0.shape[0]
    out = [m0]
    if max_order >= 1:
        out.append(_upper(np.einsum("nca,nda->ncd", m1, m1)))
    if max_order >= 2:
        out.append(_upper(np.einsum("ncab,ndab->ncd", m2, m2)))
        t = np.einsum("nea,ncab,ndb->ncde", m1, m2, m1)  # [c2, c3, c1]
        out.append(_upper(t).reshape(n, -1))
        t = np.einsum("ncab,ndbe,nfea->ncdf", m2, m2, m2)
        trip = itertools.combinations_with_replacement(range(C), 3)
        out.append(np.stack([t[:, i, j, k] for i, j, k in trip], axis=-1))
    if max_order >= 3:
        out.append(_upper(np.einsum("ncabe,ndabe->ncd", m3, m3)))
        out.append(np.einsum("nfa,ncabd,nebd->nfce", m1, m3, m2).reshape(n, -1))
        t = np.einsum("ncagh,ndbgh,neab->necd", m3, m3, m2)
        out.append(_upper(t).reshape(n, -1))
    if max_order >= 4:
        out.append(_upper(np.einsum("ncpqrs,ndpqrs->ncd", m4, m4)))
        t = np.einsum("ncpqrs,ndpq,ners->ncde", m4, m2, m2)
        out.append(_upper(t).reshape(n, -1))
    return np.concatenate(out, axis=1)


def _moments(seed: int, rotation: np.ndarray | None = None) -> tuple[np.ndarray, list]:
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(N_ATOMS, N_NEIGH, 3))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    if rotation is not None:
        u = u @ rotation.T
    w = rng.normal(size=(N_ATOMS, N_NEIGH, C))
    full = _full_moments(u, w)
    unique = np.concatenate(
        [full[0][..., None]] + [_unique(full[k], k) for k in range(1, 5)], axis=-1
    )  # (N, C, 35)
    return unique, full


@pytest.mark.parametrize("max_order", [0, 1, 2, 3, 4])
def test_invariants_equal_full_tensor_formulas(max_order):
    unique, full = _moments(0)
    got = np.asarray(invariants(jnp.asarray(unique), C, max_order))
    want = _reference(full, max_order)
    assert got.shape == (N_ATOMS, n_features(C, max_order)) == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_invariants_are_rotation_invariant():
    rot = Rotation.random(random_state=4).as_matrix()
    a = np.asarray(invariants(jnp.asarray(_moments(1)[0]), C, 4))
    b = np.asarray(invariants(jnp.asarray(_moments(1, rot)[0]), C, 4))
    assert np.abs(a).min() > 1e-8  # no family vanishes identically
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
