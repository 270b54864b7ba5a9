"""Neighbour lists (vs ASE), graph packing, padding, overflow, buckets, overlap check."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list

from mlipctl.data.neighbors import (
    bucket,
    build_graph,
    check_overlaps,
    count_edges,
    edge_vectors,
    max_neighbors,
    neighbor_pairs,
)
from mlipctl.errors import UserInputError

RNG = np.random.default_rng(1234)


def _random_cell(cell, n, pbc=True, symbols="Cu"):
    frac = RNG.uniform(0.0, 1.0, (n, 3))
    return Atoms([symbols] * n, scaled_positions=frac, cell=np.asarray(cell, float), pbc=pbc)


CASES = {
    # cell edge < cutoff: many images of each atom, including an atom's own images
    "single_atom_tiny_cube": (_random_cell(np.eye(3) * 2.0, 1), 5.0),
    "cube_below_cutoff": (_random_cell(np.eye(3) * 3.0, 3), 5.0),
    "cube_below_2cutoff": (_random_cell(np.eye(3) * 7.0, 6), 4.5),
    "fcc_primitive": (bulk("Cu", "fcc", a=3.61), 5.0),
    "skewed_triclinic": (_random_cell([[3.0, 0, 0], [2.8, 1.0, 0], [2.5, 0.7, 1.2]], 3), 4.0),
    "very_skewed": (_random_cell([[5.0, 0, 0], [4.9, 0.5, 0], [4.8, 0.3, 0.4]], 2), 3.0),
    "negative_tilt": (_random_cell([[6.0, 0, 0], [5.5, 2.0, 0], [-4.0, 1.5, 3.0]], 5), 5.0),
    "slab_pbc_TTF": (
        _random_cell([[6.0, 0, 0], [1.0, 5.0, 0], [0.5, 0.3, 9.0]], 8, (1, 1, 0)),
        5.0,
    ),
    "wire_pbc_TFF": (_random_cell(np.diag([2.5, 8.0, 8.0]), 4, (1, 0, 0)), 5.0),
    "slab_zero_c_vector": (
        Atoms(
            "Cu4",
            positions=RNG.uniform(0, 4, (4, 3)),
            cell=[[4, 0, 0], [0, 4, 0], [0, 0, 0]],
            pbc=(1, 1, 0),
        ),
        5.0,
    ),
    "positions_outside_cell": (
        Atoms("Cu6", positions=RNG.uniform(-5, 15, (6, 3)), cell=np.eye(3) * 4.0, pbc=True),
        5.0,
    ),
    "cluster_no_cell": (molecule("C6H6"), 3.0),
    "cluster_small_cell": (
        Atoms("Cu8", positions=RNG.uniform(-3, 6, (8, 3)), cell=np.eye(3) * 2.0, pbc=False),
        4.0,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", ["vesin", "matscipy"])
def test_pairs_match_ase(name: str, backend: str) -> None:
    atoms, rc = CASES[name]
    i, j, S = neighbor_pairs(atoms, rc, backend=backend)
    assert i.dtype == j.dtype == S.dtype == np.int64 and S.shape == (len(i), 3)
    ours = set(zip(i.tolist(), j.tolist(), map(tuple, S.tolist()), strict=True))
    assert len(ours) == len(i), "duplicate pairs"
    ai, aj, aS, aD = neighbor_list("ijSD", atoms, rc)
    ref = {
        (a, b, tuple(s)): d
        for a, b, s, d in zip(ai.tolist(), aj.tolist(), aS.tolist(), aD, strict=True)
    }
    assert len(ref) > 0
    assert ours == set(ref)
    # full list: every edge has its reverse with negated shift
    assert ours == {(b, a, tuple(-np.asarray(s))) for a, b, s in ours}
    # graph formula reproduces ASE's distance vectors
    D = edge_vectors(atoms, (i, j, S))
    ref_D = np.array(
        [ref[(a, b, tuple(s))] for a, b, s in zip(i.tolist(), j.tolist(), S.tolist(), strict=True)]
    )
    np.testing.assert_allclose(D, ref_D, atol=1e-10)
    assert np.all(np.linalg.norm(D, axis=1) < rc)


def test_no_self_pair_with_zero_shift_but_own_images_kept() -> None:
    atoms = bulk("Cu", "fcc", a=3.61)  # one atom: every neighbour is an image of itself
    i, j, S = neighbor_pairs(atoms, 3.0)
    assert len(i) == 12  # fcc first shell
    assert np.all(i == 0) and np.all(j == 0) and np.all(S.any(axis=1))


def test_bad_structures_raise() -> None:
    with pytest.raises(UserInputError, match="no atoms"):
        neighbor_pairs(Atoms(), 3.0)
    bad = bulk("Cu", "fcc", a=3.61)
    bad.positions[0, 1] = np.nan
    with pytest.raises(UserInputError, match="NaN"):
        neighbor_pairs(bad, 3.0)
    flat = Atoms("Cu", cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=True)
    with pytest.raises(UserInputError, match="linearly dependent"):
        neighbor_pairs(flat, 3.0)
    with pytest.raises(ValueError, match="cutoff"):
        neighbor_pairs(bulk("Cu"), 0.0)


def _two_structures():
    a = bulk("Cu", "fcc", a=3.61, cubic=True)  # 4 atoms
    b = bulk("Cu", "fcc", a=3.61).repeat((2, 1, 1))
    b[1].symbol = "Ni"
    b.positions += RNG.normal(0, 0.02, b.positions.shape)
    return [a, b]


def test_build_graph_exact_capacity() -> None:
    structs = _two_structures()
    type_map = {28: 0, 29: 1}
    g = build_graph(structs, 4.0, type_map)
    pairs = [neighbor_pairs(a, 4.0) for a in structs]
    assert g.positions.shape == (6, 3) and g.positions.dtype == np.float64
    assert g.cell.shape == (2, 3, 3) and g.shifts.dtype == np.float64
    for arr in (g.species, g.structure, g.senders, g.receivers, g.n_atoms):
        assert arr.dtype == np.int32
    assert g.senders.shape == (count_edges(pairs),)
    assert not bool(g.overflow) and g.edge_mask.all() and g.atom_mask.all()
    np.testing.assert_array_equal(g.species, [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(g.structure, [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(g.n_atoms, [4, 2])
    # edge vectors from the graph formula equal those of each structure
    r = (
        g.positions[g.receivers]
        - g.positions[g.senders]
        + np.einsum("ek,ekl->el", g.shifts, g.cell[g.structure[g.senders]])
    )
    ref = np.concatenate([edge_vectors(a, p) for a, p in zip(structs, pairs, strict=True)])
    np.testing.assert_allclose(r, ref, atol=1e-12)
    # edges never cross structures
    assert np.all(g.structure[g.senders] == g.structure[g.receivers])


def test_build_graph_padding() -> None:
    structs = _two_structures()
    need = count_edges([neighbor_pairs(a, 4.0) for a in structs])
    g = build_graph(structs, 4.0, {28: 0, 29: 1}, n_atoms=16, n_edges=need + 10, n_structures=4)
    assert (
        g.positions.shape == (16, 3)
        and g.cell.shape == (4, 3, 3)
        and g.senders.shape == (need + 10,)
    )
    np.testing.assert_array_equal(g.atom_mask, [True] * 6 + [False] * 10)
    np.testing.assert_array_equal(g.structure_mask, [True, True, False, False])
    np.testing.assert_array_equal(g.structure[6:], 3)  # padding atoms -> padding slot B-1
    assert np.all(g.positions[6:] == 0.0) and np.all(g.species[6:] == 0)
    assert g.edge_mask.sum() == need and not g.edge_mask[need:].any()
    assert (
        np.all(g.senders[need:] == 0)
        and np.all(g.receivers[need:] == 0)
        and np.all(g.shifts[need:] == 0)
    )
    np.testing.assert_array_equal(g.n_atoms, [4, 2, 0, 0])
    # default structure capacity adds one padding slot when there are padding atoms
    g2 = build_graph(structs, 4.0, {28: 0, 29: 1}, n_atoms=8)
    assert g2.cell.shape == (3, 3, 3) and np.all(g2.structure[6:] == 2) and not g2.structure_mask[2]


def test_build_graph_overflow_and_too_small() -> None:
    structs = _two_structures()
    need = count_edges([neighbor_pairs(a, 4.0) for a in structs])
    g = build_graph(structs, 4.0, {28: 0, 29: 1}, n_edges=need - 1)
    assert bool(g.overflow) and g.senders.shape == (need - 1,)
    assert not g.edge_mask.any(), "overflowing graph must not carry a partial edge list"
    assert not bool(build_graph(structs, 4.0, {28: 0, 29: 1}, n_edges=need).overflow)
    # Too few neighbour slots per atom: the same contract.
    k = max_neighbors([neighbor_pairs(a, 4.0) for a in structs])
    g = build_graph(structs, 4.0, {28: 0, 29: 1}, n_neighbors=k - 1)
    assert bool(g.overflow) and g.neighbors.shape == (6, k - 1)
    assert not g.edge_mask.any() and np.all(g.neighbors == g.senders.shape[0])
    g = build_graph(structs, 4.0, {28: 0, 29: 1}, n_neighbors=k + 2)
    assert not bool(g.overflow) and g.neighbors.shape == (6, k + 2)
    with pytest.raises(ValueError, match="atom capacity 5 < 6"):
        build_graph(structs, 4.0, {28: 0, 29: 1}, n_atoms=5)
    with pytest.raises(ValueError, match="structure capacity 1 < 2"):
        build_graph(structs, 4.0, {28: 0, 29: 1}, n_structures=1)


def test_build_graph_unknown_element() -> None:
    structs = _two_structures()
    with pytest.raises(UserInputError) as err:
        build_graph(structs, 4.0, {29: 0, 13: 1})
    msg = str(err.value)
    assert "Ni (Z=28)" in msg and "structure 1" in msg and "Al, Cu" in msg


def test_bucket_ladder() -> None:
    assert bucket(0) == 8 and bucket(1) == 8 and bucket(8) == 8 and bucket(9) == 16
    sizes = sorted({bucket(n) for n in range(1, 5000)})
    assert all(s % 8 == 0 for s in sizes)
    assert all(b / a <= 1.5 for a, b in zip(sizes[4:], sizes[5:], strict=False))
    assert len(sizes) < 40  # geometric, not linear
    for n in (7, 100, 1234, 4999):
        assert bucket(n) >= n and bucket(n) == bucket(bucket(n))
    assert bucket(5, [4, 10, 20]) == 10
    with pytest.raises(ValueError, match="exceeds"):
        bucket(21, [4, 10, 20])


def test_check_overlaps() -> None:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    check_overlaps(atoms)  # fine
    atoms.positions[2] = atoms.positions[1] + [0.1, 0.2, 0.0]
    with pytest.raises(UserInputError, match=r"atom 1 \(Cu\) and atom 2 \(Cu\) are 0.2236 Å apart"):
        check_overlaps(atoms)
    tiny = Atoms("Cu", cell=np.eye(3) * 0.3, pbc=True)
    with pytest.raises(UserInputError, match="periodic image"):
        check_overlaps(tiny)
