"""A small pure-JAX Morse potential on :class:`AtomsGraph` used by the MD tests, checked here
against an independent numpy implementation and finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk

from mlipctl.data.neighbors import build_graph

jax.config.update("jax_enable_x64", True)

# Morse parameters for Cu (Girifalco & Weizer 1959) with a smooth switch-off between R_ON and RC.
CU_MORSE = {"D": 0.3429, "a": 1.3588, "r0": 2.866}
RC = 5.0
R_ON = 4.0
TYPE_MAP = {29: 0}


def make_morse(rc: float = RC, r_on: float = R_ON):
    """Energy function ``(params, graph) -> (1, B)`` of a Morse pair potential switched off
    smoothly (C2: 1 - 10x^3 + 15x^4 - 6x^5) between ``r_on`` and ``rc``; params {'D','a','r0'}."""

    def energy(params, graph):
        cell = graph.cell[graph.structure[graph.senders]]
        rij = (
            graph.positions[graph.receivers]
            - graph.positions[graph.senders]
            + jnp.einsum("ei,eij->ej", graph.shifts, cell)
        )
        r2 = jnp.sum(rij * rij, axis=1)
        real = graph.edge_mask & (r2 < rc * rc)
        r = jnp.sqrt(jnp.where(real, r2, 1.0))
        x = jnp.clip((r - r_on) / (rc - r_on), 0.0, 1.0)
        switch = 1.0 - x**3 * (10.0 - 15.0 * x + 6.0 * x * x)
        ex = jnp.exp(-params["a"] * (r - params["r0"]))
        pair = jnp.where(real, params["D"] * (ex * ex - 2.0 * ex) * switch, 0.0)
        n = graph.positions.shape[0]
        atom = 0.5 * jax.ops.segment_sum(pair, graph.senders, n)
        atom = jnp.where(graph.atom_mask, atom, 0.0)
        e = jax.ops.segment_sum(atom, graph.structure, graph.cell.shape[0])
        return e[None, :]

    return energy


morse_energy = make_morse()


def morse_params():
    return {k: jnp.asarray(v) for k, v in CU_MORSE.items()}


def _numpy_morse(atoms) -> float:
    from ase.neighborlist import neighbor_list

    d = neighbor_list("d", atoms, RC)
    x = np.clip((d - R_ON) / (RC - R_ON), 0.0, 1.0)
    sw = 1.0 - x**3 * (10.0 - 15.0 * x + 6.0 * x * x)
    ex = np.exp(-CU_MORSE["a"] * (d - CU_MORSE["r0"]))
    return float(0.5 * np.sum(CU_MORSE["D"] * (ex * ex - 2.0 * ex) * sw))


def test_morse_matches_numpy_and_finite_differences():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=3)
    graph = jax.tree.map(jnp.asarray, build_graph([atoms], RC, TYPE_MAP))
    params = morse_params()
    e = float(morse_energy(params, graph)[0, 0])
    assert e == pytest.approx(_numpy_morse(atoms), rel=1e-12)

    grad = jax.grad(lambda p: morse_energy(params, graph._replace(positions=p))[0, 0])(
        graph.positions
    )
    h = 1e-5
    for i, k in [(0, 0), (5, 2), (17, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, k] += h
        minus.positions[i, k] -= h
        fd = (_numpy_morse(plus) - _numpy_morse(minus)) / (2 * h)
        assert float(grad[i, k]) == pytest.approx(fd, abs=1e-7)
