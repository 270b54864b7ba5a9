"""Tied per-order radial channels: W + D_order, with decoupled decay of the deviations D."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from ase.build import bulk
from pydantic import ValidationError

from mlipctl.config.model import ModelConfig, MomentModelConfig
from mlipctl.config.training import TrainingConfig
from mlipctl.data.batching import BatchLoader
from mlipctl.data.io import Labelled
from mlipctl.data.neighbors import build_graph
from mlipctl.model.potential import ModelSpec, init_params, make_energy
from mlipctl.training.loss import LossSettings
from mlipctl.training.trainer import TrainState, make_train_step

ARCH = {"kind": "moment", "cutoff": 4.0, "n_radial": 3, "n_basis": 6, "hidden": [8]}


def _spec(**arch: object) -> ModelSpec:
    config = ModelConfig(architecture={**ARCH, **arch}, dtype="float64")
    return ModelSpec(config=config, species=("Cu", "Ni"), offsets=(0.0, 0.0))


def _atoms():
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.symbols[[0, 5, 9]] = "Ni"
    atoms.rattle(0.1, seed=3)
    return atoms


def _energy(spec: ModelSpec, params: dict) -> float:
    graph = build_graph([_atoms()], spec.cutoff, spec.type_map())
    return float(np.sum(np.asarray(make_energy(spec)(params, graph))[:, 0]))


def test_tie_needs_per_order_channels():
    with pytest.raises(ValidationError, match="radial_per_order"):
        MomentModelConfig(radial_tie_decay=1.0)
    with pytest.raises(ValidationError):
        MomentModelConfig(radial_per_order=True, radial_tie_decay=-1.0)


def test_tied_weights_are_shared_set_plus_deviation():
    tied = _spec(radial_per_order=True, radial_tie_decay=2.0)
    params = init_params(tied, 0)
    inner = params["params"]
    c, sets = 3, 4
    assert inner["radial"].shape[-1] == c and inner["radial_delta"].shape[-1] == c * sets
    assert not np.any(np.asarray(inner["radial_delta"]))

    # Zero deviations: the same energy as one radial set shared by all orders.
    shared = _spec()
    shared_params = {"params": {k: v for k, v in inner.items() if k != "radial_delta"}}
    e_tied = _energy(tied, params)
    assert e_tied == pytest.approx(_energy(shared, shared_params), rel=1e-12, abs=1e-12)

    # Non-zero deviations: the same energy as independent per-order sets W + D_order.
    delta = np.random.default_rng(0).normal(0, 0.3, inner["radial_delta"].shape)
    params = {"params": {**inner, "radial_delta": delta}}
    untied = _spec(radial_per_order=True)
    untied_inner = {k: v for k, v in inner.items() if k != "radial_delta"}
    untied_inner["radial"] = np.tile(np.asarray(inner["radial"]), (1, 1, sets)) + delta
    e_dev = _energy(tied, params)
    assert abs(e_dev - e_tied) > 1e-6
    assert e_dev == pytest.approx(_energy(untied, {"params": untied_inner}), rel=1e-12, abs=1e-12)


def test_training_step_decays_the_deviations_only():
    """One step at rates a and b: the deviations differ by -lr (a - b) D, nothing else does."""
    rng = np.random.default_rng(1)
    data = []
    for k in range(2):
        atoms = _atoms()
        atoms.rattle(0.05, seed=10 + k)
        n = len(atoms)
        data.append(
            Labelled(
                atoms=atoms,
                energy=-3.5 * n,
                forces=rng.normal(0, 0.2, (n, 3)),
                stress=None,
                config_type="bulk",
                weight=1.0,
                index=k,
            )
        )
    loader = BatchLoader(data, 4.0, _spec().type_map(), batch_size=2, seed=0)
    graph, targets = next(iter(loader.epoch(0)))
    tcfg = TrainingConfig()
    weights = LossSettings.from_config(tcfg.loss).weights()
    lr = 1e-2
    delta = rng.normal(0, 0.3, (4, 6, 12))  # (species pairs, n_basis, n_radial * 4 orders)
    out = {}
    for rate in (0.5, 3.0):
        spec = _spec(radial_per_order=True, radial_tie_decay=rate)
        params = init_params(spec, 0)
        params = {"params": {**params["params"], "radial_delta": delta}}
        tx, step = make_train_step(spec, tcfg)
        state = TrainState(params, params, tx.init(params))
        new, _ = jax.jit(step)(state, graph, targets, np.float64(lr), np.int64(0), weights)
        out[rate] = new.params["params"]
    diff = np.asarray(out[0.5]["radial_delta"]) - np.asarray(out[3.0]["radial_delta"])
    np.testing.assert_allclose(diff, lr * (3.0 - 0.5) * delta, rtol=1e-9, atol=1e-12)
    for name in ("radial", "feature_shift"):
        np.testing.assert_array_equal(np.asarray(out[0.5][name]), np.asarray(out[3.0][name]))
