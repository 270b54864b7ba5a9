"""Physics and behaviour tests of the relax engine (EMT for references, a JAX Morse potential
and a small mlipctl model for the jitted path)."""

from __future__ import annotations

import math
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.eos import EquationOfState
from ase.optimize import BFGS
from test_engine_relax_potential import morse_model

from mlipctl.config.relax import RelaxConfig, VariableCellConfig
from mlipctl.engines.fire import EnergyFnCalculator
from mlipctl.engines.relax import relax_atoms, run_relax
from mlipctl.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]
A_CU = 3.6


def _vacancy_cell(reps: int = 3, a: float = A_CU):
    host = bulk("Cu", "fcc", a=a, cubic=True).repeat((reps,) * 3)
    vac = host.copy()
    del vac[0]
    return host, vac


def _config(tmp_path: Path, structure: Path, **kw) -> RelaxConfig:
    data = {
        "calculator": {"kind": "emt"},
        "structure": {"kind": "file", "path": str(structure)},
        "output": str(tmp_path / "out"),
        **kw,
    }
    return RelaxConfig.model_validate(data)


def test_emt_vacancy_formation_energy_matches_ase(tmp_path):
    host, vac = _vacancy_cell()
    n = len(host)
    host.calc = EMT()
    e_bulk = host.get_potential_energy()
    ref = vac.copy()
    ref.calc = EMT()
    assert BFGS(ref, logfile=None).run(fmax=1e-3, steps=500)
    ef_ase = ref.get_potential_energy() - (n - 1) / n * e_bulk

    path = tmp_path / "vac.extxyz"
    ase.io.write(path, vac)
    cfg = _config(tmp_path, path, fmax=1e-3, trajectory_interval=5)
    report = run_relax(cfg, progress=False)
    assert report.passed, report.criteria
    ef_ours = report.results["energy_ev"] - (n - 1) / n * e_bulk
    assert abs(ef_ours - ef_ase) < 1e-3
    # EMT's relaxed Cu vacancy formation energy at a = 3.6 Å is 1.23 eV.
    assert 0.9 < ef_ours < 1.4
    assert report.results["max_force_ev_per_a"] < 1e-3
    assert report.results["relaxation_energy_ev"] < 0.0

    final = ase.io.read(report.artifacts["final_structure"])
    assert final.get_potential_energy() == pytest.approx(report.results["energy_ev"], abs=1e-9)
    frames = ase.io.read(report.artifacts["trajectory"], ":")
    assert [f.info["step"] for f in frames] == list(range(0, report.results["steps"] + 1, 5))
    assert frames[0].get_potential_energy() == pytest.approx(report.results["initial_energy_ev"])


def _eos_lattice_constant() -> float:
    volumes, energies = [], []
    for a in np.linspace(3.55, 3.63, 9):
        at = bulk("Cu", "fcc", a=a, cubic=True)
        at.calc = EMT()
        volumes.append(at.get_volume())
        energies.append(at.get_potential_energy())
    v0, _, _ = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    return float((v0) ** (1 / 3))


@pytest.mark.parametrize("hydrostatic", [False, True])
def test_variable_cell_recovers_equilibrium_lattice_constant(hydrostatic):
    a0 = _eos_lattice_constant()
    strained = bulk("Cu", "fcc", a=A_CU, cubic=True).repeat((2, 2, 2))
    strained.set_cell(strained.cell[:] @ np.diag([1.03, 0.98, 1.02]), scale_atoms=True)
    if hydrostatic:
        strained.set_cell(strained.cell[:] * 1.03, scale_atoms=True)
    res = relax_atoms(
        strained,
        EMT(),
        optimizer="lbfgs",
        fmax=1e-4,
        max_steps=2000,
        cell_filter=VariableCellConfig(hydrostatic_strain=hydrostatic),
    )
    assert res.converged
    lengths = res.atoms.cell.lengths() / 2
    if hydrostatic:
        # Uniform scaling only: the anisotropic strain stays, the volume relaxes.
        ratios = lengths / lengths[0]
        np.testing.assert_allclose(ratios, [1.0, 0.98 / 1.03, 1.02 / 1.03], rtol=1e-9)
        assert abs(np.mean(res.stress[:3])) < 1e-5
    else:
        np.testing.assert_allclose(lengths, a0, atol=2e-3)
        np.testing.assert_allclose(res.atoms.cell.angles(), 90.0, atol=1e-3)
        assert np.abs(res.stress).max() < 1e-4


def test_pressure_compresses_to_target_stress(tmp_path):
    path = tmp_path / "cu.extxyz"
    ase.io.write(path, bulk("Cu", "fcc", a=A_CU, cubic=True).repeat((2, 2, 2)))
    reports = {}
    for p in (0.0, 10.0):
        cfg = _config(
            tmp_path,
            path,
            fmax=1e-4,
            optimizer={"kind": "lbfgs"},
            cell={"kind": "variable", "pressure_gpa": p},
            output=str(tmp_path / f"p{p}"),
        )
        reports[p] = run_relax(cfg, progress=False)
        assert reports[p].passed
    assert reports[10.0].results["pressure_gpa"] == pytest.approx(10.0, abs=0.05)
    assert reports[0.0].results["pressure_gpa"] == pytest.approx(0.0, abs=0.05)
    assert reports[10.0].results["volume_a3"] < reports[0.0].results["volume_a3"]
    r = reports[10.0].results
    assert r["enthalpy_ev"] == pytest.approx(r["energy_ev"] + 10.0 * 0.0062415091 * r["volume_a3"])


def test_fixed_atoms_stay_fixed_ase_and_jax():
    _, vac = _vacancy_cell(2)
    vac.rattle(0.08, seed=4)
    fixed = [0, 3, 10]
    for calc, opt in ((EMT(), "bfgs"), (EMT(), "fire"), (morse_model(), "jax_fire")):
        res = relax_atoms(vac, calc, optimizer=opt, fmax=0.01, max_steps=300, fixed=fixed)
        assert res.converged, opt
        np.testing.assert_array_equal(res.atoms.positions[fixed], vac.positions[fixed])
        free = np.setdiff1d(np.arange(len(vac)), fixed)
        assert np.abs(res.atoms.positions[free] - vac.positions[free]).max() > 1e-3
        assert np.abs(res.atoms.get_forces()[fixed]).max() == 0.0
    # FixAtoms already on the structure are honoured too.
    pre = vac.copy()
    pre.set_constraint(FixAtoms(indices=[5]))
    res = relax_atoms(pre, morse_model(), optimizer="jax_fire", fmax=0.01, max_steps=300)
    np.testing.assert_array_equal(res.atoms.positions[5], vac.positions[5])


def test_jax_fire_matches_ase_fire_on_model():
    _, vac = _vacancy_cell(2)
    vac.rattle(0.05, seed=7)
    model = morse_model()
    ours = relax_atoms(vac, model, optimizer="jax_fire", fmax=1e-3, max_steps=2000)
    ref = vac.copy()
    ref.calc = EnergyFnCalculator(model)
    from ase.optimize import FIRE

    assert FIRE(ref, logfile=None).run(fmax=1e-3, steps=2000)
    assert ours.converged
    assert abs(ours.energy - ref.get_potential_energy()) < 1e-3
    assert ours.max_force < 1e-3
    assert ours.n_compiles == 1
    # The reported energy/forces are those of the final positions.
    check = ours.atoms.copy()
    check.calc = EnergyFnCalculator(model)
    assert check.get_potential_energy() == pytest.approx(ours.energy, abs=1e-9)


def test_jax_fire_rebuilds_neighbour_list_without_dropping_pairs():
    _, vac = _vacancy_cell(2)
    vac.rattle(0.25, seed=11)
    model = morse_model()
    res = relax_atoms(
        vac, model, optimizer="jax_fire", fmax=1e-3, max_steps=2000, skin=0.1,
        trajectory_interval=7,
    )  # fmt: skip
    assert res.converged
    assert res.n_rebuilds >= 3
    calc = EnergyFnCalculator(model)
    for frame in [*res.trajectory, res.atoms]:
        check = frame.copy()
        check.calc = calc
        assert check.get_potential_energy() == pytest.approx(frame.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(check.get_forces(), frame.get_forces(), atol=1e-9)
    assert [f.info["step"] for f in res.trajectory] == list(range(0, res.steps + 1, 7))


@pytest.mark.slow  # three model compilations, ~30-50 s on 2 busy cores
def test_jax_fire_with_mlipctl_model_file(tmp_path):
    from mlipctl.config.model import ModelConfig
    from mlipctl.model.potential import ModelSpec, Potential

    arch = {"kind": "moment", "cutoff": 4.0, "n_basis": 4, "n_radial": 2, "hidden": [8]}
    spec = ModelSpec(
        config=ModelConfig.model_validate({"architecture": arch}), species=("Cu",), offsets=(0.0,)
    )
    model_path = Potential.initialize(spec, seed=0).save(tmp_path / "m.mlip")
    _, vac = _vacancy_cell(2)
    vac.rattle(0.03, seed=2)
    path = tmp_path / "vac.extxyz"
    ase.io.write(path, vac)
    cfg = RelaxConfig.model_validate(
        {
            "calculator": {"kind": "mlip", "path": str(model_path)},
            "structure": {"kind": "file", "path": str(path)},
            "optimizer": {"kind": "jax_fire"},
            "fmax": 1e-6,
            "max_steps": 15,
            "output": str(tmp_path / "out"),
        }
    )
    report = run_relax(cfg, progress=False)
    assert report.results["optimizer"] == "jax_fire"
    assert report.results["steps"] == 15
    assert "compile" in report.timings
    # Same energy as the model's own ASE calculator at the written final positions.
    from mlipctl.model.potential import load_potential

    final = ase.io.read(report.artifacts["final_structure"])
    final.calc = load_potential(model_path).calculator()
    assert final.get_potential_energy() == pytest.approx(report.results["energy_ev"], abs=1e-4)
    if not report.results["converged"]:
        assert not report.passed


def test_not_converged_is_a_failed_criterion(tmp_path):
    _, vac = _vacancy_cell(2)
    path = tmp_path / "vac.extxyz"
    ase.io.write(path, vac)
    cfg = _config(tmp_path, path, max_steps=2, fmax=1e-4)
    report = run_relax(cfg, progress=False)
    assert not report.passed
    crit = {c.name: c for c in report.criteria}
    assert not crit["converged"].passed and not crit["max_force"].passed
    assert report.results["steps"] == 2 and not report.results["converged"]
    assert any("not converged" in m for m in report.messages)
    assert len(ase.io.read(report.artifacts["trajectory"], ":")) == 3
    assert Path(report.artifacts["final_structure"]).exists()

    # Resume continues from the last frame and converges.
    last = ase.io.read(report.artifacts["trajectory"], "-1")
    cfg2 = _config(tmp_path, path, max_steps=500, fmax=1e-3)
    again = run_relax(cfg2, resume=True, progress=False)
    assert again.passed
    assert again.results["initial_energy_ev"] == pytest.approx(last.get_potential_energy())
    assert any("resumed" in m for m in again.messages)


def test_bad_inputs_raise_clear_errors(tmp_path):
    _, vac = _vacancy_cell(2)
    with pytest.raises(UserInputError, match="outside the structure"):
        relax_atoms(vac, EMT(), fixed=[len(vac)])
    overlap = vac.copy()
    overlap.positions[1] = overlap.positions[2] + 0.1
    with pytest.raises(UserInputError, match="overlapping atoms"):
        relax_atoms(overlap, EMT())
    nan = vac.copy()
    nan.positions[3, 0] = math.nan
    with pytest.raises(UserInputError, match="NaN"):
        relax_atoms(nan, EMT())
    with pytest.raises(UserInputError, match="jax_fire needs an mlipctl model"):
        relax_atoms(vac, EMT(), optimizer="jax_fire")
    gold = vac.copy()
    gold.symbols[4] = "Au"
    with pytest.raises(UserInputError, match="Au"):
        relax_atoms(gold, morse_model(), optimizer="jax_fire")
    with pytest.raises(UserInputError, match="unknown optimizer"):
        relax_atoms(vac, EMT(), optimizer="newton")
    path = tmp_path / "vac.extxyz"
    ase.io.write(path, vac)
    with pytest.raises(UserInputError, match="outside the structure"):
        run_relax(_config(tmp_path, path, fixed_atoms=[500]), progress=False)


def test_shipped_config_validates_and_runs(tmp_path):
    from mlipctl.commands import load

    cfg = load("relax", REPO / "configs" / "relax.yaml", {"output": str(tmp_path / "out")})
    assert isinstance(cfg, RelaxConfig)
    report = run_relax(cfg, progress=False)
    assert report.passed, report.messages
    assert Path(report.artifacts["final_structure"]).exists()
