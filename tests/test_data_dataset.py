"""DataConfig, deterministic splits, weights, fingerprints, loading and reference energies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from pydantic import ValidationError

from mlipctl.config.data import (
    DataConfig,
    IsolatedAtomsReference,
    LeastSquaresReference,
    NoReference,
)
from mlipctl.data.dataset import (
    apply_config_type_weights,
    fingerprint,
    load_dataset,
    split_indices,
)
from mlipctl.data.io import Labelled, read_structures, write_structures_atomic
from mlipctl.data.offsets import (
    fit_reference_energies,
    offset_energy,
    reference_energies,
)
from mlipctl.errors import UserInputError

# ---------------------------------------------------------------- config


def test_data_config_defaults_and_union(tmp_path: Path) -> None:
    cfg = DataConfig.model_validate({"path": "train.extxyz"})
    assert cfg.energy_key == "energy" and cfg.forces_key == "forces" and cfg.stress_key == "stress"
    assert cfg.config_type_key == "config_type" and cfg.weight_key is None
    assert isinstance(cfg.reference_energies, LeastSquaresReference)
    iso = DataConfig.model_validate(
        {
            "path": "t.xyz",
            "reference_energies": {"kind": "isolated_atoms", "energies": {"Cu": -0.2}},
        }
    )
    assert isinstance(iso.reference_energies, IsolatedAtomsReference)
    assert iso.reference_energies.energies == {"Cu": -0.2}
    none = DataConfig.model_validate({"path": "t.xyz", "reference_energies": {"kind": "none"}})
    assert isinstance(none.reference_energies, NoReference)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"valid_fraction": 0.6, "test_fraction": 0.4}, "must be < 1"),
        ({"valid_fraction": 1.0}, "less than 1"),
        ({"test_fraction": -0.1}, "greater than or equal to 0"),
        ({"energy_kye": "e"}, "Extra inputs are not permitted"),
        (
            {"reference_energies": {"kind": "isolated_atoms", "energies": {"cu": 1.0}}},
            "did you mean 'Cu'",
        ),
        ({"reference_energies": {"kind": "magic"}}, "does not match any of the expected tags"),
        ({"config_type_weights": {"Surface": -1.0}}, "must be >= 0"),
    ],
)
def test_data_config_rejects(extra: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DataConfig.model_validate({"path": "t.xyz", **extra})


def test_data_config_file_check_and_separate_files(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="file not found: .*missing.xyz"):
        DataConfig.model_validate(
            {"path": str(tmp_path / "missing.xyz")}, context={"check_files": True}
        )
    # with a separate valid file, valid_fraction does not take training data
    cfg = DataConfig.model_validate(
        {"path": "a.xyz", "valid_path": "b.xyz", "valid_fraction": 0.9, "test_fraction": 0.5}
    )
    assert cfg.valid_fraction == 0.9


def test_every_field_documented_and_config_import_is_light() -> None:
    for model in (DataConfig, LeastSquaresReference, IsolatedAtomsReference, NoReference):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
    code = (
        "import sys, mlipctl.config.data; "
        "heavy = [m for m in ('ase', 'jax', 'numpy', 'matplotlib', 'scipy') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- splits


def test_split_is_pinned_for_a_seed() -> None:
    # SHA-256 ordering: these numbers hold on every platform and NumPy version.
    s = split_indices(["x"] * 20, valid_fraction=0.25, seed=7, stratify=False)
    assert s.valid.tolist() == [3, 8, 10, 17, 19]
    assert split_indices(
        ["x"] * 20, valid_fraction=0.25, seed=8, stratify=False
    ).valid.tolist() != [
        3,
        8,
        10,
        17,
        19,
    ]


def test_split_deterministic_disjoint_and_stratified() -> None:
    types = ["bulk"] * 40 + ["surface"] * 5 + ["vacancy"] * 3 + ["dimer"] * 1
    a = split_indices(types, valid_fraction=0.2, test_fraction=0.1, seed=3)
    b = split_indices(types, valid_fraction=0.2, test_fraction=0.1, seed=3)
    for part in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    together = np.concatenate([a.train, a.valid, a.test])
    assert sorted(together.tolist()) == list(range(len(types)))  # disjoint and complete
    assert len(a.valid) == 8 + 1 + 1 and len(a.test) == 4 + 1 + 1
    for group in ("surface", "vacancy"):
        for part in (a.train, a.valid, a.test):
            assert any(types[i] == group for i in part), f"{group} missing from a split"
    assert [types[i] for i in a.train].count("dimer") == 1  # a singleton stays in training
    plain = split_indices(types, valid_fraction=0.2, test_fraction=0.1, seed=3, stratify=False)
    assert len(plain.valid) == round(0.2 * len(types)) and len(plain.test) == round(
        0.1 * len(types)
    )
    c = split_indices(types, valid_fraction=0.2, test_fraction=0.1, seed=4)
    assert a.valid.tolist() != c.valid.tolist()
    with pytest.raises(ValueError, match="must be < 1"):
        split_indices(types, valid_fraction=0.5, test_fraction=0.5)


# ---------------------------------------------------------------- weights, fingerprint


def _labelled(n: int = 3) -> list[Labelled]:
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.6 + 0.01 * k, cubic=True)
        out.append(
            Labelled(
                atoms=a,
                energy=-14.0 + k,
                forces=np.full((4, 3), 0.1 * k),
                stress=np.eye(3) * 1e-3 * k,
                config_type="A" if k % 2 else "B",
                index=k,
            )
        )
    return out


def test_config_type_weights() -> None:
    data = _labelled()
    data[0].weight = 2.0
    out = apply_config_type_weights(data, {"B": 3.0})
    assert [s.weight for s in out] == [6.0, 1.0, 3.0]
    assert data[0].weight == 2.0  # input untouched
    with pytest.raises(UserInputError, match=r"not in the data: \['b'\]; present: \['A', 'B'\]"):
        apply_config_type_weights(data, {"b": 3.0})


def test_fingerprint_stable_and_sensitive() -> None:
    data = _labelled()
    fp = fingerprint(data)
    assert fp == fingerprint(_labelled()) and len(fp) == 64
    data[1].weight = 5.0
    assert fingerprint(data) == fp  # weights are training settings, not data
    moved = _labelled()
    moved[2].atoms.positions[0, 0] += 1e-9
    assert fingerprint(moved) != fp
    relabelled = _labelled()
    relabelled[0].energy += 1e-9
    assert fingerprint(relabelled) != fp
    no_stress = _labelled()
    no_stress[0].stress = None
    assert fingerprint(no_stress) != fp
    assert fingerprint(_labelled()[::-1]) != fp


def test_load_dataset_splits_and_weights(tmp_path: Path, emt_cu_structures: list) -> None:
    train = tmp_path / "train.extxyz"
    write_structures_atomic(train, emt_cu_structures * 3)  # 18 structures, 3 config types
    cfg = DataConfig.model_validate(
        {
            "path": str(train),
            "valid_fraction": 0.2,
            "seed": 1,
            "config_type_weights": {"Vacancy": 4.0},
        },
        context={"check_files": True},
    )
    ds = load_dataset(cfg)
    assert len(ds.train) + len(ds.valid) == 18 and not ds.test
    assert {s.config_type for s in ds.valid} == {"Elastic", "AIMD-NVT", "Vacancy"}
    assert all(
        s.weight == (4.0 if s.config_type == "Vacancy" else 1.0) for s in ds.train + ds.valid
    )
    assert load_dataset(cfg).fingerprints() == ds.fingerprints()

    valid = tmp_path / "valid.extxyz"
    write_structures_atomic(valid, emt_cu_structures[:2])
    sep = cfg.model_copy(update={"valid_path": valid})
    ds2 = load_dataset(sep)
    assert len(ds2.train) == 18 and len(ds2.valid) == 2
    bad = cfg.model_copy(update={"config_type_weights": {"Surface": 2.0}})
    with pytest.raises(UserInputError, match="Surface"):
        load_dataset(bad)


# ---------------------------------------------------------------- reference energies


def _alloy(n_ni: int, n_cu: int, e_ni: float, e_cu: float, noise: float = 0.0) -> Labelled:
    rng = np.random.default_rng(n_ni * 31 + n_cu)
    atoms = Atoms(["Ni"] * n_ni + ["Cu"] * n_cu, positions=rng.uniform(0, 8, (n_ni + n_cu, 3)))
    return Labelled(atoms=atoms, energy=n_ni * e_ni + n_cu * e_cu + noise)


def test_least_squares_two_elements_exact() -> None:
    data = [_alloy(a, b, -5.5, -3.7) for a, b in [(1, 3), (4, 0), (2, 2), (0, 5), (6, 1)]]
    data.append(Labelled(atoms=Atoms("Cu"), energy=None))  # unlabelled structures are skipped
    fit = fit_reference_energies(data)
    assert set(fit) == {"Cu", "Ni"}
    assert fit["Ni"] == pytest.approx(-5.5, abs=1e-10) and fit["Cu"] == pytest.approx(
        -3.7, abs=1e-10
    )
    assert offset_energy(np.array([28, 29, 29]), fit) == pytest.approx(-5.5 - 7.4)


def test_least_squares_single_element_is_mean_per_atom() -> None:
    data = [
        Labelled(atoms=Atoms("Cu" * n), energy=e) for n, e in [(1, -3.0), (4, -14.0), (2, -7.5)]
    ]
    fit = fit_reference_energies(data)
    assert fit["Cu"] == pytest.approx(np.mean([-3.0, -3.5, -3.75]), abs=1e-12)


def test_reference_energy_kinds_and_errors() -> None:
    data = [_alloy(1, 1, -5.0, -3.0), _alloy(2, 1, -5.0, -3.0)]
    assert reference_energies(NoReference(), data) == {"Cu": 0.0, "Ni": 0.0}
    iso = IsolatedAtomsReference(energies={"Cu": -0.1, "Ni": -0.5, "Al": -0.2})
    assert reference_energies(iso, data) == {"Cu": -0.1, "Ni": -0.5}
    with pytest.raises(UserInputError, match=r"lacks \['Ni'\]"):
        reference_energies(IsolatedAtomsReference(energies={"Cu": -0.1}), data)
    with pytest.raises(UserInputError, match=r"for \['Al'\]: no labelled structure"):
        fit_reference_energies(data, ["Al", "Cu", "Ni"])
    with pytest.raises(UserInputError, match="no structure has an energy"):
        fit_reference_energies([Labelled(atoms=Atoms("Cu"))])
    with pytest.warns(UserWarning, match="not all determined"):
        fit_reference_energies([_alloy(1, 1, -5.0, -3.0), _alloy(2, 2, -5.0, -3.0)])
    with pytest.raises(UserInputError, match="no reference energy for Ni"):
        offset_energy(np.array([28]), {"Cu": 1.0})


@pytest.mark.mlearn
def test_mlearn_cu_offset_is_mean_energy_per_atom(mlearn_dir: Path) -> None:
    data = read_structures(mlearn_dir / "Cu" / "training.extxyz")
    fit = fit_reference_energies(data)
    mean = np.mean([s.energy / len(s.atoms) for s in data])
    assert fit["Cu"] == pytest.approx(mean, abs=1e-10)
    assert -4.2 < fit["Cu"] < -3.5  # PBE Cu: about -4.0 eV/atom in these cells
