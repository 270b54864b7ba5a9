"""The `mlipctl uncertainty` engine and the uncertainty monitors of `mlipctl md`, on a tiny deep
ensemble fitted to EMT-labelled Cu cells: calibration (closed form, stored in the model file and
applied by the calculator and the monitors), metrics, plots, the domain model and its link to the
model, trajectory checks, in-loop monitor values against the host, stop/continue policies and
input errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ase.io
import jax
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from mlipctl.config.fit import FitConfig
from mlipctl.config.loader import validate_config
from mlipctl.config.md import MDConfig
from mlipctl.config.uncertainty import UncertaintyConfig
from mlipctl.data.io import write_structures_atomic
from mlipctl.engines import uncertainty as U
from mlipctl.engines.md import run_md
from mlipctl.errors import UserInputError
from mlipctl.model.potential import Potential, load_potential, make_energy, make_predict
from mlipctl.training.trainer import run_fit
from mlipctl.uncertainty import calibration as C
from mlipctl.uncertainty.domain import DomainModel

TINY = {
    "architecture": {
        "kind": "moment",
        "cutoff": 3.0,
        "n_basis": 4,
        "n_radial": 2,
        "max_order": 1,
        "hidden": [8],
        "avg_num_neighbors": 12.0,
    },
    "ensemble": {"kind": "deep", "size": 3},
    # float64: the descriptors of a structure then do not depend on how it was batched (in
    # float32 they move by ~1e-6, enough to put a training point 1e-7 outside its own hull).
    "dtype": "float64",
}


def _emt_cells(n: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61 * (1 + rng.uniform(-0.01, 0.01)), cubic=True)
        a = a.repeat((1, 1, 2))
        a.rattle(0.05 + 0.05 * (k % 3), seed=seed * 1000 + k)
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        frames.append(a)
    return frames


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """A 3-member float64 deep ensemble fitted (briefly) on 30 rattled 8-atom EMT Cu cells, with
    validation and test splits; returns the model path."""
    root = tmp_path_factory.mktemp("uq")
    data = root / "cu.extxyz"
    ase.io.write(data, _emt_cells(30, 0))
    training = {
        "max_epochs": 4,
        "batch_size": 4,
        "optimizer": {"kind": "adam", "learning_rate": 0.01},
        "schedule": {"kind": "constant"},
        "plots": False,
    }
    cfg = validate_config(
        FitConfig,
        {
            "data": {"path": str(data), "valid_fraction": 0.25, "test_fraction": 0.2},
            "model": TINY,
            "training": training,
            "output": str(root / "fit"),
        },
    )
    run_fit(cfg, progress=False)
    return root / "fit" / "model.mlip"


@pytest.fixture(scope="module")
def baseline(fitted, tmp_path_factory):
    """One default `mlipctl uncertainty` run on the fitted model (nothing written to it)."""
    out = tmp_path_factory.mktemp("unc") / "run"
    cfg = validate_config(
        UncertaintyConfig,
        {"model": str(fitted), "output": str(out), "metrics": {"auroc_force_rmse": 0.05}},
    )
    return U.run_uncertainty(cfg, progress=False), out


def _copy_model(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / "model.mlip"
    shutil.copy(src, dst)
    return dst


def _single_spec(pot: Potential):
    """The potential's spec with a single model instead of the ensemble."""
    from mlipctl.config.model import ModelConfig

    cfg = pot.spec.config.model_dump()
    cfg["ensemble"] = {"kind": "none", "size": 1}
    return type(pot.spec)(
        config=ModelConfig.model_validate(cfg), species=pot.spec.species, offsets=pot.spec.offsets
    )


def _independent_residuals(pot: Potential, items: list) -> tuple[np.ndarray, np.ndarray]:
    """Force residuals and raw spreads via the model's public ``predict`` (not the engine)."""
    out = pot.predict([s.atoms for s in items])
    r, s = [], []
    for item, res in zip(items, out, strict=True):
        members = res["forces_members"]
        r.append((item.forces - members.mean(axis=0)).ravel())
        s.append(members.std(axis=0, ddof=1).ravel())
    return np.concatenate(r), np.concatenate(s)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_run_uncertainty_calibrates_in_closed_form_and_writes_outputs(fitted, baseline):
    report, out = baseline
    res = report.results
    pot = load_potential(fitted)
    splits, _ = U.fit_splits(pot, fitted)
    cal = res["calibration"]
    assert cal["n_structures"] == len(splits.valid) > 0
    assert "valid split" in cal["data"] and not cal["written_to_model"]

    # s sqrt(c) = sqrt(mean (r / sigma)^2) for the Gaussian, whatever c is.
    r, s = _independent_residuals(pot, splits.valid)
    factor = float(np.sqrt(np.mean((r / s) ** 2)))
    assert cal["sigma_factor"]["forces"] == pytest.approx(factor, rel=1e-4)
    k = 3
    assert cal["forces"]["variance_factor"] == pytest.approx((k + 1) / k)
    assert cal["forces"]["scale"] == pytest.approx(factor / np.sqrt((k + 1) / k), rel=1e-4)
    assert cal["forces"]["n"] == r.size

    # Metrics before/after on the fit's test split; after = before with sigma rescaled.
    met = res["metrics"]
    assert met["n_structures"] == len(splits.test) and not met["in_sample"]
    for q in ("energy", "forces"):
        before, after = met[q]["before"], met[q]["after"]
        assert after["rmse"] == before["rmse"]
        f = cal["sigma_factor"][q]
        assert after["sharpness"] == pytest.approx(f * before["sharpness"], rel=1e-12)
        assert after["spearman"] == pytest.approx(before["spearman"], abs=1e-12)
        for key in ("ece", "nll", "ence", "miscalibration_area", "rms_calibration_error"):
            assert np.isfinite(before[key]) and np.isfinite(after[key])
    names = {c.name for c in report.criteria}
    assert names == {"calibration_improves_nll_energy", "calibration_improves_nll_forces"}

    for role in ("reliability_energy", "reliability_forces", "rmse_vs_rmv_forces"):
        assert Path(report.artifacts[role]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    domain = U.load_domain(out / U.DOMAIN_FILE, pot)
    assert domain.n_train[0] == 8 * len(splits.train)
    assert res["domain"]["training"]["n_atoms_per_species"] == [8 * len(splits.train)]
    rows = (out / "domain_test.csv").read_text().splitlines()
    assert len(rows) == 1 + len(splits.test)
    assert rows[0].split(",")[:2] == ["structure", "force_rmse"]
    assert report.timings["compile"] > 0 and report.timings["total"] > 0
    json.dumps(report.to_json_dict())  # strict JSON


def test_write_to_model_is_applied_by_the_calculator(fitted, tmp_path):
    model = _copy_model(fitted, tmp_path / "m")
    before = load_potential(model)
    cfg = validate_config(
        UncertaintyConfig,
        {
            "model": str(model),
            "output": str(tmp_path / "out"),
            "calibration": {"write_to_model": True},
            "domain": {"enabled": False},
        },
    )
    report = U.run_uncertainty(cfg, progress=False)
    factors = report.results["calibration"]["sigma_factor"]
    after = load_potential(model)
    assert after.calibration == pytest.approx(factors, rel=1e-15)
    assert after.metadata[U.METADATA_KEY]["forces"]["scale"] == pytest.approx(
        report.results["calibration"]["forces"]["scale"]
    )
    assert after.metadata["fit_config"] == before.metadata["fit_config"]
    leaves = zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True)
    assert all(np.array_equal(a, b) for a, b in leaves)
    assert U.params_digest(before.params) == U.params_digest(after.params)

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((1, 1, 2))
    atoms.rattle(0.08, seed=7)
    atoms.calc = after.calculator()
    atoms.get_forces()
    res = atoms.calc.results
    members = after.predict([atoms])[0]
    raw_f = members["forces_members"].std(axis=0, ddof=1)
    raw_e = members["energy_members"].std(ddof=1)
    np.testing.assert_allclose(res["forces_std"], factors["forces"] * raw_f, rtol=1e-10)
    assert res["energy_std"] == pytest.approx(factors["energy"] * raw_e, rel=1e-10)
    # The host monitor scores use the same stored factors.
    sc = U.frame_scores(after, [atoms])
    assert sc["ensemble_std_forces"][0] == pytest.approx(
        np.max(np.linalg.norm(res["forces_std"], axis=1)), rel=1e-6
    )
    assert sc["ensemble_std_energy"][0] == pytest.approx(res["energy_std"] / len(atoms), rel=1e-6)


def test_student_t_predictive_and_explicit_files(fitted, tmp_path):
    pot = load_potential(fitted)
    splits, _ = U.fit_splits(pot, fitted)
    cal_path = write_structures_atomic(tmp_path / "cal.extxyz", splits.valid)
    test_path = write_structures_atomic(tmp_path / "test.extxyz", splits.test)
    cfg = validate_config(
        UncertaintyConfig,
        {
            "model": str(fitted),
            "calibration_data": str(cal_path),
            "test_data": str(test_path),
            "output": str(tmp_path / "out"),
            "calibration": {"predictive": "student_t"},
            "domain": {"enabled": False},
        },
    )
    report = U.run_uncertainty(cfg, progress=False)
    cal = report.results["calibration"]
    items = U._read_labelled(cal_path, "calibration data")
    r, s = _independent_residuals(pot, items)
    ref = C.fit_scale_student_t(r, s, ensemble_size=3)
    assert cal["forces"]["predictive"] == "student_t" and cal["forces"]["dof"] == 2
    assert cal["forces"]["scale"] == pytest.approx(ref.scale, rel=1e-4)
    assert cal["sigma_factor"]["forces"] == pytest.approx(ref.sigma_factor, rel=1e-4)
    assert report.results["metrics"]["data"] == str(test_path)
    with pytest.raises(ValueError, match="student_t"):
        validate_config(
            UncertaintyConfig,
            {
                "model": str(fitted),
                "calibration": {"predictive": "student_t", "finite_ensemble_correction": False},
            },
        )


def test_trajectory_domain_first_exit_and_gamma_on_training_atoms(fitted, tmp_path):
    pot = load_potential(fitted)
    splits, _ = U.fit_splits(pot, fitted)
    # Both read from the same 8-decimal file, so the first frames are exactly training atoms.
    train_path = write_structures_atomic(tmp_path / "train.extxyz", splits.train)
    train = ase.io.read(train_path, ":3")
    squeezed = []
    for a in train:
        b = a.copy()
        b.set_cell(b.cell[:] * 0.88, scale_atoms=True)
        squeezed.append(b)
    traj = tmp_path / "traj.extxyz"
    ase.io.write(traj, train + squeezed)
    out = tmp_path / "out"
    cfg = validate_config(
        UncertaintyConfig,
        {
            "model": str(fitted),
            "training_data": str(train_path),
            "trajectory": str(traj),
            "output": str(out),
            "calibration": {"enabled": False},
        },
    )
    first = U.run_uncertainty(cfg, progress=False)
    assert first.results["domain"]["training"]["reused"] is False
    report = U.run_uncertainty(cfg, resume=True, progress=False)
    assert any("reused" in m for m in report.messages)
    assert report.results["domain"]["training"]["reused"] is True
    assert report.results["domain"]["trajectory"] == first.results["domain"]["trajectory"]
    dom = report.results["domain"]["trajectory"]
    assert dom["n_frames"] == 6
    # Training atoms are points of the hull (inside by construction) and have γ <= 1 (MaxVol).
    assert dom["first_exit_hull"] == 3 and dom["n_outside_hull"] == 3
    rows = [r.split(",") for r in (out / "domain_trajectory.csv").read_text().splitlines()]
    col = {name: i for i, name in enumerate(rows[0])}
    gamma = np.array([float(r[col["gamma"]]) for r in rows[1:]])
    maha = np.array([float(r[col["mahalanobis"]]) for r in rows[1:]])
    assert np.all(gamma[:3] <= 1.0 + 1e-6) and np.all(gamma[3:] > 1.0)
    assert np.all(maha[3:] > 1.0) and dom["n_mahalanobis_alarms"] >= 3
    assert any("leaves the training hull at frame 3" in m for m in report.messages)


def test_domain_from_training_data_file_matches_fit_metadata(fitted, baseline, tmp_path):
    _, out = baseline
    pot = load_potential(fitted)
    splits, _ = U.fit_splits(pot, fitted)
    path = write_structures_atomic(tmp_path / "train.extxyz", splits.train)
    cfg = validate_config(
        UncertaintyConfig,
        {
            "model": str(fitted),
            "training_data": str(path),
            "output": str(tmp_path / "out"),
            "calibration": {"enabled": False},
            "domain": {"save_next_to_model": False},
        },
    )
    report = U.run_uncertainty(cfg, progress=False)
    a = DomainModel.load(out / U.DOMAIN_FILE)
    b = DomainModel.load(tmp_path / "out" / U.DOMAIN_FILE)
    # extxyz keeps 8 decimals of the positions: descriptors agree to round-off.
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-5)
    np.testing.assert_allclose(a.std, b.std, rtol=1e-4)
    assert report.results["domain"]["training"]["data"] == str(path)


def test_domain_model_is_tied_to_its_model(fitted, baseline, tmp_path):
    _, out = baseline
    other = load_potential(fitted)
    other.params = jax.tree.map(lambda x: x * 1.01, other.params)
    with pytest.raises(UserInputError, match="other model parameters"):
        U.load_domain(out / U.DOMAIN_FILE, other)
    with pytest.raises(UserInputError, match="not found"):
        U.load_domain(tmp_path / "missing.npz")


def test_missing_training_data_and_single_models_are_clear_errors(fitted, tmp_path):
    pot = load_potential(fitted)
    moved = tmp_path / "elsewhere" / "model.mlip"
    fit = json.loads(json.dumps(pot.metadata["fit_config"]))
    fit["data"]["path"] = "no/such/file.extxyz"
    pot.metadata = {**pot.metadata, "fit_config": fit}
    pot.save(moved)
    cfg = validate_config(UncertaintyConfig, {"model": str(moved), "output": str(tmp_path / "o")})
    with pytest.raises(UserInputError, match="training_data"):
        U.run_uncertainty(cfg, progress=False)

    single = Potential.initialize(_single_spec(pot), seed=1)
    single_path = single.save(tmp_path / "single.mlip")
    data = write_structures_atomic(tmp_path / "d.extxyz", _emt_cells(6, 3))
    cfg = validate_config(
        UncertaintyConfig,
        {
            "model": str(single_path),
            "calibration_data": str(data),
            "training_data": str(data),
            "output": str(tmp_path / "s"),
        },
    )
    with pytest.raises(UserInputError, match="single potential"):
        U.run_uncertainty(cfg, progress=False)
    cfg = cfg.model_copy(
        update={"calibration": cfg.calibration.model_copy(update={"enabled": False})}
    )
    report = U.run_uncertainty(cfg, progress=False)  # domain checks alone work for K = 1
    assert report.results["domain"]["training"]["n_atoms_per_species"] == [48]
    assert "metrics" not in report.results


def test_jitted_member_forces_match_single_members_on_a_large_graph(fitted):
    """Jitted per-member forces equal each member's own un-jitted energy gradient on a
    2048-atom cell (~25 000 edges), where jax 0.10.2 miscompiled the vmap over deep members."""
    from mlipctl.data.neighbors import build_graph

    pot = load_potential(fitted)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((8, 8, 8))
    atoms.rattle(0.05, seed=1)
    graph = jax.tree.map(jax.numpy.asarray, build_graph([atoms], pot.spec.cutoff, {29: 0}))
    forces = np.asarray(jax.jit(make_predict(pot.spec, stress=False))(pot.params, graph).forces)
    energy = make_energy(pot.spec)
    for k in range(3):
        grad = jax.grad(lambda x, k=k: energy(pot.params, graph._replace(positions=x))[k, 0])
        ref = -np.asarray(grad(graph.positions))  # not jitted
        np.testing.assert_allclose(forces[k], ref, atol=2e-4)


# --------------------------------------------------------------------------------------------
# Monitors inside the compiled MD loop
# --------------------------------------------------------------------------------------------


def _md_cfg(model: Path, domain: Path, out: Path, **monitoring) -> MDConfig:
    mon = {
        "interval": 10,
        "cooldown_steps": 0,
        "hysteresis": 1.0,
        "on_trigger": "continue",
        "monitors": [
            {"kind": "ensemble_std", "quantity": "forces", "threshold": 1e-9},
            {"kind": "ensemble_std", "quantity": "energy", "threshold": 10.0},
            {"kind": "mahalanobis", "domain_model": str(domain)},
            {"kind": "gamma", "domain_model": str(domain), "threshold": 100.0},
            {"kind": "hull", "domain_model": str(domain)},
        ],
    }
    mon.update(monitoring)
    return validate_config(
        MDConfig,
        {
            "calculator": {"kind": "mlip", "path": str(model)},
            "structure": {
                "kind": "crystal",
                "element": "Cu",
                "lattice_constant": 3.61,
                "supercell": [2, 2, 1],
            },
            "ensemble": {"kind": "langevin", "temperature_k": 300.0},
            "steps": 40,
            "chunk_steps": 40,
            "trajectory_interval": 10,
            "initial_temperature_k": 300.0,
            "monitoring": mon,
            "output": str(out),
        },
    )


def test_md_monitor_values_match_the_host_definitions(fitted, baseline, tmp_path):
    _, out = baseline
    model = _copy_model(fitted, tmp_path / "m")
    pot = load_potential(model)
    pot.calibration = {"energy": 1.7, "forces": 0.6}  # applied by the in-loop monitors too
    pot.save(model)
    report = run_md(_md_cfg(model, out / U.DOMAIN_FILE, tmp_path / "md"), progress=False)
    res = report.results
    assert res["steps_completed"] == 40
    # The always-on spread monitor flags step 10 and, never dropping below the re-arm level,
    # no other frame (hysteresis: one excursion, one flagged frame).
    assert res["flagged_frames"] == 1
    mons = res["monitors"]
    assert mons["ensemble_std_forces"]["n_triggered"] == 4
    assert mons["ensemble_std_forces"]["first_trigger_step"] == 10
    assert mons["ensemble_std_energy"]["n_triggered"] == 0
    flagged = ase.io.read(tmp_path / "md" / "flagged.extxyz", ":")
    assert [f.info["step"] for f in flagged] == [10]
    domain = U.load_domain(out / U.DOMAIN_FILE, pot)
    host = U.frame_scores(pot, flagged, domain)
    # Trajectory frames at the monitor steps 10..40: the loop's running maxima must match.
    traj = [f for f in ase.io.read(tmp_path / "md" / "trajectory.extxyz", ":") if f.info["step"]]
    assert [f.info["step"] for f in traj] == [10, 20, 30, 40]
    host_traj = U.frame_scores(pot, traj, domain)
    for name in ["ensemble_std_forces", "ensemble_std_energy", "mahalanobis", "gamma", "hull"]:
        # Frames keep 8 decimals of the positions.
        loop = flagged[0].info[f"monitor_{name}"]
        assert loop == pytest.approx(host[name][0], rel=1e-5, abs=1e-7), name
        top = mons[name]["max_value"]
        assert top == pytest.approx(np.max(host_traj[name]), rel=1e-5, abs=1e-7), name
    assert mons["hull"]["n_triggered"] == int(np.sum(host_traj["hull"] > 1e-8))
    assert mons["mahalanobis"]["n_triggered"] == int(np.sum(host_traj["mahalanobis"] > 1.0))


def test_md_stop_policy_ends_the_run_at_the_first_trigger(fitted, baseline, tmp_path):
    _, out = baseline
    cfg = _md_cfg(
        fitted,
        out / U.DOMAIN_FILE,
        tmp_path / "md",
        on_trigger="stop",
        monitors=[{"kind": "ensemble_std", "quantity": "forces", "threshold": 1e-9}],
    )
    report = run_md(cfg, progress=False)
    assert report.results["steps_completed"] == 10
    assert report.results["first_trigger_step"] == 10
    assert not report.passed
    assert {c.name: c.passed for c in report.criteria}["monitors_quiet"] is False


def test_monitor_input_errors(fitted, baseline, tmp_path):
    _, out = baseline
    domain = out / U.DOMAIN_FILE
    # Reference calculators have no ensemble or descriptors.
    cfg = _md_cfg(fitted, domain, tmp_path / "a").model_dump()
    cfg["calculator"] = {"kind": "emt"}
    cfg["monitoring"]["monitors"] = [{"kind": "mahalanobis", "domain_model": str(domain)}]
    with pytest.raises(UserInputError, match="needs an mlipctl model"):
        run_md(validate_config(MDConfig, cfg), progress=False)

    # A domain model fitted for other parameters.
    pot = load_potential(fitted)
    pot.params = jax.tree.map(lambda x: x + 0.01, pot.params)
    other = pot.save(tmp_path / "other.mlip")
    with pytest.raises(UserInputError, match="other model parameters"):
        run_md(_md_cfg(other, domain, tmp_path / "b"), progress=False)

    # A hull without facets (8-D PCA space) cannot run in the loop.
    rng = np.random.default_rng(0)
    pot = load_potential(fitted)
    big = DomainModel.fit(rng.normal(size=(400, 8)), np.zeros(400, int), hull_dim=8, gamma=False)
    bad = U.save_domain(big, tmp_path / "bad.npz", model_digest=U.params_digest(pot.params))
    cfg = _md_cfg(
        fitted, bad, tmp_path / "c", monitors=[{"kind": "hull", "domain_model": str(bad)}]
    )
    with pytest.raises(UserInputError, match="no hull facets"):
        run_md(cfg, progress=False)
    cfg = _md_cfg(
        fitted, bad, tmp_path / "d", monitors=[{"kind": "gamma", "domain_model": str(bad)}]
    )
    with pytest.raises(UserInputError, match="no γ active set"):
        run_md(cfg, progress=False)

    with pytest.raises(ValueError, match="domain_model"):
        validate_config(
            MDConfig,
            {
                "calculator": {"kind": "mlip", "path": str(fitted)},
                "structure": {"kind": "crystal", "element": "Cu"},
                "monitoring": {"monitors": [{"kind": "gamma"}]},
            },
        )


def test_ensemble_std_monitor_needs_an_ensemble(fitted, tmp_path):
    single = Potential.initialize(_single_spec(load_potential(fitted)), seed=0)
    path = single.save(tmp_path / "single.mlip")
    md = _md_cfg(
        path,
        tmp_path / "unused.npz",
        tmp_path / "md",
        monitors=[{"kind": "ensemble_std", "threshold": 0.1}],
    )
    with pytest.raises(UserInputError, match="needs an ensemble"):
        run_md(md, progress=False)
