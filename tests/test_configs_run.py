"""Every shipped config that needs a fitted model runs small through the CLI.

The fit, generate, label, relax, neb and md configs run in their own test modules; this one covers
the configs that read ``quickstart/fit/model.mlip``: a tiny ensemble fitted here stands in for it,
and ``--set`` shrinks each run (32-atom cells, 3 NEB images).
"""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.geometry import find_mic
from ase.md.verlet import VelocityVerlet
from typer.testing import CliRunner

from mlipctl.cli.app import app
from mlipctl.config.fit import FitConfig
from mlipctl.config.loader import validate_config
from mlipctl.training.trainer import run_fit

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _labelled(atoms):
    atoms.calc = EMT()
    e, f, s = atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()
    atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
    return atoms


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A 2-member deep ensemble fitted briefly on rattled and vacancy EMT Cu cells (with splits)."""
    root = tmp_path_factory.mktemp("cfgrun")
    rng = np.random.default_rng(0)
    frames = []
    for k in range(30):
        # Volumes within ±4 %: the model needs an equation of state with a minimum.
        a = bulk("Cu", "fcc", a=3.59 * (1 + rng.uniform(-0.04, 0.04)), cubic=True).repeat(2)
        if k % 3 == 0:
            # A vacancy with a neighbour part of the way into it: the validated hop's region.
            site = a.positions[0].copy()
            del a[0]
            to_site, dist = find_mic(site - a.positions, a.cell, pbc=True)
            j = int(np.argmin(dist))
            a.positions[j] += rng.uniform(0.0, 0.5) * to_site[j]
        a.rattle(0.03 + 0.02 * (k % 3), seed=k)
        frames.append(_labelled(a))
    ase.io.write(root / "cu.extxyz", frames)
    cfg = validate_config(
        FitConfig,
        {
            "data": {"path": str(root / "cu.extxyz"), "valid_fraction": 0.25, "test_fraction": 0.2},
            "model": {
                "architecture": {
                    "kind": "moment",
                    "cutoff": 4.0,
                    "n_basis": 4,
                    "n_radial": 2,
                    "max_order": 2,
                    "hidden": [8],
                    # 60 epochs on 30 cells: the linear term's extrapolation let the 3-image
                    # band collapse (atoms 0.43 Å apart, reported as a model breakdown); this
                    # module tests the configs' plumbing, not a barely trained readout.
                    "linear_readout": False,
                },
                "ensemble": {"kind": "deep", "size": 2},
            },
            "training": {
                "max_epochs": 60,
                "batch_size": 4,
                "optimizer": {"kind": "adam", "learning_rate": 0.01},
                "loss": {"kind": "mse", "energy_weight": 100.0, "forces_weight": 1.0},
                "plots": False,
            },
            "output": str(root / "fit"),
        },
    )
    run_fit(cfg, progress=False)
    return root / "fit" / "model.mlip"


def _run(config: str, out: Path, *sets: str):
    res = runner.invoke(
        app,
        [config.split("-")[0], str(ROOT / "configs" / f"{config}.yaml"), "--no-progress"]
        + [x for s in sets for x in ("--set", s)]
        + ["--set", f"output={out}"],
    )
    assert res.exit_code in (0, 1), res.output
    report = json.loads((out / "report.json").read_text())
    # The exit code is the verdict: 1 exactly when a criterion failed.
    assert (res.exit_code == 0) == all(c["passed"] for c in report["criteria"])
    return report


@pytest.mark.parametrize(
    "config", ["validate", pytest.param("validate-full", marks=pytest.mark.slow)]
)
def test_validate_configs_run_small(config, model, tmp_path):
    report = _run(
        config,
        tmp_path / "out",
        f"model={model}",
        "crystal.min_atoms=32",
        "neb_images=3",
    )
    names = {c["name"] for c in report["criteria"]}
    assert {"vacancy.formation_abs_error", "vacancy.migration_rel_error"} <= names
    assert report["results"]["setup"]["defect_supercell_atoms"] == 32


def test_uncertainty_config_runs_small(model, tmp_path):
    report = _run("uncertainty", tmp_path / "out", f"model={model}")
    assert "calibration" in json.dumps(report["results"])


def test_uncertainty_trajectory_config_runs_small(model, tmp_path):
    atoms = _labelled(bulk("Cu", "fcc", a=3.59, cubic=True).repeat(2))
    atoms.calc = EMT()
    atoms.rattle(0.05, seed=1)
    frames = []
    dyn = VelocityVerlet(atoms, timestep=2.0 * 0.09822694788464063)  # 2 fs in ASE time units
    for _ in range(4):
        dyn.run(5)
        frames.append(atoms.copy())
    traj = tmp_path / "traj.extxyz"
    ase.io.write(traj, frames)
    report = _run(
        "uncertainty-trajectory", tmp_path / "out", f"model={model}", f"trajectory={traj}"
    )
    assert "trajectory" in json.dumps(report["results"])
