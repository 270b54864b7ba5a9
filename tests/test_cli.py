"""The command line: help, version, schema, template, configs/, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mlipctl import __version__, commands
from mlipctl.cli.app import app
from mlipctl.commands import COMMANDS
from mlipctl.config.loader import validate_config
from mlipctl.reports.base import Criterion, Report

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_every_command():
    res = invoke("--help")
    assert res.exit_code == 0
    for name in [*COMMANDS, "schema", "template"]:
        assert name in res.output


def test_version():
    res = invoke("--version")
    assert res.exit_code == 0 and res.output.strip() == f"mlipctl {__version__}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_schema_is_json_schema(name):
    res = invoke("schema", name)
    assert res.exit_code == 0, res.output
    schema = json.loads(res.stdout)
    assert schema["type"] == "object" and schema["properties"]
    assert schema.get("additionalProperties") is False


@pytest.mark.parametrize("name", list(COMMANDS))
def test_template_validates_and_is_annotated(name):
    res = invoke("template", name)
    assert res.exit_code == 0, res.output
    text = res.stdout
    assert text.count("#") > 5
    data = yaml.safe_load(text)
    cfg = validate_config(COMMANDS[name].config_class(), data, check_files=False)
    # The template spells out every default: validating it again changes nothing.
    assert cfg.model_dump(mode="json") == data


def test_unknown_command_for_schema():
    res = invoke("schema", "frobnicate")
    assert res.exit_code == 2
    assert "unknown command 'frobnicate'" in res.output


def _config_files() -> list[Path]:
    return sorted((ROOT / "configs").glob("*.yaml"))


def _command_of(path: Path) -> str:
    return path.stem.split("-")[0]


def test_every_command_has_an_example_config():
    have = {_command_of(p) for p in _config_files()}
    missing = [c for c in COMMANDS if c not in have]
    assert not missing, f"configs/ has no example for: {missing}"


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: p.name)
def test_example_configs_validate(path):
    name = _command_of(path)
    assert name in COMMANDS, f"{path.name}: file name must start with a command name"
    data = yaml.safe_load(path.read_text())
    validate_config(COMMANDS[name].config_class(), data, source=str(path), check_files=False)


def test_bad_config_exit_2_one_line_per_problem(tmp_path):
    cfg = tmp_path / "v.yaml"
    cfg.write_text("model: m.mlip\nchecks: [vacancy]\nfmaxx: 0.01\nneb_images: -1\n")
    res = invoke("validate", str(cfg))
    assert res.exit_code == 2
    out = res.output
    assert "Traceback" not in out
    assert "fmaxx (line 3): unknown key; did you mean 'fmax'?" in out
    assert "neb_images (line 4): Input should be greater than or equal to 3" in out
    assert "model (line 1): file not found: m.mlip" in out


@pytest.mark.parametrize(
    ("text", "needle"),
    [("", "config file is empty"), ("[1, 2", "not valid YAML"), ("\x00\x01", "")],
)
def test_non_yaml_and_empty_exit_2(tmp_path, text, needle):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text.encode())
    res = invoke("relax", str(cfg))
    assert res.exit_code == 2, res.output
    assert needle in res.output and "Traceback" not in res.output


def test_missing_config_file_exit_2(tmp_path):
    res = invoke("fit", str(tmp_path / "nope.yaml"))
    assert res.exit_code == 2 and "config file not found" in res.output


def test_flags_alone_build_a_config(tmp_path):
    model = tmp_path / "m.mlip"
    model.write_bytes(b"x")
    cfg = commands.load("validate", None, {"model": str(model), "checks": ["vacancy", "surface"]})
    assert cfg.checks == ["vacancy", "surface"] and cfg.reference.kind == "emt"


def _fake_report(passed: bool) -> Report:
    return Report(
        command="relax",
        config={"x": 1},
        results={"energy": -1.5},
        criteria=[Criterion.at_most("max_force", 0.5 if not passed else 0.001, 0.01, "eV/Å")],
    )


@pytest.mark.parametrize("passed", [True, False])
def test_json_output_and_exit_code_follow_criteria(tmp_path, monkeypatch, passed):
    monkeypatch.setattr(commands, "run", lambda *a, **k: _fake_report(passed))
    out = tmp_path / "out"
    res = invoke(
        "relax",
        "--reference",
        "emt",
        "--set",
        "structure.kind=crystal",
        "--set",
        "structure.element=Cu",
        "--output",
        str(out),
        "--json",
    )
    assert res.exit_code == (0 if passed else 1), res.output
    data = json.loads(res.stdout)
    assert data["passed"] is passed and data["results"]["energy"] == -1.5
    assert json.loads((out / "report.json").read_text())["passed"] is passed
    assert "max_force" in (out / "report.md").read_text()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_internal_error_writes_log_and_exits_1(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(commands, "run", boom)
    monkeypatch.setenv("MLIPCTL_LOG_DIR", str(tmp_path / "logs"))
    res = invoke("relax", "--reference", "emt", "--set", "structure={kind: crystal, element: Cu}")
    assert res.exit_code == 1
    assert "internal error (RuntimeError: kaboom)" in res.output
    assert "Traceback" not in res.output
    logs = list((tmp_path / "logs").glob("crash-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text()


def test_console_script_exit_code_and_no_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("calculator: {kind: emt}\nstructure: {kind: crystal, element: Qq}\n")
    env = dict(os.environ, MLIPCTL_LOG_DIR=str(tmp_path))
    res = subprocess.run(
        [sys.executable, "-m", "mlipctl.cli.app", "relax", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 2
    assert "'Qq' is not a chemical element symbol" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["relax", "--set", "novalue"], "--set expects KEY=VALUE"),
        (["relax", "--model", "m.mlip", "--reference", "emt"], "either --model or --reference"),
        (["neb", "--defect", "vacancy"], "--defect needs --element"),
    ],
)
def test_bad_flags_exit_2_without_traceback(tmp_path, args, needle):
    env = dict(os.environ, MLIPCTL_LOG_DIR=str(tmp_path))
    res = subprocess.run(
        [sys.executable, "-m", "mlipctl.cli.app", *args], capture_output=True, text=True, env=env
    )
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr
    assert "Traceback" not in res.stderr + res.stdout
