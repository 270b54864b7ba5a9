"""`mlipctl relax`: geometry (and optionally cell) optimisation with any calculator.

Optimisers: ASE's FIRE, BFGS and LBFGS for every calculator (reference or model, through its
ASE calculator), and ``jax_fire`` for models: FIRE steps inside jitted ``lax.while_loop`` chunks
with a host-rebuilt skin neighbour list (:mod:`mlipctl.engines.fire`). Variable-cell runs use
ASE's ``FrechetCellFilter`` (optional hydrostatic pressure, optional uniform scaling only).

Library entry point: :func:`relax_atoms` (used by ``validate``). CLI entry point:
:func:`run_relax`, which writes ``trajectory.extxyz`` (every ``trajectory_interval`` steps,
step 0 included) and ``final.extxyz`` into ``cfg.output``, both atomically.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from mlipctl.config.relax import (
    BFGSConfig,
    FireConfig,
    FixedCellConfig,
    JaxFireConfig,
    LBFGSConfig,
    RelaxConfig,
    VariableCellConfig,
)
from mlipctl.data.neighbors import check_overlaps
from mlipctl.engines.fire import DEFAULT_SKIN, MIN_DISTANCE, FireParams, as_jax_model, fire_relax
from mlipctl.errors import UserInputError
from mlipctl.reports.base import Criterion, Environment, Report

OptimizerSpec = str | FireConfig | BFGSConfig | LBFGSConfig | JaxFireConfig
"""An optimiser kind ('fire', 'bfgs', 'lbfgs', 'jax_fire') or its config."""

_OPTIMIZERS: dict[str, type] = {
    "fire": FireConfig,
    "bfgs": BFGSConfig,
    "lbfgs": LBFGSConfig,
    "jax_fire": JaxFireConfig,
}


@dataclass
class RelaxResult:
    """Outcome of :func:`relax_atoms`.

    Attributes:
        atoms: relaxed copy (constraints kept) with a SinglePointCalculator holding energy,
            forces (N, 3) and, for variable-cell runs, stress (6,).
        energy: final potential energy, eV.
        max_force: largest per-atom force on the final structure (fixed atoms excluded), eV/Å.
        converge_force: the quantity compared with ``fmax``: ``max_force`` for a fixed cell;
            for a variable cell the largest generalised force of the cell filter (atoms and
            cell rows), eV/Å.
        steps: optimiser steps taken.
        converged: ``converge_force < fmax`` within ``max_steps``.
        initial_energy: energy before the first step, eV.
        stress: (6,) Voigt stress of the final cell (variable cell only), eV/Å³.
        trajectory: frames every ``trajectory_interval`` steps (empty if 0).
        optimizer: optimiser kind used.
        n_rebuilds: neighbour-list rebuilds (jax_fire).
        n_compiles: compilations (jax_fire).
        timings: seconds: ``compile`` (jax_fire) and ``relax``.
    """

    atoms: Atoms
    energy: float
    max_force: float
    converge_force: float
    steps: int
    converged: bool
    initial_energy: float
    stress: np.ndarray | None = None
    trajectory: list[Atoms] = field(default_factory=list)
    optimizer: str = "fire"
    n_rebuilds: int = 0
    n_compiles: int = 0
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Helpers shared with the NEB engine
# --------------------------------------------------------------------------------------------


@contextmanager
def progress_bar(enabled: bool, total: int, label: str) -> Iterator[Callable[[int, float], None]]:
    """A rich progress bar on stderr; yields ``update(steps, max_force)``."""
    if not enabled:
        yield lambda steps, fmax: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("max force {task.fields[fmax]} eV/Å"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, fmax="-")

        def update(steps: int, fmax: float) -> None:
            bar.update(task, completed=min(steps, total), fmax=f"{fmax:.4f}")

        yield update


def snapshot(atoms: Atoms, **results: Any) -> Atoms:
    """Copy of ``atoms`` carrying ``results`` (energy, forces, ...) in a SinglePointCalculator."""
    frame = atoms.copy()
    frame.calc = SinglePointCalculator(frame, **results)
    return frame


def optimizer_config(optimizer: OptimizerSpec) -> Any:
    """The optimiser config for a kind name (defaults) or the config itself."""
    if isinstance(optimizer, str):
        if optimizer not in _OPTIMIZERS:
            raise UserInputError(
                f"unknown optimizer {optimizer!r}; expected one of {', '.join(_OPTIMIZERS)}"
            )
        return _OPTIMIZERS[optimizer]()
    return optimizer


def fixed_indices(atoms: Atoms, fixed: Sequence[int] = ()) -> np.ndarray:
    """Sorted indices fixed by ``fixed`` and by FixAtoms constraints already on ``atoms``.

    Raises:
        UserInputError: an index outside the structure, or a constraint other than FixAtoms
            that the caller cannot honour (checked by the jitted paths).
    """
    n = len(atoms)
    bad = [int(i) for i in fixed if not 0 <= int(i) < n]
    if bad:
        raise UserInputError(
            f"fixed atom indices {bad} are outside the structure (it has {n} atoms, 0..{n - 1})"
        )
    out = {int(i) for i in fixed}
    for c in atoms.constraints:
        if isinstance(c, FixAtoms):
            out.update(int(i) for i in c.get_indices())
    return np.array(sorted(out), dtype=np.int64)


def check_structure(atoms: Atoms) -> None:
    """Reject empty structures, NaN positions/cells and overlapping atoms (UserInputError)."""
    check_overlaps(atoms, MIN_DISTANCE)


# --------------------------------------------------------------------------------------------
# Library entry point
# --------------------------------------------------------------------------------------------


def _ase_optimizer(cfg: Any, target: Any) -> Any:
    from ase.optimize import BFGS, FIRE, LBFGS

    if isinstance(cfg, FireConfig):
        return FIRE(target, maxstep=cfg.maxstep, dt=cfg.dt, logfile=None)
    if isinstance(cfg, BFGSConfig):
        return BFGS(target, maxstep=cfg.maxstep, alpha=cfg.alpha, logfile=None)
    if isinstance(cfg, LBFGSConfig):
        return LBFGS(target, maxstep=cfg.maxstep, memory=cfg.memory, logfile=None)
    raise UserInputError(f"optimizer {cfg.kind!r} is not an ASE optimiser")


def relax_atoms(
    atoms: Atoms,
    calc_or_potential: Any,
    *,
    optimizer: OptimizerSpec = "fire",
    fmax: float = 0.01,
    max_steps: int = 1000,
    cell_filter: FixedCellConfig | VariableCellConfig | None = None,
    fixed: Sequence[int] = (),
    trajectory_interval: int = 0,
    progress: bool = False,
    skin: float = DEFAULT_SKIN,
) -> RelaxResult:
    """Relax ``atoms`` (not modified) and return the relaxed copy with its energy and forces.

    Args:
        atoms: start structure; FixAtoms constraints on it are honoured.
        calc_or_potential: an ASE calculator, a :class:`~mlipctl.model.potential.Potential`
            or a :class:`~mlipctl.engines.fire.JaxModel`. ASE optimisers use the model's ASE
            calculator; ``jax_fire`` needs a Potential or JaxModel.
        optimizer: 'fire', 'bfgs', 'lbfgs', 'jax_fire' or an optimiser config.
        fmax: convergence threshold on the largest force, eV/Å.
        max_steps: give up after this many steps (``converged`` False).
        cell_filter: None or FixedCellConfig: fixed cell; VariableCellConfig: relax the cell
            with FrechetCellFilter (``pressure_gpa`` becomes ``scalar_pressure`` in eV/Å³).
        fixed: indices of atoms kept fixed (added to any FixAtoms already present).
        trajectory_interval: keep a frame every this many steps, step 0 included (0: none).
        progress: show a progress bar on stderr.
        skin: neighbour-list skin (Å) of ``jax_fire``.

    Raises:
        UserInputError: bad indices, overlapping atoms, NaN positions, unknown elements for a
            model, non-finite energies or forces, jax_fire without a model or with a variable
            cell or with constraints other than FixAtoms.
    """
    opt_cfg = optimizer_config(optimizer)
    variable = isinstance(cell_filter, VariableCellConfig)
    if cell_filter is not None and not isinstance(
        cell_filter, FixedCellConfig | VariableCellConfig
    ):
        raise UserInputError(
            f"cell_filter must be a fixed or variable cell config, got {cell_filter!r}"
        )
    check_structure(atoms)
    fixed_idx = fixed_indices(atoms, fixed)
    if isinstance(opt_cfg, JaxFireConfig):
        return _relax_jax(
            atoms,
            calc_or_potential,
            opt_cfg,
            fmax,
            max_steps,
            variable,
            fixed_idx,
            trajectory_interval,
            progress,
            skin,
        )

    calc = calc_or_potential
    if not isinstance(calc, Calculator):
        model = as_jax_model(calc)
        if model is None:
            raise UserInputError(
                f"cannot relax with {type(calc).__name__}: expected an ASE calculator, a "
                "Potential or a JaxModel"
            )
        calc = model.calculator()
    work = atoms.copy()
    work.calc = calc
    others = [c for c in work.constraints if not isinstance(c, FixAtoms)]
    work.set_constraint([*others, FixAtoms(indices=fixed_idx)] if len(fixed_idx) else others)
    target: Any = work
    if variable:
        from ase.filters import FrechetCellFilter

        assert isinstance(cell_filter, VariableCellConfig)
        if not np.all(work.pbc):
            raise UserInputError("a variable-cell relaxation needs a structure periodic in 3D")
        target = FrechetCellFilter(
            work,
            hydrostatic_strain=cell_filter.hydrostatic_strain,
            scalar_pressure=cell_filter.pressure_gpa * units.GPa,
        )
    opt = _ase_optimizer(opt_cfg, target)
    frames: list[Atoms] = []
    initial: list[float] = []

    def observe() -> None:
        energy = work.get_potential_energy()
        forces = work.get_forces()
        if not (math.isfinite(energy) and np.all(np.isfinite(forces))):
            raise UserInputError(
                f"the calculator returned non-finite energy or forces at step {opt.nsteps}"
            )
        if not initial:
            initial.append(float(energy))
        if trajectory_interval > 0 and opt.nsteps % trajectory_interval == 0:
            results: dict[str, Any] = {"energy": energy, "forces": forces}
            if variable:
                results["stress"] = work.get_stress()
            frames.append(snapshot(work, **results))
            frames[-1].info["step"] = int(opt.nsteps)

    t0 = time.perf_counter()
    with progress_bar(progress, max_steps, f"relax ({opt_cfg.kind})") as update:
        opt.attach(observe, interval=1)
        if progress:
            opt.attach(lambda: update(opt.nsteps, _max_norm(target.get_forces())), interval=1)
        converged = bool(opt.run(fmax=fmax, steps=max_steps))
    elapsed = time.perf_counter() - t0
    energy = float(work.get_potential_energy())
    forces = work.get_forces()
    stress = np.asarray(work.get_stress()) if variable else None
    results = {"energy": energy, "forces": forces}
    if stress is not None:
        results["stress"] = stress
    return RelaxResult(
        atoms=snapshot(work, **results),
        energy=energy,
        max_force=_max_norm(forces),
        converge_force=_max_norm(target.get_forces()),
        steps=int(opt.nsteps),
        converged=converged,
        initial_energy=initial[0] if initial else energy,
        stress=stress,
        trajectory=frames,
        optimizer=opt_cfg.kind,
        timings={"relax": elapsed},
    )


def _relax_jax(
    atoms: Atoms,
    calc_or_potential: Any,
    cfg: JaxFireConfig,
    fmax: float,
    max_steps: int,
    variable: bool,
    fixed_idx: np.ndarray,
    trajectory_interval: int,
    progress: bool,
    skin: float,
) -> RelaxResult:
    model = as_jax_model(calc_or_potential)
    if model is None:
        raise UserInputError(
            "optimizer jax_fire needs an mlipctl model (a Potential or JaxModel), not "
            f"{type(calc_or_potential).__name__}; use fire, bfgs or lbfgs for other calculators"
        )
    if variable:
        raise UserInputError("optimizer jax_fire supports a fixed cell only; use fire/bfgs/lbfgs")
    others = [type(c).__name__ for c in atoms.constraints if not isinstance(c, FixAtoms)]
    if others:
        raise UserInputError(f"optimizer jax_fire supports FixAtoms only, got {others}")
    movable = np.ones(len(atoms), bool)
    movable[fixed_idx] = False
    params = FireParams(dt_max=cfg.dt_max, maxstep=cfg.maxstep)
    with progress_bar(progress, max_steps, "relax (jax_fire)") as update:
        out = fire_relax(
            atoms,
            model,
            fmax=fmax,
            max_steps=max_steps,
            movable=movable,
            dt=cfg.dt,
            params=params,
            skin=skin,
            trajectory_interval=trajectory_interval,
            on_progress=update,
        )
    final = atoms.copy()
    final.positions = out.positions
    if len(fixed_idx):
        others_c = [c for c in final.constraints if not isinstance(c, FixAtoms)]
        final.set_constraint([*others_c, FixAtoms(indices=fixed_idx)])
    final.calc = SinglePointCalculator(final, energy=out.energy, forces=out.forces)
    initial = out.frames[0].get_potential_energy() if out.frames else math.nan
    return RelaxResult(
        atoms=final,
        energy=out.energy,
        max_force=out.max_force,
        converge_force=out.max_force,
        steps=out.steps,
        converged=out.converged,
        initial_energy=float(initial),
        trajectory=out.frames,
        optimizer="jax_fire",
        n_rebuilds=out.n_rebuilds,
        n_compiles=out.n_compiles,
        timings={"compile": out.compile_seconds, "relax": out.run_seconds},
    )


def _max_norm(forces: Any) -> float:
    f = np.asarray(forces, dtype=np.float64).reshape(-1, 3)
    return float(np.sqrt((f * f).sum(axis=1).max())) if len(f) else 0.0


def equilibrium_lattice_constant(
    calc: Calculator,
    element: str,
    structure: str,
    *,
    c_over_a: float | None = None,
    a_guess: float | None = None,
) -> float:
    """The calculator's equilibrium lattice constant (Å) from an equation-of-state fit.

    The conventional cell is scaled uniformly (hcp keeps its c/a), energies at 9 strains of
    ±3 % and then ±0.6 % around the first estimate are fitted with Birch-Murnaghan.
    """
    from ase.eos import EquationOfState

    from mlipctl.data.crystals import unit_cell

    cell0 = unit_cell(element, structure, a_guess, c_over_a)
    a0 = float(np.linalg.norm(cell0.cell[0]))
    scale = 1.0
    for span in (0.03, 0.006):
        volumes, energies = [], []
        for s in scale * np.linspace(1 - span, 1 + span, 9):
            at = cell0.copy()
            at.set_cell(cell0.cell[:] * s, scale_atoms=True)
            at.calc = calc
            volumes.append(at.get_volume())
            energies.append(at.get_potential_energy())
        v0, _, _ = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
        scale = float((v0 / cell0.get_volume()) ** (1.0 / 3.0))
    return a0 * scale


# --------------------------------------------------------------------------------------------
# CLI entry point
# --------------------------------------------------------------------------------------------


def _resume_from(out: Path, atoms: Atoms, messages: list[str]) -> Atoms:
    """Positions and cell of the last trajectory frame of an earlier run, if there is one."""
    path = out / "trajectory.extxyz"
    if not path.exists():
        messages.append("resume: no earlier trajectory found; started from the input structure")
        return atoms
    from mlipctl.data.sources import read_frames

    last = read_frames(str(path), "-1")[0]
    if len(last) != len(atoms) or not np.array_equal(last.numbers, atoms.numbers):
        raise UserInputError(
            f"cannot resume: {path} holds {last.get_chemical_formula()} but the config's "
            f"structure is {atoms.get_chemical_formula()}"
        )
    start = atoms.copy()
    start.set_cell(last.cell[:], scale_atoms=False)
    start.positions = last.positions
    step = last.info.get("step", "?")
    messages.append(f"resumed from {path} (frame of step {step}); the step count restarts at 0")
    return start


def run_relax(cfg: RelaxConfig, *, resume: bool = False, progress: bool = True) -> Report:
    """Run `mlipctl relax`: relax ``cfg.structure`` and write trajectory and final structure."""
    from mlipctl.data.io import write_structures_atomic
    from mlipctl.data.sources import load_structure
    from mlipctl.engines.calculators import describe, is_model, load_potential_for, make_calculator

    timings: dict[str, float] = {}
    messages: list[str] = []
    out = Path(cfg.output)
    t0 = time.perf_counter()
    atoms = load_structure(cfg.structure)
    if resume:
        atoms = _resume_from(out, atoms, messages)
    if isinstance(cfg.optimizer, JaxFireConfig) or is_model(cfg.calculator):
        engine: Any = load_potential_for(cfg.calculator)
    else:
        engine = make_calculator(cfg.calculator)
    timings["setup"] = time.perf_counter() - t0

    res = relax_atoms(
        atoms,
        engine,
        optimizer=cfg.optimizer,
        fmax=cfg.fmax,
        max_steps=cfg.max_steps,
        cell_filter=cfg.cell,
        fixed=cfg.fixed_atoms,
        trajectory_interval=cfg.trajectory_interval,
        progress=progress,
    )
    timings.update(res.timings)

    t1 = time.perf_counter()
    artifacts: dict[str, str] = {}
    if res.trajectory:
        artifacts["trajectory"] = str(
            write_structures_atomic(out / "trajectory.extxyz", res.trajectory)
        )
    artifacts["final_structure"] = str(write_structures_atomic(out / "final.extxyz", [res.atoms]))
    timings["write"] = time.perf_counter() - t1

    n = len(res.atoms)
    results: dict[str, Any] = {
        "calculator": describe(cfg.calculator),
        "optimizer": res.optimizer,
        "formula": res.atoms.get_chemical_formula(),
        "n_atoms": n,
        "n_fixed": int(len(fixed_indices(res.atoms))),
        "initial_energy_ev": res.initial_energy,
        "energy_ev": res.energy,
        "energy_per_atom_ev": res.energy / n,
        "relaxation_energy_ev": res.energy - res.initial_energy,
        "max_force_ev_per_a": res.max_force,
        "converge_force_ev_per_a": res.converge_force,
        "steps": res.steps,
        "converged": res.converged,
    }
    if res.optimizer == "jax_fire":
        results["neighbor_rebuilds"] = res.n_rebuilds
        results["compilations"] = res.n_compiles
    if isinstance(cfg.cell, VariableCellConfig):
        cell = res.atoms.cell
        volume = float(res.atoms.get_volume())
        results["cell_a"] = cell[:].tolist()
        results["cell_lengths_a"] = [float(x) for x in cell.lengths()]
        results["cell_angles_deg"] = [float(x) for x in cell.angles()]
        results["volume_a3"] = volume
        results["volume_per_atom_a3"] = volume / n
        if res.stress is not None:
            results["stress_gpa"] = (np.asarray(res.stress) / units.GPa).tolist()
            results["pressure_gpa"] = float(-np.mean(res.stress[:3]) / units.GPa)
        p = cfg.cell.pressure_gpa * units.GPa
        results["enthalpy_ev"] = res.energy + p * volume
    if not res.converged:
        messages.append(
            f"not converged: max force {res.converge_force:.4g} eV/Å after {res.steps} steps "
            f"(fmax {cfg.fmax}); raise max_steps or try another optimizer"
        )
    criteria = [
        Criterion.is_true(
            "converged",
            res.converged,
            detail=f"{res.optimizer} reached max force < {cfg.fmax} eV/Å within {cfg.max_steps} steps",
        ),
        Criterion.at_most("max_force", res.converge_force, cfg.fmax, unit="eV/Å"),
    ]
    return Report(
        command="relax",
        config=cfg.model_dump(mode="json"),
        environment=Environment.capture(),
        timings=timings,
        results=results,
        criteria=criteria,
        artifacts=artifacts,
        messages=messages,
    )
