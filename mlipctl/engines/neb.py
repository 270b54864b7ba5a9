"""`mlipctl neb`: climbing-image nudged elastic band between two states or for a vacancy hop.

Two drivers behind one result type (:class:`NEBResult`):

* **batched** (models, optimiser ``fire`` or ``mdmin``): the moving images are packed into one
  padded :class:`~mlipctl.data.graph.AtomsGraph` (B = number of moving images) and every step
  is one jitted call: energies and forces of all images from one ``jax.grad``, the NEB force
  projection (:func:`neb_forces`: improved tangent of Henkelman & Jónsson, J. Chem. Phys. 113,
  9978 (2000); climbing image of Henkelman, Uberuaga & Jónsson, ibid. 9901; optional
  energy-weighted springs from the latter) and the optimiser update. The neighbour list carries
  a skin and is rebuilt on the host only when an atom has moved more than skin/2.
* **ase** (reference calculators, or ``bfgs``): ASE's ``NEB`` with ``method="improvedtangent"``
  (the same projection), one calculator per image, ASE's optimiser. Energy-weighted springs are
  applied by recomputing ASE's spring constants from the current energies before every force
  evaluation.

The energy profile along the path uses ASE's tangent-force cubic spline (``fit_raw``, as
``NEBTools``). :func:`run_neb_images` is the library entry point (used by ``validate``);
:func:`run_neb` is the CLI runner that builds or reads the end points, relaxes them, interpolates
the band (IDPP or linear), runs the band and writes ``images.extxyz``, ``saddle.extxyz``,
``profile.csv``, ``profile_spline.csv`` and ``neb.png`` (all atomically), plus a band checkpoint
every 50 steps (``band_checkpoint.extxyz``) that ``resume=True`` continues from.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from mlipctl.config.neb import DefectEndpointsConfig, NEBConfig
from mlipctl.engines.fire import (
    DEFAULT_SKIN,
    CompiledCache,
    FireParams,
    JaxModel,
    SkinNeighbors,
    as_jax_model,
    fire_init,
    fire_update,
    make_force_fn,
    max_atom_norm,
)
from mlipctl.engines.relax import (
    check_structure,
    fixed_indices,
    progress_bar,
    relax_atoms,
    snapshot,
)
from mlipctl.errors import UserInputError
from mlipctl.reports.base import Criterion, Environment, Report, atomic_write_bytes

jax.config.update("jax_enable_x64", True)

BAND_OPTIMIZERS = ("fire", "mdmin")
"""Optimisers of the batched driver; ``bfgs`` runs through ASE."""

MDMIN_DT = 0.2
"""ASE's MDMin default time step."""


@dataclass
class NEBResult:
    """Outcome of a NEB run.

    Attributes:
        images: all images, end points included, each with a SinglePointCalculator holding its
            energy and true (un-projected) forces (N, 3).
        energies: (n_images + 2,) energies in eV.
        converged: largest NEB force below ``fmax`` within ``max_steps``.
        steps: optimiser steps taken.
        max_force: largest per-atom NEB force on the moving images at the end, eV/Å.
        saddle_index: index into ``images`` of the highest-energy moving image.
        barrier_forward: E[saddle] - E[0], eV.
        barrier_backward: E[saddle] - E[-1], eV.
        delta_e: E[-1] - E[0], eV.
        reaction_coordinate: (n_images + 2,) cumulative path length, Å.
        spline_coordinate: reaction coordinate of the spline points, Å.
        spline_energy: spline energies relative to E[0], eV.
        spline_barrier_forward: maximum of the spline relative to E[0], eV.
        driver: "batched" or "ase".
        layout: image layout of the batched driver ("flat" or "map"; "" for ase).
        n_step_calls: compiled step calls (batched driver: one per step plus the last check).
        n_compiles: compilations of the step (batched driver).
        n_rebuilds: neighbour-list rebuilds after the first (batched driver).
        energy_traces: times ``energy_fn`` was traced inside the step: equals ``n_compiles``
            when all images go through one batched call.
        timings: seconds (``compile``, ``band``, ...).
    """

    images: list[Atoms]
    energies: np.ndarray
    converged: bool
    steps: int
    max_force: float
    saddle_index: int
    barrier_forward: float
    barrier_backward: float
    delta_e: float
    reaction_coordinate: np.ndarray
    spline_coordinate: np.ndarray
    spline_energy: np.ndarray
    spline_barrier_forward: float
    driver: str
    layout: str = ""
    n_step_calls: int = 0
    n_compiles: int = 0
    n_rebuilds: int = 0
    energy_traces: int = 0
    timings: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# NEB force projection (pure JAX)
# --------------------------------------------------------------------------------------------


def spring_constants(energies: Any, k: float, variable: tuple[float, float] | None) -> Any:
    """Spring constants (M + 1,) of the springs between consecutive images.

    Args:
        energies: (M + 2,) energies of all images, end points included.
        k: constant spring constant (eV/Å²), used when ``variable`` is None.
        variable: (k_min, k_max): energy-weighted springs (Henkelman, Uberuaga & Jónsson 2000):
            spring i (between images i-1 and i) with E_i = max(E_{i-1}, E_i) gets
            k_max - (k_max - k_min) (E_max - E_i) / (E_max - E_ref) if E_i > E_ref, else k_min;
            E_ref is the higher end-point energy, E_max the highest image energy.

    Works on numpy and JAX arrays alike.
    """
    xp = jnp if isinstance(energies, jax.Array) else np
    e = xp.asarray(energies)
    if variable is None:
        return xp.full(e.shape[0] - 1, k, dtype=e.dtype)
    k_min, k_max = variable
    e_spring = xp.maximum(e[1:], e[:-1])
    e_ref = xp.maximum(e[0], e[-1])
    e_max = xp.max(e)
    span = xp.where(e_max > e_ref, e_max - e_ref, 1.0)
    weighted = k_max - (k_max - k_min) * (e_max - e_spring) / span
    return xp.where(e_spring > e_ref, weighted, k_min)


def _mic(d: jax.Array, cell: jax.Array, use_mic: bool) -> jax.Array:
    """Wrap displacements (..., 3) to the nearest periodic image (valid for |d| < half a cell)."""
    if not use_mic:
        return d
    frac = d @ jnp.linalg.inv(cell)
    return (frac - jnp.round(frac)) @ cell


def neb_forces(
    energies: jax.Array,
    forces: jax.Array,
    positions: jax.Array,
    end_energies: jax.Array,
    end_positions: jax.Array,
    springs: jax.Array,
    cell: jax.Array,
    *,
    climb: bool,
    use_mic: bool,
) -> tuple[jax.Array, jax.Array]:
    """NEB forces on the M moving images (ASE's ``improvedtangent`` method, same conventions).

    Args:
        energies: (M,) image energies.
        forces: (M, N, 3) true forces (zero on fixed atoms).
        positions: (M, N, 3).
        end_energies: (2,) energies of the initial and final states.
        end_positions: (2, N, 3).
        springs: (M + 1,) spring constants (see :func:`spring_constants`).
        cell: (3, 3) common cell (minimum-image spring vectors when ``use_mic``).
        climb: the highest-energy image climbs (full force, tangential part inverted).
        use_mic: wrap spring vectors to the nearest periodic image.

    Returns:
        ``(neb_forces (M, N, 3), tangents (M, N, 3))``.
    """
    e_all = jnp.concatenate([end_energies[:1], energies, end_energies[1:]])
    r_all = jnp.concatenate([end_positions[:1], positions, end_positions[1:]])
    seg = _mic(r_all[1:] - r_all[:-1], cell, use_mic)  # (M+1, N, 3): image i -> i+1
    seg_len = jnp.sqrt(jnp.sum(seg * seg, axis=(1, 2)))
    t_minus, t_plus = seg[:-1], seg[1:]
    e_prev, e_mid, e_next = e_all[:-2], e_all[1:-1], e_all[2:]
    d_next, d_prev = jnp.abs(e_next - e_mid), jnp.abs(e_prev - e_mid)
    d_max, d_min = jnp.maximum(d_next, d_prev), jnp.minimum(d_next, d_prev)
    rising = (e_next > e_mid) & (e_mid > e_prev)
    falling = (e_next < e_mid) & (e_mid < e_prev)
    w_plus = jnp.where(e_next > e_prev, d_max, d_min)
    w_minus = jnp.where(e_next > e_prev, d_min, d_max)
    w_plus = jnp.where(rising, 1.0, jnp.where(falling, 0.0, w_plus))
    w_minus = jnp.where(rising, 0.0, jnp.where(falling, 1.0, w_minus))
    tangent = w_plus[:, None, None] * t_plus + w_minus[:, None, None] * t_minus
    norm = jnp.sqrt(jnp.sum(tangent * tangent, axis=(1, 2)))
    tangent = tangent / jnp.where(norm > 0, norm, 1.0)[:, None, None]

    parallel = jnp.sum(forces * tangent, axis=(1, 2))  # (M,)
    spring = springs[1:] * seg_len[1:] - springs[:-1] * seg_len[:-1]  # (M,)
    nudged = forces + (spring - parallel)[:, None, None] * tangent
    if not climb:
        return nudged, tangent
    climbing = forces - 2.0 * parallel[:, None, None] * tangent
    # ASE picks the last of equal maxima (argsort); ties are measure-zero in practice.
    is_top = jnp.arange(energies.shape[0]) == jnp.argmax(energies)
    return jnp.where(is_top[:, None, None], climbing, nudged), tangent


# --------------------------------------------------------------------------------------------
# Batched driver
# --------------------------------------------------------------------------------------------


class MDMinState(NamedTuple):
    """ASE's MDMin (velocity projected on the force, zeroed when going uphill)."""

    positions: jax.Array
    velocities: jax.Array
    started: jax.Array


def mdmin_update(state: MDMinState, forces: jax.Array, dt: float, maxstep: float) -> MDMinState:
    """One MDMin step as ASE's (per-atom step capped at ``maxstep``)."""
    v = state.velocities + 0.5 * dt * forces
    vf = jnp.vdot(v, forces)
    ff = jnp.vdot(forces, forces)
    projected = jnp.where(vf < 0.0, 0.0, forces * vf / jnp.where(ff > 0, ff, 1.0))
    v = jnp.where(state.started, projected, jnp.zeros_like(v))
    v = v + 0.5 * dt * forces
    dx = dt * v
    largest = max_atom_norm(dx)
    dx = dx * jnp.clip(maxstep / (1e-6 + largest), 0.0, 1.0)
    return MDMinState(state.positions + dx, v, jnp.asarray(True))


class _StepOut(NamedTuple):
    energies: jax.Array  # (M,)
    forces: jax.Array  # (M, N, 3) true forces, fixed atoms zeroed
    fmax: jax.Array  # () largest per-atom NEB force
    moved: jax.Array  # () the updated positions left the skin


class BatchedBand:
    """A band of M moving images whose forces come from one batched, jitted call per step.

    Args:
        model: the potential.
        images: all images (M + 2), end points first and last; same atoms, cell and pbc.
        k: spring constant, eV/Å² (constant springs).
        variable_springs: (k_min, k_max) for energy-weighted springs, or None.
        climb: climbing image.
        optimizer: "fire" or "mdmin".
        skin: neighbour-list skin, Å.
        fire: FIRE settings.
        layout: "flat": all images in one padded graph with B = M structure slots, one model
            call; "map": M stacked B = 1 graphs evaluated one after another by ``lax.map``
            inside the same compiled call (same results; on CPU about 2x faster per image, as
            the working set of one image stays in cache); "auto": "map" on CPU, else "flat".
    """

    def __init__(
        self,
        model: JaxModel,
        images: Sequence[Atoms],
        *,
        k: float = 0.1,
        variable_springs: tuple[float, float] | None = None,
        climb: bool = True,
        optimizer: str = "fire",
        skin: float = DEFAULT_SKIN,
        fire: FireParams | None = None,
        layout: str = "auto",
    ) -> None:
        if layout not in ("auto", "flat", "map"):
            raise UserInputError(f"layout must be 'auto', 'flat' or 'map', got {layout!r}")
        if layout == "auto":
            layout = "map" if jax.default_backend() == "cpu" else "flat"
        self.layout = layout
        if optimizer not in BAND_OPTIMIZERS:
            raise UserInputError(
                f"the batched NEB supports optimizers {BAND_OPTIMIZERS}, got {optimizer!r}"
            )
        check_band(images)
        self.model = model
        self.images = [im.copy() for im in images]
        for im in self.images:
            im.calc = None
        self.n_moving = len(images) - 2
        self.n_atoms = len(images[0])
        self.optimizer = optimizer
        self.fire = fire or FireParams()
        movable = np.ones(self.n_atoms, bool)
        movable[band_fixed(images)] = False
        self.movable = jnp.asarray(movable)
        cell = np.asarray(images[0].cell[:], dtype=np.float64)
        self.use_mic = bool(np.any(images[0].pbc)) and abs(np.linalg.det(cell)) > 1e-9
        self.cell = jnp.asarray(cell)
        self.neighbors = SkinNeighbors(model.cutoff, skin, model.type_map)
        self.skin = float(skin)
        self.n_calls = 0
        self.n_compiles = 0
        self.energy_traces = 0
        self.compile_seconds = 0.0
        self.run_seconds = 0.0

        force_fn = make_force_fn(model.energy_fn, model.cutoff)
        ends = [self.images[0], self.images[-1]]
        graph = SkinNeighbors(model.cutoff, 0.0, model.type_map).build(ends)
        e_ends, f_ends = jax.device_get(jax.jit(force_fn)(model.params, _device(graph)))
        if not (np.all(np.isfinite(e_ends)) and np.all(np.isfinite(f_ends))):
            raise UserInputError("the potential returned non-finite energies for the end points")
        self.end_energies = np.asarray(e_ends, dtype=np.float64)
        self.end_forces = np.asarray(f_ends).reshape(2, self.n_atoms, 3)
        self.end_positions = jnp.asarray(np.stack([ends[0].positions, ends[1].positions]))
        self._step = self._make_step(variable_springs, k, climb)

    def _make_step(
        self, variable: tuple[float, float] | None, k: float, climb: bool
    ) -> Callable[..., Any]:
        energy_fn = self.model.energy_fn

        def counted(params: Any, graph: Any) -> jax.Array:
            self.energy_traces += 1  # runs only while tracing
            return energy_fn(params, graph)

        force_fn = make_force_fn(counted, self.model.cutoff)
        m, n = self.n_moving, self.n_atoms
        fire, use_mic, skin, optimizer = self.fire, self.use_mic, self.skin, self.optimizer
        layout = self.layout

        def step(
            params: Any,
            graph: Any,
            state: Any,
            ends_e: jax.Array,
            ends_r: jax.Array,
            cell: jax.Array,
            movable: jax.Array,
        ) -> tuple[Any, _StepOut]:
            self.n_compiles += 1  # runs only while tracing
            x = state.positions
            if layout == "flat":
                flat = graph._replace(positions=x.reshape(m * n, 3))
                energies, forces = force_fn(params, flat)
            else:
                # Stacked per-image graphs, evaluated image after image inside this one call.
                def one(args: tuple[Any, jax.Array]) -> tuple[jax.Array, jax.Array]:
                    g, xi = args
                    e, f = force_fn(params, g._replace(positions=xi))
                    return e[0], f

                energies, forces = jax.lax.map(one, (graph, x))
            forces = jnp.where(movable[None, :, None], forces.reshape(m, n, 3), 0.0)
            e_all = jnp.concatenate([ends_e[:1], energies, ends_e[1:]])
            springs = spring_constants(e_all, k, variable)
            nudged, _ = neb_forces(
                energies, forces, x, ends_e, ends_r, springs, cell, climb=climb, use_mic=use_mic
            )
            nudged = jnp.where(movable[None, :, None], nudged, 0.0)
            if optimizer == "fire":
                new = fire_update(state, nudged, fire)
            else:
                new = mdmin_update(state, nudged, MDMIN_DT, fire.maxstep)
            reference = graph.positions.reshape(m, n, 3)
            moved = max_atom_norm(new.positions - reference) > 0.5 * skin
            return new, _StepOut(energies, forces, max_atom_norm(nudged), moved)

        return CompiledCache(step)

    def _graph(self, positions: np.ndarray) -> Any:
        for im, x in zip(self.images[1:-1], positions, strict=True):
            im.positions = x
        moving = self.images[1:-1]
        if self.layout == "flat":
            return _device(self.neighbors.build(moving))
        return _device(self.neighbors.build_stacked(moving))

    def run(
        self,
        *,
        fmax: float,
        max_steps: int,
        on_step: Callable[[int, float], None] | None = None,
        checkpoint: Callable[[int, np.ndarray], None] | None = None,
        checkpoint_interval: int = 50,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, int, bool]:
        """Optimise the band.

        Returns:
            ``(positions (M, N, 3), energies (M,), forces (M, N, 3), max NEB force, steps,
            converged)``, all at the final positions.
        """
        x0 = np.stack([im.positions for im in self.images[1:-1]])
        graph = self._graph(x0)
        if self.optimizer == "fire":
            state: Any = fire_init(x0, 0.1, self.fire.alpha_start)
        else:
            state = MDMinState(jnp.asarray(x0), jnp.zeros_like(jnp.asarray(x0)), jnp.asarray(False))
        ends_e = jnp.asarray(self.end_energies)
        steps = 0
        while True:
            before = self._step.compile_seconds
            t0 = time.perf_counter()
            new, out = self._step(
                self.model.params,
                graph,
                state,
                ends_e,
                self.end_positions,
                self.cell,
                self.movable,
            )
            out = jax.device_get(out)
            compiled = self._step.compile_seconds - before
            self.run_seconds += time.perf_counter() - t0 - compiled
            self.compile_seconds += compiled
            self.n_calls += 1
            f_now = float(out.fmax)
            if not (np.all(np.isfinite(out.energies)) and math.isfinite(f_now)):
                raise UserInputError(
                    f"the potential returned non-finite energies or forces at NEB step {steps}"
                )
            if on_step is not None:
                on_step(steps, f_now)
            if f_now < fmax or steps >= max_steps:
                positions = np.asarray(state.positions)
                return positions, out.energies, out.forces, f_now, steps, f_now < fmax
            state = new
            steps += 1
            if bool(out.moved):
                graph = self._graph(np.asarray(state.positions))
            if checkpoint is not None and steps % checkpoint_interval == 0:
                checkpoint(steps, np.asarray(state.positions))

    @property
    def n_rebuilds(self) -> int:
        return max(self.neighbors.n_builds - 1, 0)


def _device(graph: Any) -> Any:
    return type(graph)(*(jnp.asarray(x) for x in graph))


# --------------------------------------------------------------------------------------------
# Band helpers
# --------------------------------------------------------------------------------------------


def check_band(images: Sequence[Atoms]) -> None:
    """NEB needs >= 3 images with the same atoms in the same order, cell and pbc.

    Raises:
        UserInputError: naming the first mismatch.
    """
    if len(images) < 3:
        raise UserInputError(f"a NEB band needs at least 3 images (got {len(images)})")
    first = images[0]
    for k, im in enumerate(images[1:], start=1):
        what = "final state" if k == len(images) - 1 else f"image {k}"
        if len(im) != len(first):
            raise UserInputError(
                f"mismatched NEB end points: initial state has {len(first)} atoms but {what} "
                f"has {len(im)}"
            )
        if not np.array_equal(im.numbers, first.numbers):
            i = int(np.flatnonzero(im.numbers != first.numbers)[0])
            raise UserInputError(
                f"mismatched NEB end points: atom {i} is {first.get_chemical_symbols()[i]} in "
                f"the initial state but {im.get_chemical_symbols()[i]} in {what} (same atoms in "
                "the same order are required)"
            )
        if not np.array_equal(im.pbc, first.pbc):
            raise UserInputError(f"mismatched NEB end points: pbc differ in {what}")
        if np.max(np.abs(im.cell[:] - first.cell[:])) > 1e-6:
            raise UserInputError(
                f"mismatched NEB end points: the cell of {what} differs from the initial "
                "state's (NEB needs one fixed cell)"
            )


def band_fixed(images: Sequence[Atoms]) -> np.ndarray:
    """Indices fixed (FixAtoms) in any image; they must sit at the same place in the end points.

    Raises:
        UserInputError: a fixed atom whose position differs between the end points.
    """
    idx = np.unique(np.concatenate([fixed_indices(im) for im in images]).astype(np.int64))
    if len(idx):
        delta = np.abs(images[0].positions[idx] - images[-1].positions[idx]).max()
        if delta > 1e-6:
            raise UserInputError(
                f"fixed atoms move by up to {delta:.3g} Å between the NEB end points; fixed "
                "atoms must keep their positions"
            )
    return idx


def make_band(initial: Atoms, final: Atoms, n_images: int, method: str = "idpp") -> list[Atoms]:
    """End points plus ``n_images`` interpolated images (linear or IDPP, minimum image)."""
    from ase.mep import NEB

    check_band([initial, initial, final])
    band_fixed([initial, final])
    images = [initial.copy() for _ in range(n_images + 1)] + [final.copy()]
    for im in images:
        im.calc = None
    neb = NEB(images, method="improvedtangent")
    neb.interpolate(method=method, mic=bool(np.any(initial.pbc)), apply_constraint=False)
    return images


def _profile(images: Sequence[Atoms], energies: np.ndarray, forces: np.ndarray) -> Any:
    from ase.utils.forcecurve import fit_raw

    positions = [im.positions for im in images]
    cell, pbc = images[0].cell, images[0].pbc
    return fit_raw(energies, forces, positions, cell if np.any(pbc) else None, pbc)


# --------------------------------------------------------------------------------------------
# ASE driver
# --------------------------------------------------------------------------------------------


def _ase_neb(images: list[Atoms], k: float, variable: tuple[float, float] | None, **kw: Any) -> Any:
    """ASE NEB that keeps its last projected forces (and, with ``variable``, sets its spring
    constants from the current energies before projecting; see :func:`spring_constants`)."""
    from ase.mep import NEB

    class TrackedNEB(NEB):
        last_forces: np.ndarray | None = None

        def get_forces(self) -> np.ndarray:
            if variable is not None:
                # Energies at these positions first; per-image calculators cache them, so the
                # second projection below costs no new evaluations.
                super().get_forces()
                self.k = list(spring_constants(np.asarray(self.energies), 0.0, variable))
            self.last_forces = super().get_forces()
            return self.last_forces

    return TrackedNEB(images, k=k if variable is None else variable[1], **kw)


def _run_ase(
    images: Sequence[Atoms],
    factory: Callable[[], Calculator] | None,
    shared: Calculator | None,
    *,
    climb: bool,
    k: float,
    variable_springs: tuple[float, float] | None,
    optimizer: str,
    fmax: float,
    max_steps: int,
    on_step: Callable[[int, float], None] | None,
    checkpoint: Callable[[int, np.ndarray], None] | None,
    checkpoint_interval: int,
) -> tuple[list[Atoms], np.ndarray, np.ndarray, float, int, bool]:
    from ase.optimize import BFGS, FIRE, MDMin

    band = [im.copy() for im in images]
    for im in band:
        im.calc = factory() if factory is not None else shared
    kw: dict[str, Any] = {
        "climb": climb,
        "method": "improvedtangent",
        "allow_shared_calculator": factory is None,
    }
    neb = _ase_neb(band, k, variable_springs, **kw)
    opt_cls = {"fire": FIRE, "bfgs": BFGS, "mdmin": MDMin}[optimizer]
    opt = opt_cls(neb, logfile=None)

    def observe() -> None:
        forces = neb.last_forces  # the optimiser has just evaluated these positions
        if not (np.all(np.isfinite(neb.energies)) and np.all(np.isfinite(forces))):
            raise UserInputError(
                f"the calculator returned non-finite energies or forces at NEB step {opt.nsteps}"
            )
        if on_step is not None:
            f = forces.reshape(-1, 3)
            on_step(opt.nsteps, float(np.sqrt((f * f).sum(axis=1).max())))
        if checkpoint is not None and opt.nsteps and opt.nsteps % checkpoint_interval == 0:
            checkpoint(opt.nsteps, np.stack([im.positions for im in band[1:-1]]))

    opt.attach(observe, interval=1)
    converged = bool(opt.run(fmax=fmax, steps=max_steps))
    f = neb.last_forces.reshape(-1, 3)
    max_force = float(np.sqrt((f * f).sum(axis=1).max()))
    energies = np.asarray(neb.energies, dtype=np.float64).copy()
    forces = np.asarray(neb.real_forces, dtype=np.float64).copy()
    for i in (0, -1):  # ASE leaves the end points' forces at zero
        forces[i] = band[i].get_forces(apply_constraint=False)
    return band, energies, forces, max_force, int(opt.nsteps), converged


# --------------------------------------------------------------------------------------------
# Library entry point
# --------------------------------------------------------------------------------------------


def run_neb_images(
    images: Sequence[Atoms],
    calc_or_potential: Any,
    *,
    climb: bool = True,
    k: float = 0.1,
    variable_springs: tuple[float, float] | None = None,
    optimizer: str = "fire",
    fmax: float = 0.01,
    max_steps: int = 2000,
    batched: bool | None = None,
    layout: str = "auto",
    skin: float = DEFAULT_SKIN,
    progress: bool = False,
    checkpoint: Callable[[int, np.ndarray], None] | None = None,
    checkpoint_interval: int = 50,
) -> NEBResult:
    """Run a (climbing-image) NEB on a prepared band.

    Args:
        images: end points (relaxed, as wanted) and the interpolated images between them.
        calc_or_potential: a Potential or JaxModel (batched driver), an ASE calculator shared
            by all images, or a zero-argument factory returning a fresh calculator per image.
        climb: climbing image on the highest-energy image.
        k: spring constant, eV/Å² (ignored with ``variable_springs``).
        variable_springs: (k_min, k_max) energy-weighted springs, or None.
        optimizer: "fire", "mdmin" or "bfgs" (bfgs always runs through ASE).
        fmax: convergence threshold on the largest per-atom NEB force, eV/Å.
        max_steps: give up after this many steps (``converged`` False).
        batched: force (True) or forbid (False) the batched driver; None: batched for models
            with fire/mdmin. ``batched=False`` with a model runs ASE's NEB with the model's ASE
            calculator on every image.
        layout: image layout of the batched driver (see :class:`BatchedBand`).
        skin: neighbour-list skin of the batched driver, Å.
        progress: progress bar on stderr.
        checkpoint: called as ``checkpoint(step, positions (M, N, 3))`` every
            ``checkpoint_interval`` steps.

    Raises:
        UserInputError: mismatched images, overlapping atoms, unknown elements, non-finite
            energies, or an optimiser the chosen driver does not have.
    """
    if optimizer not in ("fire", "mdmin", "bfgs"):
        raise UserInputError(f"unknown NEB optimizer {optimizer!r}; use fire, mdmin or bfgs")
    check_band(images)
    for k_im, im in enumerate(images):
        try:
            check_structure(im)
        except UserInputError as exc:
            raise UserInputError(f"{exc} (NEB image {k_im})") from None
    model = as_jax_model(calc_or_potential)
    use_batched = model is not None and optimizer in BAND_OPTIMIZERS
    if batched is True and not use_batched:
        raise UserInputError(
            "the batched NEB needs a model (Potential or JaxModel) and optimizer fire or mdmin"
        )
    if batched is False:
        use_batched = False
    timings: dict[str, float] = {}
    label = "NEB (batched)" if use_batched else "NEB (ase)"
    t0 = time.perf_counter()
    with progress_bar(progress, max_steps, label) as update:
        if use_batched:
            assert model is not None
            t_setup = time.perf_counter()
            band = BatchedBand(
                model,
                images,
                k=k,
                variable_springs=variable_springs,
                climb=climb,
                optimizer=optimizer,
                skin=skin,
                layout=layout,
            )
            band_setup = time.perf_counter() - t_setup
            positions, e_mid, f_mid, max_force, steps, converged = band.run(
                fmax=fmax,
                max_steps=max_steps,
                on_step=update,
                checkpoint=checkpoint,
                checkpoint_interval=checkpoint_interval,
            )
            energies = np.concatenate([band.end_energies[:1], e_mid, band.end_energies[1:]])
            forces = np.concatenate([band.end_forces[:1], f_mid, band.end_forces[1:]])
            final_images = [im.copy() for im in images]
            for im, x in zip(final_images[1:-1], positions, strict=True):
                im.positions = x
            extra = {
                "layout": band.layout,
                "n_step_calls": band.n_calls,
                "n_compiles": band.n_compiles,
                "n_rebuilds": band.n_rebuilds,
                "energy_traces": band.energy_traces,
            }
            timings["compile"] = band.compile_seconds
            # End-point energies: one small jitted call, compiled here.
            timings["band_setup"] = band_setup
            timings["band"] = band.run_seconds
        else:
            factory: Callable[[], Calculator] | None = None
            shared: Calculator | None = None
            if model is not None:
                factory = model.calculator
            elif isinstance(calc_or_potential, Calculator):
                shared = calc_or_potential
            elif callable(calc_or_potential):
                factory = calc_or_potential
            else:
                raise UserInputError(
                    f"cannot run NEB with {type(calc_or_potential).__name__}: expected a "
                    "Potential, JaxModel, ASE calculator or calculator factory"
                )
            final_images, energies, forces, max_force, steps, converged = _run_ase(
                images,
                factory,
                shared,
                climb=climb,
                k=k,
                variable_springs=variable_springs,
                optimizer=optimizer,
                fmax=fmax,
                max_steps=max_steps,
                on_step=update,
                checkpoint=checkpoint,
                checkpoint_interval=checkpoint_interval,
            )
            extra = {}
            timings["band"] = time.perf_counter() - t0
    out_images = [
        snapshot(im, energy=float(e), forces=f)
        for im, e, f in zip(final_images, energies, forces, strict=True)
    ]
    for i, im in enumerate(out_images):
        im.info["neb_image"] = i
    saddle = 1 + int(np.argmax(energies[1:-1]))
    fit = _profile(out_images, energies, forces)
    return NEBResult(
        images=out_images,
        energies=np.asarray(energies, dtype=np.float64),
        converged=converged,
        steps=steps,
        max_force=max_force,
        saddle_index=saddle,
        barrier_forward=float(energies[saddle] - energies[0]),
        barrier_backward=float(energies[saddle] - energies[-1]),
        delta_e=float(energies[-1] - energies[0]),
        reaction_coordinate=np.asarray(fit.path, dtype=np.float64),
        spline_coordinate=np.asarray(fit.fit_path, dtype=np.float64),
        spline_energy=np.asarray(fit.fit_energies, dtype=np.float64),
        spline_barrier_forward=float(np.max(fit.fit_energies)),
        driver="batched" if use_batched else "ase",
        timings=timings,
        **extra,
    )


# --------------------------------------------------------------------------------------------
# CLI entry point
# --------------------------------------------------------------------------------------------


def _plot(res: NEBResult, title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rel = res.energies - res.energies[0]
    ax.plot(res.spline_coordinate, res.spline_energy, "-", color="C0", label="tangent-force spline")
    ax.plot(res.reaction_coordinate, rel, "o", color="C1", label="images")
    s = res.saddle_index
    ax.plot(res.reaction_coordinate[s], rel[s], "*", ms=14, color="C3", label="saddle")
    ax.set_xlabel("reaction coordinate (Å)")
    ax.set_ylabel("energy relative to initial state (eV)")
    status = "" if res.converged else "  [NOT CONVERGED]"
    ax.set_title(
        f"{title}: Ef = {res.barrier_forward:.3f} eV, Eb = {res.barrier_backward:.3f} eV, "
        f"ΔE = {res.delta_e:.3f} eV{status}",
        fontsize=8,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _csv(header: Sequence[str], rows: Sequence[Sequence[float]]) -> bytes:
    lines = [",".join(header)] + [",".join(f"{v:.10g}" for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def _endpoints(cfg: NEBConfig, engine: Any, messages: list[str], results: dict[str, Any]):
    """Initial and final states (unrelaxed) from files or a generated vacancy hop."""
    if isinstance(cfg.endpoints, DefectEndpointsConfig):
        from mlipctl.data.crystals import build_crystal, vacancy_hop
        from mlipctl.engines.relax import equilibrium_lattice_constant

        cr = cfg.endpoints.crystal
        a = cr.lattice_constant
        if a is None:
            model = as_jax_model(engine)
            calc = model.calculator() if model is not None else engine
            a = equilibrium_lattice_constant(calc, cr.element, cr.structure, c_over_a=cr.c_over_a)
            messages.append(f"lattice constant {a:.4f} Å from the calculator's equation of state")
        results["lattice_constant_a"] = float(a)
        host = build_crystal(
            cr.element,
            cr.structure,
            a=a,
            c_over_a=cr.c_over_a,
            supercell=cr.supercell,
            min_atoms=cr.min_atoms,
        )
        initial, final, hop = vacancy_hop(host, site=0)
        results["hopping_atom"] = hop
        results["host_atoms"] = len(host)
        return initial, final
    from mlipctl.data.sources import read_frames

    initial = read_frames(str(cfg.endpoints.initial), "-1")[0]
    final = read_frames(str(cfg.endpoints.final), "-1")[0]
    check_band([initial, initial, final])
    return initial, final


def _load_checkpoint(path: Path, n_images: int, n_atoms: int) -> list[Atoms] | None:
    from mlipctl.data.sources import read_frames

    frames = read_frames(str(path), ":")
    if len(frames) != n_images + 2 or any(len(f) != n_atoms for f in frames):
        raise UserInputError(
            f"cannot resume: {path} holds {len(frames)} images of {len(frames[0])} atoms, the "
            f"config needs {n_images + 2} images of {n_atoms} atoms"
        )
    return frames


def run_neb(cfg: NEBConfig, *, resume: bool = False, progress: bool = True) -> Report:
    """Run `mlipctl neb` (see the module docstring for the files written)."""
    from mlipctl.data.io import write_structures_atomic
    from mlipctl.engines.calculators import describe, is_model, load_potential_for, make_calculator

    out = Path(cfg.output)
    timings: dict[str, float] = {}
    messages: list[str] = []
    results: dict[str, Any] = {"calculator": describe(cfg.calculator)}
    criteria: list[Criterion] = []
    t0 = time.perf_counter()
    if is_model(cfg.calculator):
        engine: Any = load_potential_for(cfg.calculator)
    else:
        engine = lambda: make_calculator(cfg.calculator)  # noqa: E731 - one fresh calc per image
    initial, final = _endpoints(cfg, engine() if callable(engine) else engine, messages, results)
    timings["setup"] = time.perf_counter() - t0

    ckpt_path = out / "band_checkpoint.extxyz"
    band: list[Atoms] | None = None
    if resume and ckpt_path.exists():
        band = _load_checkpoint(ckpt_path, cfg.n_images, len(initial))
        check_band([initial, *band[1:-1], final])
        messages.append(f"resumed from {ckpt_path} (step {band[0].info.get('neb_step', '?')})")
    elif resume:
        messages.append("resume: no band checkpoint found; started from the end points")

    if band is None:
        if cfg.relax_endpoints:
            t1 = time.perf_counter()
            opt = "jax_fire" if is_model(cfg.calculator) else "lbfgs"
            relaxed = []
            for name, atoms in (("initial", initial), ("final", final)):
                calc = engine if not callable(engine) else engine()
                r = relax_atoms(
                    atoms, calc, optimizer=opt, fmax=cfg.endpoint_fmax, max_steps=cfg.max_steps
                )
                results[f"{name}_relax"] = {
                    "energy_ev": r.energy,
                    "steps": r.steps,
                    "converged": r.converged,
                    "max_force_ev_per_a": r.max_force,
                    "optimizer": r.optimizer,
                }
                criteria.append(
                    Criterion.is_true(
                        f"{name}_state_relaxed",
                        r.converged,
                        detail=f"{opt} end-point relaxation to {cfg.endpoint_fmax} eV/Å",
                    )
                )
                relaxed.append(r.atoms)
            initial, final = relaxed
            timings["relax_endpoints"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        band = make_band(initial, final, cfg.n_images, cfg.interpolation)
        timings["interpolate"] = time.perf_counter() - t2

    def save_checkpoint(step: int, positions: np.ndarray) -> None:
        frames = [im.copy() for im in band]
        for im, x in zip(frames[1:-1], positions, strict=True):
            im.positions = x
        for im in frames:
            im.calc = None
            im.info["neb_step"] = step
        write_structures_atomic(ckpt_path, frames)

    res = run_neb_images(
        band,
        engine,
        climb=cfg.climb,
        k=cfg.spring_constant,
        variable_springs=cfg.variable_springs,
        optimizer=cfg.optimizer,
        fmax=cfg.fmax,
        max_steps=cfg.max_steps,
        progress=progress,
        checkpoint=save_checkpoint,
    )
    timings.update(res.timings)
    if res.driver == "ase" and is_model(cfg.calculator):
        messages.append(
            f"optimizer {cfg.optimizer} runs through ASE's NEB (image by image); fire and mdmin "
            "use the batched driver"
        )

    t3 = time.perf_counter()
    artifacts = {
        "images": str(write_structures_atomic(out / "images.extxyz", res.images)),
        "saddle": str(
            write_structures_atomic(out / "saddle.extxyz", [res.images[res.saddle_index]])
        ),
    }
    rel = res.energies - res.energies[0]
    rows = [
        (i, s, e, r)
        for i, (s, e, r) in enumerate(zip(res.reaction_coordinate, res.energies, rel, strict=True))
    ]
    atomic_write_bytes(
        out / "profile.csv",
        _csv(("image", "reaction_coordinate_a", "energy_ev", "energy_rel_ev"), rows),
    )
    atomic_write_bytes(
        out / "profile_spline.csv",
        _csv(
            ("reaction_coordinate_a", "energy_rel_ev"),
            list(zip(res.spline_coordinate, res.spline_energy, strict=True)),
        ),
    )
    title = res.images[0].get_chemical_formula()
    atomic_write_bytes(out / "neb.png", _plot(res, title))
    artifacts.update(
        {
            "profile": str(out / "profile.csv"),
            "profile_spline": str(out / "profile_spline.csv"),
            "plot": str(out / "neb.png"),
        }
    )
    if ckpt_path.exists():
        artifacts["checkpoint"] = str(ckpt_path)
    timings["write"] = time.perf_counter() - t3

    results.update(
        {
            "driver": res.driver,
            "n_images": cfg.n_images,
            "n_atoms": len(res.images[0]),
            "barrier_forward_ev": res.barrier_forward,
            "barrier_backward_ev": res.barrier_backward,
            "delta_e_ev": res.delta_e,
            "spline_barrier_forward_ev": res.spline_barrier_forward,
            "saddle_image": res.saddle_index,
            "image_energies_ev": res.energies.tolist(),
            "image_energies_rel_ev": rel.tolist(),
            "reaction_coordinate_a": res.reaction_coordinate.tolist(),
            "converged": res.converged,
            "steps": res.steps,
            "max_force_ev_per_a": res.max_force,
        }
    )
    if res.driver == "batched":
        results.update(
            {
                "layout": res.layout,
                "step_calls": res.n_step_calls,
                "compilations": res.n_compiles,
                "neighbor_rebuilds": res.n_rebuilds,
            }
        )
    if not res.converged:
        messages.append(
            f"NEB not converged: max NEB force {res.max_force:.4g} eV/Å after {res.steps} steps "
            f"(fmax {cfg.fmax}); the barriers above are NOT saddle-point values"
        )
    criteria.append(
        Criterion.is_true(
            "converged",
            res.converged,
            detail=f"max NEB force < {cfg.fmax} eV/Å within {cfg.max_steps} steps",
        )
    )
    criteria.append(Criterion.at_most("max_neb_force", res.max_force, cfg.fmax, unit="eV/Å"))
    return Report(
        command="neb",
        config=cfg.model_dump(mode="json"),
        environment=Environment.capture(),
        timings=timings,
        results=results,
        criteria=criteria,
        artifacts=artifacts,
        messages=messages,
    )
