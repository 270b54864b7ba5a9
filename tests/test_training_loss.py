"""Loss and metrics: padding never counts, accumulation is exact, units are as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase.build import bulk
from ase.calculators.emt import EMT

from mlipctl.data.graph import Targets
from mlipctl.data.neighbors import build_graph
from mlipctl.training.loss import (
    EV_PER_A3_TO_GPA,
    LossSettings,
    MetricAccumulator,
    batch_loss,
    metric_value,
)

TYPE_MAP = {29: 0}


def _structures(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((1, 1, 1 + k % 2))
        a.rattle(0.05, seed=int(rng.integers(1 << 30)))
        a.calc = EMT()
        out.append((a, a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=False)))
    return out


def _batch(items, *, n_atoms=None, n_structures=None):
    atoms = [x[0] for x in items]
    g = build_graph(atoms, 3.0, TYPE_MAP, n_atoms=n_atoms, n_structures=n_structures)
    B, N = g.structure_mask.shape[0], g.positions.shape[0]
    energy = np.zeros(B)
    forces = np.zeros((N, 3))
    stress = np.zeros((B, 3, 3))
    a0 = 0
    for s, (a, e, f, st) in enumerate(items):
        energy[s], stress[s] = e, st
        forces[a0 : a0 + len(a)] = f
        a0 += len(a)
    real = g.structure_mask.copy()
    t = Targets(
        energy=energy,
        forces=forces,
        stress=stress,
        has_energy=real,
        has_forces=real,
        has_stress=real,
        weight=real.astype(np.float64),
    )
    return g, t


def _noisy_predictions(g, t, K=2, seed=1):
    """Predictions = labels + noise on real entries; padding gets *exactly* the label (0), so
    counting padding would shrink every error."""
    rng = np.random.default_rng(seed)
    B, N = t.energy.shape[0], t.forces.shape[0]
    e = t.energy[None] + rng.normal(0, 0.05, (K, B)) * g.structure_mask[None]
    f = t.forces[None] + rng.normal(0, 0.1, (K, N, 3)) * g.atom_mask[None, :, None]
    s = t.stress[None] + rng.normal(0, 0.01, (K, B, 3, 3)) * g.structure_mask[None, :, None, None]
    return e, f, s


def _reference_metrics(items, e, f, s):
    """Hand-computed errors of the ensemble mean over the real entries only."""
    e_err, f_err, s_err = [], [], []
    a0 = 0
    for i, (a, e_ref, f_ref, s_ref) in enumerate(items):
        n = len(a)
        e_err.append((e[:, i].mean() - e_ref) / n)
        f_err.append(f[:, a0 : a0 + n].mean(axis=0) - f_ref)
        s_err.append(s[:, i].mean(axis=0) - s_ref)
        a0 += n
    e_err = np.array(e_err)
    f_err = np.concatenate(f_err).ravel()
    s_err = np.array(s_err).ravel()
    return {
        "energy_mae": 1000 * np.abs(e_err).mean(),
        "energy_rmse": 1000 * np.sqrt(np.mean(e_err**2)),
        "forces_mae": np.abs(f_err).mean(),
        "forces_rmse": np.sqrt(np.mean(f_err**2)),
        "stress_mae": EV_PER_A3_TO_GPA * np.abs(s_err).mean(),
        "stress_rmse": EV_PER_A3_TO_GPA * np.sqrt(np.mean(s_err**2)),
    }


def test_metrics_ignore_padding_atoms_and_slots():
    items = _structures(3)
    n_real = sum(len(x[0]) for x in items)
    g, t = _batch(items, n_atoms=n_real + 40, n_structures=6)
    assert (~g.atom_mask).sum() == 40 and (~g.structure_mask).sum() == 3
    e, f, s = _noisy_predictions(g, t)
    acc = MetricAccumulator(species=["Cu"])
    acc.update(e, f, s, g, t)
    got = acc.result()["overall"]
    want = _reference_metrics(items, e, f, s)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert got["forces_count"] == 3 * n_real
    assert got["energy_count"] == 3
    # Had the 40 padding atoms (exact zero error) been counted, the force MAE would be lower.
    diluted = want["forces_mae"] * n_real / (n_real + 40)
    assert got["forces_mae"] > diluted * 1.05


def test_metrics_accumulate_exactly_across_uneven_batches():
    items = _structures(5, seed=3)
    whole_g, whole_t = _batch(items)
    e, f, s = _noisy_predictions(whole_g, whole_t, seed=7)
    one = MetricAccumulator(species=["Cu"])
    one.update(e, f, s, whole_g, whole_t)

    # Same predictions cut into batches of 1 and 4 structures (different atom counts, padded).
    split = MetricAccumulator(species=["Cu"])
    n1 = len(items[0][0])
    for sl, asl in ((slice(0, 1), slice(0, n1)), (slice(1, 5), slice(n1, None))):
        sub = items[sl]
        g, t = _batch(sub, n_atoms=sum(len(x[0]) for x in sub) + 8)
        N = g.positions.shape[0]
        fe = np.zeros((e.shape[0], N, 3))
        n_sub = sum(len(x[0]) for x in sub)
        fe[:, :n_sub] = f[:, asl]
        B = g.structure_mask.shape[0]
        ee = np.zeros((e.shape[0], B))
        ee[:, : len(sub)] = e[:, sl]
        ss = np.zeros((e.shape[0], B, 3, 3))
        ss[:, : len(sub)] = s[:, sl]
        split.update(ee, fe, ss, g, t)
    a, b = one.result()["overall"], split.result()["overall"]
    for key in ("energy_mae", "energy_rmse", "forces_mae", "forces_rmse", "stress_rmse"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
    # The mean of the two batch RMSEs is a different (wrong) number: make sure we are not it.
    assert a["energy_count"] == 5


def test_metrics_groups_by_config_type_and_element():
    items = _structures(4)
    g, t = _batch(items, n_atoms=sum(len(x[0]) for x in items) + 4)
    e, f, s = _noisy_predictions(g, t)
    acc = MetricAccumulator(species=["Cu"])
    acc.update(e, f, s, g, t, config_types=["bulk", "md", "bulk", "md"])
    res = acc.result()
    assert res["config_type/bulk"]["energy_count"] == 2
    assert res["config_type/md"]["forces_count"] == 3 * (len(items[1][0]) + len(items[3][0]))
    assert res["element/Cu"]["forces_mae"] == pytest.approx(res["overall"]["forces_mae"])
    bulk_err = [(e[:, i].mean() - items[i][1]) / len(items[i][0]) for i in (0, 2)]
    assert res["config_type/bulk"]["energy_mae"] == pytest.approx(1000 * np.mean(np.abs(bulk_err)))
    with pytest.raises(ValueError, match="config_type labels"):
        acc.update(e, f, s, g, t, config_types=["bulk"])


def test_loss_ignores_padding_and_uses_weights():
    items = _structures(2)
    n_real = sum(len(x[0]) for x in items)
    g, t = _batch(items, n_atoms=n_real + 16, n_structures=4)
    e, f, s = _noisy_predictions(g, t, K=3)
    # Garbage on padding entries must not change the loss: they are masked, not just zero.
    f_bad = f.copy()
    f_bad[:, ~g.atom_mask] = 123.0
    e_bad = e.copy()
    e_bad[:, ~g.structure_mask] = -99.0
    settings = LossSettings(energy_weight=2.0, forces_weight=0.5, stress_weight=3.0)
    clean = batch_loss(e, f, s, g, t, settings)
    dirty = batch_loss(e_bad, f_bad, s, g, t, settings)
    np.testing.assert_allclose(np.asarray(clean.total), np.asarray(dirty.total), rtol=1e-12)
    assert np.asarray(clean.total).shape == (3,)

    # Hand computation of member 0.
    n = np.array([len(x[0]) for x in items], dtype=float)
    e_err = (e[0, :2] - t.energy[:2]) / n
    f_err = (f[0] - t.forces)[g.atom_mask]
    s_err = (s[0] - t.stress)[:2]
    want = 2.0 * np.mean(e_err**2) + 0.5 * np.mean(f_err**2) + 3.0 * np.mean(s_err**2)
    assert float(clean.total[0]) == pytest.approx(want, rel=1e-10)

    # Weight 0 on a structure removes it from the energy term (and from the mean's count).
    t0 = t._replace(weight=np.array([1.0, 0.0, 0.0, 0.0]))
    only_first = batch_loss(e, f, s, g, t0, LossSettings(1.0, 0.0, 0.0))
    assert float(only_first.total[0]) == pytest.approx(e_err[0] ** 2, rel=1e-10)

    # Weights multiply: a weight of 5 on the first structure adds 4 more of its terms.
    t5 = t._replace(weight=np.array([5.0, 1.0, 0.0, 0.0]))
    heavy = batch_loss(e, f, s, g, t5, LossSettings(1.0, 0.0, 0.0))
    want5 = (5.0 * e_err[0] ** 2 + e_err[1] ** 2) / 2
    assert float(heavy.total[0]) == pytest.approx(want5, rel=1e-10)


def test_a_weight_counts_in_a_batch_of_one_structure():
    """A config_type weight must change the loss of a batch holding only that structure (a
    weighted mean sum(w x)/sum(w) would cancel it there: batch size 1 would ignore weights)."""
    items = _structures(1)
    g, t = _batch(items)
    e, f, s = _noisy_predictions(g, t, K=1)
    base = batch_loss(e, f, s, g, t, LossSettings(1.0, 1.0, 1.0))
    heavy = batch_loss(e, f, s, g, t._replace(weight=t.weight * 5.0), LossSettings(1.0, 1.0, 1.0))
    np.testing.assert_allclose(np.asarray(heavy.total), 5.0 * np.asarray(base.total), rtol=1e-12)


def test_huber_is_quadratic_below_delta_and_linear_above():
    items = _structures(1)
    g, t = _batch(items)
    e = t.energy[None] + np.array([[0.001 * len(items[0][0])]])  # 1 meV/atom error
    f = t.forces[None].copy()
    small = batch_loss(e, f, None, g, t, LossSettings(1.0, 1.0, 0.0, "huber", 0.01))
    assert float(small.energy[0]) == pytest.approx(1e-6, rel=1e-9)
    e_big = t.energy[None] + np.array([[1.0 * len(items[0][0])]])  # 1 eV/atom error
    big = batch_loss(e_big, f, None, g, t, LossSettings(1.0, 1.0, 0.0, "huber", 0.01))
    assert float(big.energy[0]) == pytest.approx(2 * 0.01 * 1.0 - 0.01**2, rel=1e-9)
    mse = batch_loss(e_big, f, None, g, t, LossSettings(1.0, 1.0, 0.0, "mse"))
    assert float(mse.energy[0]) == pytest.approx(1.0, rel=1e-9)


def test_batch_without_labels_gives_zero_not_nan():
    items = _structures(1)
    g, t = _batch(items)
    none = np.zeros_like(t.has_energy)
    t = t._replace(has_energy=none, has_forces=none, has_stress=none)
    e, f, s = _noisy_predictions(g, t)
    parts = batch_loss(e, f, s, g, t, LossSettings(1.0, 1.0, 1.0))
    assert np.all(np.asarray(parts.total) == 0.0)


def test_metric_value_names_missing_metric():
    overall = {"energy_mae": 1.0, "energy_mse_train_units": 4e-6, "forces_mse_train_units": 0.01}
    s = LossSettings(energy_weight=1.0, forces_weight=2.0)
    assert metric_value("loss", overall, s) == pytest.approx(4e-6 + 0.02)
    assert metric_value("energy_mae", overall, s) == 1.0
    with pytest.raises(ValueError, match="stress"):
        metric_value("stress_mae", overall, s)
    assert math.isfinite(metric_value("loss", {}, s))
