"""Domain of applicability: hull, kernel distance, Mahalanobis (Ledoit-Wolf, F threshold, Šidák),
MaxVol γ, serialisation and the JAX monitors."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from scipy import linalg
from scipy.spatial.distance import cdist

from mlipctl.errors import UserInputError
from mlipctl.uncertainty import domain as Dm


def _cube_training(rng: np.random.Generator) -> np.ndarray:
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], float)
    return np.vstack([corners, rng.uniform(0.0, 1.0, (200, 3))])


# ------------------------------------------------------------------------------------ hull


def test_unit_cube_hull_inside_and_outside():
    rng = np.random.default_rng(0)
    train = _cube_training(rng)
    model = Dm.DomainModel.fit(train, np.zeros(len(train), int), hull_dim=3, gamma=False)
    inside = rng.uniform(0.02, 0.98, (100, 3))
    outside = rng.uniform(0.02, 0.98, (100, 3))
    axis = rng.integers(0, 3, 100)
    outside[np.arange(100), axis] = np.where(rng.random(100) < 0.5, -0.05, 1.05)
    on_face = np.array([[0.5, 0.5, 1.0], [0.0, 0.3, 0.7], [1.0, 1.0, 1.0]])
    q = np.vstack([inside, outside, on_face])
    sp = np.zeros(len(q), int)
    expected = np.r_[np.ones(100, bool), np.zeros(100, bool), np.ones(3, bool)]
    for method in ("facets", "lp", "auto"):
        np.testing.assert_array_equal(model.hull_inside(q, sp, method=method), expected)
    # Training points themselves are inside.
    assert model.hull_inside(train, np.zeros(len(train), int)).all()


def test_hull_lp_and_facets_agree_after_pca():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(400, 12)) * np.linspace(3.0, 0.2, 12)
    model = Dm.DomainModel.fit(train, np.zeros(400, int), hull_dim=4, gamma=False)
    assert model.hull_dim == 4
    q = rng.normal(size=(150, 12)) * np.linspace(3.0, 0.2, 12) * 1.2
    sp = np.zeros(150, int)
    a = model.hull_inside(q, sp, method="facets")
    b = model.hull_inside(q, sp, method="lp")
    np.testing.assert_array_equal(a, b)
    assert 0.2 < a.mean() < 0.95  # both classes present, so the comparison means something


def test_hull_per_structure_and_first_exit():
    rng = np.random.default_rng(2)
    train = _cube_training(rng)
    model = Dm.DomainModel.fit(train, np.zeros(len(train), int), hull_dim=3, gamma=False)
    # A 4-atom "trajectory" drifting along +x by 0.1 per frame from x in [0.3, 0.6].
    base = np.array([[0.3, 0.5, 0.5], [0.4, 0.2, 0.8], [0.5, 0.5, 0.1], [0.6, 0.9, 0.9]])
    frames = [base + [0.1 * t, 0.0, 0.0] for t in range(8)]
    desc = np.vstack(frames)
    structure = np.repeat(np.arange(8), 4)
    atom_inside = model.hull_inside(desc, np.zeros(len(desc), int))
    frame_inside = Dm.per_structure_all(atom_inside, structure, 8)
    # The last atom (x = 0.6 + 0.1 t) leaves first, at t = 5 (x = 1.1).
    np.testing.assert_array_equal(frame_inside, [True] * 5 + [False] * 3)
    assert Dm.first_exit(frame_inside) == 5
    assert Dm.first_exit(np.ones(3, bool)) is None
    mx = Dm.per_structure_max(desc[:, 0], structure, 9)
    np.testing.assert_allclose(mx[:8], 0.6 + 0.1 * np.arange(8))
    assert mx[8] == -np.inf


def test_low_dimensional_hull_needs_few_points_but_high_dimensional_does_not():
    # Why the PCA dimension is small: held-out in-distribution points fall outside the hull of
    # 500 training points ~3 % of the time in 3-D but most of the time in 12-D.
    rng = np.random.default_rng(3)
    train, test = rng.normal(size=(500, 12)), rng.normal(size=(60, 12))
    out3 = 1 - Dm.inside_hull_lp(test[:, :3], Dm.hull_vertices(train[:, :3])).mean()
    out12 = 1 - Dm.inside_hull_lp(test, train).mean()
    assert out3 < 0.15
    assert out12 > 0.6


# ------------------------------------------------------------------------------------ kernel


def test_kernel_distance_zero_on_training_and_grows_with_distance():
    rng = np.random.default_rng(4)
    train = rng.normal(size=(300, 6))
    model = Dm.DomainModel.fit(train, np.zeros(300, int), gamma=False)
    d_train = model.kernel_distance(train, np.zeros(300, int))
    np.testing.assert_array_equal(d_train, 0.0)
    direction = rng.normal(size=6)
    direction /= np.linalg.norm(direction)
    far = train[0] + 60.0 * direction * model.std[0]
    assert model.kernel_distance(far[None], np.zeros(1, int))[0] == pytest.approx(np.sqrt(2.0))
    # Along a ray from the data's outer edge the distance grows strictly until it saturates.
    start = train[np.argmax(train @ direction)]
    ray = start + np.outer(np.linspace(0, 6, 40), direction * model.std[0])
    d = model.kernel_distance(ray, np.zeros(40, int))
    assert d[0] == 0.0
    assert np.all(np.diff(d) > 0)
    assert np.all((d >= 0) & (d <= np.sqrt(2.0)))


def test_kernel_distance_matches_bruteforce_and_is_memory_bounded():
    rng = np.random.default_rng(5)
    n_train, dim = 30_000, 32
    train = rng.normal(size=(n_train, dim))
    q = rng.normal(size=(1000, dim)) * 1.3
    z_train, z_q = train, q  # min_sq_distance is the kernel's engine; test it on raw arrays
    tracemalloc.start()
    t0 = time.perf_counter()
    d2, idx = Dm.min_sq_distance(z_q, z_train)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    full_matrix = 1000 * n_train * 8
    assert peak < 40e6 < full_matrix  # 16 MB blocks instead of a 240 MB distance matrix
    assert elapsed < 15.0
    sub = slice(0, 50)
    ref = cdist(z_q[sub], z_train, "sqeuclidean")
    np.testing.assert_allclose(d2[sub], ref.min(axis=1), rtol=1e-9)
    np.testing.assert_array_equal(idx[sub], ref.argmin(axis=1))


# ------------------------------------------------------------------------------------ Mahalanobis


def _lw_loop(x: np.ndarray) -> float:
    """Ledoit-Wolf intensity written out term by term from the paper's definitions."""
    n, dim = x.shape
    a = x - x.mean(axis=0)
    s = a.T @ a / n
    m = np.trace(s) / dim
    d2 = np.sum((s - m * np.eye(dim)) ** 2) / dim
    b2_bar = sum(np.sum((np.outer(row, row) - s) ** 2) / dim for row in a) / n**2
    return min(b2_bar, d2) / d2


@pytest.mark.parametrize(("a", "b", "delta"), [(2.0, 1.0, 17 / 18), (3.0, 1.0, 0.640625)])
def test_ledoit_wolf_closed_form_known_case(a, b, delta):
    # Rows ±a e1, ±b e2: S = diag(a²/2, b²/2), d² = ((a² - b²)/4)², b̄² = (a⁴ + b⁴)/32.
    x = np.array([[a, 0.0], [-a, 0.0], [0.0, b], [0.0, -b]])
    d2 = ((a * a - b * b) / 4) ** 2
    b2 = (a**4 + b**4) / 32
    assert min(b2, d2) / d2 == pytest.approx(delta)
    assert Dm.ledoit_wolf_shrinkage(x) == pytest.approx(delta, rel=1e-12)


def test_ledoit_wolf_matches_term_by_term_formula():
    rng = np.random.default_rng(6)
    for n, dim in [(30, 6), (8, 12), (200, 3)]:
        x = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
        assert Dm.ledoit_wolf_shrinkage(x) == pytest.approx(_lw_loop(x), rel=1e-10)
    # Isotropic sample covariance: nothing to shrink.
    assert Dm.ledoit_wolf_shrinkage(np.vstack([np.eye(3), -np.eye(3)])) == 0.0
    # Many samples of a strongly anisotropic law: little shrinkage.
    x = rng.normal(size=(5000, 4)) * [10.0, 1.0, 0.1, 0.01]
    assert Dm.ledoit_wolf_shrinkage(x) < 0.01
    # n < D: the shrunk covariance is still positive definite.
    cov, delta = Dm.shrunk_covariance(rng.normal(size=(5, 10)))
    assert 0 < delta <= 1 and np.linalg.eigvalsh(cov).min() > 0


def test_threshold_rules():
    chi = Dm.mahalanobis_threshold(10**7, 5, 0.01, "chi2")
    assert Dm.mahalanobis_threshold(10**7, 5, 0.01, "f") == pytest.approx(chi, rel=1e-4)
    assert Dm.mahalanobis_threshold(40, 5, 0.01, "f") > 1.3 * chi
    # n <= D: no Hotelling region; falls back to chi-square.
    assert Dm.mahalanobis_threshold(5, 5, 0.01, "f") == chi
    assert Dm.sidak_alpha(0.05, 1) == pytest.approx(0.05)
    assert 1 - (1 - Dm.sidak_alpha(0.05, 64)) ** 64 == pytest.approx(0.05, rel=1e-12)
    with pytest.raises(UserInputError, match="alpha"):
        Dm.mahalanobis_threshold(40, 5, 1.5)


def _false_alarm_ratio(
    n: int, dim: int, alpha: float, shrink: bool, reps: int = 1000, m: int = 60, seed: int = 0
) -> tuple[float, float]:
    """Average per-point false-alarm rate / alpha over many training sets (F rule, chi2 rule)."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(dim, dim))
    lmat = np.linalg.cholesky(g @ g.T + np.eye(dim))
    thr_f = Dm.mahalanobis_threshold(n, dim, alpha, "f")
    thr_c = Dm.mahalanobis_threshold(n, dim, alpha, "chi2")
    hits_f = hits_c = 0
    for _ in range(reps):
        x = rng.normal(size=(n, dim)) @ lmat.T
        y = rng.normal(size=(m, dim)) @ lmat.T
        cov, _ = Dm.shrunk_covariance(x, shrink)
        w = linalg.solve_triangular(linalg.cholesky(cov, lower=True), (y - x.mean(0)).T, lower=True)
        d2 = np.sum(w * w, axis=0)
        hits_f += int(np.sum(d2 > thr_f))
        hits_c += int(np.sum(d2 > thr_c))
    total = reps * m * alpha
    return hits_f / total, hits_c / total


def test_f_threshold_is_exact_where_chi2_doubles_false_alarms():
    f_ratio, chi_ratio = _false_alarm_ratio(40, 5, 0.05, shrink=False)
    assert 0.9 < f_ratio < 1.1  # exact rule: 60 000 draws, sd of the ratio ~0.02
    assert 0.5 < f_ratio < 2.0
    assert 1.8 < chi_ratio < 2.6  # theory: 2.2x


def test_f_threshold_with_ledoit_wolf_shrinkage():
    # Shrinkage makes the rule conservative at small n (measured ~0.4 alpha at n = 40, D = 5) and
    # it approaches alpha as n grows (~0.8 alpha at n = 200).
    small, _ = _false_alarm_ratio(40, 5, 0.05, shrink=True, reps=500, seed=1)
    large, _ = _false_alarm_ratio(200, 5, 0.05, shrink=True, reps=500, seed=2)
    assert small < 0.7
    assert 0.5 < large < 2.0
    assert large > small


@pytest.mark.parametrize(("shrinkage", "n_train"), [(False, 400), (True, 1000)])
def test_sidak_frame_false_alarm_rate(shrinkage, n_train):
    # Two species with correlated descriptors (species 1's correlation matrix has an eigenvalue
    # of 0.003), 32-atom frames, frame false-alarm rate alpha via Šidák. Measured rate / alpha:
    # 1.04 without shrinkage; with shrinkage 0.49 (n = 100), 0.68 (400), 0.72 (1000).
    rng = np.random.default_rng(7)
    dim, alpha, atoms, n_fits, n_frames = 4, 0.05, 32, 40, 100
    means = [np.zeros(dim), np.full(dim, 3.0)]
    mix = np.stack([rng.normal(size=(dim, dim)) + 2 * np.eye(dim) for _ in range(2)])
    alarms = 0
    for fit in range(n_fits):
        x = np.vstack([means[s] + rng.normal(size=(n_train, dim)) @ mix[s].T for s in (0, 1)])
        model = Dm.DomainModel.fit(
            x, np.repeat([0, 1], n_train), shrinkage=shrinkage, gamma=False, hull_dim=2
        )
        sp = rng.integers(0, 2, (n_frames, atoms))
        flat = sp.ravel()
        desc = np.asarray(means)[flat] + np.einsum(
            "nij,nj->ni", mix[flat], rng.normal(size=(flat.size, dim))
        )
        thr = model.mahalanobis_thresholds(alpha, n_atoms=atoms, sidak=True)
        d2 = model.mahalanobis_sq(desc, flat).reshape(n_frames, atoms)
        frame_alarm = np.any(d2 > thr[sp], axis=1)
        alarms += int(frame_alarm.sum())
        if fit == 0:  # the one-frame API agrees with the vectorised evaluation
            one, per_atom = model.mahalanobis_alarm(desc[:atoms], flat[:atoms], alpha)
            assert one == frame_alarm[0] and per_atom.shape == (atoms,)
    rate = alarms / (n_fits * n_frames)
    assert 0.5 * alpha <= rate <= 2.0 * alpha, rate


def test_mahalanobis_far_points_alarm_and_unknown_species_is_out():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(300, 5))
    model = Dm.DomainModel.fit(x, np.zeros(300, int), n_species=2, gamma=False)
    far = x[:3] + 20.0
    alarm, per_atom = model.mahalanobis_alarm(far, np.zeros(3, int), 0.01)
    assert alarm and per_atom.all()
    q = x[:2]
    sp = np.array([0, 1])
    assert np.isinf(model.mahalanobis_sq(q, sp)[1])
    assert not model.hull_inside(q, sp)[1]
    assert model.kernel_distance(q, sp)[1] == pytest.approx(np.sqrt(2))
    assert model.mahalanobis_thresholds(0.01)[1] == 0.0


# ------------------------------------------------------------------------------------ gamma


def test_maxvol_gamma_bounds():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2000, 16)) @ rng.normal(size=(16, 16))
    model = Dm.DomainModel.fit(x, np.zeros(2000, int))
    g_train = model.gamma(x, np.zeros(2000, int))
    assert g_train.max() <= 1.0 + 1e-6
    assert model.gamma_train_max[0] == pytest.approx(g_train.max())
    np.testing.assert_allclose(g_train[model.gamma_active[0]], 1.0, rtol=1e-9)
    far = 20.0 * rng.normal(size=(50, 16)) @ rng.normal(size=(16, 16))
    assert np.median(model.gamma(far, np.zeros(50, int))) > 5.0
    # Linear reparametrisation of the descriptors leaves γ unchanged.
    t = rng.normal(size=(16, 16)) + 4 * np.eye(16)
    act, a_inv = Dm.maxvol(x @ t)
    g_t = np.max(np.abs(x[:100] @ t @ a_inv), axis=1)
    g_x = np.max(np.abs(x[:100] @ linalg.inv(x[act])), axis=1)
    np.testing.assert_allclose(g_t, g_x, rtol=1e-8)


def test_maxvol_is_a_local_volume_maximum():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(60, 4))
    act, _ = Dm.maxvol(x, tol=1e-12)
    vol = abs(np.linalg.det(x[act]))
    for j in range(4):
        for i in range(60):
            trial = act.copy()
            trial[j] = i
            assert abs(np.linalg.det(x[trial])) <= vol * (1 + 1e-9)


def test_gamma_needs_full_rank_descriptors():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(100, 3)) @ rng.normal(size=(3, 6))  # rank 3 < D = 6
    with pytest.raises(UserInputError, match="species 0: training descriptors have rank 3"):
        Dm.DomainModel.fit(x, np.zeros(100, int))
    Dm.DomainModel.fit(x, np.zeros(100, int), gamma=False)  # the other checks still fit


# ------------------------------------------------------------------------------------ model I/O


def _two_species_model(rng: np.random.Generator) -> tuple[Dm.DomainModel, np.ndarray, np.ndarray]:
    x = np.vstack([rng.normal(size=(150, 6)), 2.0 + 0.5 * rng.normal(size=(120, 6))])
    sp = np.repeat([0, 2], [150, 120])  # species 1 never seen
    return Dm.DomainModel.fit(x, sp, n_species=3, hull_dim=3), x, sp


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(13)
    model, _, _ = _two_species_model(rng)
    path = model.save(tmp_path / "domain.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["domain.npz"]  # no temp file left
    back = Dm.DomainModel.load(path)
    q = rng.normal(size=(40, 6)) * 2
    sp = rng.integers(0, 3, 40)
    for fn in ("hull_inside", "kernel_distance", "mahalanobis_sq", "gamma"):
        np.testing.assert_array_equal(getattr(back, fn)(q, sp), getattr(model, fn)(q, sp))
    d = model.to_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in d.values())
    with pytest.raises(UserInputError, match="missing arrays"):
        Dm.DomainModel.from_dict({k: v for k, v in d.items() if k != "whiten"})
    with pytest.raises(UserInputError, match="format version 99"):
        Dm.DomainModel.from_dict({**d, "format_version": np.asarray(99)})
    with pytest.raises(UserInputError, match="inconsistent"):
        Dm.DomainModel.from_dict({**d, "whiten": d["whiten"][:, :2]})
    with pytest.raises(UserInputError, match="not found"):
        Dm.DomainModel.load(tmp_path / "missing.npz")


def test_bad_descriptors_are_named():
    rng = np.random.default_rng(14)
    model, x, sp = _two_species_model(rng)
    bad = x[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(UserInputError, match="NaN"):
        model.gamma(bad, sp[:3])
    with pytest.raises(UserInputError, match="expects 6"):
        model.gamma(x[:3, :4], sp[:3])
    with pytest.raises(UserInputError, match="outside the model's 3 species"):
        model.gamma(x[:3], np.array([0, 3, 0]))
    with pytest.raises(UserInputError, match="integer"):
        model.gamma(x[:3], np.array([0.0, 1.0, 0.0]))


# ------------------------------------------------------------------------------------ JAX


def test_jax_monitors_match_numpy_under_jit():
    import jax

    rng = np.random.default_rng(15)
    model, _, _ = _two_species_model(rng)
    q = np.vstack([rng.normal(size=(30, 6)), 2.0 + rng.normal(size=(30, 6))])
    sp = rng.integers(0, 3, 60)
    params = model.jax_params()
    with jax.enable_x64(True):
        d2 = np.asarray(jax.jit(Dm.jax_mahalanobis)(params, q, sp))
        g = np.asarray(jax.jit(Dm.jax_gamma)(params, q, sp))
        ex = np.asarray(jax.jit(Dm.jax_hull_excess)(params, q, sp))
    np.testing.assert_allclose(d2, model.mahalanobis_sq(q, sp), rtol=1e-10)
    np.testing.assert_allclose(g, model.gamma(q, sp), rtol=1e-10)
    unseen = sp == 1
    assert np.isinf(d2[unseen]).all() and np.isinf(g[unseen]).all() and np.isinf(ex[unseen]).all()
    np.testing.assert_array_equal(ex[~unseen] <= Dm.HULL_TOL, model.hull_inside(q, sp)[~unseen])
