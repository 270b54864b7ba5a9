"""One way for every engine to get a calculator from a config: a model file or a reference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlipctl.config.calculator import ModelFileConfig

if TYPE_CHECKING:  # pragma: no cover
    from ase.calculators.calculator import Calculator

    from mlipctl.model.potential import Potential


def is_model(cfg: Any) -> bool:
    """True if the calculator config names an mlipctl model file (jitted engines apply)."""
    return isinstance(cfg, ModelFileConfig)


def load_potential_for(cfg: ModelFileConfig) -> Potential:
    from mlipctl.model.potential import load_potential

    return load_potential(str(cfg.path))


def make_calculator(cfg: Any) -> Calculator:
    """A fresh ASE calculator for a :data:`~mlipctl.config.calculator.CalculatorConfig`."""
    if is_model(cfg):
        return load_potential_for(cfg).calculator()
    from mlipctl.reference.registry import make_calculator as make_reference

    return make_reference(cfg)


def describe(cfg: Any) -> str:
    """Short human label, e.g. 'model runs/fit/model.mlip' or 'reference emt'."""
    return f"model {cfg.path}" if is_model(cfg) else f"reference {cfg.kind}"
