"""Reference calculator registry: every kind builds, matches ASE, and fails with clear messages."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.lj import LennardJones
from ase.calculators.morse import MorsePotential
from ase.neighborlist import neighbor_list

from mlipctl.errors import UserInputError
from mlipctl.reference.registry import as_reference, make_calculator, supported_elements

TESTS = Path(__file__).resolve().parent


def _cu(seed: int = 0) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 1, 1))
    atoms.rattle(0.05, seed=seed)
    return atoms


def _ar(seed: int = 0) -> Atoms:
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True)
    atoms.rattle(0.1, seed=seed)
    return atoms


def _efs(atoms: Atoms, calc) -> tuple[float, np.ndarray, np.ndarray]:
    a = atoms.copy()
    a.calc = calc
    return a.get_potential_energy(), a.get_forces(), a.get_stress()


def _fd_force(atoms: Atoms, cfg: dict, atom: int, axis: int, h: float = 1e-4) -> float:
    """-dE/dx by central differences, with a fresh calculator per point."""
    energies = []
    for sign in (1, -1):
        a = atoms.copy()
        a.positions[atom, axis] += sign * h
        a.calc = make_calculator(cfg)
        energies.append(a.get_potential_energy())
    return -(energies[0] - energies[1]) / (2 * h)


def test_emt_is_default_kind_and_matches_ase_exactly():
    atoms = _cu()
    e, f, s = _efs(atoms, make_calculator({"kind": "emt"}))
    e0, f0, s0 = _efs(atoms, EMT())
    assert e == e0
    np.testing.assert_array_equal(f, f0)
    np.testing.assert_array_equal(s, s0)
    assert np.abs(f).max() > 1e-3  # rattled: a real force test, not all zeros


def test_each_call_builds_a_fresh_calculator():
    a, b = make_calculator({"kind": "emt"}), make_calculator({"kind": "emt"})
    assert a is not b


def test_lj_matches_ase_and_has_its_minimum_at_two_to_the_sixth_sigma():
    cfg = {"kind": "lj", "epsilon": 0.0104, "sigma": 3.40, "rc": 8.5}
    atoms = _ar()
    e, f, s = _efs(atoms, make_calculator(cfg))
    e0, f0, s0 = _efs(atoms, LennardJones(epsilon=0.0104, sigma=3.40, rc=8.5))
    assert e == e0
    np.testing.assert_array_equal(f, f0)
    np.testing.assert_array_equal(s, s0)
    assert e < 0  # Ar fcc near equilibrium is bound
    # Dimer at the minimum: zero force (energy is shifted so V(rc) = 0, forces are not).
    r_min = 2 ** (1 / 6) * 3.40
    dimer = Atoms("Ar2", positions=[[0, 0, 0], [0, 0, r_min]])
    dimer.calc = make_calculator(cfg)
    assert np.abs(dimer.get_forces()).max() < 1e-10


def test_morse_defaults_match_ase_and_give_the_well_depth_at_r0():
    atoms = _cu(1)
    e, f, s = _efs(atoms, make_calculator({"kind": "morse"}))
    direct = MorsePotential(epsilon=0.3429, r0=2.866, rho0=1.3588 * 2.866, rcut1=1.9, rcut2=2.7)
    e0, f0, s0 = _efs(atoms, direct)
    assert e == pytest.approx(e0, rel=1e-12)
    np.testing.assert_allclose(f, f0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s, s0, rtol=1e-12, atol=1e-12)
    cfg = {"kind": "morse", "epsilon": 0.5, "r0": 2.2, "alpha": 1.7}
    dimer = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.2]])
    dimer.calc = make_calculator(cfg)
    assert dimer.get_potential_energy() == pytest.approx(-0.5, abs=1e-12)
    assert np.abs(dimer.get_forces()).max() < 1e-10
    stretched = dimer.copy()
    stretched.positions[1, 2] = 2.5
    assert _fd_force(stretched, cfg, 1, 2) < 0  # pulled back towards r0


# ----------------------------------------------------------------------------- EAM

_RE, _RC, _RS = 2.556, 5.0, 4.0  # Å: nearest-neighbour distance, cutoff, taper start


def _taper(r: np.ndarray) -> np.ndarray:
    x = np.clip((r - _RS) / (_RC - _RS), 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * x))


def _density(r: np.ndarray) -> np.ndarray:
    return np.exp(-6.0 * (r / _RE - 1.0)) * _taper(r)


def _pair(r: np.ndarray) -> np.ndarray:
    return 0.4 * np.exp(-9.0 * (r / _RE - 1.0)) * _taper(r)


def _embed(rho: np.ndarray) -> np.ndarray:
    return -1.3 * np.sqrt(rho)


def _write_setfl(path: Path, nr: int = 2001, nrho: int = 2001) -> None:
    """A one-element LAMMPS setfl (eam/alloy) file of the analytic model above."""
    dr = _RC / (nr - 1)
    drho = 20.0 / (nrho - 1)
    r = np.arange(nr) * dr
    rho = np.arange(nrho) * drho

    def block(values: np.ndarray) -> list[str]:
        return [" ".join(f"{v:.16e}" for v in values[k : k + 5]) for k in range(0, len(values), 5)]

    lines = [
        "mlipctl test potential: analytic Finnis-Sinclair-like Cu",
        "rho = exp(-6(r/re-1)) fc, phi = 0.4 exp(-9(r/re-1)) fc, F = -1.3 sqrt(rho)",
        "written by tests/test_reference_registry.py",
        "1 Cu",
        f"{nrho} {drho:.16e} {nr} {dr:.16e} {_RC:.16e}",
        "29 63.546 3.615 fcc",
        *block(_embed(rho)),
        *block(_density(r)),
        *block(r * _pair(r)),  # setfl stores r * phi(r)
    ]
    path.write_text("\n".join(lines) + "\n")


def _analytic_energy(atoms: Atoms) -> float:
    i, j, d = neighbor_list("ijd", atoms, _RC)
    rho = np.bincount(i, weights=_density(d), minlength=len(atoms))
    return float(_embed(rho).sum() + 0.5 * _pair(d).sum())


@pytest.fixture(scope="module")
def setfl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eam") / "Cu_test.eam.alloy"
    _write_setfl(path)
    return path


@pytest.mark.parametrize("backend", ["ase", "matscipy"])
def test_eam_file_reproduces_the_analytic_model(setfl, backend):
    cfg = {"kind": "eam", "path": str(setfl), "backend": backend}
    atoms = _cu(2)
    calc = make_calculator(cfg)
    e, f, s = _efs(atoms, calc)
    assert e == pytest.approx(_analytic_energy(atoms), rel=1e-6)
    assert np.abs(f).max() > 1e-3
    assert _fd_force(atoms, cfg, 3, 0) == pytest.approx(f[3, 0], abs=1e-4)
    assert np.isfinite(s).all()
    assert supported_elements(cfg) == {"Cu"}


def test_eam_backends_agree(setfl):
    atoms = _cu(3)
    e1, f1, s1 = _efs(atoms, make_calculator({"kind": "eam", "path": str(setfl)}))
    e2, f2, s2 = _efs(
        atoms, make_calculator({"kind": "eam", "path": str(setfl), "backend": "matscipy"})
    )
    assert e1 == pytest.approx(e2, abs=1e-6)
    np.testing.assert_allclose(f1, f2, atol=1e-5)
    np.testing.assert_allclose(s1, s2, atol=1e-6)


def test_eam_missing_and_malformed_files(tmp_path):
    with pytest.raises(UserInputError, match=r"EAM potential file .*none\.alloy does not exist"):
        make_calculator({"kind": "eam", "path": str(tmp_path / "none.alloy")})
    bad = tmp_path / "bad.alloy"
    bad.write_text("not\nan\neam file\n")
    for backend in ("ase", "matscipy"):
        with pytest.raises(UserInputError, match="cannot read EAM potential .*bad.alloy"):
            make_calculator({"kind": "eam", "path": str(bad), "backend": backend})


# ----------------------------------------------------------------------------- element tables


def test_supported_elements():
    from ase.calculators.emt import parameters

    emt = supported_elements({"kind": "emt"})
    assert emt == set(parameters)
    assert emt == {"H", "C", "N", "O", "Al", "Ni", "Cu", "Pd", "Ag", "Pt", "Au"}
    assert supported_elements({"kind": "lj"}) is None
    assert supported_elements({"kind": "morse"}) is None
    xtb = supported_elements({"kind": "tblite"})
    assert xtb is not None and {"H", "Cu", "Rn"} <= xtb and "Fr" not in xtb


def test_invalid_mapping_is_a_user_input_error():
    with pytest.raises(UserInputError, match="invalid reference calculator config.*sigma"):
        as_reference({"kind": "lj", "sigma": -1})


# ----------------------------------------------------------------------------- import kind


@pytest.fixture
def helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def test_import_path_builds_emt_in_both_spellings():
    atoms = _cu(4)
    e0 = _efs(atoms, EMT())[0]
    for path in ("ase.calculators.emt:EMT", "ase.calculators.emt.EMT"):
        calc = make_calculator({"kind": "import", "class_path": path})
        assert isinstance(calc, EMT)
        assert _efs(atoms, calc)[0] == e0


def test_import_kwargs_reach_the_constructor():
    cfg = {
        "kind": "import",
        "class_path": "ase.calculators.lj:LennardJones",
        "kwargs": {"sigma": 3.4, "epsilon": 0.0104, "rc": 8.5},
    }
    atoms = _ar(1)
    assert (
        _efs(atoms, make_calculator(cfg))[0]
        == _efs(atoms, LennardJones(sigma=3.4, epsilon=0.0104, rc=8.5))[0]
    )


def test_import_factory_function(helpers_on_path):
    calc = make_calculator(
        {"kind": "import", "class_path": "_failing_calc:emt_factory", "kwargs": {}}
    )
    assert isinstance(calc, EMT)
    with pytest.raises(UserInputError, match="returned a object, not an ASE calculator"):
        make_calculator({"kind": "import", "class_path": "_failing_calc:not_a_calculator_factory"})


def test_import_bad_module():
    with pytest.raises(UserInputError) as info:
        make_calculator({"kind": "import", "class_path": "no_such_pkg.calc:Calc"})
    msg = str(info.value)
    assert "cannot import module 'no_such_pkg.calc'" in msg
    assert "ModuleNotFoundError" in msg and "No module named 'no_such_pkg'" in msg


def test_import_bad_class():
    with pytest.raises(
        UserInputError, match="module 'ase.calculators.emt' has no attribute 'EMTX'"
    ):
        make_calculator({"kind": "import", "class_path": "ase.calculators.emt:EMTX"})


def test_import_not_a_calculator(helpers_on_path):
    with pytest.raises(UserInputError, match="not an ASE calculator: class NotACalculator"):
        make_calculator({"kind": "import", "class_path": "_failing_calc:NotACalculator"})
    with pytest.raises(UserInputError, match="neither a calculator class nor a function"):
        make_calculator({"kind": "import", "class_path": "ase.units:Bohr"})


def test_import_bad_kwargs_are_named():
    # EMT takes **kwargs and would store a typo silently; the registry names it.
    with pytest.raises(UserInputError) as info:
        make_calculator(
            {"kind": "import", "class_path": "ase.calculators.emt:EMT", "kwargs": {"asap": 1}}
        )
    assert "does not accept keyword argument(s) 'asap'" in str(info.value)
    assert "asap_cutoff" in str(info.value)  # lists what is accepted
    with pytest.raises(UserInputError, match="'sigmaa'"):
        make_calculator(
            {
                "kind": "import",
                "class_path": "ase.calculators.lj:LennardJones",
                "kwargs": {"sigmaa": 3.4},
            }
        )


def test_import_constructor_errors_are_wrapped(helpers_on_path):
    path = "_failing_calc:StrictEMT"
    calc = make_calculator({"kind": "import", "class_path": path, "kwargs": {"cutoff": 2.0}})
    assert calc.cutoff == 2.0
    with pytest.raises(UserInputError) as info:
        make_calculator({"kind": "import", "class_path": path, "kwargs": {"cutoff": -1.0}})
    assert str(info.value) == (
        "constructing _failing_calc:StrictEMT(**kwargs) failed: "
        "ValueError: cutoff must be positive, got -1.0"
    )
    with pytest.raises(UserInputError, match="rejected its kwargs.*missing 1 required.*cutoff"):
        make_calculator({"kind": "import", "class_path": path})


# ----------------------------------------------------------------------------- optional packages


def test_missing_optional_packages_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tblite", None)
    monkeypatch.setitem(sys.modules, "tblite.ase", None)
    monkeypatch.setitem(sys.modules, "pyscf", None)
    with pytest.raises(UserInputError, match=r"tblite package.*pip install mlipctl\[dft\]"):
        make_calculator({"kind": "tblite"})
    with pytest.raises(UserInputError, match=r"pyscf package.*pip install mlipctl\[dft\]"):
        make_calculator({"kind": "pyscf"})


def test_tblite_gfn2_water():
    pytest.importorskip("tblite.ase", reason="tblite not installed (pip install mlipctl[dft])")
    cfg = {"kind": "tblite", "method": "GFN2-xTB"}
    water = molecule("H2O")
    water.calc = make_calculator(cfg)
    e = water.get_potential_energy()
    f = water.get_forces()
    # GFN2-xTB total energy of water is about -5.07 Hartree.
    assert e / 27.211386 == pytest.approx(-5.07, abs=0.05)
    assert _fd_force(water, cfg, 0, 2, h=1e-3) == pytest.approx(f[0, 2], abs=2e-3)


def test_pyscf_h2_hartree_fock_and_forces():
    pytest.importorskip("pyscf", reason="pyscf not installed (pip install mlipctl[dft])")
    cfg = {"kind": "pyscf", "basis": "sto-3g", "xc": "HF"}
    h2 = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    h2.calc = make_calculator(cfg)
    # RHF/STO-3G H2 at 0.74 Å: -1.1167 Hartree (Szabo & Ostlund).
    assert h2.get_potential_energy() / 27.211386 == pytest.approx(-1.1167, abs=2e-4)
    f = h2.get_forces()
    assert f[0, 2] == pytest.approx(-f[1, 2], abs=1e-8)  # Newton's third law
    assert _fd_force(h2, cfg, 1, 2, h=1e-3) == pytest.approx(f[1, 2], abs=1e-4)


def test_pyscf_refuses_periodic_structures():
    pytest.importorskip("pyscf", reason="pyscf not installed (pip install mlipctl[dft])")
    atoms = bulk("Cu", "fcc", a=3.61)
    atoms.calc = make_calculator({"kind": "pyscf", "basis": "sto-3g"})
    with pytest.raises(UserInputError, match="molecules and clusters only"):
        atoms.get_potential_energy()


def test_tblite_periodic_copper_cell():
    pytest.importorskip("tblite.ase", reason="tblite not installed (pip install mlipctl[dft])")
    atoms = bulk("Cu", "fcc", a=3.61)
    atoms.calc = make_calculator({"kind": "tblite", "method": "GFN1-xTB"})
    e = atoms.get_potential_energy()
    assert np.isfinite(e) and e < 0
    assert np.abs(atoms.get_forces()).max() < 1e-6  # one atom per cell: zero by symmetry
    assert np.isfinite(atoms.get_stress()).all()


def test_pyscf_through_label_structures():
    pytest.importorskip("pyscf", reason="pyscf not installed (pip install mlipctl[dft])")
    from mlipctl.reference.labelling import label_structures

    h2 = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    cu = bulk("Cu", "fcc", a=3.61)
    mol, crystal = label_structures([h2, cu], {"kind": "pyscf", "basis": "sto-3g", "xc": "HF"})
    assert mol.ok and mol.stress is None and "not periodic" in (mol.stress_note or "")
    assert mol.energy / 27.211386 == pytest.approx(-1.1167, abs=2e-4)
    assert not crystal.ok
    assert crystal.error is not None and crystal.error.startswith(
        "UserInputError: the pyscf reference handles molecules and clusters only"
    )
