"""Bulk properties of `validate`: equation of state, hcp c/a, cubic elastic constants, errors."""

from __future__ import annotations

import numpy as np
import pytest
from ase import units
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from mlipctl.engines.relax import equilibrium_lattice_constant
from mlipctl.engines.validate_bulk import (
    BulkState,
    elastic_constants,
    energy_of,
    equilibrium_state,
    evaluate_structures,
    resolve,
)
from mlipctl.errors import UserInputError
from mlipctl.reference.registry import make_calculator


@pytest.fixture(scope="module")
def emt_cu() -> BulkState:
    return equilibrium_state(EMT(), "Cu", "fcc")


def test_emt_cu_equilibrium_matches_independent_fit(emt_cu):
    # The relax engine's own EOS fit is an independent implementation of the same idea.
    a_relax = equilibrium_lattice_constant(EMT(), "Cu", "fcc")
    assert emt_cu.a == pytest.approx(a_relax, abs=2e-4)
    assert emt_cu.a == pytest.approx(3.5898, abs=1e-3)
    assert emt_cu.c_over_a is None
    # E(V) scan: the minimum sits inside it and the fitted energy is the lowest sampled one.
    assert emt_cu.eos_volumes.min() < emt_cu.volume_per_atom < emt_cu.eos_volumes.max()
    assert emt_cu.energy_per_atom <= emt_cu.eos_energies.min() + 1e-9
    # B from a parabola through the scan's three central points: a second, cruder estimate.
    v, e = emt_cu.eos_volumes, emt_cu.eos_energies
    k = len(v) // 2
    c2 = np.polyfit(v[k - 1 : k + 2], e[k - 1 : k + 2], 2)[0]
    assert emt_cu.bulk_modulus_gpa == pytest.approx(
        2 * c2 * emt_cu.volume_per_atom / units.GPa, rel=0.03
    )


def test_state_round_trip(emt_cu):
    back = BulkState.from_dict(emt_cu.to_dict())
    assert back.a == emt_cu.a and back.structure == "fcc"
    np.testing.assert_array_equal(back.eos_energies, emt_cu.eos_energies)
    assert len(back.unit()) == 4


def _energy_c(calc, state: BulkState, eps: np.ndarray, h: float) -> float:
    """Second derivative of the energy density along a strain direction (no stress used)."""
    unit = state.unit()
    vals = []
    for s in (-h, 0.0, h):
        at = unit.copy()
        at.set_cell(unit.cell[:] @ (np.eye(3) + s * eps), scale_atoms=True)
        vals.append(energy_of(calc, at))
    return (vals[0] - 2 * vals[1] + vals[2]) / h**2 / unit.get_volume() / units.GPa


def test_elastic_constants_match_energy_second_derivatives(emt_cu):
    c = elastic_constants(EMT(), emt_cu)
    assert c["converged"]
    assert c["c11"] == pytest.approx(_energy_c(EMT(), emt_cu, np.diag([1.0, 0, 0]), 1e-3), rel=0.01)
    # Shear: engineering γ = h with ε_yz = ε_zy = h/2 gives d²(E/V)/dγ² = C44.
    shear = np.zeros((3, 3))
    shear[1, 2] = shear[2, 1] = 0.5
    assert c["c44"] == pytest.approx(_energy_c(EMT(), emt_cu, shear, 1e-3), rel=0.01)
    # Biaxial-free check of C12 through the bulk modulus of the EOS.
    assert c["bulk_modulus_voigt_gpa"] == pytest.approx(emt_cu.bulk_modulus_gpa, rel=0.02)
    assert c["c11"] > c["c12"] > 0 and c["c44"] > 0


def test_pair_potential_obeys_the_cauchy_relation():
    # Central pair forces in a zero-stress cubic crystal with inversion symmetry: C12 = C44.
    morse = make_calculator({"kind": "morse"})
    state = equilibrium_state(morse, "Cu", "fcc")
    c = elastic_constants(morse, state)
    assert c["c12"] == pytest.approx(c["c44"], rel=2e-3)
    # ...which EMT (many-body) violates, so the check can tell them apart.
    emt = elastic_constants(EMT(), equilibrium_state(EMT(), "Cu", "fcc"))
    assert abs(emt["c12"] - emt["c44"]) > 10.0


def test_diamond_internal_relaxation_softens_shear():
    calc = EMT()
    state = equilibrium_state(calc, "Cu", "diamond")
    relaxed = elastic_constants(calc, state, fmax=1e-4)
    # Unrelaxed C44 from the raw stresses of the sheared cells (no internal relaxation).
    unit = state.unit()
    shear = np.zeros((3, 3))
    shear[1, 2] = shear[2, 1] = 0.5 * 0.005
    raw = []
    for sign in (1, -1):
        at = unit.copy()
        at.set_cell(unit.cell[:] @ (np.eye(3) + sign * shear), scale_atoms=True)
        at.calc = calc
        assert np.abs(at.get_forces()).max() > 1e-3  # diamond has internal strain
        raw.append(at.get_stress()[3])
    c44_unrelaxed = (raw[0] - raw[1]) / 0.01 / units.GPa
    assert relaxed["c44"] < c44_unrelaxed - 5.0


def test_hcp_optimises_c_over_a():
    calc = EMT()
    state = equilibrium_state(calc, "Cu", "hcp", c_over_a=1.55)
    assert state.structure == "hcp" and state.c_over_a is not None
    # A scan of c/a at the equilibrium volume has its minimum at the returned value.
    v_cell = state.volume_per_atom * 4
    qs = state.c_over_a * np.array([0.99, 1.0, 1.01])
    from mlipctl.data.crystals import unit_cell

    es = []
    for q in qs:
        a = (v_cell / (np.sqrt(3.0) * q)) ** (1 / 3)
        es.append(energy_of(calc, unit_cell("Cu", "hcp", a, q)))
    assert es[1] < es[0] and es[1] < es[2]
    with pytest.raises(UserInputError, match="cubic"):
        elastic_constants(calc, state)


class _Repulsive(Calculator):
    """E = 100/V: purely repulsive, no minimum anywhere, and no stress."""

    implemented_properties = ["energy", "forces"]

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results = {
            "energy": 100.0 / self.atoms.get_volume(),
            "forces": np.zeros((len(self.atoms), 3)),
        }


def test_no_minimum_and_no_stress_are_clear_errors(emt_cu):
    with pytest.raises(UserInputError, match="minimum|equation-of-state"):
        equilibrium_state(_Repulsive(), "Cu", "fcc")
    with pytest.raises(UserInputError, match="no stress"):
        elastic_constants(_Repulsive(), emt_cu)


def test_resolve_and_evaluate():
    eng = resolve(EMT, "reference")
    assert isinstance(eng.calc, EMT) and eng.neb is EMT
    shared = EMT()
    assert resolve(shared, "model").calc is shared
    with pytest.raises(UserInputError, match="cannot use"):
        resolve(3.0, "model")
    with pytest.raises(UserInputError, match="not an ASE calculator"):
        resolve(lambda: 3.0, "model")
    from ase.build import bulk

    frames = [bulk("Cu", "fcc", a=3.6, cubic=True), bulk("Cu", "fcc", a=3.5)]
    out = evaluate_structures(eng, frames, stress=True)
    assert out[0]["energy"] == pytest.approx(energy_of(EMT(), frames[0]))
    assert out[1]["stress"].shape == (6,) and out[0]["forces"].shape == (4, 3)
