"""`mlipctl label`: labels equal direct EMT calls; streaming, resume, truncation repair, failures.

The calculators below are imported by path (``test_label:InjectingEMT``) through the reference
registry's ``import`` kind, also inside spawned worker processes and a killed subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from pydantic import ValidationError

from mlipctl.config.label import LabelConfig
from mlipctl.engines.label import (
    FAILED,
    complete_prefix,
    frame_text,
    label_file,
    run_label,
)
from mlipctl.errors import UserInputError

TESTS = Path(__file__).resolve().parent


class InjectingEMT(EMT):
    """EMT that fails on demand: ``info["inject"]`` = 'raise', 'non_finite' or 'exit' (kills the process)."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        mode = atoms.info.get("inject") if atoms is not None else None
        if mode == "raise":
            raise RuntimeError("injected SCF failure")
        if mode == "exit":
            os._exit(3)
        super().calculate(atoms, properties, system_changes)
        if mode == "non_finite":
            self.results["forces"][0, 0] = np.nan


class SlowEMT(EMT):
    """EMT that takes 0.15 s per structure, so a run can be killed part-way."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        time.sleep(0.15)
        super().calculate(atoms, properties, system_changes)


def _structures(n: int = 8, seed: int = 0) -> list[Atoms]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 1 + k % 2))
        if k % 3 == 2:
            a.symbols[0] = "Au"
        a.set_cell(a.cell[:] * (1 + 0.01 * (k - n / 2)), scale_atoms=True)
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        a.info["config_type"] = f"group{k % 2}"
        out.append(a)
    return out


def _write_input(tmp_path: Path, frames: list[Atoms], name: str = "in.extxyz") -> Path:
    path = tmp_path / name
    ase.io.write(path, frames, format="extxyz")
    return path


def _cfg(tmp_path: Path, input_path: Path, **over) -> LabelConfig:
    data = {"input": str(input_path), "output": str(tmp_path / "out"), **over}
    return LabelConfig.model_validate(data, context={"check_files": True})


def _read(cfg: LabelConfig) -> list[Atoms]:
    return ase.io.read(Path(cfg.output) / cfg.filename, ":")


def _assert_equal_to_direct_emt(inputs: list[Atoms] | Path, labelled: list[Atoms]) -> None:
    """Labels equal EMT on the input as read from its file (extxyz rounds positions)."""
    if isinstance(inputs, Path):
        inputs = ase.io.read(inputs, ":")
    for got in labelled:
        ref = inputs[got.info["label_index"]].copy()
        ref.calc = EMT()
        assert got.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-10)
        # extxyz stores forces with 8 decimals
        np.testing.assert_allclose(got.get_forces(), ref.get_forces(), rtol=0, atol=1e-8)
        np.testing.assert_allclose(got.get_stress(), ref.get_stress(), atol=1e-10)
        np.testing.assert_allclose(got.positions, ref.positions, atol=1e-12)


def test_labels_equal_direct_emt_calls_in_input_order(tmp_path):
    inputs = _structures(8)
    cfg = _cfg(tmp_path, _write_input(tmp_path, inputs))
    report = run_label(cfg, progress=False)
    out = _read(cfg)
    assert [a.info["label_index"] for a in out] == list(range(8))
    assert [a.info["config_type"] for a in out] == [a.info["config_type"] for a in inputs]
    _assert_equal_to_direct_emt(Path(cfg.input), out)
    assert report.passed and report.command == "label"
    r = report.results
    assert (r["n_input"], r["n_labelled"], r["n_labelled_this_run"], r["n_failed"]) == (8, 8, 8, 0)
    assert report.artifacts["labelled"].endswith("labelled.extxyz")
    assert not (Path(cfg.output) / FAILED).exists()
    # A second run finds everything done and labels nothing.
    again = run_label(cfg, progress=False)
    assert again.results["n_resumed"] == 8 and again.results["n_labelled_this_run"] == 0
    _assert_equal_to_direct_emt(Path(cfg.input), _read(cfg))


def test_labels_with_a_generated_set(tmp_path):
    from mlipctl.config.generate import GenerateConfig
    from mlipctl.data.generate import run_generate

    gen = GenerateConfig.model_validate(
        {
            "systems": [{"kind": "crystal", "element": "Cu"}],
            "strain": {"n_volumes": 2, "n_shears": 1},
            "rattle": {"amplitudes": [0.1], "n_per_amplitude": 2},
            "vacancy": {"min_atoms": 32, "n_rattled": 1, "n_hops": 0},
            "interstitial": {"enabled": False},
            "surface": {"millers": [[1, 1, 1]], "n_per_surface": 1},
            "md": {"enabled": False},
            "amorphous": {"enabled": False},
            "output": str(tmp_path / "gen"),
        }
    )
    structures = Path(run_generate(gen, progress=False).artifacts["structures"])
    cfg = _cfg(tmp_path, structures)
    report = run_label(cfg, progress=False)
    inputs = ase.io.read(structures, ":")
    out = _read(cfg)
    assert report.results["n_labelled"] == len(inputs) == 7
    _assert_equal_to_direct_emt(Path(cfg.input), out)
    assert [a.info["provenance"] for a in out] == [a.info["provenance"] for a in inputs]


def test_resume_after_keyboard_interrupt_labels_only_the_missing(tmp_path):
    inputs = _structures(10)
    cfg = _cfg(tmp_path, _write_input(tmp_path, inputs))
    seen: list[int] = []

    def interrupt_after_4(index, result):
        seen.append(index)
        if len(seen) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_file(cfg, progress=False, on_result=interrupt_after_4)
    partial = _read(cfg)
    assert sorted(a.info["label_index"] for a in partial) == sorted(seen)
    relabelled: list[int] = []
    outcome = label_file(cfg, progress=False, on_result=lambda i, r: relabelled.append(i))
    assert sorted(outcome.resumed) == sorted(seen)
    assert sorted(relabelled) == sorted(set(range(10)) - set(seen))  # nothing labelled twice
    out = _read(cfg)
    assert [a.info["label_index"] for a in out] == list(range(10))
    _assert_equal_to_direct_emt(Path(cfg.input), out)


def test_truncated_last_frame_is_cut_and_relabelled(tmp_path):
    inputs = _structures(6)
    cfg = _cfg(tmp_path, _write_input(tmp_path, inputs))

    def stop_after_3(index, result, box=[0]):  # noqa: B006 - a counter local to this test
        box[0] += 1
        if box[0] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        label_file(cfg, progress=False, on_result=stop_after_3)
    path = Path(cfg.output) / cfg.filename
    # A crash in the middle of writing the fourth frame leaves half a frame behind.
    victim = inputs[5].copy()
    victim.calc = EMT()
    victim.get_potential_energy()
    text = frame_text(victim)
    with open(path, "a") as fh:
        fh.write(text[: len(text) // 2])
    size_before = path.stat().st_size
    assert complete_prefix(path.read_bytes())[0] == 3
    report = run_label(cfg, progress=False)
    assert report.results["truncated_bytes_cut"] == len(text) // 2
    assert report.results["n_resumed"] == 3 and report.results["n_labelled_this_run"] == 3
    assert any("truncated" in m for m in report.messages)
    out = _read(cfg)
    assert [a.info["label_index"] for a in out] == list(range(6))
    _assert_equal_to_direct_emt(Path(cfg.input), out)
    assert path.stat().st_size != size_before


def test_resume_after_the_process_is_killed(tmp_path):
    inputs = _structures(12)
    inp = _write_input(tmp_path, inputs)
    data = {
        "input": str(inp),
        "output": str(tmp_path / "out"),
        "reference": {"kind": "import", "class_path": "test_label:SlowEMT"},
    }
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "from mlipctl.config.label import LabelConfig\n"
        "from mlipctl.engines.label import label_file\n"
        f"label_file(LabelConfig.model_validate(json.loads({json.dumps(data)!r})), progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    path = tmp_path / "out" / "labelled.extxyz"
    deadline = time.monotonic() + 60
    n_done = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists():
                n_done = complete_prefix(path.read_bytes())[0]
                if n_done >= 3:
                    break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    assert 3 <= n_done < 12, err.decode()[-2000:]
    on_disk = complete_prefix(path.read_bytes())[0]
    cfg = LabelConfig.model_validate(data)
    relabelled: list[int] = []
    outcome = label_file(cfg, progress=False, on_result=lambda i, r: relabelled.append(i))
    assert len(outcome.resumed) == on_disk >= 3
    assert sorted(outcome.resumed + relabelled) == list(range(12))  # each labelled exactly once
    out = _read(cfg)
    assert [a.info["label_index"] for a in out] == list(range(12))
    _assert_equal_to_direct_emt(Path(cfg.input), out)


def test_failures_are_recorded_and_never_stop_the_batch(tmp_path):
    inputs = _structures(8)
    inputs[2].info["inject"] = "raise"
    inputs[5].info["inject"] = "non_finite"
    cfg = _cfg(
        tmp_path,
        _write_input(tmp_path, inputs),
        reference={"kind": "import", "class_path": "test_label:InjectingEMT"},
    )
    report = run_label(cfg, progress=False)
    r = report.results
    assert r["n_failed"] == 2 and r["n_labelled"] == 6
    reasons = {f["index"]: f["error"] for f in r["failures"]}
    assert set(reasons) == {2, 5}
    assert "injected SCF failure" in reasons[2] and reasons[2].startswith("RuntimeError")
    assert reasons[5].startswith("NonFiniteResult")
    assert not report.passed  # max_failed_fraction defaults to 0
    assert any("structure 2 (group0): RuntimeError: injected" in m for m in report.messages)
    failed = json.loads((Path(cfg.output) / FAILED).read_text())
    assert [f["index"] for f in failed["failures"]] == [2, 5]
    out = _read(cfg)
    assert [a.info["label_index"] for a in out] == [0, 1, 3, 4, 6, 7]
    _assert_equal_to_direct_emt(Path(cfg.input), out)
    # A rerun retries only the failed two (they fail again); nothing is duplicated.
    again = run_label(cfg, progress=False)
    assert again.results["n_resumed"] == 6 and again.results["n_failed"] == 2
    assert again.results["calc_time_total_s"] == 0.0  # failed calculations only
    assert len(_read(cfg)) == 6
    tolerant = _cfg(
        tmp_path,
        Path(cfg.input),
        reference={"kind": "import", "class_path": "test_label:InjectingEMT"},
        max_failed_fraction=0.25,
    )
    assert run_label(tolerant, progress=False).passed


def test_a_killed_worker_is_recorded_under_the_process_backend(tmp_path):
    inputs = _structures(6)
    inputs[3].info["inject"] = "exit"
    cfg = _cfg(
        tmp_path,
        _write_input(tmp_path, inputs),
        reference={"kind": "import", "class_path": "test_label:InjectingEMT"},
        parallel={"backend": "processes", "workers": 2},
    )
    report = run_label(cfg, progress=False)
    r = report.results
    assert r["n_labelled"] == 5 and r["n_failed"] == 1
    (failure,) = r["failures"]
    assert failure["index"] == 3 and failure["error"].startswith("worker died")
    out = _read(cfg)
    assert [a.info["label_index"] for a in out] == [0, 1, 2, 4, 5]
    _assert_equal_to_direct_emt(Path(cfg.input), out)


def test_other_input_or_reference_is_refused_unless_overwrite(tmp_path):
    inputs = _structures(4)
    cfg = _cfg(tmp_path, _write_input(tmp_path, inputs))
    run_label(cfg, progress=False)
    other = _write_input(tmp_path, _structures(4, seed=1), "other.extxyz")
    with pytest.raises(UserInputError, match="do not belong to this run.*overwrite: true"):
        run_label(_cfg(tmp_path, other), progress=False)
    with pytest.raises(UserInputError, match="reference was"):
        run_label(_cfg(tmp_path, Path(cfg.input), reference={"kind": "lj"}), progress=False)
    with pytest.raises(UserInputError, match="index"):
        run_label(_cfg(tmp_path, Path(cfg.input), index="0:2"), progress=False)
    report = run_label(_cfg(tmp_path, other, overwrite=True), progress=False)
    assert report.results["n_labelled_this_run"] == 4 and report.results["n_resumed"] == 0
    _assert_equal_to_direct_emt(other, _read(cfg))


def test_output_without_manifest_or_from_elsewhere_is_refused(tmp_path):
    inputs = _structures(3)
    cfg = _cfg(tmp_path, _write_input(tmp_path, inputs))
    out = Path(cfg.output)
    out.mkdir()
    ase.io.write(out / cfg.filename, inputs)
    with pytest.raises(UserInputError, match="cannot be checked against this input"):
        run_label(cfg, progress=False)


def test_a_concurrent_run_on_the_same_output_is_refused(tmp_path):
    import fcntl

    cfg = _cfg(tmp_path, _write_input(tmp_path, _structures(2)))
    out = Path(cfg.output)
    out.mkdir()
    fd = os.open(out / ".label.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(UserInputError, match="another `mlipctl label` is writing"):
            run_label(cfg, progress=False)
    finally:
        os.close(fd)


def test_non_periodic_structures_get_energy_and_forces_but_no_stress(tmp_path):
    mol = molecule("CO")
    mol.center(vacuum=4.0)
    cfg = _cfg(tmp_path, _write_input(tmp_path, [mol, _structures(1)[0]]))
    report = run_label(cfg, progress=False)
    assert report.passed
    (note,) = report.results["stress_missing"]
    assert "not periodic" in note
    m, c = _read(cfg)
    ref = mol.copy()
    ref.calc = EMT()
    assert m.get_potential_energy() == pytest.approx(ref.get_potential_energy(), abs=1e-10)
    assert "stress" not in m.calc.results and "stress" in c.calc.results


def test_energy_only_labels(tmp_path):
    inputs = _structures(2)
    cfg = _cfg(tmp_path, _write_input(tmp_path, inputs), properties=["energy"])
    run_label(cfg, progress=False)
    out = _read(cfg)
    assert set(out[0].calc.results) <= {"energy", "free_energy"}


def test_complete_prefix_counts_whole_frames_only():
    a = Atoms("Cu2", positions=[[0, 0, 0], [1, 1, 1]], cell=[3, 3, 3], pbc=True)
    one = frame_text(a).encode()
    assert complete_prefix(one * 3) == (3, 3 * len(one))
    for cut in (1, len(one) // 2, len(one) - 1):
        assert complete_prefix(one * 2 + one[:cut]) == (2, 2 * len(one))
    assert complete_prefix(b"") == (0, 0)
    assert complete_prefix(b"garbage\n") == (0, 0)


def test_config_validation():
    with pytest.raises(ValidationError, match="twice"):
        LabelConfig.model_validate({"input": "x.extxyz", "properties": ["energy", "energy"]})
    with pytest.raises(ValidationError, match="filename"):
        LabelConfig.model_validate({"input": "x.extxyz", "filename": "a/b.xyz"})
    with pytest.raises(ValidationError, match="file not found"):
        LabelConfig.model_validate({"input": "/no/such.extxyz"}, context={"check_files": True})


def test_shipped_config_validates():
    from mlipctl.config.loader import load_config

    root = TESTS.parent
    cfg = load_config(LabelConfig, root / "configs" / "label-emt.yaml", check_files=False)
    assert cfg.reference.kind == "emt" and cfg.parallel.backend == "serial"
