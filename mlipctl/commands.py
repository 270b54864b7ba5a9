"""The table of subcommands: config model, engine entry point and an example config for each.

The CLI is a thin layer over this table; library users can call :func:`run` directly.
Imports are by dotted path so that nothing heavy loads until a command actually runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    config: str  # "module:Class"
    runner: str  # "module:function(cfg, *, resume, progress) -> Report"
    example: dict[str, Any] = field(default_factory=dict)

    def config_class(self) -> type:
        return _resolve(self.config)

    def run(self, cfg: Any, *, resume: bool = False, progress: bool = True) -> Any:
        return _resolve(self.runner)(cfg, resume=resume, progress=progress)


def _resolve(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


_CU = {"kind": "crystal", "element": "Cu", "structure": "fcc", "supercell": [3, 3, 3]}

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command(
            "quickstart",
            "The main job on EMT: generate and label Cu structures, fit an ensemble, validate it.",
            "mlipctl.config.quickstart:QuickstartConfig",
            "mlipctl.workflows.quickstart:run_quickstart",
            example={"element": "Cu"},
        ),
        Command(
            "generate",
            "Build candidate structures (strained, rattled, defects, surfaces, MD, amorphous).",
            "mlipctl.config.generate:GenerateConfig",
            "mlipctl.data.generate:run_generate",
            example={"systems": [{"kind": "crystal", "element": "Cu", "structure": "fcc"}]},
        ),
        Command(
            "label",
            "Label structures with a reference calculator (serial, process pool or Dask).",
            "mlipctl.config.label:LabelConfig",
            "mlipctl.engines.label:run_label",
            example={"input": "runs/generate/structures.extxyz", "reference": {"kind": "emt"}},
        ),
        Command(
            "fit",
            "Train a potential (or an ensemble) on labelled structures.",
            "mlipctl.config.fit:FitConfig",
            "mlipctl.training.report:run_fit_report",
            example={"data": {"path": "data/train.extxyz"}, "output": "runs/fit"},
        ),
        Command(
            "validate",
            "Check a model against a reference on defect energetics; exit 1 if a criterion fails.",
            "mlipctl.config.validate:ValidateConfig",
            "mlipctl.engines.validate:run_validate",
            example={"model": "runs/fit/model.mlip", "checks": ["vacancy"]},
        ),
        Command(
            "relax",
            "Relax a structure (positions, optionally the cell).",
            "mlipctl.config.relax:RelaxConfig",
            "mlipctl.engines.relax:run_relax",
            example={"calculator": {"kind": "emt"}, "structure": _CU},
        ),
        Command(
            "neb",
            "Climbing-image NEB between two states or for a defect hop.",
            "mlipctl.config.neb:NEBConfig",
            "mlipctl.engines.neb:run_neb",
            example={
                "calculator": {"kind": "emt"},
                "endpoints": {"kind": "defect", "defect": "vacancy", "crystal": _CU},
            },
        ),
        Command(
            "md",
            "Molecular dynamics with on-the-fly monitors.",
            "mlipctl.config.md:MDConfig",
            "mlipctl.engines.md:run_md",
            example={
                "calculator": {"kind": "emt"},
                "structure": _CU,
                "ensemble": {"kind": "langevin", "temperature_k": 300.0},
                "monitoring": {"monitors": [{"kind": "max_force", "threshold": 5.0}]},
            },
        ),
        Command(
            "uncertainty",
            "Calibrate ensemble uncertainty and check the domain of applicability.",
            "mlipctl.config.uncertainty:UncertaintyConfig",
            "mlipctl.engines.uncertainty:run_uncertainty",
            example={"model": "runs/fit/model.mlip", "calibration_data": "data/valid.extxyz"},
        ),
    ]
}


def get_command(name: str) -> Command:
    try:
        return COMMANDS[name]
    except KeyError:
        from mlipctl.errors import UserInputError

        raise UserInputError(
            f"unknown command {name!r}; expected one of {', '.join(COMMANDS)}"
        ) from None


def load(name: str, path: str | Path | None, overrides: dict[str, Any] | None = None) -> Any:
    """Validate a config for command ``name`` from a YAML file and/or overrides."""
    from mlipctl.config.loader import load_config, set_dotted, validate_config

    cmd = get_command(name)
    model = cmd.config_class()
    if path is not None:
        return load_config(model, path, overrides)
    data: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    return validate_config(model, data, source="(command-line flags)")


def run(name: str, cfg: Any, *, resume: bool = False, progress: bool = True) -> Any:
    """Run command ``name`` on a validated config and return its report."""
    return get_command(name).run(cfg, resume=resume, progress=progress)
