"""Checking the validator: the reference against itself passes with errors below 1 meV, a
potential fitted without defects fails its defect criteria, and the runner writes a complete,
resumable report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from test_engine_relax_potential import MORSE_CU, R_ON, RC, morse_model
from test_validate_transfer import bulk_fitted_morse

from mlipctl.config.loader import validate_config
from mlipctl.config.validate import Thresholds, ValidateConfig
from mlipctl.data.io import write_structures_atomic
from mlipctl.engines import validate as validate_mod
from mlipctl.engines.validate import (
    Settings,
    equilibrium_states,
    load_model,
    resolve,
    run_validate,
    validate_bulk,
    validate_divacancy,
    validate_interstitial,
    validate_surface,
    validate_vacancy,
    write_outcome,
)
from mlipctl.engines.validate_defects import RelaxSettings
from mlipctl.errors import UserInputError
from mlipctl.reference import registry
from mlipctl.reference.registry import make_calculator

SMALL = Settings(min_atoms=32, neb_images=3)
MEV = 1e-3


def _errors(results: dict) -> list[float]:
    """Every model-vs-reference 'error' number in a results tree."""
    out = []
    for value in results.values():
        if isinstance(value, dict):
            if "error" in value and "model" in value:
                out.append(abs(value["error"]))
            out += _errors(value)
    return out


@pytest.fixture(scope="module")
def emt_states():
    return equilibrium_states(
        {"model": resolve(EMT(), "model"), "reference": resolve(EMT, "reference")}, "Cu", "fcc"
    )


def test_reference_against_itself_passes_below_one_mev(emt_states, tmp_path):
    # The model side is one shared EMT instance (ASE NEB with a shared calculator), the
    # reference side a factory (one calculator per image): different code paths, same physics.
    model, reference = EMT(), EMT
    outcomes = [
        validate_bulk(model, reference, "Cu", states=emt_states, settings=SMALL),
        validate_vacancy(model, reference, "Cu", states=emt_states, settings=SMALL),
        validate_interstitial(model, reference, "Cu", states=emt_states, settings=SMALL),
        validate_divacancy(model, reference, "Cu", states=emt_states, settings=SMALL),
        validate_surface(model, reference, "Cu", states=emt_states, settings=SMALL),
    ]
    for out in outcomes:
        assert out.passed, [(c.name, c.value) for c in out.criteria if not c.passed]
        errs = _errors(out.results)
        assert errs and max(errs) < MEV, (out.name, errs)
    vac = outcomes[1].results
    assert 1.15 < vac["formation_energy_ev"]["reference"] < 1.3
    assert vac["migration_barrier_ev"]["reference"] == pytest.approx(0.79, abs=0.02)
    assert vac["profile_rms_ev"] < MEV and vac["profile_shape_rms"] < MEV
    assert vac["smoothness_model"]["force_consistency_rel"] < 0.01
    names = {c.name for c in outcomes[1].criteria}
    assert {
        "vacancy.formation_abs_error",
        "vacancy.migration_rel_error",
        "vacancy.profile_shape_rms",
        "vacancy.force_consistency_rel",
        "vacancy.energy_jump_ratio",
        "vacancy.force_jump_ratio",
        "vacancy.converged",
    } == names
    # Everything the outcome holds can be written (structures as extxyz, plots, tables).
    files = write_outcome(outcomes[1], tmp_path)
    for path in files.values():
        assert (tmp_path / path.split("/")[-1]).stat().st_size > 0
    assert (tmp_path / "saddle_model.extxyz").exists() and (tmp_path / "neb_profiles.png").exists()


def test_batched_jax_model_against_ase_with_the_same_potential():
    """The jitted path (JaxModel: batched NEB, jitted calculator) against ASE's Morse."""
    cfg = {
        "kind": "morse",
        "epsilon": MORSE_CU["D"],
        "r0": MORSE_CU["r0"],
        "alpha": MORSE_CU["a"],
        "rc": RC,
        "rc_onset": R_ON,
    }
    out = validate_vacancy(morse_model(), lambda: make_calculator(cfg), "Cu", "fcc", settings=SMALL)
    assert out.results["neb"]["model"]["driver"] == "batched"
    assert out.results["neb"]["reference"]["driver"] == "ase"
    assert out.passed, [(c.name, c.value) for c in out.criteria if not c.passed]
    assert out.results["formation_energy_ev"]["error"] == pytest.approx(0.0, abs=MEV)
    assert out.results["migration_barrier_ev"]["error"] == pytest.approx(0.0, abs=2 * MEV)


def test_bulk_fitted_pair_potential_fails_defect_criteria(emt_states):
    """A potential fitted to rattled bulk only (no vacancy, no surface) fails them."""
    morse = bulk_fitted_morse()
    model = lambda: make_calculator(morse)  # noqa: E731
    vac = validate_vacancy(model, EMT, "Cu", settings=SMALL)
    failed = {c.name for c in vac.criteria if not c.passed}
    assert "vacancy.formation_abs_error" in failed
    # Pair potentials underestimate E_f (no many-body bond strengthening around the vacancy).
    assert vac.results["formation_energy_ev"]["error"] < -0.05
    # Its path is still smooth and force-consistent: those checks judge the potential's
    # differentiability, not its accuracy.
    assert "vacancy.force_consistency_rel" not in failed
    surf = validate_surface(model, EMT, "Cu", settings=SMALL)
    assert any(not c.passed for c in surf.criteria if c.name.endswith("_rel_error"))


def test_thresholds_decide(emt_states):
    morse = bulk_fitted_morse()
    model = lambda: make_calculator(morse)  # noqa: E731
    strict = validate_divacancy(
        model, EMT, "Cu", states=None, settings=SMALL, thresholds=Thresholds(defect_energy_ev=1e-4)
    )
    loose = Thresholds(defect_energy_ev=10.0)
    relaxed = validate_divacancy(model, EMT, "Cu", settings=SMALL, thresholds=loose)
    assert not strict.passed and relaxed.passed
    assert strict.results == relaxed.results


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


def _cfg(tmp_path, **kw) -> ValidateConfig:
    model = tmp_path / "m.mlip"
    model.write_bytes(b"stand-in: load_model is replaced in these tests")
    data = {
        "model": str(model),
        "crystal": {"min_atoms": 32},
        "neb_images": 3,
        "output": str(tmp_path / "out"),
        **kw,
    }
    return validate_config(ValidateConfig, data)


@pytest.fixture
def emt_as_model(monkeypatch):
    """run_validate with EMT standing in for the model file."""
    monkeypatch.setattr(validate_mod, "load_model", lambda path: (EMT, ("Cu",), None))


@pytest.fixture
def small_transfer(tmp_path):
    """Two small structures for the transferability step (the generated set takes ~10 s)."""
    a = bulk("Cu", "fcc", a=3.59, cubic=True).repeat(2)
    a.rattle(0.05, seed=0)
    slab = bulk("Cu", "fcc", a=3.59, cubic=True).repeat((2, 2, 3))
    slab.center(vacuum=6.0, axis=2)
    return str(write_structures_atomic(tmp_path / "transfer.extxyz", [a, slab]))


def test_runner_report_files_and_resume(tmp_path, emt_as_model, small_transfer, emt_cu_structures):
    test_set = write_structures_atomic(tmp_path / "test.extxyz", emt_cu_structures)
    cfg = _cfg(
        tmp_path,
        checks=["vacancy", "bulk", "divacancy"],
        test_set=str(test_set),
        transferability=[small_transfer],
    )
    report = run_validate(cfg, progress=False)
    assert report.passed, [(c.name, c.value) for c in report.criteria if not c.passed]
    assert report.command == "validate"
    assert report.results["setup"]["element"] == "Cu"
    assert report.results["setup"]["structure"] == "fcc"
    assert report.results["setup"]["defect_supercell_atoms"] == 32
    assert {"equilibrium", "vacancy", "bulk", "divacancy", "test_set", "transferability"} <= set(
        report.results
    )
    # The divacancy reuses the vacancy step's formation energies.
    assert report.results["divacancy"]["vacancy_formation_energy_ev"] == pytest.approx(
        report.results["vacancy"]["formation_energy_ev"]
    )
    assert report.results["test_set"]["overall"]["forces"]["mae"] < 1e-6
    assert report.results["transferability"]["n_atoms"] == 32 + 48
    for role, path in report.artifacts.items():
        assert (tmp_path / "out" / path.split("/")[-1]).exists(), role
    for name in (
        "eos.png",
        "neb_profiles.png",
        "path_smoothness.png",
        "parity_forces.png",
        "transferability_map.png",
        "vacancy_model.extxyz",
        "saddle_reference.extxyz",
    ):
        assert (tmp_path / "out" / name).exists(), name
    report.write(cfg.output)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["passed"] is True and saved["results"]["verdict"]["failed"] == []

    # Resume: finished steps are reused, not recomputed, and give the same numbers.
    again = run_validate(cfg, resume=True, progress=False)
    assert any("reused" in m for m in again.messages)
    assert again.results["vacancy"] == report.results["vacancy"]
    assert "vacancy.total" not in again.timings
    # A changed setting invalidates the cached steps.
    changed = _cfg(tmp_path, checks=["vacancy"], fmax=0.02, transferability=[small_transfer])
    third = run_validate(changed, resume=True, progress=False)
    assert "vacancy.total" in third.timings


def test_runner_reports_failures(tmp_path, monkeypatch, small_transfer):
    morse = bulk_fitted_morse()
    monkeypatch.setattr(
        validate_mod, "load_model", lambda path: (lambda: make_calculator(morse), ("Cu",), 5.5)
    )
    cfg = _cfg(tmp_path, checks=["divacancy", "surface"], transferability=[small_transfer])
    report = run_validate(cfg, progress=False)
    assert not report.passed
    assert report.results["verdict"]["failed"]
    assert all(c.threshold is not None for c in report.criteria)


class _NaNWithVacancy(EMT):
    """EMT, except that a cell with a vacancy (N not a multiple of 4) gets a NaN energy."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        super().calculate(atoms, properties, system_changes)
        if len(self.atoms) % 4 or self.always:
            self.results["energy"] = float("nan")

    always = False


class _AlwaysNaN(_NaNWithVacancy):
    always = True


def test_model_breakdown_is_a_failed_check_not_bad_input(tmp_path, monkeypatch, small_transfer):
    monkeypatch.setattr(validate_mod, "load_model", lambda path: (_NaNWithVacancy, ("Cu",), None))
    report = run_validate(
        _cfg(tmp_path, checks=["vacancy", "bulk"], transferability=[small_transfer]),
        progress=False,
    )
    failed = report.results["verdict"]["failed"]
    assert failed == ["vacancy.model_breakdown"]
    assert "non-finite" in report.results["vacancy"]["model_breakdown"]
    assert report.results["vacancy"]["model_breakdown"].startswith("model: ")
    assert "bulk" in report.results and any(c.name.startswith("bulk.") for c in report.criteria)

    # Without an equilibrium crystal no check can run: each one fails and says why.
    monkeypatch.setattr(validate_mod, "load_model", lambda path: (_AlwaysNaN, ("Cu",), None))
    report = run_validate(
        _cfg(
            tmp_path,
            checks=["vacancy"],
            transferability=[small_transfer],
            output=str(tmp_path / "o2"),
        ),
        progress=False,
    )
    assert report.results["verdict"]["failed"] == [
        "equilibrium.model_breakdown",
        "vacancy.model_breakdown",
        "transferability.model_breakdown",
    ]

    # The reference breaking down is bad input, as before.
    monkeypatch.setattr(validate_mod, "load_model", lambda path: (EMT, ("Cu",), None))
    monkeypatch.setattr(registry, "make_calculator", lambda cfg: _AlwaysNaN())
    with pytest.raises(UserInputError, match="^reference: "):
        run_validate(
            _cfg(tmp_path, checks=["vacancy"], output=str(tmp_path / "o3")), progress=False
        )


def test_runner_input_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(validate_mod, "load_model", lambda path: (EMT, ("Cu", "Ni"), None))
    with pytest.raises(UserInputError, match="choose one"):
        run_validate(_cfg(tmp_path), progress=False)
    with pytest.raises(UserInputError, match="not one of the model's elements"):
        run_validate(_cfg(tmp_path, crystal={"element": "Ag", "min_atoms": 32}), progress=False)
    monkeypatch.setattr(validate_mod, "load_model", lambda path: (EMT, ("Li",), None))
    with pytest.raises(UserInputError, match="does not support Li"):
        run_validate(_cfg(tmp_path), progress=False)
    with pytest.raises(UserInputError):
        load_model(tmp_path / "missing.mlip")  # the real loader (not the patched one)
    with pytest.raises(UserInputError):
        load_model(tmp_path / "m.mlip")  # not a model file


def test_settings_from_config(tmp_path):
    cfg = _cfg(tmp_path, fmax=0.02, neb_fmax=0.03, dense_points=12)
    s = Settings.from_config(cfg)
    assert s.relax == RelaxSettings(fmax=0.02) and s.neb_fmax == 0.03
    assert s.dense_points == 12 and s.min_atoms == 32 and s.neb_images == 3


# --------------------------------------------------------------------------------------------
# Real models (slow)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mlip_fitted_without_vacancies_fails_its_vacancy_criteria(tmp_path):
    """Fit a small mlipctl model on rattled/strained bulk only, then run the real runner."""
    from mlipctl.config.fit import FitConfig
    from mlipctl.training.trainer import run_fit

    rng = np.random.default_rng(2)
    frames = []
    for k in range(48):
        a = bulk("Cu", "fcc", a=3.59 * (1 + rng.uniform(-0.03, 0.03)), cubic=True).repeat(2)
        a.rattle(rng.uniform(0.02, 0.15), seed=k)
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        a.info["config_type"] = "rattled_bulk"
        frames.append(a)
    data = write_structures_atomic(tmp_path / "bulk.extxyz", frames)
    arch = {"kind": "moment", "cutoff": 4.5, "n_basis": 6, "n_radial": 4, "max_order": 2}
    fit = run_fit(
        validate_config(
            FitConfig,
            {
                "data": {"path": str(data), "valid_fraction": 0.1},
                "model": {"architecture": {**arch, "hidden": [16]}, "dtype": "float64"},
                "training": {
                    "max_epochs": 60,
                    "batch_size": 4,
                    "optimizer": {"kind": "adam", "learning_rate": 0.01},
                    "schedule": {"kind": "cosine", "warmup_epochs": 0, "final_fraction": 0.05},
                    "plots": False,
                },
                "output": str(tmp_path / "fit"),
            },
        ),
        progress=False,
    )
    cfg = validate_config(
        ValidateConfig,
        {
            "model": str(fit.model_path),
            "checks": ["vacancy"],
            "crystal": {"min_atoms": 100},
            "neb_images": 5,
            "output": str(tmp_path / "validate"),
        },
    )
    report = run_validate(cfg, progress=False)
    failed = {c.name for c in report.criteria if not c.passed}
    assert failed & {"vacancy.formation_abs_error", "vacancy.migration_rel_error"}, report.results[
        "vacancy"
    ]
    # The model itself is a smooth, force-consistent potential.
    assert "vacancy.force_consistency_rel" not in failed
    assert report.results["vacancy"]["neb"]["model"]["driver"] == "batched"
    assert report.results["setup"]["model_cutoff_a"] == 4.5
