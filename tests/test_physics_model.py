"""Physics of the moment-tensor potential with random parameters (float64): forces and stress are
derivatives of the energy, symmetries, locality, smoothness at the cutoff, padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT

from mlipctl.config.model import ModelConfig, MomentModelConfig
from mlipctl.data.neighbors import build_graph
from mlipctl.model.potential import (
    ModelSpec,
    fit_feature_scaling,
    init_params,
    make_energy,
    make_predict,
)

CUTOFF = 4.0


def _spec(dtype: str = "float64") -> ModelSpec:
    arch = MomentModelConfig(
        cutoff=CUTOFF,
        n_basis=5,
        n_radial=3,
        max_order=4,  # every invariant family
        radial_per_order=True,
        hidden=(8,),
        avg_num_neighbors=10.0,
    )
    return ModelSpec(
        ModelConfig(architecture=arch, dtype=dtype),
        species=("Cu", "Ni"),
        offsets=(-1.5, -2.5),
        energy_shift=0.1,
        energy_scale=0.7,
    )


def _bulk_cuni(seed: int = 0) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.symbols[[1, 4]] = "Ni"
    atoms.rattle(0.08, seed=seed)
    return atoms


def _cluster(seed: int = 1, n: int = 7, offset: tuple[float, float, float] = (0, 0, 0)) -> Atoms:
    rng = np.random.default_rng(seed)
    base = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2)).positions[:n]
    pos = base + rng.normal(0, 0.1, base.shape) + np.asarray(offset)
    sym = ["Cu", "Ni"] * n
    return Atoms(sym[:n], positions=pos, pbc=False)


@pytest.fixture(scope="module")
def model():
    """(spec, params, jitted energy, jitted predict with stress) with standardised features so
    that every invariant family matters for the outputs."""
    spec = _spec()
    params = init_params(spec, 3)
    graphs = [_graph(spec, [s]) for s in (_bulk_cuni(), _cluster())]
    params = fit_feature_scaling(spec, params, graphs)
    # The linear readout starts at zero; give it weights so every test here exercises it too.
    lin = params["params"]["readout"]["linear"]
    noise = 0.1 * np.random.default_rng(5).standard_normal(lin.shape)
    params["params"]["readout"]["linear"] = jnp.asarray(noise, lin.dtype)
    energy = jax.jit(make_energy(spec))
    predict = jax.jit(make_predict(spec, stress=True))
    return spec, params, energy, predict


def _graph(spec: ModelSpec, atoms_list: list[Atoms], cutoff: float = CUTOFF, **kw):
    """Graph padded to one fixed shape, so each jitted function compiles once per module."""
    kw = {"n_atoms": 48, "n_edges": 3000, "n_structures": 4, **kw}
    return build_graph(atoms_list, cutoff, spec.type_map(), **kw)


def _with_positions(graph, positions: np.ndarray):
    return graph._replace(positions=np.asarray(positions, dtype=np.float64))


@pytest.mark.parametrize("make", [_bulk_cuni, _cluster], ids=["periodic", "cluster"])
def test_forces_are_minus_energy_gradient(model, make):
    spec, params, energy, predict = model
    atoms = make()
    graph = _graph(spec, [atoms])
    pred = predict(params, graph)
    forces = np.asarray(pred.forces[0, : len(atoms)])
    assert np.abs(forces).max() > 1e-2, "forces are trivially small; the test would prove little"
    h = 1e-5
    fd = np.zeros_like(forces)
    for i in range(len(atoms)):
        for a in range(3):
            pos = np.array(graph.positions)
            pos[i, a] += h
            e_plus = float(energy(params, _with_positions(graph, pos))[0, 0])
            pos[i, a] -= 2 * h
            e_minus = float(energy(params, _with_positions(graph, pos))[0, 0])
            fd[i, a] = -(e_plus - e_minus) / (2 * h)
    np.testing.assert_allclose(forces, fd, atol=1e-6 * max(1.0, np.abs(fd).max()))
    # Same graph edges, so the FD energies use the pairs of the unperturbed structure.
    assert np.all(np.asarray(pred.forces[0, len(atoms) :]) == 0.0)


def _strained(atoms: Atoms, a: int, b: int, h: float) -> Atoms:
    out = atoms.copy()
    deform = np.eye(3)
    deform[a, b] += h
    out.set_cell(atoms.cell[:] @ deform, scale_atoms=True)
    return out


def _fd_stress(energy_of, atoms: Atoms, h: float = 1e-5) -> np.ndarray:
    """(1/V) dE/d(eps_ab) by central differences of x' = x (I + eps), cell' = cell (I + eps)."""
    out = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            plus = energy_of(_strained(atoms, a, b, h))
            minus = energy_of(_strained(atoms, a, b, -h))
            out[a, b] = (plus - minus) / (2 * h) / atoms.get_volume()
    return out


def test_fd_stress_convention_matches_ase_emt():
    # Pins the sign convention of _fd_stress to ASE's (EMT's analytical stress).
    atoms = bulk("Cu", "fcc", a=3.5, cubic=True)
    atoms.rattle(0.05, seed=2)
    atoms.set_cell(atoms.cell[:] @ (np.eye(3) + [[0.01, 0.02, 0], [0.02, -0.01, 0], [0, 0, 0]]))

    def emt_energy(at: Atoms) -> float:
        at.calc = EMT()
        return at.get_potential_energy()

    atoms.calc = EMT()
    ase_stress = atoms.get_stress(voigt=False)
    assert np.abs(ase_stress).max() > 1e-3
    np.testing.assert_allclose(_fd_stress(emt_energy, atoms), ase_stress, atol=1e-6)


def test_stress_is_strain_derivative_with_ase_sign(model):
    spec, params, energy, predict = model
    atoms = _bulk_cuni(seed=5)
    graph = _graph(spec, [atoms])
    stress = np.asarray(predict(params, graph).stress[0, 0])
    assert np.abs(stress).max() > 1e-4

    def model_energy(at: Atoms) -> float:
        # Same pairs (indices and shifts) as the unstrained cell; strain is tiny.
        cell = np.array(graph.cell)
        cell[0] = at.cell[:]
        positions = np.array(graph.positions)
        positions[: len(at)] = at.positions
        g = graph._replace(positions=positions, cell=cell)
        return float(energy(params, g)[0, 0])

    np.testing.assert_allclose(stress, _fd_stress(model_energy, atoms), atol=1e-8)
    np.testing.assert_allclose(stress, stress.T, atol=1e-12)


def test_stress_zero_for_cells_without_volume(model):
    spec, params, _, predict = model
    pred = predict(params, _graph(spec, [_cluster()]))
    assert np.all(np.asarray(pred.stress) == 0.0)


def _random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:  # proper rotation; reflections are checked separately below
        q[:, 0] *= -1
    return q


@pytest.mark.parametrize("make", [_bulk_cuni, _cluster], ids=["periodic", "cluster"])
def test_rotation_translation_permutation(model, make):
    spec, params, _, predict = model
    atoms = make()
    ref = predict(params, _graph(spec, [atoms]))
    e0 = float(ref.energy[0, 0])
    f0 = np.asarray(ref.forces[0, : len(atoms)])

    rot = _random_rotation(7)
    moved = atoms.copy()
    moved.positions = atoms.positions @ rot.T + np.array([0.3, -1.2, 2.5])
    moved.set_cell(atoms.cell[:] @ rot.T, scale_atoms=False)
    out = predict(params, _graph(spec, [moved]))
    assert abs(float(out.energy[0, 0]) - e0) < 1e-9 * max(1.0, abs(e0))
    np.testing.assert_allclose(np.asarray(out.forces[0, : len(atoms)]), f0 @ rot.T, atol=1e-9)
    if atoms.pbc.all():
        s0 = np.asarray(ref.stress[0, 0])
        np.testing.assert_allclose(np.asarray(out.stress[0, 0]), rot @ s0 @ rot.T, atol=1e-10)

    mirrored = atoms.copy()
    mirror = np.diag([1.0, 1.0, -1.0])
    mirrored.positions = atoms.positions @ mirror
    mirrored.set_cell(atoms.cell[:] @ mirror, scale_atoms=False)
    e_mirror = float(predict(params, _graph(spec, [mirrored])).energy[0, 0])
    assert abs(e_mirror - e0) < 1e-9 * max(1.0, abs(e0))  # all invariants are O(3) invariant

    perm = np.random.default_rng(3).permutation(len(atoms))
    permuted = atoms[perm]
    out = predict(params, _graph(spec, [permuted]))
    assert abs(float(out.energy[0, 0]) - e0) < 1e-9 * max(1.0, abs(e0))
    np.testing.assert_allclose(np.asarray(out.forces[0, : len(atoms)]), f0[perm], atol=1e-10)


def test_far_apart_clusters_are_additive(model):
    spec, params, _, predict = model
    a = _cluster(seed=1, n=6)
    b = _cluster(seed=2, n=5, offset=(CUTOFF + 9.0, 0.5, 0.0))
    both = a + b
    whole = predict(params, _graph(spec, [both]))
    part_a = predict(params, _graph(spec, [a]))
    part_b = predict(params, _graph(spec, [b]))
    e_sum = float(part_a.energy[0, 0]) + float(part_b.energy[0, 0])
    assert abs(float(whole.energy[0, 0]) - e_sum) < 1e-9
    forces = np.concatenate([part_a.forces[0, : len(a)], part_b.forces[0, : len(b)]])
    np.testing.assert_allclose(np.asarray(whole.forces[0, : len(both)]), forces, atol=1e-12)


def test_batch_equals_separate_and_padding_is_inert(model):
    spec, params, _, predict = model
    structures = [_bulk_cuni(1), _cluster(4), _bulk_cuni(2)]
    n_atoms = sum(len(s) for s in structures)
    exact_graph = build_graph(structures, CUTOFF, spec.type_map())  # no padding at all
    assert exact_graph.atom_mask.all() and exact_graph.edge_mask.all()
    exact = predict(params, exact_graph)
    padded_graph = _graph(spec, structures)
    assert n_atoms < 48 and not padded_graph.edge_mask.all()
    padded = predict(params, padded_graph)
    np.testing.assert_allclose(padded.energy[0, :3], exact.energy[0, :3], rtol=0, atol=1e-10)
    assert float(padded.energy[0, 3]) == 0.0  # the padding slot
    np.testing.assert_allclose(padded.forces[0, :n_atoms], exact.forces[0], atol=1e-12)
    assert np.all(np.asarray(padded.forces[0, n_atoms:]) == 0.0)
    assert np.all(np.asarray(padded.atom_energy[0, n_atoms:]) == 0.0)
    start = 0
    for k, atoms in enumerate(structures):
        alone = predict(params, _graph(spec, [atoms]))
        assert abs(float(alone.energy[0, 0]) - float(exact.energy[0, k])) < 1e-10
        np.testing.assert_allclose(
            alone.forces[0, : len(atoms)], exact.forces[0, start : start + len(atoms)], atol=1e-12
        )
        start += len(atoms)
    # Energy = sum of per-atom energies, which include the per-species offsets.
    np.testing.assert_allclose(
        float(np.asarray(exact.atom_energy[0, : len(structures[0])]).sum()),
        float(exact.energy[0, 0]),
        rtol=1e-13,
    )


def test_parameter_gradients_finite_with_padding(model):
    # Zero-length padding edges must not leak NaN into training gradients (force loss).
    spec, params, _, _ = model
    graph = _graph(spec, [_bulk_cuni(), _cluster()])
    assert not graph.edge_mask.all() and not graph.atom_mask.all()
    predict = make_predict(spec, stress=True)

    def loss(p):
        out = predict(p, graph)
        return jnp.sum(out.energy**2) + jnp.sum(out.forces**2) + jnp.sum(out.stress**2)

    grads = jax.jit(jax.grad(loss))(params)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    assert any(float(jnp.abs(x).max()) > 0 for x in leaves)


def test_energy_and_forces_continuous_at_cutoff(model):
    spec, params, energy, predict = model
    # A neighbour of a small cluster moves out along a line across the cutoff.
    core = Atoms("CuNi", positions=[[0, 0, 0], [2.3, 0.4, 0.1]], pbc=False)

    def at(distance: float):
        direction = np.array([-0.3, 0.9, -0.2]) / np.linalg.norm([-0.3, 0.9, -0.2])
        atoms = core + Atoms("Cu", positions=[direction * distance])
        out = predict(params, _graph(spec, [atoms], CUTOFF + 1.0))
        return float(out.energy[0, 0]), np.asarray(out.forces[0, 2])

    e_in, f_in = at(CUTOFF - 1e-4)
    e_out, f_out = at(CUTOFF + 1e-4)
    assert np.all(f_out == 0.0)
    # Envelope: value, slope and curvature vanish at r_c, so E - E_out ~ (delta)^3, F ~ (delta)^2.
    assert abs(e_in - e_out) < 1e-9
    assert np.abs(f_in).max() < 1e-6
    # Approaching r_c the force decays smoothly to zero (no jump, no kink).
    deltas = np.array([0.2, 0.1, 0.05, 0.025])
    forces = np.array([np.linalg.norm(at(CUTOFF - d)[1]) for d in deltas])
    assert forces[0] > 1e-5
    ratios = forces[:-1] / forces[1:]
    assert np.all(ratios > 2.5), f"force does not vanish quadratically at r_c: {forces}"
    # Edges beyond the cutoff (a neighbour list with a skin) change nothing.
    atoms = core + Atoms("Cu", positions=[[0.0, 0.0, CUTOFF + 0.3]])
    tight = predict(params, _graph(spec, [atoms]))
    skin = predict(params, _graph(spec, [atoms], CUTOFF + 1.0))
    assert abs(float(tight.energy[0, 0]) - float(skin.energy[0, 0])) < 1e-12
    np.testing.assert_allclose(tight.forces[0], skin.forces[0], atol=1e-14)


def test_float32_model_keeps_float64_sums():
    # A small order-1 model keeps the two extra compilations cheap.
    arch = MomentModelConfig(cutoff=CUTOFF, n_basis=4, n_radial=2, max_order=1, hidden=(4,))

    def spec(dtype: str) -> ModelSpec:
        return ModelSpec(ModelConfig(architecture=arch, dtype=dtype), ("Cu", "Ni"), (-1.0, -2.0))

    params = init_params(spec("float32"), 0)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    graph = _graph(spec("float32"), [_bulk_cuni()])
    pred = jax.jit(make_predict(spec("float32"), stress=True))(params, graph)
    assert pred.energy.dtype == jnp.float64
    assert pred.forces.dtype == jnp.float64
    assert pred.atom_energy.dtype == jnp.float64
    params64 = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
    ref = jax.jit(make_predict(spec("float64"), stress=True))(params64, graph)
    np.testing.assert_allclose(pred.energy, ref.energy, rtol=1e-6)
    np.testing.assert_allclose(pred.forces, ref.forces, atol=1e-4 * float(np.abs(ref.forces).max()))


def test_bessel_basis_forces_and_cutoff():
    arch = MomentModelConfig(cutoff=CUTOFF, basis="bessel", n_basis=4, n_radial=2, max_order=1)
    spec = ModelSpec(ModelConfig(architecture=arch, dtype="float64"), ("Cu", "Ni"), (0.0, 0.0))
    params = init_params(spec, 1)
    energy = jax.jit(make_energy(spec))
    atoms = _cluster(seed=6, n=5)
    graph = _graph(spec, [atoms])
    forces = np.asarray(jax.jit(make_predict(spec, stress=False))(params, graph).forces[0, :5])
    assert np.abs(forces).max() > 1e-3
    h = 1e-5
    for i, a in ((0, 0), (3, 2)):
        pos = np.array(graph.positions)
        pos[i, a] += h
        e_plus = float(energy(params, _with_positions(graph, pos))[0, 0])
        pos[i, a] -= 2 * h
        e_minus = float(energy(params, _with_positions(graph, pos))[0, 0])
        assert forces[i, a] == pytest.approx(-(e_plus - e_minus) / (2 * h), abs=1e-6)
    pair = Atoms("CuNi", positions=[[0, 0, 0], [0, 0, CUTOFF - 1e-4]], pbc=False)
    far = Atoms("CuNi", positions=[[0, 0, 0], [0, 0, CUTOFF + 1e-4]], pbc=False)
    e_in = float(energy(params, _graph(spec, [pair], CUTOFF + 1.0))[0, 0])
    e_out = float(energy(params, _graph(spec, [far], CUTOFF + 1.0))[0, 0])
    assert abs(e_in - e_out) < 1e-9


@pytest.mark.parametrize("p", [3, 6, 9])
def test_envelope_vanishes_smoothly_at_the_cutoff(p):
    from mlipctl.model.moment import envelope

    d1 = jax.grad(lambda x: envelope(x, p))
    d2 = jax.grad(d1)
    assert float(envelope(jnp.float64(0.0), p)) == 1.0
    for fn in (lambda x: envelope(x, p), d1, d2):
        assert abs(float(fn(jnp.float64(1.0 - 1e-7)))) < 1e-3
        assert float(fn(jnp.float64(1.2))) == 0.0
    x = np.linspace(0.0, 1.0, 101)
    assert np.all(np.diff(np.asarray(envelope(jnp.asarray(x), p))) <= 0.0)
    if p == 3:
        np.testing.assert_allclose(envelope(jnp.asarray(x)), 1 - 10 * x**3 + 15 * x**4 - 6 * x**5)
