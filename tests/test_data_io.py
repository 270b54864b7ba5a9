"""Reading/writing labelled structures: label locations, stress forms, errors, mlearn Cu."""

from __future__ import annotations

import re
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase.build import bulk

from mlipctl.data.io import Labelled, read_structures, stress_to_3x3, write_structures_atomic
from mlipctl.errors import UserInputError

EV_PER_A3_PER_GPA = 1.0 / 160.21766208


def test_stress_voigt_and_3x3_agree() -> None:
    full = np.array([[1.0, 6.0, 5.0], [6.0, 2.0, 4.0], [5.0, 4.0, 3.0]])
    voigt = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # xx yy zz yz xz xy
    np.testing.assert_array_equal(stress_to_3x3(voigt), full)
    np.testing.assert_array_equal(stress_to_3x3(full.ravel()), full)
    np.testing.assert_array_equal(stress_to_3x3(full), full)
    with pytest.raises(ValueError, match="6 \\(Voigt\\) or 9"):
        stress_to_3x3(np.zeros(4))


def test_custom_keys_and_stress_forms_from_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    full = np.array([[1.0, 6.0, 5.0], [6.0, 2.0, 4.0], [5.0, 4.0, 3.0]]) * 1e-3
    frames = []
    for k, stress in enumerate([full, np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) * 1e-3]):
        a = bulk("Cu", "fcc", a=3.61, cubic=True)
        a.info["dft_energy"] = -10.0 - k
        a.info["dft_stress"] = stress
        a.info["kind"] = f"group{k}"
        a.info["w"] = 2.5
        a.arrays["dft_forces"] = rng.normal(size=(4, 3))
        frames.append(a)
    path = tmp_path / "custom.extxyz"
    ase.io.write(path, frames)
    out = read_structures(
        path,
        energy_key="dft_energy",
        forces_key="dft_forces",
        stress_key="dft_stress",
        config_type_key="kind",
        weight_key="w",
    )
    assert [o.energy for o in out] == [-10.0, -11.0]
    np.testing.assert_allclose(out[0].forces, frames[0].arrays["dft_forces"])
    np.testing.assert_allclose(out[0].stress, full)
    np.testing.assert_allclose(out[1].stress, full)  # Voigt in the file, 3x3 after reading
    assert [o.config_type for o in out] == ["group0", "group1"]
    assert [o.weight for o in out] == [2.5, 2.5] and [o.index for o in out] == [0, 1]
    # default keys find nothing: labels are optional
    bare = read_structures(path)
    assert bare[0].energy is None and bare[0].forces is None and bare[0].stress is None
    assert bare[0].config_type == "default" and bare[0].weight == 1.0


def test_roundtrip_calculator_labels(tmp_path: Path, emt_cu_structures: list) -> None:
    # EMT labels sit in a SinglePointCalculator; extxyz stores them in the standard keys.
    path = tmp_path / "sub" / "emt.extxyz"
    write_structures_atomic(path, emt_cu_structures)
    assert not [p for p in path.parent.iterdir() if p.name != "emt.extxyz"], "temp file left"
    first = read_structures(path)
    for item, atoms in zip(first, emt_cu_structures, strict=True):
        assert item.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-12)
        # extxyz writes per-atom columns with 8 decimals (ASE's format)
        np.testing.assert_allclose(item.forces, atoms.get_forces(), rtol=0, atol=5.1e-9)
        np.testing.assert_allclose(item.stress, atoms.get_stress(voigt=False), atol=1e-12)
        assert item.config_type == atoms.info["config_type"] and item.atoms.calc is None
    # Labelled -> file -> Labelled keeps labels and weights
    first[0].weight = 3.0
    write_structures_atomic(path, first)
    second = read_structures(path, weight_key="weight")
    assert second[0].weight == 3.0 and second[1].weight == 1.0
    for a, b in zip(first, second, strict=True):
        assert a.energy == b.energy and a.config_type == b.config_type
        np.testing.assert_array_equal(a.forces, b.forces)
        np.testing.assert_array_equal(a.stress, b.stress)


def test_index_selector_keeps_file_positions(tmp_path: Path, emt_cu_structures: list) -> None:
    path = tmp_path / "emt.extxyz"
    write_structures_atomic(path, emt_cu_structures)
    assert [s.index for s in read_structures(path, index="1:6:2")] == [1, 3, 5]
    assert [s.index for s in read_structures(path, index="-1")] == [5]
    with pytest.raises(UserInputError, match="selects no structures"):
        read_structures(path, index="10:20")
    with pytest.raises(UserInputError, match="not a valid selector"):
        read_structures(path, index="abc")


def test_nan_labels_name_file_and_structure(tmp_path: Path) -> None:
    good = bulk("Cu", "fcc", a=3.61, cubic=True)
    good.info["energy_dft"] = -1.0
    bad = good.copy()
    bad.info["energy_dft"] = float("nan")
    path = tmp_path / "nan.extxyz"
    ase.io.write(path, [good, bad])
    with pytest.raises(UserInputError) as err:
        read_structures(path, energy_key="energy_dft")
    assert (
        str(path) in str(err.value) and "structure 1" in str(err.value) and "nan" in str(err.value)
    )

    f = good.copy()
    f.arrays["F"] = np.zeros((4, 3))
    f.arrays["F"][2, 1] = np.nan
    ase.io.write(path, [f])
    with pytest.raises(UserInputError, match=r"structure 0: forces 'F' contain NaN/inf \(atom 2\)"):
        read_structures(path, forces_key="F")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.extxyz"
    with pytest.raises(UserInputError, match=f"data file not found: {re.escape(str(missing))}"):
        read_structures(missing)
    garbage = tmp_path / "notes.xyz"
    garbage.write_text("hello world\nthis is not a structure\n")
    with pytest.raises(
        UserInputError, match=f"cannot read structures from {re.escape(str(garbage))}"
    ):
        read_structures(garbage)
    toml = tmp_path / "settings.toml"
    toml.write_text("[a]\nb = 1\n")
    with pytest.raises(UserInputError, match="cannot read structures from .*settings.toml"):
        read_structures(toml)


def test_write_rejects_empty_and_keeps_old_file_on_error(tmp_path: Path) -> None:
    path = tmp_path / "out.extxyz"
    path.write_text("old")
    with pytest.raises(ValueError, match="empty"):
        write_structures_atomic(path, [])

    good = Labelled(atoms=bulk("Cu"), energy=-1.0)
    # the writer fails on the second frame, after the temp file already holds the first
    with pytest.raises(Exception):  # noqa: B017 - whatever ASE raises, the old file must survive
        write_structures_atomic(path, [good, "not a structure"])  # type: ignore[list-item]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.extxyz"]


@pytest.mark.mlearn
def test_mlearn_cu_training(mlearn_dir: Path) -> None:
    path = mlearn_dir / "Cu" / "training.extxyz"
    data = read_structures(path)
    assert len(data) == 262
    assert sum(len(s.atoms) for s in data) == 27416
    assert all(s.energy is not None and s.forces is not None and s.stress is not None for s in data)
    assert {s.config_type for s in data} == {"Elastic", "Surface", "AIMD-NVT", "Vacancy"}
    # ASE convention: raw VASP kBar (positive = compressive) -> -0.1 GPa -> eV/Å^3
    for s in data[::10]:
        raw = np.asarray(s.atoms.info["virial_stress_kB_raw"], dtype=float)
        np.testing.assert_allclose(
            np.diag(s.stress), -raw[:3] * 0.1 * EV_PER_A3_PER_GPA, rtol=1e-6, atol=1e-9
        )
    # the 3x3 stress equals the file's own info line, bypassing ASE's calculator handling
    header = path.read_text().splitlines()[1]
    stress = np.array(re.search(r' stress="([^"]+)"', header).group(1).split(), dtype=float)
    np.testing.assert_array_equal(data[0].stress, stress.reshape(3, 3))
    assert np.allclose(data[0].stress, data[0].stress.T)
