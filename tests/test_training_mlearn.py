"""A tiny version of each shipped ``configs/fit-mlearn-*.yaml`` runs end to end on the real data.

Tiny = one epoch on every 25th structure of the training and test files, without warm-up and
config_type weights; the model, loss, optimiser and batch size are the config's own. Skips (with the reason) when the mlearn data is not present.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlipctl.config.fit import FitConfig
from mlipctl.config.loader import load_config

ROOT = Path(__file__).resolve().parents[1]
MLEARN = Path(os.environ.get("MLIPCTL_MLEARN_DIR", ROOT.parent / "shared/data/mlearn"))


@pytest.mark.mlearn
@pytest.mark.parametrize("element", ["Cu", "Ni", "Li", "Ge"])
def test_tiny_version_of_mlearn_config_runs(element, tmp_path):
    train = MLEARN / element / "training.extxyz"
    test = MLEARN / element / "test.extxyz"
    if not (train.is_file() and test.is_file()):
        pytest.skip(f"mlearn data not found at {MLEARN / element} (set MLIPCTL_MLEARN_DIR)")
    from mlipctl.training.trainer import run_fit

    overrides = {
        "data.path": str(train),
        "data.test_path": str(test),
        "data.index": "::25",
        # The subset may hold no cell of a weighted config_type (e.g. Surface), which
        # config_type_weights rightly rejects as a likely typo; the weights are not under test.
        "data.config_type_weights": {},
        "training.max_epochs": 1,
        "training.schedule.warmup_epochs": 0,
        "training.plots": False,
        "output": str(tmp_path / "fit"),
    }
    cfg = load_config(FitConfig, ROOT / f"configs/fit-mlearn-{element}.yaml", overrides)
    res = run_fit(cfg, progress=False)
    assert res.model_path.is_file()
    assert res.steps >= 1 and res.epochs_completed == 1
    test_metrics = res.metrics["test"]["overall"]
    assert test_metrics["energy_count"] >= 1 and test_metrics["forces_count"] > 0
    # Offsets came from the data: per-atom energies of mlearn metals are a few eV below zero.
    offset = res.normalisation["offsets_ev_per_atom"][element]
    assert -10.0 < offset < -0.5
    if cfg.training.refit is not None:
        assert res.refit is not None and res.timings["refit"] > 0
