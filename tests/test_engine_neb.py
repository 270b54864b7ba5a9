"""Physics and behaviour tests of the NEB engine: the force projection against ASE's, the EMT
vacancy barrier against ASE's own CI-NEB, the batched jitted band against ASE driving the same
JAX potential image by image, end points, non-convergence, resume and bad input."""

from __future__ import annotations

from pathlib import Path

import ase.io
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.emt import EMT
from ase.mep import NEB
from ase.optimize import FIRE
from test_engine_relax_potential import morse_model

from mlipctl.config.neb import NEBConfig
from mlipctl.data.crystals import build_crystal, vacancy_hop
from mlipctl.engines.fire import EnergyFnCalculator
from mlipctl.engines.neb import (
    make_band,
    neb_forces,
    run_neb,
    run_neb_images,
    spring_constants,
)
from mlipctl.engines.relax import relax_atoms
from mlipctl.errors import UserInputError

REPO = Path(__file__).resolve().parents[1]


def _hop(reps: int = 2, a: float = 3.6):
    return vacancy_hop(build_crystal("Cu", "fcc", a=a, supercell=(reps,) * 3))[:2]


def _small_config(tmp_path: Path, **kw) -> NEBConfig:
    data = {
        "calculator": {"kind": "emt"},
        "endpoints": {
            "kind": "defect",
            "crystal": {"element": "Cu", "lattice_constant": 3.6, "supercell": [2, 2, 2]},
        },
        "n_images": 3,
        "output": str(tmp_path / "out"),
        **kw,
    }
    return NEBConfig.model_validate(data)


# --- projection --------------------------------------------------------------------------------


def test_spring_constants_energy_weighted():
    e = np.array([0.0, 0.5, 1.0, 0.5, 0.2])
    np.testing.assert_allclose(spring_constants(e, 0.1, None), [0.1] * 4)
    k = spring_constants(e, 0.0, (0.1, 0.3))
    np.testing.assert_allclose(k, [0.175, 0.3, 0.3, 0.175])
    low = spring_constants(np.array([0.0, -0.1, 0.05, 0.0]), 0.0, (0.1, 0.3))
    assert low[0] == pytest.approx(0.1)  # below the higher end point: k_min
    np.testing.assert_allclose(np.asarray(spring_constants(jnp.asarray(e), 0.0, (0.1, 0.3))), k)


@pytest.mark.parametrize("climb", [True, False])
@pytest.mark.parametrize("variable", [None, (0.05, 0.2)])
def test_projection_matches_ase_improved_tangent(climb, variable):
    ini, fin = _hop()
    images = [ini.copy() for _ in range(6)] + [fin.copy()]
    NEB(images, method="improvedtangent").interpolate()
    rng = np.random.default_rng(0)
    for im in images[1:-1]:
        im.positions += rng.normal(0.0, 0.03, im.positions.shape)
    # A lattice-vector jump of one atom: spring vectors must use the minimum image.
    images[2].positions[7] += images[2].cell[1]
    for im in images:
        im.calc = EMT()
    energies = np.array([im.get_potential_energy() for im in images])
    k = spring_constants(energies, 0.1, variable)
    neb = NEB(images, k=list(k), climb=climb, method="improvedtangent")
    ref = neb.get_forces().reshape(5, len(ini), 3)

    forces = np.stack([im.get_forces() for im in images[1:-1]])
    positions = np.stack([im.positions for im in images[1:-1]])
    ours, tangent = neb_forces(
        jnp.asarray(energies[1:-1]),
        jnp.asarray(forces),
        jnp.asarray(positions),
        jnp.asarray(energies[[0, -1]]),
        jnp.asarray(np.stack([images[0].positions, images[-1].positions])),
        spring_constants(jnp.asarray(energies), 0.1, variable),
        jnp.asarray(ini.cell[:]),
        climb=climb,
        use_mic=True,
    )
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-10)
    norms = np.sqrt((np.asarray(tangent) ** 2).sum(axis=(1, 2)))
    np.testing.assert_allclose(norms, 1.0)


# --- EMT vacancy hop: our runner vs ASE's own CI-NEB -----------------------------------------


def test_emt_vacancy_barrier_matches_ase_cineb(tmp_path):
    from mlipctl.commands import load

    cfg = load("neb", REPO / "configs" / "neb.yaml", {"output": str(tmp_path / "out")})
    report = run_neb(cfg, progress=False)
    assert report.passed, (report.criteria, report.messages)
    res = report.results
    assert res["driver"] == "ase"

    # ASE's own number on the same cell: relax end points, IDPP band, CI-NEB, FIRE.
    a = res["lattice_constant_a"]
    assert a == pytest.approx(3.590, abs=2e-3)  # EMT's Cu lattice constant
    ini, fin = _hop(3, a)
    ends = []
    for atoms in (ini, fin):
        atoms = atoms.copy()
        atoms.calc = EMT()
        assert FIRE(atoms, logfile=None).run(fmax=0.01, steps=2000)
        ends.append(atoms)
    images = [ends[0]] + [ends[0].copy() for _ in range(cfg.n_images)] + [ends[1]]
    for im in images[1:-1]:
        im.calc = EMT()
    neb = NEB(images, k=0.1, climb=True, method="improvedtangent")
    neb.interpolate(method="idpp", mic=True)
    assert FIRE(neb, logfile=None).run(fmax=0.01, steps=2000)
    e_ase = np.array([im.get_potential_energy() for im in images])
    barrier_ase = e_ase.max() - e_ase[0]
    assert abs(res["barrier_forward_ev"] - barrier_ase) < 2e-3
    assert 0.5 < barrier_ase < 1.0  # EMT Cu vacancy migration, about 0.7 eV

    # End points keep their relaxed energies; forward - backward = ΔE from the written files.
    frames = ase.io.read(report.artifacts["images"], ":")
    e = np.array([f.get_potential_energy() for f in frames])
    assert len(frames) == cfg.n_images + 2
    assert e[0] == pytest.approx(res["initial_relax"]["energy_ev"], abs=1e-9)
    assert e[-1] == pytest.approx(res["final_relax"]["energy_ev"], abs=1e-9)
    assert e[0] == pytest.approx(ends[0].get_potential_energy(), abs=1e-3)
    assert e[-1] == pytest.approx(ends[1].get_potential_energy(), abs=1e-3)
    s = res["saddle_image"]
    assert (e[s] - e[0]) - (e[s] - e[-1]) == pytest.approx(e[-1] - e[0], abs=1e-12)
    assert res["barrier_forward_ev"] - res["barrier_backward_ev"] == pytest.approx(
        res["delta_e_ev"], abs=1e-12
    )
    assert abs(res["delta_e_ev"]) < 1e-3  # the hop is symmetric
    saddle = ase.io.read(report.artifacts["saddle"])
    assert saddle.get_potential_energy() == pytest.approx(e.max(), abs=1e-9)
    # Spline through the images: its maximum is close to the climbing-image energy.
    assert res["spline_barrier_forward_ev"] == pytest.approx(res["barrier_forward_ev"], abs=5e-3)
    rows = Path(report.artifacts["profile"]).read_text().splitlines()
    assert len(rows) == cfg.n_images + 3
    assert Path(report.artifacts["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- batched jitted band vs ASE driving the same potential image by image --------------------


@pytest.fixture(scope="module")
def morse_band():
    model = morse_model()
    ini, fin = _hop()
    ends = [relax_atoms(x, model, optimizer="jax_fire", fmax=0.005).atoms for x in (ini, fin)]
    return model, make_band(ends[0], ends[1], 3, "idpp")


def _ase_barrier(band, model, fmax: float) -> float:
    images = [im.copy() for im in band]
    calc = EnergyFnCalculator(model)  # one shared calculator: one compilation
    for im in images:
        im.calc = calc
    neb = NEB(images, k=0.1, climb=True, method="improvedtangent", allow_shared_calculator=True)
    assert FIRE(neb, logfile=None).run(fmax=fmax, steps=2000)
    e = [calc.get_potential_energy(im) for im in images]
    return max(e) - e[0]


@pytest.fixture(scope="module")
def ase_morse_barrier(morse_band):
    model, band = morse_band
    return _ase_barrier(band, model, 0.005)


@pytest.mark.parametrize("layout", ["flat", "map"])
def test_batched_band_matches_ase_on_same_potential(morse_band, ase_morse_barrier, layout):
    model, band = morse_band
    ours = run_neb_images(band, model, fmax=0.005, layout=layout)
    assert ours.driver == "batched" and ours.converged and ours.layout == layout
    assert abs(ours.barrier_forward - ase_morse_barrier) < 2e-3
    # One compiled call per step (plus the final check), each evaluating all images at once.
    assert ours.n_step_calls == ours.steps + 1
    assert ours.n_compiles == 1
    assert ours.energy_traces == ours.n_compiles
    # Reported energies and forces are the potential's at the final images.
    calc = EnergyFnCalculator(model)
    for im in ours.images:
        assert calc.get_potential_energy(im) == pytest.approx(im.get_potential_energy(), abs=1e-9)
        np.testing.assert_allclose(calc.get_forces(im), im.get_forces(), atol=1e-9)


def test_flat_and_map_layouts_take_identical_steps(morse_band):
    model, band = morse_band
    runs = [run_neb_images(band, model, fmax=0.05, layout=lay) for lay in ("flat", "map")]
    assert runs[0].steps == runs[1].steps
    np.testing.assert_allclose(runs[0].energies, runs[1].energies, atol=1e-9)
    for a, b in zip(runs[0].images, runs[1].images, strict=True):
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-9)


@pytest.mark.parametrize(
    ("optimizer", "variable"), [("mdmin", None), ("fire", (0.05, 0.2))]
)  # fmt: skip
def test_batched_optimizers_and_variable_springs_agree(
    morse_band, ase_morse_barrier, optimizer, variable
):
    model, band = morse_band
    other = run_neb_images(band, model, fmax=0.005, optimizer=optimizer, variable_springs=variable)
    assert other.converged and other.driver == "batched"
    assert abs(other.barrier_forward - ase_morse_barrier) < 2e-3
    if variable is not None:  # the ASE driver's energy-weighted springs give the same saddle
        ase_run = run_neb_images(band, model, fmax=0.005, variable_springs=variable, batched=False)
        assert ase_run.driver == "ase" and ase_run.converged
        assert abs(ase_run.barrier_forward - other.barrier_forward) < 2e-3


def test_batched_band_rebuilds_neighbour_list(morse_band):
    model, band = morse_band
    res = run_neb_images(band, model, fmax=0.005, skin=0.02)
    assert res.converged and res.n_rebuilds > 0
    calc = EnergyFnCalculator(model)
    for im in res.images:
        assert calc.get_potential_energy(im) == pytest.approx(im.get_potential_energy(), abs=1e-9)


@pytest.mark.slow  # three model compilations: 20-30 s on 2 busy cores
def test_batched_neb_with_model_file(tmp_path):
    from mlipctl.config.model import ModelConfig
    from mlipctl.model.potential import ModelSpec, Potential

    arch = {"kind": "moment", "cutoff": 4.0, "n_basis": 4, "n_radial": 2, "hidden": [8]}
    spec = ModelSpec(
        config=ModelConfig.model_validate({"architecture": arch}), species=("Cu",), offsets=(0.0,)
    )
    path = Potential.initialize(spec, seed=0).save(tmp_path / "m.mlip")
    cfg = _small_config(
        tmp_path, calculator={"kind": "mlip", "path": str(path)}, relax_endpoints=False,
        max_steps=5, fmax=1e-6,
    )  # fmt: skip
    report = run_neb(cfg, progress=False)
    res = report.results
    assert res["driver"] == "batched" and res["steps"] == 5 and not report.passed
    assert res["step_calls"] == 6 and res["compilations"] == 1
    # Unrelaxed hop end points are symmetry-equivalent: any invariant model gives ΔE = 0.
    assert abs(res["delta_e_ev"]) < 1e-5
    assert "compile" in report.timings


# --- end points, convergence, resume, bad input ----------------------------------------------


def test_not_converged_is_reported_as_failed(tmp_path):
    cfg = _small_config(tmp_path, max_steps=3, relax_endpoints=False)
    report = run_neb(cfg, progress=False)
    assert not report.passed
    crit = {c.name: c for c in report.criteria}
    assert not crit["converged"].passed and not crit["max_neb_force"].passed
    assert report.results["steps"] == 3 and not report.results["converged"]
    assert any("NOT saddle-point" in m for m in report.messages)
    assert Path(report.artifacts["images"]).exists() and Path(report.artifacts["plot"]).exists()


def test_resume_continues_from_band_checkpoint(tmp_path):
    first = run_neb(_small_config(tmp_path, max_steps=55, fmax=1e-4), progress=False)
    assert not first.passed
    ckpt = ase.io.read(first.artifacts["checkpoint"], ":")
    assert ckpt[0].info["neb_step"] == 50
    again = run_neb(_small_config(tmp_path, fmax=0.01), resume=True, progress=False)
    assert again.passed
    assert any("resumed" in m for m in again.messages)
    assert "initial_relax" not in again.results  # end points come from the checkpoint
    fresh = run_neb(_small_config(tmp_path, output=str(tmp_path / "fresh")), progress=False)
    assert again.results["barrier_forward_ev"] == pytest.approx(
        fresh.results["barrier_forward_ev"], abs=2e-3
    )


def test_mismatched_end_points_raise(tmp_path):
    ini, fin = _hop()
    cases = {
        "atoms but final state has": fin[:-1],
        "same atoms in the same order": fin.copy(),
        "cell of final state differs": fin.copy(),
    }
    cases["same atoms in the same order"].symbols[3] = "Ag"
    cases["cell of final state differs"].set_cell(fin.cell[:] * 1.01, scale_atoms=True)
    ase.io.write(tmp_path / "ini.extxyz", ini)
    for match, bad in cases.items():
        ase.io.write(tmp_path / "fin.extxyz", bad)
        cfg = NEBConfig.model_validate(
            {
                "calculator": {"kind": "emt"},
                "endpoints": {
                    "kind": "files",
                    "initial": str(tmp_path / "ini.extxyz"),
                    "final": str(tmp_path / "fin.extxyz"),
                },
                "output": str(tmp_path / "out"),
            }
        )
        with pytest.raises(UserInputError, match=match):
            run_neb(cfg, progress=False)
        with pytest.raises(UserInputError, match="mismatched NEB end points"):
            run_neb_images([ini, ini.copy(), bad], EMT())
    overlap = ini.copy()
    overlap.positions[4] = overlap.positions[5] + 0.05
    with pytest.raises(UserInputError, match="overlapping atoms.*image 1"):
        run_neb_images([ini, overlap, fin], EMT())
    with pytest.raises(UserInputError, match="batched NEB needs a model"):
        run_neb_images([ini, ini.copy(), fin], EMT(), batched=True)


def test_fixed_atoms_in_band_stay_put():
    from ase.constraints import FixAtoms

    model = morse_model()
    ini, fin, hop = vacancy_hop(build_crystal("Cu", "fcc", a=3.6, supercell=(2, 2, 2)))
    fixed = [i for i in range(len(ini)) if i != hop][:2]
    for im in (ini, fin):
        im.set_constraint(FixAtoms(indices=fixed))
    band = make_band(ini, fin, 3, "linear")
    res = run_neb_images(band, model, fmax=0.01)
    assert res.converged
    for before, after in zip(band, res.images, strict=True):
        np.testing.assert_array_equal(after.positions[fixed], before.positions[fixed])
        assert np.abs(after.get_forces()[fixed]).max() == 0.0
    free = np.setdiff1d(np.arange(len(ini)), fixed)
    assert np.abs(res.images[2].positions[free] - band[2].positions[free]).max() > 1e-3
    shifted = fin.copy()
    shifted.positions[fixed[0]] += 0.3
    with pytest.raises(UserInputError, match="fixed atoms move"):
        make_band(ini, shifted, 3)
