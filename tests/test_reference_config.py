"""Reference and parallel configs: defaults, discriminated union, validation messages."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import TypeAdapter, ValidationError

from mlipctl.config.reference import (
    SERIAL,
    EAMReference,
    EMTReference,
    ImportReference,
    LJReference,
    MorseReference,
    ParallelConfig,
    PySCFReference,
    ReferenceConfig,
    TBLiteReference,
    default_reference,
)

REF = TypeAdapter(ReferenceConfig)


def _error(data: object) -> str:
    with pytest.raises(ValidationError) as info:
        REF.validate_python(data)
    return str(info.value)


def test_default_is_emt_and_every_kind_parses_with_defaults(tmp_path):
    assert default_reference() == EMTReference()
    pot = tmp_path / "Cu.eam.alloy"
    cases = {
        "emt": ({"kind": "emt"}, EMTReference),
        "lj": ({"kind": "lj"}, LJReference),
        "morse": ({"kind": "morse"}, MorseReference),
        "eam": ({"kind": "eam", "path": str(pot)}, EAMReference),
        "tblite": ({"kind": "tblite"}, TBLiteReference),
        "pyscf": ({"kind": "pyscf"}, PySCFReference),
        "import": ({"kind": "import", "class_path": "ase.calculators.emt:EMT"}, ImportReference),
    }
    for kind, (data, cls) in cases.items():
        cfg = REF.validate_python(data)
        assert isinstance(cfg, cls), kind
        assert cfg.kind == kind
        # JSON round trip: configs are written into run directories.
        assert REF.validate_json(REF.dump_json(cfg)) == cfg


def test_every_field_is_documented():
    for variant in (
        EMTReference,
        LJReference,
        MorseReference,
        EAMReference,
        TBLiteReference,
        PySCFReference,
        ImportReference,
        ParallelConfig,
    ):
        for name, field in variant.model_fields.items():
            assert field.description, f"{variant.__name__}.{name} has no description"


def test_bad_kind_missing_field_and_extra_key_are_named():
    msg = _error({"kind": "vasp"})
    assert "vasp" in msg and "emt" in msg  # names the bad tag and the allowed ones
    assert "class_path" in _error({"kind": "import"})
    assert "path" in _error({"kind": "eam"})
    msg = _error({"kind": "lj", "sigmaa": 3.0})
    assert "sigmaa" in msg and "Extra inputs are not permitted" in msg
    assert "greater than 0" in _error({"kind": "lj", "epsilon": -1.0})


def test_lj_and_morse_cross_field_rules():
    assert "smooth" in _error({"kind": "lj", "ro": 5.0})
    assert "below the cutoff" in _error({"kind": "lj", "smooth": True, "rc": 8.0, "ro": 9.0})
    assert "not both" in _error({"kind": "morse", "alpha": 1.3, "rho0": 4.0})
    assert "larger than r0" in _error({"kind": "morse", "r0": 3.0, "rc": 2.0})
    assert "below rc" in _error({"kind": "morse", "rc": 6.0, "rc_onset": 6.5})
    m = MorseReference(r0=2.0, alpha=1.5)
    assert m.rho0_value() == pytest.approx(3.0)
    assert MorseReference(r0=2.0, rho0=5.0).rho0_value() == 5.0
    assert MorseReference().rho0_value() == pytest.approx(1.3588 * 2.866)
    rc, onset = MorseReference(r0=2.0).cutoffs()
    assert (rc, onset) == pytest.approx((5.4, 3.8))


def test_eam_suffix_and_backend_rules(tmp_path):
    for suffix in (".alloy", ".fs", ".eam", ".adp"):
        assert REF.validate_python({"kind": "eam", "path": str(tmp_path / f"p{suffix}")})
    msg = _error({"kind": "eam", "path": str(tmp_path / "Cu.txt")})
    assert "'.txt'" in msg and ".alloy" in msg
    assert "use backend: ase" in _error(
        {"kind": "eam", "path": str(tmp_path / "p.adp"), "backend": "matscipy"}
    )
    assert "matscipy" in _error({"kind": "eam", "path": str(tmp_path / "p.alloy"), "backend": "x"})


def test_eam_path_existence_is_checked_only_for_runs(tmp_path):
    missing = {"kind": "eam", "path": str(tmp_path / "none.alloy")}
    REF.validate_python(missing)  # templates/schema work without the file
    with pytest.raises(ValidationError, match="file not found"):
        REF.validate_python(missing, context={"check_files": True})


def test_import_class_path_forms():
    assert ImportReference(class_path="ase.calculators.emt:EMT").split() == (
        "ase.calculators.emt",
        "EMT",
    )
    assert ImportReference(class_path="ase.calculators.emt.EMT").split() == (
        "ase.calculators.emt",
        "EMT",
    )
    assert ImportReference(class_path="pkg.mod:Outer.Inner").split() == ("pkg.mod", "Outer.Inner")
    assert "names no module" in _error({"kind": "import", "class_path": "EMT"})
    assert "form" in _error({"kind": "import", "class_path": "ase calculators:EMT"})
    assert "form" in _error({"kind": "import", "class_path": "ase.calculators.emt:"})


def test_parallel_config_rules():
    assert SERIAL.backend == "serial" and SERIAL.workers == 1 and SERIAL.timeout_s is None
    ParallelConfig(backend="dask", scheduler_address="tcp://127.0.0.1:8786")
    ParallelConfig(backend="processes", workers=2, timeout_s=10.0)
    with pytest.raises(ValidationError, match="scheduler_address is only used with backend: dask"):
        ParallelConfig(backend="processes", workers=2, scheduler_address="tcp://127.0.0.1:8786")
    with pytest.raises(ValidationError, match="needs backend 'processes' or 'dask'"):
        ParallelConfig(workers=4)
    with pytest.raises(ValidationError, match="leave workers unset"):
        ParallelConfig(backend="dask", workers=3, scheduler_address="tcp://127.0.0.1:8786")
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        ParallelConfig(backend="processes", workers=0)
    with pytest.raises(ValidationError, match="greater than 0"):
        ParallelConfig(timeout_s=0)
    with pytest.raises(ValidationError, match="backend"):
        ParallelConfig(backend="threads")
    with pytest.raises(ValidationError, match="Extra inputs"):
        ParallelConfig(backend="dask", n_workers=2)


def test_config_module_imports_nothing_heavy():
    code = (
        "import sys, mlipctl.config.reference\n"
        "heavy = [m for m in ('ase', 'jax', 'numpy', 'dask', 'scipy') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
