"""Model config validation, ModelSpec, ensembles (none/deep/shallow), descriptors, feature scaling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from pydantic import ValidationError

from mlipctl.config.model import EnsembleConfig, ModelConfig, MomentModelConfig
from mlipctl.data.neighbors import build_graph
from mlipctl.errors import UserInputError
from mlipctl.model.moment import n_features
from mlipctl.model.potential import (
    ModelSpec,
    fit_feature_scaling,
    init_params,
    make_descriptors,
    make_energy,
    make_predict,
)

ARCH = MomentModelConfig(
    cutoff=4.0, n_basis=4, n_radial=3, max_order=1, hidden=(8,), avg_num_neighbors=10.0
)  # order 1 keeps compilation short; the physics tests cover order 3


def _spec(kind: str = "none", size: int = 1) -> ModelSpec:
    return ModelSpec(
        ModelConfig(
            architecture=ARCH, ensemble=EnsembleConfig(kind=kind, size=size), dtype="float64"
        ),
        species=("Cu", "Ni"),
        offsets=(-1.0, -2.0),
    )


def _structures() -> list[Atoms]:
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.symbols[2] = "Ni"
    a.rattle(0.1, seed=1)
    b = bulk("Ni", "fcc", a=3.5).repeat((2, 2, 1))
    b.rattle(0.1, seed=2)
    return [a, b]


@pytest.fixture(scope="module")
def graph():
    return build_graph(
        _structures(), ARCH.cutoff, _spec().type_map(), n_atoms=16, n_edges=1200, n_structures=3
    )


# --- configs and spec ----------------------------------------------------------------------


def test_ensemble_size_must_match_kind():
    assert EnsembleConfig().size == 1
    assert EnsembleConfig(kind="deep", size=3).size == 3
    with pytest.raises(ValidationError, match="size 1"):
        EnsembleConfig(kind="none", size=2)
    for kind in ("deep", "shallow"):
        with pytest.raises(ValidationError, match="size >= 2"):
            EnsembleConfig(kind=kind, size=1)


def test_model_config_union_defaults_and_errors():
    cfg = ModelConfig.model_validate({"architecture": {"kind": "moment", "hidden": [32, 16]}})
    assert cfg.architecture.hidden == (32, 16)
    assert ModelConfig().architecture.kind == "moment"
    assert ModelConfig().dtype == "float32"
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        ModelConfig.model_validate({"architecture": {"kind": "mace"}})
    with pytest.raises(ValidationError, match="widths must be >= 1"):
        MomentModelConfig(hidden=(8, 0))
    with pytest.raises(ValidationError, match="r_min"):
        MomentModelConfig(cutoff=3.0, r_min=3.5)
    with pytest.raises(ValidationError):
        MomentModelConfig(max_order=5)
    with pytest.raises(ValidationError, match="Extra inputs"):
        ModelConfig.model_validate({"architecture": {"kind": "moment", "n_layers": 3}})
    with pytest.raises(ValidationError):
        ModelConfig.model_validate({"dtype": "float16"})


def test_spec_round_trip_hash_and_errors():
    spec = _spec("shallow", 3)
    again = ModelSpec.from_dict(spec.to_dict())
    assert again == spec and hash(again) == hash(spec)
    assert spec.type_map() == {29: 0, 28: 1}
    assert spec.n_members == 3 and spec.cutoff == 4.0
    with pytest.raises(UserInputError, match="Xx"):
        ModelSpec(ModelConfig(), ("Cu", "Xx"), (0.0, 0.0))
    with pytest.raises(UserInputError, match="2 energy offsets for 1 species"):
        ModelSpec(ModelConfig(), ("Cu",), (0.0, 1.0))
    with pytest.raises(UserInputError, match="duplicate"):
        ModelSpec(ModelConfig(), ("Cu", "Cu"), (0.0, 0.0))
    with pytest.raises(UserInputError, match="energy_scale"):
        ModelSpec(ModelConfig(), ("Cu",), (0.0,), energy_scale=0.0)


def test_descriptor_size_formula():
    assert n_features(1, 0) == 1
    # C=2: M0 2, M1.M1 3, M2:M2 3, M1.M2.M1 6, tr(M2^3) 4, M3:M3 3, M1.M3:M2 8, M3M3M2 6.
    assert n_features(2, 3) == 2 + 3 + 3 + 6 + 4 + 3 + 8 + 6
    assert n_features(6, 3) == 593


# --- ensembles -----------------------------------------------------------------------------


def test_deep_members_differ_and_member0_equals_single_model(graph):
    single, deep = _spec(), _spec("deep", 3)
    p1 = init_params(single, 11)
    pk = init_params(deep, 11)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(pk), strict=True):
        assert b.shape == (3, *a.shape)
        np.testing.assert_array_equal(np.asarray(b[0]), np.asarray(a))
    predict1 = jax.jit(make_predict(single, stress=True))
    out1 = predict1(p1, graph)
    outk = jax.jit(make_predict(deep, stress=True))(pk, graph)
    assert outk.energy.shape == (3, 3) and outk.forces.shape == (3, 16, 3)
    assert outk.stress.shape == (3, 3, 3, 3) and outk.atom_energy.shape == (3, 16)
    np.testing.assert_allclose(outk.energy[0], out1.energy[0], rtol=1e-12)
    np.testing.assert_allclose(outk.forces[0], out1.forces[0], atol=1e-12)
    np.testing.assert_allclose(outk.stress[0], out1.stress[0], atol=1e-12)
    # Members are independently initialised, so they disagree.
    e = np.asarray(outk.energy[:, :2])
    assert np.all(np.abs(e[1] - e[0]) > 1e-6) and np.all(np.abs(e[2] - e[1]) > 1e-6)
    assert float(jnp.abs(outk.forces[1] - outk.forces[0]).max()) > 1e-6
    # Member k of the vmapped ensemble is the single model with member k's parameters.
    p2 = jax.tree_util.tree_map(lambda x: x[2], pk)
    out2 = predict1(p2, graph)
    np.testing.assert_allclose(outk.energy[2], out2.energy[0], rtol=1e-12)
    np.testing.assert_allclose(outk.forces[2], out2.forces[0], atol=1e-12)
    energy = jax.jit(make_energy(deep))(pk, graph)
    np.testing.assert_allclose(energy, outk.energy, rtol=1e-12)  # energy-only path agrees


def test_shallow_heads_differ_and_forces_are_per_head_gradients(graph):
    spec = _spec("shallow", 4)
    params = init_params(spec, 5)
    # Heads are the K outputs of the last layer; everything before is shared.
    assert params["params"]["readout"]["kernel_1"].shape == (2, 8, 4)
    pred = jax.jit(make_predict(spec, stress=False))(params, graph)
    assert pred.energy.shape == (4, 3) and pred.forces.shape == (4, 16, 3)
    assert pred.stress is None
    e = np.asarray(pred.energy[:, :2])
    assert np.all(np.std(e, axis=0) > 1e-6)
    energy = make_energy(spec)
    jac = jax.jit(
        jax.jacrev(lambda pos: energy(params, graph._replace(positions=pos)).sum(axis=1))
    )(jnp.asarray(graph.positions))  # (K, N, 3): one gradient per head
    np.testing.assert_allclose(pred.forces, -jac, atol=1e-12)
    assert float(jnp.abs(pred.forces[1] - pred.forces[0]).max()) > 1e-8


def test_descriptors_invariant_padded_and_member0(graph):
    deep = _spec("deep", 2)
    pk = init_params(deep, 4)
    descriptors = jax.jit(make_descriptors(deep))
    d = np.asarray(descriptors(pk, graph))
    assert d.shape == (16, n_features(3, ARCH.max_order))
    n_real = int(graph.atom_mask.sum())
    assert np.all(d[n_real:] == 0.0) and np.abs(d[:n_real]).max() > 0
    single = _spec()
    d0 = np.asarray(jax.jit(make_descriptors(single))(init_params(single, 4), graph))
    np.testing.assert_allclose(d, d0, atol=1e-14)
    # Rotating every structure leaves the descriptors unchanged.
    rot = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    rotated = graph._replace(positions=graph.positions @ rot.T, cell=graph.cell @ rot.T)
    np.testing.assert_allclose(descriptors(pk, rotated), d, atol=1e-10)


def test_feature_scaling_standardises_training_descriptors(graph):
    spec = _spec("deep", 2)
    params = init_params(spec, 0)
    scaled = fit_feature_scaling(spec, params, [graph])
    # Other parameters are untouched; shift/scale are per member and per element.
    assert scaled["params"]["feature_shift"].shape == (2, 2, n_features(3, ARCH.max_order))
    np.testing.assert_array_equal(scaled["params"]["radial"], params["params"]["radial"])
    d = np.asarray(jax.jit(make_descriptors(spec))(scaled, graph))
    species = np.asarray(graph.species)
    for z in (0, 1):
        rows = d[np.asarray(graph.atom_mask) & (species == z)]
        std = rows.std(axis=0)
        np.testing.assert_allclose(rows.mean(axis=0), 0.0, atol=1e-8)
        # Unit spread, except features whose spread is below the floor (1% of their RMS).
        assert np.all(std <= 1.0 + 1e-6)
        assert np.mean(np.abs(std - 1.0) < 1e-6) > 0.8


@pytest.mark.parametrize("kind", ["shallow", "deep"])
def test_mean_forces_mode_equals_mean_of_members(graph, kind):
    spec = _spec(kind, 3)
    params = init_params(spec, 8)
    full = jax.jit(make_predict(spec, stress=True))(params, graph)
    mean = jax.jit(make_predict(spec, stress=True, member_forces=False))(params, graph)
    assert mean.forces.shape == (1, 16, 3) and mean.stress.shape == (1, 3, 3, 3)
    np.testing.assert_allclose(mean.energy, full.energy, rtol=1e-12)
    np.testing.assert_allclose(mean.atom_energy, full.atom_energy, atol=1e-12)
    np.testing.assert_allclose(mean.forces[0], full.forces.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(mean.stress[0], full.stress.mean(axis=0), atol=1e-12)


def test_installed_jax_compiles_vmapped_gradients_correctly():
    """Bare-JAX reproducer of jax-ml/jax#39103 (jax 0.10.2 on CPU): a jitted vmap of a float32
    gradient over parameter sets went wrong for every slice but the first beyond ~5000 rows.
    Deep ensembles rely on exactly this pattern, so a broken install must fail here."""
    rng = np.random.default_rng(0)
    weights = jnp.asarray(rng.normal(size=(3, 8, 6)), jnp.float32)
    x = jnp.linspace(0.5, 5.0, 20_000).astype(jnp.float32)
    centres = jnp.linspace(0.5, 5.0, 8).astype(jnp.float32)

    def f(w, x):
        g = jnp.exp(-0.5 * ((x[:, None] - centres) / 0.6) ** 2) * x[:, None]
        return ((g @ w) ** 2).sum()

    batched = jax.jit(jax.vmap(jax.grad(f, argnums=1), in_axes=(0, None)))(weights, x)
    for k in range(3):
        single = jax.grad(f, argnums=1)(weights[k], x)
        np.testing.assert_allclose(
            batched[k], single, rtol=1e-4, atol=1e-4 * float(abs(single).max())
        )


def test_jitted_deep_members_match_unjitted_in_float32():
    """Per-member forces of a jitted float32 deep ensemble on a 864-atom cell (> 30 000 edges)
    equal the un-jitted ones (member 0 alone would hide a batching bug)."""
    spec = ModelSpec(
        ModelConfig(architecture=ARCH, ensemble=EnsembleConfig(kind="deep", size=3)),
        species=("Cu",),
        offsets=(0.0,),
    )
    params = init_params(spec, 0)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((6, 6, 6))
    atoms.rattle(0.05, seed=1)
    g = jax.tree.map(jnp.asarray, build_graph([atoms], spec.cutoff, spec.type_map()))
    predict = make_predict(spec, stress=False)
    jitted = np.asarray(jax.jit(predict)(params, g).forces)
    eager = np.asarray(predict(params, g).forces)
    scale = np.abs(eager).max()
    assert scale > 0
    np.testing.assert_allclose(jitted, eager, atol=1e-4 * scale)
