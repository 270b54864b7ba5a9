"""Layering and config hygiene that the code review relies on."""

from __future__ import annotations

import ast
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from mlipctl.commands import COMMANDS

PKG = Path(__file__).resolve().parents[1] / "mlipctl"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("config", ("mlipctl.model", "mlipctl.training", "mlipctl.engines", "jax", "flax", "ase")),
        ("engines", ("mlipctl.training", "mlipctl.cli")),
        ("model", ("mlipctl.training", "mlipctl.engines", "mlipctl.cli")),
        ("data", ("mlipctl.model", "mlipctl.training", "mlipctl.engines", "mlipctl.cli")),
        ("reference", ("mlipctl.model", "mlipctl.training", "mlipctl.engines", "mlipctl.cli")),
        ("reports", ("mlipctl.cli",)),
    ],
)
def test_layers_do_not_import_upwards(layer, forbidden):
    bad = []
    for f in sorted((PKG / layer).glob("*.py")):
        for mod in _imports(f):
            if any(mod == x or mod.startswith(x + ".") for x in forbidden):
                bad.append(f"{f.name} imports {mod}")
    assert not bad, bad


def _models(tp, seen: set[type]) -> None:
    origin = typing.get_origin(tp)
    if origin is not None:
        for a in typing.get_args(tp):
            _models(a, seen)
        return
    if isinstance(tp, type) and issubclass(tp, BaseModel) and tp not in seen:
        seen.add(tp)
        for f in tp.model_fields.values():
            _models(f.annotation, seen)


def _all_config_models() -> set[type]:
    seen: set[type] = set()
    for cmd in COMMANDS.values():
        try:
            _models(cmd.config_class(), seen)
        except ImportError as exc:  # a command whose config module is still missing
            pytest.fail(f"config of `{cmd.name}` does not import: {exc}")
    return seen


def test_every_config_model_is_strict_and_documented():
    models = _all_config_models()
    assert len(models) > 10
    problems = []
    for m in models:
        if m.model_config.get("extra") != "forbid":
            problems.append(f"{m.__name__}: extra is not 'forbid'")
        for name, f in m.model_fields.items():
            if not (f.description and f.description.strip()):
                problems.append(f"{m.__name__}.{name}: no description")
    assert not problems, "\n".join(problems)


def test_cli_help_does_not_import_heavy_modules():
    code = (
        "import sys; from mlipctl.cli.app import app; "
        "heavy=[m for m in ('jax','ase','matplotlib','flax','scipy','dask') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported at CLI start-up: {out.stdout}"
