"""Defect structures and formation energies of `validate` (EMT, small cells)."""

from __future__ import annotations

import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.optimize import BFGS

from mlipctl.data.crystals import unit_cell
from mlipctl.engines.validate_bulk import BulkState, energy_of, equilibrium_state
from mlipctl.engines.validate_defects import (
    RelaxSettings,
    default_millers,
    divacancy,
    interstitial,
    interstitial_names,
    perfect_supercell,
    relax_defect,
    surface_energy,
    surface_label,
    surface_slab,
    vacancy_endpoints,
)
from mlipctl.errors import UserInputError


def _state(structure: str, a: float, c_over_a: float | None = None) -> BulkState:
    """A state with a given lattice constant (structure tests need no calculator)."""
    unit = unit_cell("Cu", structure, a, c_over_a)
    return BulkState(
        element="Cu",
        structure=structure,
        a=a,
        c_over_a=c_over_a,
        bulk_modulus_gpa=100.0,
        energy_per_atom=0.0,
        volume_per_atom=unit.get_volume() / len(unit),
        eos_volumes=np.zeros(1),
        eos_energies=np.zeros(1),
    )


def _neighbour_distances(atoms, index: int, k: int) -> np.ndarray:
    d = atoms.get_distances(index, list(range(len(atoms))), mic=True)
    return np.sort(d[np.arange(len(atoms)) != index])[:k]


@pytest.fixture(scope="module")
def emt_cu() -> BulkState:
    return equilibrium_state(EMT(), "Cu", "fcc")


def test_supercell_and_vacancy_endpoints():
    st = _state("fcc", 3.6)
    perfect = perfect_supercell(st, 250)
    assert len(perfect) == 256  # 4x4x4 conventional cells
    initial, final, hop = vacancy_endpoints(perfect)
    assert len(initial) == len(final) == 255
    # Only the hopping atom moves, by one nearest-neighbour distance (minimum image).
    moved = np.linalg.norm(final.positions - initial.positions, axis=1)
    assert np.flatnonzero(moved > 1e-9).tolist() == [hop]
    assert moved[hop] == pytest.approx(3.6 / np.sqrt(2))


@pytest.mark.parametrize(
    ("structure", "a", "coa", "name", "n_first", "d_first"),
    [
        ("fcc", 3.6, None, "octahedral", 6, 0.5),  # 6 at a/2
        ("diamond", 5.43, None, "tetrahedral", 4, np.sqrt(3) / 4),  # 4 at √3a/4
        ("hcp", 2.55, 1.633, "octahedral", 6, 1 / np.sqrt(2)),  # 6 at a/√2
    ],
)
def test_interstitial_sites_have_the_right_cage(structure, a, coa, name, n_first, d_first):
    st = _state(structure, a, coa)
    perfect = perfect_supercell(st, 32)
    atoms = interstitial(st, perfect, name)
    assert len(atoms) == len(perfect) + 1
    d = _neighbour_distances(atoms, len(atoms) - 1, n_first + 1)
    np.testing.assert_allclose(d[:n_first], d_first * a, rtol=1e-3)
    assert d[n_first] > d_first * a * 1.05  # the cage is complete


@pytest.mark.parametrize(
    ("structure", "name", "direction"),
    [
        ("fcc", "dumbbell_100", (0, 0, 1)),
        ("bcc", "dumbbell_110", (1, 1, 0)),
        ("diamond", "dumbbell_110", (1, 1, 0)),
        ("hcp", "dumbbell_100", (1, 0, 0)),
    ],
)
def test_dumbbells_are_centred_on_a_site_along_their_axis(structure, name, direction):
    a = {"fcc": 3.6, "bcc": 2.87, "diamond": 5.43, "hcp": 2.55}[structure]
    st = _state(structure, a, 1.633 if structure == "hcp" else None)
    perfect = perfect_supercell(st, 32)
    atoms = interstitial(st, perfect, name)
    assert len(atoms) == len(perfect) + 1
    pair = atoms.positions[-2:]
    centre = pair.mean(axis=0)
    # The pair's centre is a lattice site of the perfect crystal, and the pair is along <hkl>.
    assert np.min(np.linalg.norm(perfect.positions - centre, axis=1)) < 1e-9
    axis = (pair[1] - pair[0]) / np.linalg.norm(pair[1] - pair[0])
    u = np.asarray(direction, float) / np.linalg.norm(direction)
    assert abs(axis @ u) == pytest.approx(1.0)
    assert name in interstitial_names(structure)


def test_divacancy_removes_a_nearest_neighbour_pair():
    st = _state("fcc", 3.6)
    perfect = perfect_supercell(st, 100)
    atoms, (i, j) = divacancy(perfect)
    assert len(atoms) == len(perfect) - 2
    assert perfect.get_distance(i, j, mic=True) == pytest.approx(3.6 / np.sqrt(2))


def test_vacancy_formation_matches_direct_ase_computation(emt_cu):
    calc = EMT()
    perfect = perfect_supercell(emt_cu, 100)
    e_bulk = energy_of(calc, perfect)
    initial, _, _ = vacancy_endpoints(perfect)
    d = relax_defect(calc, initial, "vacancy", e_bulk, len(perfect), RelaxSettings(fmax=0.005))
    assert d.converged and d.max_force < 0.005
    # Independently: ASE BFGS on the same cell, E_f = E_vac − (N−1)/N E_bulk by hand.
    ref = initial.copy()
    ref.calc = EMT()
    BFGS(ref, logfile=None).run(fmax=0.001)
    e_f = ref.get_potential_energy() - (len(perfect) - 1) / len(perfect) * e_bulk
    assert d.formation_energy == pytest.approx(e_f, abs=1e-3)
    assert 1.1 < d.formation_energy < 1.35  # EMT Cu: 1.22-1.24 eV depending on the cell


def test_interstitial_and_divacancy_energetics(emt_cu):
    calc = EMT()
    perfect = perfect_supercell(emt_cu, 100)
    e_bulk = energy_of(calc, perfect)
    settings = RelaxSettings()
    ef = {
        name: relax_defect(
            calc, interstitial(emt_cu, perfect, name), name, e_bulk, len(perfect), settings
        ).formation_energy
        for name in interstitial_names("fcc")
    }
    # fcc metals: the <100> dumbbell is the stable self-interstitial, below the octahedral.
    assert ef["dumbbell_100"] < ef["octahedral"]
    assert 2.0 < ef["dumbbell_100"] < 5.0
    vac, _, _ = vacancy_endpoints(perfect)
    e1 = relax_defect(calc, vac, "vacancy", e_bulk, len(perfect), settings).formation_energy
    atoms, _ = divacancy(perfect)
    e2 = relax_defect(calc, atoms, "divacancy", e_bulk, len(perfect), settings).formation_energy
    # Nearest-neighbour vacancies attract (positive binding) but far less than E_f itself.
    assert 0.0 < 2 * e1 - e2 < 0.5 * e1


def test_surface_energies_order_and_definition(emt_cu):
    calc = EMT()
    settings = RelaxSettings()
    values = {}
    for miller in default_millers("fcc"):
        label = surface_label("fcc", miller)
        slab = surface_slab(emt_cu, miller)
        assert np.ptp(slab.positions[:, 2]) >= 12.0
        se = surface_energy(calc, slab, label, emt_cu.energy_per_atom, settings)
        assert se.relaxed.converged
        # Relaxation lowers the energy; the unrelaxed value follows the definition exactly.
        assert se.energy_j_m2 <= se.unrelaxed_j_m2 + 1e-9
        e_slab = energy_of(calc, slab)
        area = np.linalg.norm(np.cross(slab.cell[0], slab.cell[1]))
        by_hand = (e_slab - len(slab) * emt_cu.energy_per_atom) / (2 * area) * 16.021766339
        assert se.unrelaxed_j_m2 == pytest.approx(by_hand, rel=1e-10)
        values[label] = se.energy_j_m2
    # Close-packed (111) is the lowest, the open (110) the highest.
    assert values["111"] < values["100"] < values["110"]
    assert default_millers("hcp") == [(0, 0, 1)] and surface_label("hcp", (0, 0, 1)) == "0001"


def test_unknown_structure_for_interstitials():
    with pytest.raises(UserInputError, match="no interstitial"):
        interstitial_names("rocksalt")
