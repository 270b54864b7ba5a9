"""Shared test fixtures: the mlearn DFT data (skipped when absent) and small labelled EMT cells."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def _mlearn_path() -> Path:
    env = os.environ.get("MLIPCTL_MLEARN_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared/data/mlearn"


@pytest.fixture(scope="session")
def mlearn_dir() -> Path:
    """Directory with ``<El>/{training,test}.extxyz``; skips the test when it is missing."""
    path = _mlearn_path()
    if not (path / "Cu" / "training.extxyz").is_file():
        pytest.skip(
            f"mlearn DFT data not found at {path} (set MLIPCTL_MLEARN_DIR to the directory "
            "holding Cu/training.extxyz)"
        )
    return path


@pytest.fixture(scope="session")
def emt_cu_structures() -> list:
    """Six small Cu cells (1-32 atoms, cubic/primitive/strained/rattled/vacancy) with EMT energy,
    forces and stress attached via a SinglePointCalculator and varied ``config_type``."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(42)
    cells = []
    prim = bulk("Cu", "fcc", a=3.61)
    cells.append((prim, "Elastic"))
    strained = bulk("Cu", "fcc", a=3.61)
    strained.set_cell(
        strained.cell[:] @ (np.eye(3) + np.diag([0.01, -0.005, 0.0])), scale_atoms=True
    )
    cells.append((strained, "Elastic"))
    cubic = bulk("Cu", "fcc", a=3.61, cubic=True)
    cells.append((cubic, "Elastic"))
    for _ in range(2):
        sc = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
        sc.positions += rng.normal(0.0, 0.05, sc.positions.shape)
        cells.append((sc, "AIMD-NVT"))
    vac = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((2, 2, 2))
    del vac[5]
    vac.positions += rng.normal(0.0, 0.03, vac.positions.shape)
    cells.append((vac, "Vacancy"))

    out = []
    for atoms, ctype in cells:
        atoms.calc = EMT()
        e = atoms.get_potential_energy()
        f = atoms.get_forces()
        s = atoms.get_stress(voigt=False)
        atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f, stress=s)
        atoms.info["config_type"] = ctype
        out.append(atoms)
    return out
