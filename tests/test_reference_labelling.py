"""label_structures: exact labels, input order, streaming, and failures that do not stop a batch.

Failures are injected with tests/_failing_calc.py (imported by path through the ``import``
reference kind, in this process and in worker processes).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.io import read, write

from mlipctl.config.reference import ParallelConfig
from mlipctl.errors import UserInputError
from mlipctl.reference import labelling
from mlipctl.reference.labelling import WORKER_DIED, LabelResult, label_structures

TESTS = Path(__file__).resolve().parent
EMT_CFG = {"kind": "emt"}
FAILING = {"kind": "import", "class_path": "_failing_calc:FailingEMT"}


@pytest.fixture
def helpers_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def _cu(seed: int, config_type: str = "bulk", fail: str | None = None) -> Atoms:
    atoms = bulk("Cu", "fcc", a=3.61 + 0.01 * seed, cubic=True)
    atoms.rattle(0.05, seed=seed)
    atoms.info["config_type"] = config_type
    if fail is not None:
        atoms.info["fail"] = fail
    return atoms


def _cluster() -> Atoms:
    atoms = Atoms("Cu4", positions=[[0, 0, 0], [2.5, 0, 0], [1.25, 2.2, 0], [1.25, 0.7, 2.0]])
    atoms.info["config_type"] = "cluster"
    return atoms


def _direct(atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray | None]:
    a = atoms.copy()
    a.set_constraint()
    a.calc = EMT()
    stress = a.get_stress(voigt=False) if a.pbc.all() else None
    return a.get_potential_energy(), a.get_forces(), stress


def _assert_matches_emt(result: LabelResult, atoms: Atoms) -> None:
    assert result.ok, result.error
    assert result.error is None
    e, f, s = _direct(atoms)
    assert result.energy == e
    np.testing.assert_array_equal(result.forces, f)
    if s is None:
        assert result.stress is None
    else:
        np.testing.assert_array_equal(result.stress, s)
    assert result.atoms.info == atoms.info
    assert result.atoms.get_potential_energy() == e
    np.testing.assert_array_equal(result.atoms.get_forces(apply_constraint=False), f)


def _check_failures(results: list[LabelResult], structures: list[Atoms]) -> None:
    """Every structure tagged ``fail`` failed with its reason; all others equal direct EMT."""
    expected = {
        "raise": "RuntimeError: injected failure",
        "nan": "NonFiniteResult: the calculator returned a non-finite energy (nan)",
        "exit": WORKER_DIED,
        "sleep": "Timeout: calculation exceeded timeout_s=",
        "hang": "Timeout: calculation exceeded timeout_s=",
    }
    assert [r.index for r in results] == list(range(len(structures)))
    for r, atoms in zip(results, structures, strict=True):
        mode = atoms.info.get("fail")
        if mode is None:
            _assert_matches_emt(r, atoms)
        else:
            assert not r.ok, mode
            assert r.error is not None and r.error.startswith(expected[mode]), (mode, r.error)
            assert r.energy is None and r.forces is None and r.stress is None
            assert r.atoms.calc is None and r.atoms.info == atoms.info
    hang = [r for r, a in zip(results, structures, strict=True) if a.info.get("fail") == "hang"]
    for r in hang:
        assert r.error is not None and "its worker process was killed" in r.error


# ----------------------------------------------------------------------------- serial, exact


def test_serial_labels_equal_direct_emt_calls_and_stream_in_order():
    structures = [_cu(0, "bulk"), _cu(1, "strained"), _cluster(), _cu(2, "bulk")]
    before = [a.copy() for a in structures]
    seen: list[tuple[int, int]] = []
    results = label_structures(
        structures, EMT_CFG, on_result=lambda i, r: seen.append((i, r.index))
    )
    assert seen == [(0, 0), (1, 1), (2, 2), (3, 3)]
    for r, atoms in zip(results, structures, strict=True):
        _assert_matches_emt(r, atoms)
        assert r.wall_time_s > 0
    cluster = results[2]
    assert cluster.stress is None
    assert cluster.stress_note is not None and "not periodic" in cluster.stress_note
    assert results[0].stress_note is None
    # The inputs are untouched: no calculator attached, same positions.
    for a, b in zip(structures, before, strict=True):
        assert a.calc is None
        np.testing.assert_array_equal(a.positions, b.positions)


def test_labels_are_derivatives_of_the_energy():
    """Physics check on what is stored: F = -dE/dx and σ = (1/V) dE/dε (ASE's sign)."""
    atoms = _cu(5)
    (r,) = label_structures([atoms], EMT_CFG)
    h = 1e-5
    for atom, axis in [(0, 0), (2, 1)]:
        e = []
        for sign in (1, -1):
            a = atoms.copy()
            a.positions[atom, axis] += sign * h
            a.calc = EMT()
            e.append(a.get_potential_energy())
        assert -(e[0] - e[1]) / (2 * h) == pytest.approx(r.forces[atom, axis], abs=1e-6)
    for i, j in [(0, 0), (1, 2)]:
        e = []
        for sign in (1, -1):
            eps = np.eye(3)
            eps[i, j] += sign * h / (2 if i != j else 1)
            eps[j, i] += sign * h / 2 if i != j else 0
            a = atoms.copy()
            a.set_cell(atoms.cell.array @ eps, scale_atoms=True)
            a.calc = EMT()
            e.append(a.get_potential_energy())
        dE = (e[0] - e[1]) / (2 * h)
        assert dE / atoms.get_volume() == pytest.approx(r.stress[i, j], abs=1e-6)


def test_labels_survive_an_extxyz_round_trip(tmp_path):
    structures = [_cu(0, "bulk"), _cluster()]
    results = label_structures(structures, EMT_CFG)
    path = tmp_path / "labelled.extxyz"
    write(path, [r.atoms for r in results], format="extxyz")
    back = read(path, index=":")
    for r, b in zip(results, back, strict=True):
        assert b.info["config_type"] == r.atoms.info["config_type"]
        assert b.get_potential_energy() == pytest.approx(r.energy, abs=1e-10)
        np.testing.assert_allclose(b.get_forces(), r.forces, rtol=0, atol=1e-7)  # 8 decimals
    np.testing.assert_allclose(back[0].get_stress(voigt=False), results[0].stress, atol=1e-7)


def test_property_subsets_and_raw_forces_under_constraints():
    atoms = _cu(3)
    (e_only,) = label_structures([atoms], EMT_CFG, properties=("energy",))
    assert e_only.ok and e_only.forces is None and e_only.stress is None
    assert e_only.stress_note is None
    assert set(e_only.atoms.calc.results) <= {"energy", "free_energy"}
    (ef,) = label_structures([atoms], EMT_CFG, properties=["forces"])  # energy always computed
    assert ef.energy == e_only.energy and ef.forces is not None and ef.stress is None
    # Constraints of the input do not zero the labels: training needs the true forces.
    fixed = atoms.copy()
    fixed.set_constraint(FixAtoms(indices=[0]))
    (r,) = label_structures([fixed], EMT_CFG)
    np.testing.assert_array_equal(r.forces, _direct(atoms)[1])
    assert np.abs(r.forces[0]).max() > 1e-3
    with pytest.raises(UserInputError, match="unknown property charges"):
        label_structures([atoms], EMT_CFG, properties=("energy", "charges"))


def test_bad_structures_fail_alone_with_the_reason():
    nan = _cu(1)
    nan.positions[2, 1] = np.nan
    overlap = _cu(2)
    overlap.positions[3] = overlap.positions[1] + [0.01, 0.0, 0.0]
    iron = bulk("Fe", "bcc", a=2.87, cubic=True)
    structures = [_cu(0), nan, overlap, iron, Atoms(), _cu(4)]
    results = label_structures(structures, EMT_CFG)
    assert [r.ok for r in results] == [True, False, False, False, False, True]
    assert results[1].error == "UserInputError: structure has non-finite (NaN or inf) positions"
    assert results[2].error is not None and "atoms 1 and 3 are 0.01 Å apart" in results[2].error
    assert results[3].error is not None and "element(s) Fe not supported by the 'emt'" in (
        results[3].error
    )
    assert results[4].error == "UserInputError: structure has no atoms"
    _assert_matches_emt(results[5], structures[5])


def test_bad_arguments_raise_before_any_work(monkeypatch):
    with pytest.raises(UserInputError, match="structure 1 is a str, not an ase.Atoms"):
        label_structures([_cu(0), "POSCAR"], EMT_CFG)
    with pytest.raises(UserInputError, match="invalid reference calculator config"):
        label_structures([_cu(0)], {"kind": "vasp"})
    with pytest.raises(UserInputError, match="invalid parallel config.*workers"):
        label_structures([_cu(0)], EMT_CFG, {"backend": "processes", "workers": 0})
    monkeypatch.setitem(sys.modules, "tblite", None)
    monkeypatch.setitem(sys.modules, "tblite.ase", None)
    with pytest.raises(UserInputError, match=r"pip install mlipctl\[dft\]"):
        label_structures([_cu(0)], {"kind": "tblite"})
    assert label_structures([], EMT_CFG) == []


def test_progress_bar(capsys):
    results = label_structures([_cu(0), _cu(1)], EMT_CFG, progress=True)
    assert all(r.ok for r in results)
    assert "labelling" in capsys.readouterr().out


# ----------------------------------------------------------------------------- injected failures


def test_serial_failures_are_recorded_and_the_rest_is_labelled(helpers_on_path):
    structures = [
        _cu(0),
        _cu(1, fail="raise"),
        _cu(2, fail="nan"),
        _cu(3),
        _cu(4, fail="sleep"),
        _cluster(),
    ]
    results = label_structures(structures, FAILING, ParallelConfig(timeout_s=0.5))
    _check_failures(results, structures)
    assert 0.45 <= results[4].wall_time_s < 10.0  # stopped at the deadline, not after 30 s


def test_timeout_outside_the_main_thread(helpers_on_path):
    """Off the main thread SIGALRM is unavailable; the deadline uses an async exception."""
    structures = [_cu(0, fail="sleep"), _cu(1)]
    box: list[list[LabelResult]] = []
    t = threading.Thread(
        target=lambda: box.append(
            label_structures(structures, FAILING, ParallelConfig(timeout_s=0.3))
        )
    )
    t.start()
    t.join(timeout=20)
    assert not t.is_alive()
    _check_failures(box[0], structures)


def test_processes_survive_errors_nan_and_a_dying_worker(helpers_on_path):
    structures = [
        _cu(0),
        _cu(1, fail="raise"),
        _cu(2, fail="exit"),
        _cu(3, fail="nan"),
        _cluster(),
        _cu(5),
        _cu(6),
    ]
    parent = os.getpid()
    arrivals: list[int] = []

    def on_result(i: int, r: LabelResult) -> None:
        assert os.getpid() == parent  # callers stream to disk from the parent
        arrivals.append(i)

    results = label_structures(
        structures, FAILING, ParallelConfig(backend="processes", workers=2), on_result=on_result
    )
    _check_failures(results, structures)
    assert sorted(arrivals) == list(range(len(structures)))


def test_processes_timeouts_soft_and_hard(helpers_on_path):
    structures = [_cu(0, fail="sleep"), _cu(1), _cu(2, fail="hang"), _cu(3)]
    results = label_structures(
        structures, FAILING, ParallelConfig(backend="processes", workers=2, timeout_s=1.0)
    )
    _check_failures(results, structures)
    assert "killed" not in (results[0].error or "")  # the soft deadline stopped it


def test_processes_stop_cleanly_when_on_result_raises(helpers_on_path):
    structures = [_cu(i) for i in range(4)]

    def on_result(i: int, r: LabelResult) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        label_structures(
            structures,
            EMT_CFG,
            ParallelConfig(backend="processes", workers=2),
            on_result=on_result,
        )
    # No worker process is left behind.
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert multiprocessing.active_children() == []


# ----------------------------------------------------------------------------- dask


def test_dask_local_cluster_survives_failures_and_a_dying_worker(helpers_on_path):
    pytest.importorskip("distributed", reason="dask.distributed not installed (mlipctl[dask])")
    structures = [
        _cu(0),
        _cu(1, fail="raise"),
        _cu(2, fail="exit"),
        _cu(3, fail="nan"),
        _cu(4, fail="sleep"),
        _cluster(),
    ]
    arrivals: list[int] = []
    results = label_structures(
        structures,
        FAILING,
        ParallelConfig(backend="dask", workers=2, timeout_s=1.0),
        on_result=lambda i, r: arrivals.append(i),
    )
    _check_failures(results, structures)
    assert sorted(arrivals) == list(range(len(structures)))


def test_dask_unreachable_scheduler_is_a_user_input_error(monkeypatch):
    pytest.importorskip("distributed", reason="dask.distributed not installed (mlipctl[dask])")
    monkeypatch.setattr(labelling, "_DASK_CONNECT_TIMEOUT", "1s")
    cfg = ParallelConfig(backend="dask", scheduler_address="tcp://127.0.0.1:9")
    with pytest.raises(UserInputError, match=r"cannot connect to the dask scheduler at tcp://"):
        label_structures([_cu(0)], EMT_CFG, cfg)


def test_missing_dask_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(UserInputError, match=r"pip install mlipctl\[dask\]"):
        label_structures([_cu(0)], EMT_CFG, ParallelConfig(backend="dask", workers=2))
