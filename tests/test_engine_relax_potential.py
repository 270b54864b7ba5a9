"""A pure-JAX Morse pair potential on :class:`AtomsGraph` for the relax/NEB tests, and checks of
the JAX plumbing they rely on (:mod:`mlipctl.engines.fire`): the calculator adapter against an
independent numpy Morse and finite differences, skin lists against exact lists."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from mlipctl.data.neighbors import neighbor_pairs
from mlipctl.engines.fire import EnergyFnCalculator, JaxModel, SkinNeighbors, make_force_fn

jax.config.update("jax_enable_x64", True)

# Morse parameters for Cu (Girifalco & Weizer 1959), switched off smoothly between R_ON and RC.
MORSE_CU = {"D": 0.3429, "a": 1.3588, "r0": 2.866}
RC, R_ON = 5.0, 4.0


def morse_energy(params, graph):
    """``(params, graph) -> (1, B)``: Morse pair energy with a C2 switch between R_ON and RC."""
    cell = graph.cell[graph.structure[graph.senders]]
    rij = (
        graph.positions[graph.receivers]
        - graph.positions[graph.senders]
        + jnp.einsum("ei,eij->ej", graph.shifts, cell)
    )
    r2 = jnp.sum(rij * rij, axis=1)
    real = graph.edge_mask & (r2 < RC * RC)
    r = jnp.sqrt(jnp.where(real, r2, 1.0))
    x = jnp.clip((r - R_ON) / (RC - R_ON), 0.0, 1.0)
    switch = 1.0 - x**3 * (10.0 - 15.0 * x + 6.0 * x * x)
    ex = jnp.exp(-params["a"] * (r - params["r0"]))
    pair = jnp.where(real, params["D"] * (ex * ex - 2.0 * ex) * switch, 0.0)
    atom = 0.5 * jax.ops.segment_sum(pair, graph.senders, graph.positions.shape[0])
    atom = jnp.where(graph.atom_mask, atom, 0.0)
    return jax.ops.segment_sum(atom, graph.structure, graph.cell.shape[0])[None, :]


def morse_model() -> JaxModel:
    params = {k: jnp.asarray(v) for k, v in MORSE_CU.items()}
    return JaxModel(morse_energy, params, cutoff=RC, type_map={29: 0}, name="Morse Cu")


def numpy_morse(atoms) -> float:
    from ase.neighborlist import neighbor_list

    d = neighbor_list("d", atoms, RC)
    x = np.clip((d - R_ON) / (RC - R_ON), 0.0, 1.0)
    sw = 1.0 - x**3 * (10.0 - 15.0 * x + 6.0 * x * x)
    ex = np.exp(-MORSE_CU["a"] * (d - MORSE_CU["r0"]))
    return float(0.5 * np.sum(MORSE_CU["D"] * (ex * ex - 2.0 * ex) * sw))


def test_calculator_matches_numpy_and_finite_differences():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=1)
    atoms.calc = EnergyFnCalculator(morse_model())
    assert atoms.get_potential_energy() == pytest.approx(numpy_morse(atoms), rel=1e-12)
    forces = atoms.get_forces()
    h = 1e-5
    for i, k in [(0, 0), (7, 2), (20, 1)]:
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[i, k] += h
        minus.positions[i, k] -= h
        fd = -(numpy_morse(plus) - numpy_morse(minus)) / (2 * h)
        assert forces[i, k] == pytest.approx(fd, abs=1e-7)
    # Stress: strain derivative, compared with finite differences of a deformed cell.
    stress = atoms.get_stress(voigt=False)
    for a, b in [(0, 0), (1, 2)]:
        eps = np.zeros((3, 3))
        eps[a, b] = eps[b, a] = h
        vals = []
        for sign in (1, -1):
            s = atoms.copy()
            s.set_cell(atoms.cell[:] @ (np.eye(3) + sign * eps), scale_atoms=True)
            vals.append(numpy_morse(s))
        fd = (vals[0] - vals[1]) / (2 * h * (2 if a != b else 1)) / atoms.get_volume()
        assert stress[a, b] == pytest.approx(fd, abs=1e-8)


def test_skin_graph_gives_exact_forces_and_grow_only_capacity():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.1, seed=2)
    model = morse_model()
    nl = SkinNeighbors(model.cutoff, 1.0, model.type_map)
    graph = jax.tree.map(jnp.asarray, nl.build([atoms]))
    first_capacity = nl.capacity
    energy, forces = jax.jit(make_force_fn(model.energy_fn, model.cutoff))(model.params, graph)
    ref = atoms.copy()
    ref.calc = EnergyFnCalculator(model)
    assert float(energy[0]) == pytest.approx(ref.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(np.asarray(forces), ref.get_forces(), atol=1e-10)
    # The skin list holds more pairs than the exact one (masked in the force function); a
    # sparser structure keeps the padded capacity, so no recompilation.
    assert int(np.asarray(graph.edge_mask).sum()) > len(neighbor_pairs(atoms, RC)[0])
    sparse = atoms.copy()
    sparse.set_cell(atoms.cell[:] * 1.05, scale_atoms=True)
    nl.build([sparse])
    assert nl.capacity == first_capacity and nl.n_builds == 2


def test_skin_graph_of_an_atom_without_neighbours():
    """An isolated atom (no pair within cutoff + skin) still gets a valid, empty table."""
    model = morse_model()
    nl = SkinNeighbors(model.cutoff, 1.0, model.type_map)
    lone = Atoms("Cu", positions=[[0.0, 0.0, 0.0]], cell=[12.0, 12.0, 12.0], pbc=False)
    graph = nl.build([lone])
    assert not bool(graph.overflow) and not graph.edge_mask.any()
    assert graph.neighbors.shape == (1, 8) and np.all(graph.neighbors == graph.senders.shape[0])
    energy, forces = make_force_fn(model.energy_fn, model.cutoff)(
        model.params, jax.tree.map(jnp.asarray, graph)
    )
    np.testing.assert_array_equal(np.asarray(forces), 0.0)
