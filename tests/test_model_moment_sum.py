"""The dense moment sum against a plain segment_sum over an edge list, and the neighbour table."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlipctl.data.neighbors import neighbor_table
from mlipctl.model.moment import moment_sum

N_ATOMS, N_EDGES, N_CHAN = 7, 53, 3
BLOCKS = (1, 3, 6, 10)


def _edges(seed: int):
    rng = np.random.default_rng(seed)
    senders = rng.integers(0, N_ATOMS, N_EDGES)
    mask = rng.random(N_EDGES) < 0.8
    return rng, senders, mask


@pytest.mark.parametrize("blocks", [None, BLOCKS])
def test_dense_sum_and_gradients_match_segment_sum(blocks):
    rng, senders, mask = _edges(0)
    k = int(np.bincount(senders[mask], minlength=N_ATOMS).max())
    table = jnp.asarray(neighbor_table(senders, mask, N_ATOMS, k + 2))  # 2 spare slots
    n_sets = 1 if blocks is None else len(blocks)
    radial = jnp.asarray(rng.normal(size=(N_EDGES, n_sets, N_CHAN)))
    angular = jnp.asarray(rng.normal(size=(N_EDGES, sum(BLOCKS))))
    weights = jnp.asarray(rng.normal(size=(N_ATOMS, N_CHAN, sum(BLOCKS))))
    picks = np.zeros(sum(BLOCKS), int) if blocks is None else np.repeat(np.arange(4), BLOCKS)

    def dense(x):
        return jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])[table]

    def ours(r, a):
        return jnp.sum(jnp.sin(moment_sum(dense(r), dense(a), blocks)) * weights)

    def reference(r, a):
        prod = jnp.swapaxes(r[:, picks, :], 1, 2) * a[:, None, :] * mask[:, None, None]
        return jnp.sum(jnp.sin(jax.ops.segment_sum(prod, senders, N_ATOMS)) * weights)

    np.testing.assert_allclose(ours(radial, angular), reference(radial, angular), rtol=1e-12)
    for got, want in zip(
        jax.grad(ours, argnums=(0, 1))(radial, angular),
        jax.grad(reference, argnums=(0, 1))(radial, angular),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_per_order_sets_act_on_their_own_block_only():
    """Zeroing the radial set of order 2 zeroes exactly the six order-2 components."""
    rng = np.random.default_rng(1)
    radial = rng.normal(size=(N_ATOMS, 5, len(BLOCKS), N_CHAN))
    radial[:, :, 2] = 0.0
    angular = jnp.asarray(rng.normal(size=(N_ATOMS, 5, sum(BLOCKS))))
    m = np.asarray(moment_sum(jnp.asarray(radial), angular, BLOCKS))
    assert m.shape == (N_ATOMS, N_CHAN, sum(BLOCKS))
    assert np.all(m[:, :, 4:10] == 0.0)
    assert np.all(np.abs(m[:, :, :4]).sum(axis=(0, 1)) > 0)
    assert np.all(np.abs(m[:, :, 10:]).sum(axis=(0, 1)) > 0)


def test_neighbor_table_lists_each_real_edge_once_under_its_sender():
    _, senders, mask = _edges(2)
    k = int(np.bincount(senders[mask], minlength=N_ATOMS).max())
    table = neighbor_table(senders, mask, N_ATOMS, k)
    assert table.shape == (N_ATOMS, k)
    listed = table[table < N_EDGES]
    assert sorted(listed.tolist()) == np.flatnonzero(mask).tolist()
    rows = np.nonzero(table < N_EDGES)[0]
    np.testing.assert_array_equal(senders[table[table < N_EDGES]], rows)
    with pytest.raises(ValueError, match="neighbours"):
        neighbor_table(senders, mask, N_ATOMS, k - 1)
