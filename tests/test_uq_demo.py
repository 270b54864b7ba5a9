"""Demonstration: do the uncertainty monitors catch the frames a potential gets wrong?

The scenario: fit a deep ensemble on 300 K bulk Cu (ASE Langevin MD snapshots of small cells,
labelled by EMT); calibrate it and fit its domain model with `mlipctl uncertainty`; then
leave the training distribution twice — MD heating towards melting (Langevin at 1400 K started
from 300 K, driven by the model, monitors in the compiled loop) and the relaxation of a (111)
surface with the model — and ask

* whether the frames the MD monitors flagged really have larger force errors against EMT than the
  frames they did not flag, and
* how well each monitor ranks all visited frames by their force error: the AUROC at detecting
  frames whose force RMSE against EMT exceeds twice the model's in-distribution force RMSE
  (goal: >= 0.8 for the best monitor), taken from the `mlipctl uncertainty` report on the
  EMT-labelled frames.

``test_uq_demo_fast`` is a reduced version (small model and data, short runs) for the default
suite; ``test_uq_demo_full`` (slow) is the full scenario. Both print their AUROC table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import units
from ase.build import bulk, fcc111
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin

from mlipctl.config.fit import FitConfig
from mlipctl.config.loader import validate_config
from mlipctl.config.md import MDConfig
from mlipctl.config.relax import RelaxConfig
from mlipctl.config.uncertainty import UncertaintyConfig
from mlipctl.engines.md import run_md
from mlipctl.engines.relax import run_relax
from mlipctl.engines.uncertainty import run_uncertainty
from mlipctl.training.trainer import run_fit
from mlipctl.uncertainty.domain import HULL_TOL

MONITORS = ["ensemble_std_forces", "ensemble_std_energy", "mahalanobis", "gamma", "hull", "kernel"]


@dataclass(frozen=True)
class Scale:
    lattice: tuple[float, ...]  # one 300 K trajectory (32-atom cell) per lattice constant
    snapshots: int  # per trajectory, 20 fs apart after 200 fs of equilibration
    architecture: dict
    members: int
    epochs: int
    md_steps: int
    relax_steps: int


FAST = Scale(
    lattice=(3.60, 3.62),
    snapshots=20,
    architecture={
        "kind": "moment",
        "cutoff": 4.5,
        "n_basis": 6,
        "n_radial": 3,
        "max_order": 2,
        "hidden": [16],
        "avg_num_neighbors": 30.0,
    },
    members=4,
    epochs=20,
    md_steps=600,
    relax_steps=12,
)
FULL = Scale(
    lattice=(3.60, 3.61, 3.62),
    snapshots=40,
    architecture={
        "kind": "moment",
        "cutoff": 4.5,
        "n_basis": 6,
        "n_radial": 3,
        "max_order": 2,
        "hidden": [16],
        "avg_num_neighbors": 30.0,
    },
    members=4,
    epochs=30,
    md_steps=1500,
    relax_steps=20,
)


def _label(atoms) -> ase.Atoms:
    """A copy with EMT energy, forces and stress attached."""
    a = atoms.copy()
    a.calc = EMT()
    e, f = a.get_potential_energy(), a.get_forces()
    s = a.get_stress() if np.all(a.pbc) else None
    kw = {"energy": e, "forces": f} | ({"stress": s} if s is not None else {})
    out = atoms.copy()
    out.set_constraint()
    out.info = {k: v for k, v in atoms.info.items() if k in ("step", "source")}
    out.calc = SinglePointCalculator(out, **kw)
    return out


def _training_data(path: Path, scale: Scale) -> None:
    from ase.constraints import FixCom
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    frames = []
    for i, a0 in enumerate(scale.lattice):
        atoms = bulk("Cu", "fcc", a=a0, cubic=True).repeat((2, 2, 2))
        atoms.calc = EMT()
        rng = np.random.default_rng(i)
        thermalize_momenta(atoms, temperature_K=300, rng=rng)
        Stationary(atoms)
        atoms.set_constraint(FixCom())
        dyn = Langevin(
            atoms,
            2 * units.fs,
            temperature_K=300,
            friction=2.0 / (1000.0 * units.fs),
            fixcm=False,
            rng=rng,
        )
        dyn.run(100)
        for _ in range(scale.snapshots):
            dyn.run(10)
            frame = _label(atoms)
            frame.info["config_type"] = "md300"
            frames.append(frame)
    ase.io.write(path, frames)


def run_demo(root: Path, scale: Scale) -> dict:
    """The whole scenario; returns the numbers the tests check (and prints them)."""
    import time

    clock = {"t": time.perf_counter()}
    phases: dict[str, float] = {}

    def lap(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - clock["t"], 2)
        clock["t"] = now

    data = root / "train.extxyz"
    _training_data(data, scale)
    lap("data")

    fit = validate_config(
        FitConfig,
        {
            "data": {"path": str(data), "valid_fraction": 0.25},
            "model": {
                "architecture": scale.architecture,
                "ensemble": {"kind": "deep", "size": scale.members},
            },
            "training": {
                "max_epochs": scale.epochs,
                "batch_size": 4,
                "optimizer": {"kind": "adam", "learning_rate": 0.01},
                "schedule": {"kind": "cosine", "warmup_epochs": 0, "final_fraction": 0.05},
                "plots": False,
            },
            "output": str(root / "fit"),
        },
    )
    run_fit(fit, progress=False)
    model = root / "fit" / "model.mlip"
    lap("fit")

    # Calibrate (written into the model file) and fit the domain model.
    unc = run_uncertainty(
        validate_config(
            UncertaintyConfig,
            {
                "model": str(model),
                "output": str(root / "uq"),
                "calibration": {"write_to_model": True},
            },
        ),
        progress=False,
    )
    domain = root / "uq" / "domain.npz"
    lap("uncertainty")
    in_dist = unc.results["domain"]["calibration_data"]
    valid_rmse = unc.results["metrics"]["forces"]["after"]["rmse"]  # in-sample: no test split
    spread = unc.results["calibration"]["spread_scores"]["ensemble_std_forces"]
    gamma_max = in_dist["scores"]["gamma"]["max"]

    # Heating towards melting with the model, every monitor in the compiled loop; thresholds
    # from the held-out 300 K data (1.5x its largest values) where the monitor has no
    # built-in one.
    thresholds = {
        "ensemble_std_forces": 1.5 * spread["max"],
        "mahalanobis": 1.0,  # d² over the F-rule threshold at alpha = 0.01 per frame
        "gamma": max(1.5, 1.5 * gamma_max),
        "hull": HULL_TOL,
    }
    md = run_md(
        validate_config(
            MDConfig,
            {
                "calculator": {"kind": "mlip", "path": str(model)},
                "structure": {
                    "kind": "crystal",
                    "element": "Cu",
                    "lattice_constant": 3.61,
                    "supercell": [2, 2, 2],
                },
                "ensemble": {"kind": "langevin", "temperature_k": 1400.0, "friction_per_ps": 0.3},
                "timestep_fs": 2.0,
                "steps": scale.md_steps,
                "initial_temperature_k": 300.0,
                "trajectory_interval": 10,
                "chunk_steps": 100,
                "monitoring": {
                    "interval": 10,
                    "on_trigger": "continue",
                    "cooldown_steps": 20,
                    "monitors": [
                        {"kind": "ensemble_std", "threshold": thresholds["ensemble_std_forces"]},
                        {"kind": "mahalanobis", "domain_model": str(domain), "alpha": 0.01},
                        {
                            "kind": "gamma",
                            "domain_model": str(domain),
                            "threshold": thresholds["gamma"],
                        },
                        {"kind": "hull", "domain_model": str(domain)},
                    ],
                },
                "output": str(root / "md"),
            },
        ),
        progress=False,
    )

    lap("md")

    # Relaxing a (111) surface with the model (never seen in training).
    slab = fcc111("Cu", (2, 2, 4), a=3.61, vacuum=6.0)
    slab.info = {}  # adsorbate_info is not extxyz-writable
    slab.rattle(0.02, seed=0)
    ase.io.write(root / "slab.extxyz", slab)
    relax = run_relax(
        validate_config(
            RelaxConfig,
            {
                "calculator": {"kind": "mlip", "path": str(model)},
                "structure": {"kind": "file", "path": str(root / "slab.extxyz")},
                "optimizer": {"kind": "fire", "maxstep": 0.1},
                "fmax": 0.05,
                "max_steps": scale.relax_steps,
                "trajectory_interval": 2,
                "output": str(root / "relax"),
            },
        ),
        progress=False,
    )

    lap("relax")
    traj = ase.io.read(root / "md" / "trajectory.extxyz", ":")
    flagged = (
        ase.io.read(root / "md" / "flagged.extxyz", ":") if md.results["flagged_frames"] else []
    )
    surf = ase.io.read(relax.artifacts["trajectory"], ":")

    # Every visited frame, labelled by EMT, through `mlipctl uncertainty`: its report has the
    # AUROC table, and domain_test.csv each frame's force RMSE and monitor values (the host
    # definitions, equal to the in-loop ones: tests/test_engine_uncertainty.py checks it).
    visited = [_label(f) for f in traj + surf]
    ase.io.write(root / "visited.extxyz", visited)
    threshold = 2.0 * valid_rmse
    evaluation = run_uncertainty(
        validate_config(
            UncertaintyConfig,
            {
                "model": str(model),
                "test_data": str(root / "visited.extxyz"),
                "output": str(root / "uq_visited"),
                "calibration": {"enabled": False},
                "metrics": {"auroc_force_rmse": threshold},
            },
        ),
        progress=False,
    )
    evaluation.write(root / "uq_visited")
    auroc = evaluation.results["auroc"]
    rows = np.genfromtxt(root / "uq_visited" / "domain_test.csv", delimiter=",", names=True)
    n = len(traj)
    rmse_traj, rmse_surf = rows["force_rmse"][:n], rows["force_rmse"][n:]
    # Frames written at every monitor step: did any monitor trigger there?
    triggered = np.zeros(n, bool)
    for name, thr in thresholds.items():
        triggered |= rows[name][:n] > thr
    steps = np.array([int(f.info["step"]) for f in traj])
    is_flagged = np.isin(steps, [int(f.info["step"]) for f in flagged])
    assert is_flagged.sum() == len(flagged)
    surface_alarms = {
        name: float(np.mean(rows[name][n:] > thr)) for name, thr in thresholds.items()
    }
    lap("evaluation")

    summary = {
        "force_rmse_in_distribution": valid_rmse,
        "calibration_sigma_factor": unc.results["calibration"]["sigma_factor"],
        "calibration_metrics_forces": {
            k: {m: unc.results["metrics"]["forces"][k][m] for m in ("ece", "nll", "ence", "z_rms")}
            for k in ("before", "after")
        },
        "calibration_nll_improved": unc.passed,
        "in_distribution_false_alarms": {
            "frames": in_dist["n_frames"],
            "mahalanobis": in_dist["n_mahalanobis_alarms"],
            "outside_hull": in_dist["n_outside_hull"],
        },
        "md": {
            "steps_completed": md.results["steps_completed"],
            "temperature_final_k": md.results.get("temperature_final_k"),
            "blow_up": md.results["blow_up"],
            "flagged_frames": md.results["flagged_frames"],
            "first_trigger_step": md.results["first_trigger_step"],
            "first_trigger_by_monitor": {
                k: v["first_trigger_step"] for k, v in md.results["monitors"].items()
            },
        },
        "surface_frames": len(surf),
        "surface_alarm_fraction": surface_alarms,
        "trajectory_frames": len(traj),
        "trajectory_frames_triggered": int(triggered.sum()),
        "surface_force_rmse_mean": float(rmse_surf.mean()),
        "force_rmse_flagged_mean": float(rmse_traj[is_flagged].mean()) if flagged else None,
        "force_rmse_triggered_mean": (
            float(rmse_traj[triggered].mean()) if triggered.any() else None
        ),
        "force_rmse_quiet_mean": (
            float(rmse_traj[~triggered].mean()) if not triggered.all() else None
        ),
        "auroc": auroc,
        "auroc_threshold_ev_a": threshold,
        "uncertainty_report": str(root / "uq_visited" / "report.json"),
        "seconds": phases,
    }
    print(json.dumps(summary, indent=1))
    return summary


def _check(summary: dict, best_at_least: float) -> None:
    auroc = summary["auroc"]
    scores = {k: auroc[k] for k in MONITORS if k in auroc}
    assert auroc["n_positive"] > 0 and auroc["n_negative"] > 0, auroc
    assert max(scores.values()) >= best_at_least, scores
    assert summary["md"]["flagged_frames"] >= 1
    # Flagged frames, and all frames a monitor triggered on, are worse than the quiet ones.
    assert summary["force_rmse_flagged_mean"] > summary["force_rmse_quiet_mean"]
    assert summary["force_rmse_triggered_mean"] > summary["force_rmse_quiet_mean"]
    # Every frame of the surface relaxation is novel: the Mahalanobis monitor says so.
    assert summary["surface_alarm_fraction"]["mahalanobis"] == 1.0
    # The NLL-optimal scale lowers the NLL (the report's criteria); ECE need not follow when the
    # errors are heavier-tailed than a Gaussian, so it is only reported.
    assert summary["calibration_nll_improved"]


def test_uq_demo_fast(tmp_path):
    summary = run_demo(tmp_path, FAST)
    _check(summary, best_at_least=0.8)


@pytest.mark.slow
def test_uq_demo_full(tmp_path):
    summary = run_demo(tmp_path, FULL)
    _check(summary, best_at_least=0.8)
