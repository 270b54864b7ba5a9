"""The readout refit (``training.refit``): exact least squares on the last linear layer."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from mlipctl.config.fit import FitConfig
from mlipctl.config.loader import ConfigError, validate_config
from mlipctl.data.batching import BatchLoader
from mlipctl.data.dataset import load_dataset
from mlipctl.model.potential import load_potential, make_predict
from mlipctl.training.loss import LossSettings, batch_loss
from mlipctl.training.refit import readout_names
from mlipctl.training.trainer import run_fit
from tests.test_training_fit import _cfg, emt_data  # noqa: F401  (fixture)

REFIT = {"energy_weight": 50.0, "forces_weight": 1.0, "stress_weight": 0.0}


def _split_loss_and_grad(cfg: FitConfig, path):
    """The training loss over the whole training split in one batch (so the per-batch mean is
    the split's mean, as in the refit) and its gradient w.r.t. the readout's last layer."""
    pot = load_potential(path)
    data = load_dataset(cfg.data)
    loader = BatchLoader(
        data.train, pot.spec.cutoff, pot.spec.type_map(), batch_size=len(data.train)
    )
    graph, targets = loader.make_batch(loader.index_batches(0)[0])
    predict = make_predict(pot.spec, stress=False)
    settings = LossSettings(energy_weight=50.0, forces_weight=1.0)
    names = readout_names(pot.params)

    def loss(leaves):
        readout = {**pot.params["params"]["readout"], **leaves}
        p = {"params": {**pot.params["params"], "readout": readout}}
        pred = predict(p, graph)
        return batch_loss(pred.energy, pred.forces, None, graph, targets, settings).total[0]

    leaves = {n: pot.params["params"]["readout"][n] for n in names}
    value, grad = jax.value_and_grad(loss)(leaves)
    return float(value), np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grad)])


def test_refit_finds_the_least_squares_minimum(emt_data, tmp_path):  # noqa: F811
    common = {"max_epochs": 4, "dtype": "float64", "early_stopping": {"enabled": False}}
    plain = _cfg(emt_data, tmp_path / "plain", **common)
    refit = _cfg(emt_data, tmp_path / "refit", refit={**REFIT, "ridge": 0.0}, **common)
    res_plain = run_fit(plain, progress=False)
    res = run_fit(refit, progress=False)
    before, g_before = _split_loss_and_grad(plain, res_plain.model_path)
    after, g_after = _split_loss_and_grad(refit, res.model_path)
    # Same training, then the exact minimum of the split's loss over the last layer: the
    # gradient there vanishes, and the loss is the one the refit predicted from its sums.
    assert after < 0.5 * before
    assert np.linalg.norm(g_after) < 1e-6 * np.linalg.norm(g_before)
    member = res.refit["members"][0]
    assert member["ridge"] == 0.0
    assert member["train_loss_before"] == pytest.approx(before, rel=1e-9)
    assert member["train_loss_after"] == pytest.approx(after, rel=1e-6)


def test_refit_chooses_the_ridge_on_validation_and_is_recorded(emt_data, tmp_path):  # noqa: F811
    cfg = _cfg(emt_data, tmp_path / "run", max_epochs=4, refit=REFIT)
    res = run_fit(cfg, progress=False)
    member = res.refit["members"][0]
    assert member["train_loss_after"] <= member["train_loss_before"]
    assert member["valid_loss_after"] <= member["valid_loss_before"]
    assert member["n_parameters"] == 8 + 1 + 5  # hidden 8 -> 1, its bias, linear on 5 features
    assert any(m.startswith("readout refit") for m in res.messages)
    assert res.timings["refit"] > 0
    assert load_potential(res.model_path).metadata["refit"]["members"][0] == member


def test_deep_ensemble_members_are_refitted_each(emt_data, tmp_path):  # noqa: F811
    cfg = _cfg(
        emt_data,
        tmp_path / "deep",
        max_epochs=3,
        ensemble={"kind": "deep", "size": 2},
        refit={**REFIT, "ridge": 1e-6},
    )
    res = run_fit(cfg, progress=False)
    members = res.refit["members"]
    assert len(members) == 2
    assert all(m["train_loss_after"] < m["train_loss_before"] for m in members)
    o = res.metrics["test"]["overall"]
    assert o["member0_forces_mae"] != o["member1_forces_mae"]


def test_refit_config_rules(emt_data, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="shallow ensemble"):
        _cfg(emt_data, tmp_path, ensemble={"kind": "shallow", "size": 2}, refit=REFIT)
    data = {"path": str(emt_data), "valid_fraction": 0.0}
    training = {"refit": REFIT, "early_stopping": {"enabled": False}}
    with pytest.raises(ConfigError, match="chooses it on validation data"):
        validate_config(FitConfig, {"data": data, "training": training, "output": str(tmp_path)})
    training["refit"] = {**REFIT, "ridge": 1e-6}
    validate_config(FitConfig, {"data": data, "training": training, "output": str(tmp_path)})
    with pytest.raises(ConfigError, match="refit.stress_weight"):
        _cfg(
            emt_data,
            tmp_path,
            refit={**REFIT, "stress_weight": 1.0},
            loss={"kind": "mse", "stress_weight": 0},
        )


def test_a_finished_fit_resumes_with_another_refit(emt_data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    first = run_fit(_cfg(emt_data, out, max_epochs=3), progress=False)
    assert first.refit is None
    again = run_fit(_cfg(emt_data, out, max_epochs=3, refit=REFIT), resume=True, progress=False)
    # No further training: the same epochs and steps, then the refit of the same parameters.
    assert (again.epochs_completed, again.steps) == (first.epochs_completed, first.steps)
    assert again.history == first.history
    member = again.refit["members"][0]
    assert member["train_loss_after"] <= member["train_loss_before"]
    assert load_potential(out / "model.mlip").metadata["refit"]["members"][0] == member
