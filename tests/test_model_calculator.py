"""ASE calculator and Potential.predict: results, ensemble spreads, errors, compile cache, BFGS."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.optimize import BFGS

from mlipctl.config.model import EnsembleConfig, ModelConfig, MomentModelConfig
from mlipctl.data.neighbors import build_graph
from mlipctl.errors import UserInputError
from mlipctl.model.potential import ModelSpec, Potential, fit_feature_scaling, make_predict

ARCH = MomentModelConfig(
    cutoff=4.0, n_basis=4, n_radial=3, max_order=2, hidden=(8,), avg_num_neighbors=12.0
)


def _cell(seed: int, n: int = 2) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((n, 1, 1))
    atoms.symbols[1] = "Ni"
    atoms.rattle(0.05, seed=seed)
    return atoms


def _cluster() -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.symbols[3] = "Ni"
    atoms.pbc = False
    atoms.rattle(0.05, seed=4)
    return atoms


@pytest.fixture(scope="module")
def potential() -> Potential:
    spec = ModelSpec(
        ModelConfig(architecture=ARCH, ensemble=EnsembleConfig(kind="shallow", size=3)),
        species=("Cu", "Ni"),
        offsets=(-3.0, -4.0),
        energy_scale=0.3,
    )
    pot = Potential.initialize(spec, seed=2)
    graph = build_graph([_cell(0), _cluster()], ARCH.cutoff, spec.type_map())
    pot.params = fit_feature_scaling(spec, pot.params, [graph])
    return pot


def test_results_match_predict_and_ase_conventions(potential):
    atoms = _cell(1)
    calc = potential.calculator()
    atoms.calc = calc
    energy = atoms.get_potential_energy()
    forces = atoms.get_forces()
    stress = atoms.get_stress()
    energies = atoms.get_potential_energies()
    assert atoms.get_potential_energy(force_consistent=True) == energy  # free_energy
    assert stress.shape == (6,) and energies.shape == (len(atoms),)

    graph = build_graph([atoms], ARCH.cutoff, potential.spec.type_map())
    ref = jax.jit(make_predict(potential.spec, stress=True))(potential.params, graph)
    assert energy == pytest.approx(float(jnp.mean(ref.energy[:, 0])), abs=1e-9)
    np.testing.assert_allclose(forces, np.mean(ref.forces, axis=0), atol=1e-9)
    s = np.mean(ref.stress[:, 0], axis=0)
    voigt = [s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]]
    np.testing.assert_allclose(stress, voigt, atol=1e-12)
    np.testing.assert_allclose(energies.sum(), energy, rtol=1e-12)
    assert atoms.get_stress(voigt=False).shape == (3, 3)
    # Net force of a periodic cell vanishes (translation invariance).
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-5)


def test_ensemble_spreads_scaled_by_calibration(potential):
    atoms = _cell(2)
    calc = potential.calculator()
    atoms.calc = calc
    atoms.get_stress()
    res = dict(calc.results)
    members = res["energy_members"]
    assert members.shape == (3,)
    assert res["energy"] == pytest.approx(members.mean())
    assert res["energy_std"] == pytest.approx(members.std(ddof=1), rel=1e-12)
    assert res["energy_std"] > 0
    assert res["forces_std"].shape == (len(atoms), 3) and res["stress_std"].shape == (6,)
    assert res["energies_std"].shape == (len(atoms),)
    saved = dict(potential.calibration)
    try:
        potential.calibration = {"energy": 2.0, "forces": 3.0, "stress": 4.0}
        calc.reset()
        atoms.get_stress()
        scaled = calc.results
    finally:
        potential.calibration = saved
    assert scaled["energy"] == res["energy"]  # calibration changes spreads only
    assert scaled["energy_std"] == pytest.approx(2.0 * res["energy_std"], rel=1e-12)
    np.testing.assert_allclose(scaled["energies_std"], 2.0 * res["energies_std"], rtol=1e-12)
    np.testing.assert_allclose(scaled["forces_std"], 3.0 * res["forces_std"], rtol=1e-12)
    np.testing.assert_allclose(scaled["stress_std"], 4.0 * res["stress_std"], rtol=1e-12)


def test_no_stress_without_full_periodicity(potential):
    for atoms in (_cluster(), _cell(3)):
        if atoms.pbc.all():
            atoms.pbc = (True, True, False)
        atoms.calc = potential.calculator()
        assert np.isfinite(atoms.get_potential_energy())
        assert atoms.get_forces().shape == (len(atoms), 3)
        with pytest.raises(PropertyNotImplementedError):
            atoms.get_stress()


def test_stress_is_computed_once_asked_for(potential):
    """MD and NEB never ask for stress: it is skipped until a caller does, then kept."""
    atoms = _cell(3)
    atoms.calc = potential.calculator()
    forces = atoms.get_forces()
    assert "stress" not in atoms.calc.results
    stress = atoms.get_stress()
    np.testing.assert_allclose(atoms.calc.results["forces"], forces, atol=1e-12)
    atoms.positions[0] += 0.05
    atoms.get_forces()  # a cell filter asks for forces, then stress: one evaluation
    assert "stress" in atoms.calc.results
    assert not np.allclose(atoms.calc.results["stress"], stress)


def test_same_size_structure_does_not_recompile(potential):
    calc = potential.calculator()
    first = _cell(5)
    first.calc = calc
    first.get_forces()
    traces = calc.n_traces
    second = _cell(6)  # same atoms, slightly different neighbour count: same bucket
    second.calc = calc
    second.get_forces()
    second.positions += 0.01
    second.get_forces()
    other = potential.calculator()  # a new calculator shares the compiled function
    first.calc = other
    first.get_forces()
    assert calc.n_traces == traces
    bigger = _cell(7, n=3)
    bigger.calc = calc
    bigger.get_forces()
    assert calc.n_traces == traces + 1


def test_unknown_element_named(potential):
    atoms = _cell(0)
    atoms.symbols[0] = "Fe"
    atoms.calc = potential.calculator()
    with pytest.raises(UserInputError, match=r"element Fe \(Z=26\).*known elements: Ni, Cu"):
        atoms.get_potential_energy()


def test_overlapping_atoms_rejected(potential):
    atoms = _cell(0)
    atoms.positions[1] = atoms.positions[0] + [0.2, 0.1, 0.0]
    atoms.calc = potential.calculator()
    with pytest.raises(UserInputError, match="overlapping atoms"):
        atoms.get_potential_energy()


def test_nan_positions_and_nan_model_rejected(potential):
    atoms = _cell(0)
    atoms.positions[2, 1] = np.nan
    atoms.calc = potential.calculator()
    with pytest.raises(UserInputError, match="non-finite"):
        atoms.get_potential_energy()
    broken = Potential(
        spec=potential.spec,
        params=jax.tree_util.tree_map(lambda x: x * np.nan, potential.params),
    )
    atoms = _cell(0)
    atoms.calc = broken.calculator()
    with pytest.raises(RuntimeError, match="non-finite"):
        atoms.get_potential_energy()


def test_predict_many_equals_calculator(potential):
    structures = [_cell(8), _cluster(), _cell(9, n=3)]
    results = potential.predict(structures)
    assert len(results) == 3
    assert "stress" not in results[1] and "stress" in results[0]
    assert results[2]["forces_members"].shape == (3, len(structures[2]), 3)
    for atoms, res in zip(structures, results, strict=True):
        atoms.calc = potential.calculator()
        # float32 network: batched and single evaluations differ in summation order only.
        assert res["energy"] == pytest.approx(atoms.get_potential_energy(), abs=1e-5)
        np.testing.assert_allclose(res["forces"], atoms.get_forces(), rtol=1e-4, atol=1e-5)


def test_bfgs_lowers_the_energy(potential):
    # A random model is no physical potential, so only small, energy-lowering steps are asked.
    atoms = _cell(10)
    atoms.calc = potential.calculator()
    energies = [atoms.get_potential_energy()]
    opt = BFGS(atoms, logfile=None, maxstep=0.02)
    for _ in opt.irun(fmax=1e-4, steps=4):
        energies.append(atoms.get_potential_energy())
    assert opt.nsteps == 4
    assert energies[-1] < energies[0]
    assert np.all(np.isfinite(atoms.get_forces()))


def test_mean_forces_mode_gives_energy_spreads_only(potential):
    atoms = _cell(12)
    atoms.calc = potential.calculator()
    atoms.get_stress()
    full = dict(atoms.calc.results)
    atoms.calc = potential.calculator(member_forces=False)
    atoms.get_stress()
    cheap = atoms.calc.results
    assert "forces_std" not in cheap and "stress_std" not in cheap
    assert cheap["energy_std"] == pytest.approx(full["energy_std"], rel=1e-6)
    np.testing.assert_allclose(cheap["forces"], full["forces"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cheap["stress"], full["stress"], rtol=1e-5, atol=1e-8)
