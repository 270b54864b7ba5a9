"""Calibration metrics: agreement with uncertainty-toolbox, hand-computed values, synthetic data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from mlipctl.errors import UserInputError
from mlipctl.uncertainty import metrics as M

HALF_LOG_2PI = 0.5 * np.log(2 * np.pi)


def _random_case(seed: int, n: int, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.1, 2.0, n)
    mu = rng.normal(size=n)
    y = mu + factor * sigma * rng.normal(size=n)
    return mu, sigma, y


@pytest.mark.parametrize(("n", "factor"), [(3, 1.0), (7, 1.0), (50, 0.5), (1000, 2.0), (5000, 1.3)])
def test_matches_uncertainty_toolbox(n, factor):
    mc = pytest.importorskip("uncertainty_toolbox.metrics_calibration")
    mu, sigma, y = _random_case(n, n, factor)
    kw = {"vectorized": True, "prop_type": "interval"}
    assert M.ece(y - mu, sigma) == pytest.approx(
        mc.mean_absolute_calibration_error(mu, sigma, y, **kw), abs=1e-12
    )
    assert M.rms_calibration_error(y - mu, sigma) == pytest.approx(
        mc.root_mean_squared_calibration_error(mu, sigma, y, **kw), abs=1e-12
    )
    assert M.miscalibration_area(y - mu, sigma) == pytest.approx(
        mc.miscalibration_area(mu, sigma, y, **kw), abs=1e-12
    )
    assert M.sharpness(sigma) == pytest.approx(mc.sharpness(sigma), rel=1e-12)


def test_hand_computed_calibration_curve():
    # uncertainty-toolbox's own fixture: |r|/sigma = 5, 2, 1.
    mu = np.array([1.0, 2.0, 3.0])
    sigma = np.array([0.1, 0.5, 1.0])
    y = np.array([1.5, 3.0, 2.0])
    # A point with |z| lies inside the centred interval of proportion p iff p >= 2 Phi(|z|) - 1.
    p = np.linspace(0, 1, 100)
    need = 2 * stats.norm.cdf([5.0, 2.0, 1.0]) - 1
    expected_obs = np.array([np.sum(pi >= need) / 3 for pi in p])
    # In grid indices: z=1 enters at i=68 (p=0.687 > 0.6827), z=2 at i=95, z=5 only at p=1.
    assert np.flatnonzero(np.diff(expected_obs)).tolist() == [67, 94, 98]
    exp_p, obs = M.calibration_curve(y - mu, sigma)
    np.testing.assert_array_equal(exp_p, p)
    np.testing.assert_allclose(obs, expected_obs, atol=0)
    ece = np.mean(np.abs(p - expected_obs))
    assert M.ece(y - mu, sigma) == pytest.approx(ece, abs=1e-15)
    # Values printed by uncertainty-toolbox 0.1.1 on the same arrays (vectorized, interval).
    assert M.ece(y - mu, sigma) == pytest.approx(0.3733333333333335, abs=1e-14)
    assert M.rms_calibration_error(y - mu, sigma) == pytest.approx(0.4165757476562379, abs=1e-14)
    assert M.miscalibration_area(y - mu, sigma) == pytest.approx(0.37710437710437716, abs=1e-14)


def test_miscalibration_area_splits_crossing_segments():
    # f goes from +1 to -1 across one unit: two triangles of area 1/4 each.
    assert M._area_between(np.array([0.0, 1.0]), np.array([1.0, -1.0])) == pytest.approx(0.5)
    # f from 1 to -3: crossing at 1/4 -> 1/8 + 3 * 3/4 / 2 = 1.25.
    assert M._area_between(np.array([0.0, 1.0]), np.array([1.0, -3.0])) == pytest.approx(1.25)
    assert M._area_between(np.array([0.0, 2.0]), np.array([1.0, 3.0])) == pytest.approx(4.0)


def test_calibrated_gaussian_data_scores_as_calibrated():
    rng = np.random.default_rng(1)
    n = 20000
    sigma = rng.uniform(0.05, 1.5, n)
    r = sigma * rng.normal(size=n)
    m = M.evaluate(r, sigma, n_bins=10)
    assert m.ece < 0.01
    assert m.miscalibration_area < 0.01
    assert m.rms_calibration_error < 0.012
    assert m.ence < 0.04
    assert m.z_rms == pytest.approx(1.0, abs=0.02)
    # E[NLL] = 0.5 log 2 pi + E[log sigma] + 0.5 (sampling sd of the mean ~ 0.005).
    assert m.nll == pytest.approx(HALF_LOG_2PI + np.mean(np.log(sigma)) + 0.5, abs=0.02)
    assert m.spearman > 0.3  # larger sigma, larger errors
    np.testing.assert_allclose(m.binned.rmse / m.binned.rmv, 1.0, atol=0.1)


def test_overconfident_data_is_detected():
    rng = np.random.default_rng(2)
    n = 20000
    sigma = rng.uniform(0.05, 1.5, n)
    r = sigma * rng.normal(size=n)
    m = M.evaluate(r, sigma / 2)
    assert m.ece > 0.2
    assert m.ence == pytest.approx(1.0, abs=0.05)  # RMSE = 2 RMV in every bin
    assert m.z_rms == pytest.approx(2.0, abs=0.04)
    calibrated = M.evaluate(r, sigma)
    assert m.nll > calibrated.nll + 0.5


def test_gaussian_nll_and_sharpness_exact():
    r = np.array([0.0, 1.0, -2.0])
    s = np.array([1.0, 2.0, 0.5])
    expected = np.mean(HALF_LOG_2PI + np.log(s) + r**2 / (2 * s**2))
    assert M.gaussian_nll(r, s) == pytest.approx(expected, rel=1e-14)
    assert M.sharpness(s) == pytest.approx(np.sqrt((1 + 4 + 0.25) / 3), rel=1e-14)
    assert M.student_t_nll(r, s, 3.0) == pytest.approx(
        -np.mean(stats.t.logpdf(r, df=3.0, scale=s)), rel=1e-12
    )


def test_rmse_vs_rmv_bins_are_sorted_equal_count():
    rng = np.random.default_rng(3)
    sigma = rng.uniform(0.1, 1.0, 1003)
    r = rng.normal(size=1003)
    b = M.rmse_vs_rmv(r, sigma, 10)
    assert b.count.sum() == 1003
    assert b.count.max() - b.count.min() <= 1
    assert np.all(np.diff(b.rmv) > 0)
    assert np.all(b.sigma_max[:-1] <= b.sigma_min[1:])
    s_sorted = np.sort(sigma)
    assert b.rmv[0] == pytest.approx(np.sqrt(np.mean(s_sorted[: b.count[0]] ** 2)))


def _auroc_bruteforce(score: np.ndarray, label: np.ndarray) -> float:
    pos, neg = score[label], score[~label]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
    return wins / (pos.size * neg.size)


def test_auroc_rank_based_with_ties():
    assert M.auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert M.auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert M.auroc([1.0, 1.0, 1.0, 1.0], [False, True, False, True]) == 0.5
    rng = np.random.default_rng(4)
    score = rng.integers(0, 5, 80).astype(float)  # many ties
    label = rng.random(80) < 0.3
    assert M.auroc(score, label) == pytest.approx(_auroc_bruteforce(score, label), abs=1e-12)
    assert M.auroc(score, label.astype(int)) == M.auroc(score, label)


def test_auroc_needs_both_classes():
    with pytest.raises(UserInputError, match="both classes"):
        M.auroc([0.1, 0.2], [True, True])


@pytest.mark.parametrize(
    ("r", "s", "match"),
    [
        ([1.0, np.nan], [1.0, 1.0], "NaN"),
        ([1.0, 2.0], [1.0, 0.0], "<= 0"),
        ([1.0, 2.0], [1.0, np.inf], "NaN or inf"),
        ([1.0, 2.0], [1.0], "shape"),
        ([], [], "empty"),
    ],
)
def test_bad_input_is_named(r, s, match):
    with pytest.raises(UserInputError, match=match):
        M.ece(np.array(r), np.array(s))


def test_spearman_undefined_for_constant_sigma():
    assert np.isnan(M.spearman_error_sigma([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]))
