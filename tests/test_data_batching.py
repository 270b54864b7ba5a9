"""Padded batches: shapes from buckets, cached neighbour lists, targets aligned with graphs."""

from __future__ import annotations

import numpy as np
import pytest
from ase.build import bulk

import mlipctl.data.batching as batching
from mlipctl.data.batching import BatchLoader, make_targets, type_map_from_elements
from mlipctl.data.io import Labelled
from mlipctl.data.neighbors import edge_vectors, neighbor_pairs
from mlipctl.errors import UserInputError

CUTOFF = 4.0


def _mixed_dataset() -> list[Labelled]:
    """60 Cu/Ni cells of 1 to 108 atoms with synthetic but distinct labels."""
    rng = np.random.default_rng(5)
    reps = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (2, 2, 2), (3, 2, 2), (3, 3, 3)]
    out = []
    for k in range(60):
        cubic = k % 3 != 0
        base = bulk("Cu", "fcc", a=3.61, cubic=cubic) if cubic else bulk("Cu", "fcc", a=3.61)
        atoms = base.repeat(reps[k % len(reps)])
        atoms.positions += rng.normal(0, 0.03, atoms.positions.shape)
        if k % 4 == 0:
            atoms[0].symbol = "Ni"
        n = len(atoms)
        out.append(
            Labelled(
                atoms=atoms,
                energy=-3.5 * n - 0.01 * k,
                forces=rng.normal(size=(n, 3)),
                stress=None if k % 5 == 0 else np.eye(3) * 1e-3 * k,
                config_type="odd" if k % 2 else "even",
                weight=1.0 + k,
                index=k,
            )
        )
    return out


def test_batches_cover_epoch_align_and_few_shapes() -> None:
    data = _mixed_dataset()
    sizes = sorted({len(s.atoms) for s in data})
    assert sizes[0] == 1 and sizes[-1] == 108
    loader = BatchLoader(data, CUTOFF, type_map_from_elements(["Cu", "Ni"]), batch_size=4, seed=2)
    assert len(loader) == 15
    raw_totals = set()
    for epoch in range(3):
        seen = []
        for graph, targets in loader.epoch(epoch):
            n_cap, e_cap, b_cap = (
                graph.positions.shape[0],
                graph.senders.shape[0],
                graph.cell.shape[0],
            )
            assert b_cap == 5 and not bool(graph.overflow)
            assert graph.shifts.shape == (e_cap, 3) and graph.edge_mask.shape == (e_cap,)
            real = np.flatnonzero(graph.structure_mask)
            assert graph.structure_mask[-1] == False  # noqa: E712 - padding slot always present
            raw_totals.add(int(graph.n_atoms.sum()))
            assert targets.energy.dtype == np.float64 and targets.energy.shape == (b_cap,)
            assert targets.forces.shape == (n_cap, 3) and targets.stress.shape == (b_cap, 3, 3)
            assert np.all(targets.weight[~graph.structure_mask] == 0)
            assert not targets.has_energy[~graph.structure_mask].any()
            a0 = 0
            for slot in real:
                n = int(graph.n_atoms[slot])
                # identify the structure by its weight (1 + k) and check everything lines up
                k = int(round(targets.weight[slot])) - 1
                item = data[k]
                seen.append(k)
                assert n == len(item.atoms)
                assert targets.energy[slot] == item.energy
                np.testing.assert_array_equal(targets.forces[a0 : a0 + n], item.forces)
                np.testing.assert_array_equal(graph.positions[a0 : a0 + n], item.atoms.positions)
                np.testing.assert_array_equal(graph.structure[a0 : a0 + n], slot)
                assert targets.has_stress[slot] == (item.stress is not None)
                # this structure's edges reproduce its own neighbour list
                sel = graph.edge_mask & (graph.structure[graph.senders] == slot)
                s, r, sh = graph.senders[sel], graph.receivers[sel], graph.shifts[sel]
                vec = graph.positions[r] - graph.positions[s] + sh @ graph.cell[slot]
                ref = edge_vectors(item.atoms, neighbor_pairs(item.atoms, CUTOFF))
                assert len(vec) == len(ref)
                np.testing.assert_allclose(
                    np.sort(np.linalg.norm(vec, axis=1)), np.sort(np.linalg.norm(ref, axis=1))
                )
                a0 += n
            assert not graph.atom_mask[a0:].any() and np.all(graph.structure[a0:] == b_cap - 1)
        assert sorted(seen) == list(range(60)), "every structure exactly once per epoch"
    assert len(raw_totals) > 10  # without buckets this would compile > 10 shapes
    assert 1 <= len(loader.seen_shapes) <= 6
    assert loader.seen_shapes == set().union(*(loader.epoch_shapes(e) for e in range(3)))


def test_shuffle_is_seeded_per_epoch() -> None:
    data = _mixed_dataset()[:20]
    tm = type_map_from_elements(["Cu", "Ni"])
    a = BatchLoader(data, CUTOFF, tm, batch_size=3, seed=1)
    b = BatchLoader(data, CUTOFF, tm, batch_size=3, seed=1)
    np.testing.assert_array_equal(a.order(4), b.order(4))
    assert a.order(0).tolist() != a.order(1).tolist()
    assert (
        BatchLoader(data, CUTOFF, tm, batch_size=3, seed=2).order(0).tolist() != a.order(0).tolist()
    )
    fixed = BatchLoader(data, CUTOFF, tm, batch_size=3, shuffle=False)
    assert fixed.order(7).tolist() == list(range(20))
    assert len(BatchLoader(data, CUTOFF, tm, batch_size=3, drop_last=True)) == 6
    assert len(list(BatchLoader(data, CUTOFF, tm, batch_size=3, drop_last=True).epoch(0))) == 6


def test_neighbour_lists_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _mixed_dataset()[:12]
    loader = BatchLoader(data, CUTOFF, type_map_from_elements(["Cu", "Ni"]), batch_size=4)

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("neighbour list recomputed during an epoch")

    monkeypatch.setattr(batching, "neighbor_pairs", forbidden)
    monkeypatch.setattr("mlipctl.data.neighbors.neighbor_pairs", forbidden)
    for epoch in range(2):
        assert len(list(loader.epoch(epoch))) == 3


def test_unknown_element_fails_up_front() -> None:
    data = _mixed_dataset()[:4]
    with pytest.raises(UserInputError, match=r"Ni \(Z=28\) in structure 0 .* known elements: Cu"):
        BatchLoader(data, CUTOFF, type_map_from_elements(["Cu"]))


def test_make_targets_padding() -> None:
    item = Labelled(atoms=bulk("Cu"), energy=-3.0, forces=np.ones((1, 3)), weight=2.0)
    t = make_targets([item], n_atoms=8, n_structures=3)
    np.testing.assert_array_equal(t.energy, [-3.0, 0.0, 0.0])
    np.testing.assert_array_equal(t.has_energy, [True, False, False])
    np.testing.assert_array_equal(t.has_stress, [False, False, False])
    np.testing.assert_array_equal(t.forces[0], [1, 1, 1])
    assert not t.forces[1:].any()
    np.testing.assert_array_equal(t.weight, [2.0, 0.0, 0.0])
