"""Global NLL recalibration, the finite-ensemble correction and the Student-t predictive."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlipctl.errors import UserInputError
from mlipctl.uncertainty import calibration as C
from mlipctl.uncertainty import metrics as M


def _gaussian(seed: int, n: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.02, 0.5, n)
    return sigma * rng.normal(size=n), sigma


def test_overconfident_by_two_is_recovered():
    r, sigma = _gaussian(0)
    cal = C.fit_scale(r, sigma / 2, finite_ensemble_correction=False, target="forces")
    assert cal.scale == pytest.approx(2.0, rel=0.02)
    assert cal.scale_stderr == pytest.approx(2.0 / np.sqrt(2 * r.size), rel=0.02)
    assert cal.variance_factor == 1.0
    assert cal.nll_after < cal.nll_before - 0.5
    assert cal.coverage_68 == pytest.approx(0.6827, abs=0.01)
    assert cal.coverage_95 == pytest.approx(0.95, abs=0.01)
    after = M.evaluate(r, cal.apply(sigma / 2))
    assert after.ece < 0.01
    assert after.ence < 0.04
    assert M.evaluate(r, sigma / 2).ece > 0.2


def test_closed_form_is_the_nll_minimum():
    r, sigma = _gaussian(1, 2000)
    cal = C.fit_scale(r, sigma * 0.7, ensemble_size=4)
    best = M.gaussian_nll(r, cal.apply(sigma * 0.7))
    assert best == pytest.approx(cal.nll_after)
    for f in (0.98, 1.02, 0.9, 1.1):
        assert M.gaussian_nll(r, f * cal.apply(sigma * 0.7)) > best
    # The correction only splits the same sigma factor differently between s and c.
    plain = C.fit_scale(r, sigma * 0.7, finite_ensemble_correction=False)
    assert cal.sigma_factor == pytest.approx(plain.sigma_factor, rel=1e-12)
    assert cal.scale == pytest.approx(plain.scale / np.sqrt(5 / 4), rel=1e-12)


def test_variance_factor_values():
    assert C.ensemble_variance_factor(4) == pytest.approx(5 / 4)
    assert C.ensemble_variance_factor(4, ddof=0) == pytest.approx(5 / 3)
    with pytest.raises(UserInputError, match=">= 2 members"):
        C.ensemble_variance_factor(1)


@pytest.mark.parametrize("ddof", [1, 0])
def test_variance_factor_matches_exchangeable_simulation(ddof):
    # Members and truth are i.i.d. draws: Var(y - mean) / E[sample var] = c.
    rng = np.random.default_rng(10 + ddof)
    k, n = 5, 200_000
    tau = rng.uniform(0.5, 2.0, n)
    members = tau * rng.normal(size=(k, n))
    y = tau * rng.normal(size=n)
    mean, std = C.ensemble_mean_std(members, ddof=ddof)
    ratio = np.mean(((y - mean) / tau) ** 2) / np.mean((std / tau) ** 2)
    assert ratio == pytest.approx(C.ensemble_variance_factor(k, ddof), rel=0.02)


def test_student_t_is_exact_for_exchangeable_ensemble():
    # With the ddof=1 spread of K members, (y - mean) / (sigma sqrt(c)) ~ t(K - 1): the Student-t
    # fit gives s = 1, while the Gaussian fit must absorb the t variance nu / (nu - 2).
    rng = np.random.default_rng(3)
    k, n = 8, 40_000
    tau = rng.uniform(0.01, 0.1, n)
    members = tau * rng.normal(size=(k, n))
    y = tau * rng.normal(size=n)
    mean, std = C.ensemble_mean_std(members)
    t_cal = C.fit_scale_student_t(y - mean, std, ensemble_size=k, target="energy_per_atom")
    g_cal = C.fit_scale(y - mean, std, ensemble_size=k)
    nu = k - 1
    assert t_cal.scale == pytest.approx(1.0, abs=0.03)
    assert t_cal.dof == nu
    assert g_cal.scale**2 == pytest.approx(nu / (nu - 2), rel=0.06)
    assert t_cal.nll_after < g_cal.nll_after
    assert t_cal.coverage_68 == pytest.approx(0.6827, abs=0.01)
    assert t_cal.coverage_95 == pytest.approx(0.95, abs=0.01)


def test_student_t_scale_is_the_nll_minimum():
    r, sigma = _gaussian(4, 3000)
    cal = C.fit_scale_student_t(r, sigma, ensemble_size=4)
    best = M.student_t_nll(r, cal.apply(sigma), cal.dof)
    for f in (0.97, 1.03):
        assert M.student_t_nll(r, f * cal.apply(sigma), cal.dof) > best


def test_per_atom_energy_normalisation_keeps_the_scale():
    rng = np.random.default_rng(5)
    b = 400
    n_atoms = rng.integers(1, 200, b)
    sigma = 0.01 * n_atoms * rng.uniform(0.5, 2.0, b)
    ref = -3.5 * n_atoms + sigma * 1.5 * rng.normal(size=b)
    pred = -3.5 * n_atoms
    r_tot, s_tot = C.energy_errors(pred, sigma, ref, n_atoms, per_atom=False)
    r_pa, s_pa = C.energy_errors(pred, sigma, ref, n_atoms, per_atom=True)
    np.testing.assert_allclose(r_pa, (ref - pred) / n_atoms)
    a = C.fit_scale(r_tot, s_tot, finite_ensemble_correction=False)
    p = C.fit_scale(r_pa, s_pa, finite_ensemble_correction=False, target="energy_per_atom")
    assert p.scale == pytest.approx(a.scale, rel=1e-12)
    assert a.nll_after - p.nll_after == pytest.approx(np.mean(np.log(n_atoms)), rel=1e-10)
    mask = np.arange(b) < 10
    assert C.energy_errors(pred, sigma, ref, n_atoms, mask=mask)[0].shape == (10,)


def test_force_components_masked_and_broadcast():
    pred = np.arange(12.0).reshape(4, 3)
    ref = pred + 1.0
    sigma_atom = np.array([1.0, 2.0, 3.0, 4.0])
    mask = np.array([True, True, True, False])  # last atom is padding
    r, s = C.force_component_errors(pred, sigma_atom, ref, mask=mask)
    assert r.shape == s.shape == (9,)
    np.testing.assert_array_equal(r, np.ones(9))
    np.testing.assert_array_equal(s, np.repeat([1.0, 2.0, 3.0], 3))
    with pytest.raises(UserInputError, match=r"\(N, 3\)"):
        C.force_component_errors(pred[:, :2], sigma_atom, ref[:, :2])


def test_round_trip_and_bad_records():
    r, sigma = _gaussian(6, 500)
    cal = C.fit_scale(r, sigma, ensemble_size=3)
    d = json.loads(json.dumps(cal.to_dict()))
    assert C.Calibration.from_dict(d) == cal
    with pytest.raises(UserInputError, match="missing keys"):
        C.Calibration.from_dict({k: v for k, v in d.items() if k != "scale"})
    with pytest.raises(UserInputError, match="invalid scale"):
        C.Calibration.from_dict({**d, "scale": -1.0})


def test_bad_input_is_named():
    with pytest.raises(UserInputError, match="ensemble_size"):
        C.fit_scale([1.0, 2.0], [1.0, 1.0])
    with pytest.raises(UserInputError, match=r"calibration \(forces\).*NaN"):
        C.fit_scale([1.0, np.nan], [1.0, 1.0], finite_ensemble_correction=False, target="forces")
    with pytest.raises(UserInputError, match="all residuals are zero"):
        C.fit_scale([0.0, 0.0], [1.0, 1.0], finite_ensemble_correction=False)
    with pytest.raises(UserInputError, match=">= 2 members"):
        C.ensemble_mean_std(np.ones((1, 5)))
