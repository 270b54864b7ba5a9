"""The .mlip model file: bit-exact round trip and clear errors for every kind of bad file."""

from __future__ import annotations

import json
import struct

import jax
import numpy as np
import pytest
from ase.build import bulk

import mlipctl
from mlipctl.config.model import EnsembleConfig, ModelConfig, MomentModelConfig
from mlipctl.data.neighbors import build_graph
from mlipctl.errors import UserInputError
from mlipctl.model import io
from mlipctl.model.potential import ModelSpec, Potential, load_potential, make_predict

ARCH = MomentModelConfig(cutoff=3.5, n_basis=4, n_radial=2, max_order=2, hidden=(4,))


@pytest.fixture(scope="module")
def potential() -> Potential:
    spec = ModelSpec(
        ModelConfig(architecture=ARCH, ensemble=EnsembleConfig(kind="deep", size=2)),
        species=("Cu", "Ni"),
        offsets=(-3.1, -4.2),
        energy_shift=0.25,
        energy_scale=0.5,
    )
    pot = Potential.initialize(spec, seed=9)
    pot.calibration = {"energy": 1.7, "forces": 0.8}
    pot.fingerprint = "sha256:abc123"
    pot.metadata = {"note": "unit test", "metrics": {"energy_mae": 0.5}}
    return pot


@pytest.fixture()
def saved(potential, tmp_path):
    return potential.save(tmp_path / "model.mlip")


def test_round_trip_is_bit_exact(potential, saved, tmp_path):
    loaded = mlipctl.load(str(saved))
    assert loaded.spec == potential.spec
    assert loaded.calibration == {"energy": 1.7, "forces": 0.8}
    assert loaded.fingerprint == "sha256:abc123"
    assert loaded.metadata == potential.metadata
    assert loaded.versions["jax"] == jax.__version__ and "mlipctl" in loaded.versions
    assert loaded.created is not None
    a = jax.tree_util.tree_leaves_with_path(potential.params)
    b = jax.tree_util.tree_leaves_with_path(loaded.params)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (_, x), (_, y) in zip(a, b, strict=True):
        assert x.dtype == y.dtype == np.float32
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()

    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.symbols[1] = "Ni"
    atoms.rattle(0.05, seed=0)
    graph = build_graph([atoms], ARCH.cutoff, potential.spec.type_map())
    predict = jax.jit(make_predict(potential.spec, stress=True))
    before, after = predict(potential.params, graph), predict(loaded.params, graph)
    for x, y in zip(before, after, strict=True):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()

    # Saving the loaded potential again reproduces the file byte for byte.
    again = loaded.save(tmp_path / "again.mlip")
    assert again.read_bytes() == saved.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.mlip", "model.mlip"]


def test_default_calibration_and_header_contents(tmp_path):
    spec = ModelSpec(ModelConfig(architecture=ARCH), ("Cu",), (0.0,))
    path = Potential.initialize(spec).save(tmp_path / "m.mlip")
    header, _ = io.decode(path.read_bytes())
    assert header["calibration"] == {"energy": 1.0, "forces": 1.0}
    assert header["spec"]["config"]["architecture"]["kind"] == "moment"
    assert header["spec"]["config"]["architecture"]["cutoff"] == 3.5
    assert header["format_version"] == io.FORMAT_VERSION
    assert load_potential(path).calibration == {"energy": 1.0, "forces": 1.0}


def test_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="model file not found: .*nope.mlip"):
        load_potential(tmp_path / "nope.mlip")


def test_wrong_magic(tmp_path):
    path = tmp_path / "data.mlip"
    path.write_text("Lattice=... this is an extxyz file\n")
    with pytest.raises(UserInputError, match=r"data\.mlip: not an mlipctl model file"):
        load_potential(path)


@pytest.mark.parametrize("keep", [0.3, 0.999, 10])
def test_truncated(saved, keep):
    data = saved.read_bytes()
    n = int(len(data) * keep) if keep < 1 else keep
    saved.write_bytes(data[:n])
    with pytest.raises(UserInputError, match=r"model\.mlip: model file is truncated"):
        load_potential(saved)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_corrupt_byte(saved, where):
    data = bytearray(saved.read_bytes())
    k = int(len(data) * where)
    data[k] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="model.mlip: model file"):
        load_potential(saved)


def test_future_version(saved):
    data = bytearray(saved.read_bytes())
    struct.pack_into("<I", data, len(io.MAGIC), io.FORMAT_VERSION + 1)
    saved.write_bytes(bytes(data))
    with pytest.raises(UserInputError, match="format version 2 is newer"):
        load_potential(saved)


def _rewrite(path, edit) -> None:
    header, params = io.decode(path.read_bytes())
    edit(header, params)
    path.write_bytes(io.encode(header, params))


def test_unknown_architecture_kind(saved):
    def edit(header, _):
        header["spec"]["config"]["architecture"]["kind"] = "mace"

    _rewrite(saved, edit)
    with pytest.raises(UserInputError, match="incompatible model .*'mace'"):
        load_potential(saved)


def test_parameters_not_matching_architecture(saved):
    def edit(header, _):
        header["spec"]["config"]["architecture"]["n_radial"] = 3

    _rewrite(saved, edit)
    with pytest.raises(UserInputError, match="parameter shapes do not match"):
        load_potential(saved)


def test_missing_parameter(saved):
    def edit(_, params):
        del params["params"]["radial"]

    _rewrite(saved, edit)
    with pytest.raises(UserInputError, match="parameters do not match the architecture"):
        load_potential(saved)


def test_file_from_before_the_linear_readout_loads_without_it(potential, saved):
    """Files written before ``linear_readout`` existed have neither the key nor the parameters."""

    def edit(header, params):
        del header["spec"]["config"]["architecture"]["linear_readout"]
        params["params"]["readout"].pop("linear")

    _rewrite(saved, edit)
    old = load_potential(saved)
    assert old.spec.config.architecture.linear_readout is False
    assert "linear" not in old.params["params"]["readout"]
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    # With its zero-initialised linear term the fresh potential predicts what the old one does.
    ref = potential.calculator().get_potential_energy(atoms.copy())
    assert old.calculator().get_potential_energy(atoms.copy()) == pytest.approx(ref, rel=1e-6)


def test_header_without_spec(saved):
    def edit(header, _):
        del header["spec"]

    _rewrite(saved, edit)
    with pytest.raises(UserInputError, match="lacks a valid 'spec'"):
        load_potential(saved)


def test_unknown_species_in_header(saved):
    def edit(header, _):
        header["spec"]["species"] = ["Cu", "Qq"]

    _rewrite(saved, edit)
    with pytest.raises(UserInputError, match=r"model\.mlip: unknown element symbol"):
        load_potential(saved)


def test_save_is_atomic_and_rejects_bad_metadata(potential, saved):
    before = saved.read_bytes()
    bad = Potential(spec=potential.spec, params=potential.params, metadata={"x": float("nan")})
    with pytest.raises(UserInputError, match="JSON-serialisable"):
        bad.save(saved)
    assert saved.read_bytes() == before  # the old file is untouched
    assert [p.name for p in saved.parent.iterdir()] == ["model.mlip"]  # no temp files left


def test_header_is_plain_json(saved):
    data = saved.read_bytes()
    (n_head,) = struct.unpack_from("<Q", data, len(io.MAGIC) + 4)
    header = json.loads(data[len(io.MAGIC) + 12 : len(io.MAGIC) + 12 + n_head])
    assert header["spec"]["species"] == ["Cu", "Ni"]
