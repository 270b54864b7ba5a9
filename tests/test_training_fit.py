"""The fit engine on tiny EMT-labelled Cu data: learning, ensembles, outputs, resume, errors."""

from __future__ import annotations

import csv
import json
import shutil

import jax
import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from mlipctl.config.fit import FitConfig
from mlipctl.config.loader import validate_config
from mlipctl.data.io import write_structures_atomic
from mlipctl.errors import UserInputError
from mlipctl.model.potential import load_potential
from mlipctl.training.checkpoint import load_checkpoint
from mlipctl.training.trainer import CHECKPOINT_NAME, run_fit

TINY_MODEL = {
    "architecture": {
        "kind": "moment",
        "cutoff": 3.0,
        "n_basis": 4,
        "n_radial": 2,
        "max_order": 1,
        "hidden": [8],
        "avg_num_neighbors": 12.0,
    }
}


@pytest.fixture(scope="module")
def emt_data(tmp_path_factory):
    """18 rattled, strained fcc Cu cells (4 or 8 atoms) labelled with EMT: E, F and stress."""
    import ase.io

    rng = np.random.default_rng(0)
    frames = []
    for k in range(18):
        a = bulk("Cu", "fcc", a=3.61 * (1 + rng.uniform(-0.03, 0.03)), cubic=True)
        a = a.repeat((1, 1, 1 + k % 2))
        a.rattle(0.1, seed=k)
        a.calc = EMT()
        e, f, s = a.get_potential_energy(), a.get_forces(), a.get_stress()
        a.calc = SinglePointCalculator(a, energy=e, forces=f, stress=s)
        a.info["config_type"] = "rattled" if k % 3 else "strained"
        frames.append(a)
    path = tmp_path_factory.mktemp("emt") / "cu.extxyz"
    ase.io.write(path, frames)
    return path


def _cfg(data_path, out, **training) -> FitConfig:
    model = dict(TINY_MODEL)
    if "ensemble" in training:
        model["ensemble"] = training.pop("ensemble")
    if "dtype" in training:
        model["dtype"] = training.pop("dtype")
    t = {
        "max_epochs": 8,
        "batch_size": 2,
        "optimizer": {"kind": "adam", "learning_rate": 0.01},
        "schedule": {"kind": "cosine", "warmup_epochs": 0, "final_fraction": 0.1},
        "plots": False,
    }
    t.update(training)
    data = {"path": str(data_path), "valid_fraction": 0.2, "test_fraction": 0.15}
    return validate_config(
        FitConfig, {"data": data, "model": model, "training": t, "output": str(out)}
    )


@pytest.fixture(scope="module")
def base_fit(emt_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit") / "run"
    cfg = _cfg(emt_data, out, max_epochs=12, plots=True)
    return cfg, run_fit(cfg, progress=False)


def test_loss_decreases_and_outputs_are_written(base_fit):
    cfg, res = base_fit
    hist = res.history
    assert len(hist) == 12 and hist[-1]["epoch"] == 12
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    assert hist[-1]["valid_forces_mae"] < hist[0]["valid_forces_mae"]
    out = res.output_dir
    for name in (
        "model.mlip",
        "metrics.csv",
        "results.json",
        "parity_energy.png",
        "parity_forces.png",
        "parity_stress.png",
        "learning_curve.png",
        CHECKPOINT_NAME,
    ):
        assert (out / name).is_file(), name
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 13))
    assert float(rows[-1]["valid_forces_mae"]) == pytest.approx(hist[-1]["valid_forces_mae"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["units"]["energy"] == "meV/atom"
    assert res.timings["compile_train_step"] > 0 and res.timings["structures_per_s"] > 0


def test_metrics_per_split_config_type_and_element(base_fit):
    _, res = base_fit
    assert set(res.metrics) == {"train", "valid", "test"}
    for split, groups in res.metrics.items():
        o = groups["overall"]
        for q in ("energy", "forces", "stress"):
            assert o[f"{q}_mae"] > 0 and o[f"{q}_rmse"] >= o[f"{q}_mae"], (split, q)
        assert "element/Cu" in groups
        assert {"config_type/rattled", "config_type/strained"} <= set(groups)
        n_e = sum(groups[f"config_type/{c}"]["energy_count"] for c in ("rattled", "strained"))
        assert n_e == o["energy_count"]


def test_saved_model_reproduces_reported_test_metrics(base_fit, emt_data):
    """The model file holds the evaluated parameters: recompute the test energy MAE with it."""
    import ase.io

    cfg, res = base_fit
    pot = load_potential(res.model_path)
    frames = ase.io.read(emt_data, ":")
    from mlipctl.data.dataset import split_indices

    split = split_indices(
        [a.info["config_type"] for a in frames], valid_fraction=0.2, test_fraction=0.15
    )
    errs = []
    for i in split.test:
        a = frames[int(i)]
        e_ref = a.get_potential_energy()
        out = pot.predict([a])[0]
        errs.append(abs(out["energy"] - e_ref) / len(a))
    assert 1000 * np.mean(errs) == pytest.approx(
        res.metrics["test"]["overall"]["energy_mae"], rel=1e-4
    )


def test_deep_ensemble_trains_in_one_step_members_differ_and_are_independent(emt_data, tmp_path):
    # SGD: unlike Adam its step depends on the gradient's scale, so clipping over the whole
    # ensemble instead of per member would change member 0's trajectory.
    common = {
        "max_epochs": 3,
        "dtype": "float64",
        "clip_grad_norm": 0.5,
        "optimizer": {"kind": "sgd", "learning_rate": 0.05, "momentum": 0.9},
        # The best epoch is chosen on the ensemble mean, so compare the last parameters.
        "keep_best": False,
    }
    deep = run_fit(
        _cfg(emt_data, tmp_path / "deep", ensemble={"kind": "deep", "size": 3}, **common),
        progress=False,
    )
    single = run_fit(_cfg(emt_data, tmp_path / "single", **common), progress=False)
    # One optimiser step per batch for the whole ensemble, not one per member.
    assert deep.steps == single.steps
    p_deep = load_potential(deep.model_path).params
    p_single = load_potential(single.model_path).params
    leaves = jax.tree_util.tree_leaves(p_deep)
    assert all(x.shape[0] == 3 for x in leaves)
    # Members differ ...
    assert not np.allclose(leaves[0][0], leaves[0][1])
    o = deep.metrics["test"]["overall"]
    maes = [o[f"member{k}_forces_mae"] for k in range(3)]
    assert len({round(m, 9) for m in maes}) == 3
    # ... and do not interact: member 0 (same init key as the single model) trained inside the
    # ensemble equals the single model trained alone, clipping included (per member).
    member0 = jax.tree_util.tree_map(lambda x: x[0], p_deep)
    for a, b in zip(
        jax.tree_util.tree_leaves(member0), jax.tree_util.tree_leaves(p_single), strict=True
    ):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-7, atol=1e-10)


class _Interrupt(Exception):
    pass


def _stop_after(n: int):
    def callback(row):
        if row["epoch"] >= n:
            raise _Interrupt

    return callback


def test_resume_after_interruption_equals_uninterrupted_run(emt_data, tmp_path):
    kw = {"max_epochs": 5, "checkpoint": {"every_epochs": 2, "every_seconds": None}}
    full = run_fit(_cfg(emt_data, tmp_path / "full", **kw), progress=False)

    cfg = _cfg(emt_data, tmp_path / "cut", **kw)
    with pytest.raises(_Interrupt):
        run_fit(cfg, progress=False, on_epoch_end=_stop_after(3))
    ckpt = load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)
    assert int(ckpt["trainer"]["epoch"]) == 2  # epoch 3 is lost: at most one interval
    # metrics.csv already has epoch 3; the resume drops it and redoes it.
    resumed = run_fit(cfg, resume=True, progress=False)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5]
    with (tmp_path / "cut" / "metrics.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4, 5]
    for split in ("valid", "test"):
        a, b = full.metrics[split]["overall"], resumed.metrics[split]["overall"]
        for key in ("energy_mae", "forces_mae", "stress_rmse"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (split, key)
    assert resumed.best_epoch == full.best_epoch
    assert any("resumed" in m for m in resumed.messages)


def test_resume_after_kill_inside_an_epoch(emt_data, tmp_path, monkeypatch):
    """A kill right after a time-based checkpoint in the middle of an epoch (every_seconds tiny:
    a checkpoint after every step) resumes from that step and ends like the full run."""
    import mlipctl.training.trainer as trainer

    kw = {"max_epochs": 3, "checkpoint": {"every_epochs": None, "every_seconds": 1e-9}}
    full = run_fit(_cfg(emt_data, tmp_path / "full", **kw), progress=False)
    steps_per_epoch = full.steps // 3
    assert steps_per_epoch >= 2

    real_save = trainer.save_checkpoint
    calls = []

    def save_then_die(path, payload):
        real_save(path, payload)
        calls.append(1)
        if len(calls) == steps_per_epoch + 2:  # + the end-of-epoch-1 save: 1 step into epoch 2
            raise _Interrupt

    cfg = _cfg(emt_data, tmp_path / "cut", **kw)
    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Interrupt):
        run_fit(cfg, progress=False)
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    t = load_checkpoint(tmp_path / "cut" / CHECKPOINT_NAME)["trainer"]
    assert (int(t["epoch"]), int(t["batch_in_epoch"])) == (1, 1)
    resumed = run_fit(cfg, resume=True, progress=False)
    assert resumed.steps == full.steps
    for split in ("valid", "test"):
        a, b = full.metrics[split]["overall"], resumed.metrics[split]["overall"]
        for key in ("energy_mae", "forces_mae"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (split, key)
    # The epoch-2 training loss is assembled from both sessions' partial sums.
    assert resumed.history[1]["train_loss"] == pytest.approx(full.history[1]["train_loss"])


def test_corrupted_checkpoint_gives_clear_error(base_fit, tmp_path):
    cfg, res = base_fit
    out = tmp_path / "copy"
    shutil.copytree(res.output_dir, out)
    cfg = cfg.model_copy(update={"output": str(out)})
    path = out / CHECKPOINT_NAME
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="corrupted"):
        run_fit(cfg, resume=True, progress=False)
    path.write_bytes(bytes(data[: len(data) // 3]))  # truncated (e.g. disk full)
    with pytest.raises(UserInputError, match="corrupted"):
        run_fit(cfg, resume=True, progress=False)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(UserInputError, match="not an mlipctl checkpoint"):
        run_fit(cfg, resume=True, progress=False)


def test_resume_with_a_different_config_is_refused(base_fit, emt_data, tmp_path):
    cfg, res = base_fit
    out = tmp_path / "copy"
    shutil.copytree(res.output_dir, out)
    changed = _cfg(emt_data, out, max_epochs=12, plots=True, batch_size=3)
    with pytest.raises(UserInputError, match=r"config differs.*training\.batch_size: 2 -> 3"):
        run_fit(changed, resume=True, progress=False)


def test_existing_fit_and_missing_checkpoint_are_clear_errors(base_fit, tmp_path):
    cfg, _ = base_fit
    with pytest.raises(UserInputError, match="already holds a fit"):
        run_fit(cfg, progress=False)
    fresh = cfg.model_copy(update={"output": str(tmp_path / "none")})
    with pytest.raises(UserInputError, match="no checkpoint to resume from"):
        run_fit(fresh, resume=True, progress=False)


def test_stress_weight_without_stress_labels_is_a_clear_error(emt_data, tmp_path):
    from mlipctl.data.io import read_structures

    items = read_structures(emt_data)
    for it in items:
        it.stress = None
    path = tmp_path / "nostress.extxyz"
    write_structures_atomic(path, items)
    cfg = _cfg(path, tmp_path / "o", loss={"kind": "mse", "stress_weight": 1.0})
    with pytest.raises(UserInputError, match="stress_weight is 1.0 but no training structure"):
        run_fit(cfg, progress=False)


def test_early_stopping_stops_and_keeps_best(emt_data, tmp_path):
    # min_delta so large that nothing after the first validation counts as an improvement.
    cfg = _cfg(
        emt_data,
        tmp_path / "es",
        max_epochs=30,
        early_stopping={"patience": 2, "min_delta": 1e9},
        standardize_features=True,
    )
    res = run_fit(cfg, progress=False)
    assert res.stopped_early and res.epochs_completed == 3
    assert res.best_epoch == 1
    assert any("early stopping after epoch 3" in m for m in res.messages)
    # The saved parameters are epoch 1's: the final validation metrics equal that row's.
    first = res.history[0]
    v = res.metrics["valid"]["overall"]
    assert v["forces_mae"] == pytest.approx(first["valid_forces_mae"], rel=1e-9)
    assert v["energy_rmse"] == pytest.approx(first["valid_energy_rmse"], rel=1e-9)
    # standardize_features set the descriptor shift from the data before training.
    shift = np.asarray(load_potential(res.model_path).params["params"]["feature_shift"])
    assert np.abs(shift).max() > 0


def test_early_stopping_waits_for_min_epochs(emt_data, tmp_path):
    cfg = _cfg(
        emt_data,
        tmp_path / "es",
        max_epochs=30,
        early_stopping={"patience": 2, "min_delta": 1e9, "min_epochs": 6},
    )
    res = run_fit(cfg, progress=False)
    assert res.stopped_early and res.epochs_completed == 6 and res.best_epoch == 1
    assert any("did not improve for 5 validations" in m for m in res.messages)


@pytest.mark.slow
def test_resume_after_kill_minus_9_of_a_real_process(emt_data, tmp_path):
    """SIGKILL a fit running in another process after its first checkpoints, then resume."""
    import os
    import signal
    import subprocess
    import sys
    import time

    kw = {"max_epochs": 6, "checkpoint": {"every_epochs": 1, "every_seconds": None}}
    cfg = _cfg(emt_data, tmp_path / "killed", **kw)
    code = (
        "import json, sys; from mlipctl.config.fit import FitConfig; "
        "from mlipctl.training.trainer import run_fit; "
        "run_fit(FitConfig.model_validate(json.loads(sys.argv[1])), progress=False)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, cfg.model_dump_json()])
    ckpt = tmp_path / "killed" / CHECKPOINT_NAME
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and int(load_checkpoint(ckpt)["trainer"]["epoch"]) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the fit ended before it could be killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    resumed = run_fit(cfg, resume=True, progress=False)
    full = run_fit(_cfg(emt_data, tmp_path / "full", **kw), progress=False)
    a, b = full.metrics["test"]["overall"], resumed.metrics["test"]["overall"]
    for key in ("energy_mae", "forces_mae", "stress_rmse"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key


def test_stage_two_switches_the_weights_and_the_best_model_comes_from_it(emt_data, tmp_path):
    two = {"start_fraction": 0.5, "energy_weight": 40.0, "forces_weight": 0.5}
    kw = {
        "max_epochs": 6,
        "stage_two": two,
        # Nothing counts as an improvement after a stage's first validation.
        "early_stopping": {"patience": 100, "min_delta": 1e9},
        "checkpoint": {"every_epochs": 2, "every_seconds": None},
    }
    cfg = _cfg(emt_data, tmp_path / "full", **kw)
    assert cfg.training.stage_two_epoch() == 3
    full = run_fit(cfg, progress=False)
    assert [r["loss_stage"] for r in full.history] == [1, 1, 1, 2, 2, 2]
    for row in full.history:
        we, wf = (1.0, 1.0) if row["loss_stage"] == 1 else (40.0, 0.5)
        expect = we * row["train_energy_loss"] + wf * row["train_forces_loss"]
        assert row["train_loss"] == pytest.approx(expect, rel=1e-9)
    # The stage-one best (epoch 1) is dropped: losses with other weights do not compare.
    assert full.best_epoch == 4
    with (tmp_path / "full" / "metrics.csv").open() as fh:
        assert [r["loss_stage"] for r in csv.DictReader(fh)] == ["1"] * 3 + ["2"] * 3

    # Interrupted in stage two with the last checkpoint in stage one: the resume crosses the
    # switch again and ends like the uninterrupted fit.
    cut = _cfg(emt_data, tmp_path / "cut", **kw)
    with pytest.raises(_Interrupt):
        run_fit(cut, progress=False, on_epoch_end=_stop_after(5))
    resumed = run_fit(cut, resume=True, progress=False)
    assert resumed.best_epoch == 4
    a, b = full.metrics["valid"]["overall"], resumed.metrics["valid"]["overall"]
    for key in ("energy_mae", "forces_mae"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key


def test_stage_two_that_would_never_start_is_rejected(emt_data, tmp_path):
    two = {"start_fraction": 0.9, "energy_weight": 40.0}
    with pytest.raises(UserInputError, match="stage_two would start at epoch 4 of 3"):
        _cfg(emt_data, tmp_path, max_epochs=3, stage_two=two)
    assert _cfg(emt_data, tmp_path, max_epochs=10, stage_two=two).training.stage_two_epoch() == 9


def test_stage_two_stress_needs_stress_in_the_whole_fit(emt_data, tmp_path):
    with pytest.raises(UserInputError, match="stage_two.stress_weight"):
        _cfg(emt_data, tmp_path, stage_two={"energy_weight": 10.0, "stress_weight": 1.0})
