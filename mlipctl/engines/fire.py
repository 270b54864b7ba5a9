"""Jitted FIRE and the JAX plumbing that the relax and NEB engines share.

* :class:`JaxModel`: any ``energy_fn(params, graph) -> (K, B)`` with its parameters, cutoff and
  species table (a trained :class:`~mlipctl.model.potential.Potential` converts with
  :meth:`JaxModel.from_potential`), plus an ASE calculator for the same function.
* :func:`make_force_fn`: energies (B,) and forces (N, 3) from ``jax.grad`` of the member-mean
  energy, counting only edges within the cutoff (graphs carry a skin).
* :class:`SkinNeighbors`: host-side (vesin) neighbour lists at ``cutoff + skin`` packed into a
  padded :class:`AtomsGraph` whose edge capacity only grows (so rebuilds rarely recompile). The
  list stays exact while no atom has moved more than ``skin / 2`` from where it was built;
  callers rebuild past that, so a neighbour is never dropped.
* :func:`fire_update`: one FIRE step (Bitzek et al., PRL 97, 170201 (2006)), a pure function on
  arrays of any leading shape ``(..., 3)``.
* :func:`fire_relax`: a whole relaxation with the FIRE steps inside ``lax.while_loop`` chunks
  that stop when converged, at the step limit, at a trajectory frame, or when an atom has moved
  more than skin/2 (the host then rebuilds the list and continues).

Differences from ASE's FIRE: ``maxstep`` caps the largest *per-atom* step (ASE caps the norm of
the whole step vector, which for hundreds of atoms makes every atom crawl); the other
parameters (N_min = 5, f_inc = 1.1, f_dec = 0.5, alpha_start = 0.1, f_alpha = 0.99, unit
masses) are ASE's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.singlepoint import SinglePointCalculator

from mlipctl.data.graph import AtomsGraph
from mlipctl.data.neighbors import (
    bucket,
    build_graph,
    check_overlaps,
    max_neighbors,
    neighbor_pairs,
    neighbor_slots,
    species_indices,
)
from mlipctl.errors import UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from mlipctl.model.potential import Potential

jax.config.update("jax_enable_x64", True)

EnergyFn = Callable[[Any, AtomsGraph], jax.Array]
"""``energy_fn(params, graph) -> (K, B)`` total energies in eV (K ensemble members)."""

DEFAULT_SKIN = 0.5
"""Neighbour-list skin in Å of the jitted engines (rebuild when an atom moved > skin/2)."""

MIN_DISTANCE = 0.5
"""Atoms closer than this (Å) are rejected as overlapping before a jitted run."""


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class JaxModel:
    """A potential as the jitted engines see it.

    Attributes:
        energy_fn: pure ``(params, graph) -> (K, B)`` energies in eV; must give zero energy to
            masked edges and padding atoms (every mlipctl model does).
        params: parameter pytree passed to ``energy_fn``.
        cutoff: interaction range in Å; edges longer than this are masked before the call.
        type_map: atomic number -> species index of ``graph.species``.
        calculator_factory: returns a fresh ASE calculator for the same potential (None: an
            :class:`EnergyFnCalculator` is used).
        name: label for reports.
    """

    energy_fn: EnergyFn
    params: Any
    cutoff: float
    type_map: Mapping[int, int]
    calculator_factory: Callable[[], Calculator] | None = None
    name: str = "jax energy function"

    @classmethod
    def from_potential(cls, potential: Potential) -> JaxModel:
        from mlipctl.model.potential import make_energy

        spec = potential.spec
        return cls(
            energy_fn=make_energy(spec),
            params=potential.params,
            cutoff=spec.cutoff,
            type_map=spec.type_map(),
            calculator_factory=potential.calculator,
            name=f"mlipctl model ({', '.join(spec.species)})",
        )

    def calculator(self) -> Calculator:
        """A fresh ASE calculator evaluating the same potential one structure at a time."""
        if self.calculator_factory is not None:
            return self.calculator_factory()
        return EnergyFnCalculator(self)


def as_jax_model(obj: Any) -> JaxModel | None:
    """A :class:`JaxModel` for a ``JaxModel`` or ``Potential``; None for anything else."""
    if isinstance(obj, JaxModel):
        return obj
    from mlipctl.model.potential import Potential

    if isinstance(obj, Potential):
        return JaxModel.from_potential(obj)
    return None


def within_cutoff(graph: AtomsGraph, cutoff: float) -> AtomsGraph:
    """The graph with edges longer than ``cutoff`` masked (a skin list becomes exact)."""
    cell = graph.cell[graph.structure[graph.senders]]
    rij = (
        graph.positions[graph.receivers]
        - graph.positions[graph.senders]
        + jnp.einsum("ea,eab->eb", graph.shifts, cell)
    )
    inside = jnp.sum(rij * rij, axis=1) < cutoff * cutoff
    return graph._replace(edge_mask=graph.edge_mask & inside)


def make_force_fn(energy_fn: EnergyFn, cutoff: float) -> Callable[[Any, AtomsGraph], Any]:
    """``f(params, graph) -> (energy (B,) f64, forces (N, 3) f64)`` of the member mean.

    Forces are ``-d(sum_b E_b)/dx`` (structures are independent, so one gradient gives every
    structure's forces). Edges beyond ``cutoff`` are masked first.
    """

    def fn(params: Any, graph: AtomsGraph) -> tuple[jax.Array, jax.Array]:
        def total(pos: jax.Array) -> tuple[jax.Array, jax.Array]:
            g = within_cutoff(graph._replace(positions=pos), cutoff)
            e = jnp.mean(jnp.asarray(energy_fn(params, g), jnp.float64), axis=0)
            e = jnp.where(graph.structure_mask, e, 0.0)
            return jnp.sum(e), e

        (_, energy), grad = jax.value_and_grad(total, has_aux=True)(
            jnp.asarray(graph.positions, jnp.float64)
        )
        return energy, -grad

    return fn


class EnergyFnCalculator(Calculator):
    """ASE calculator for a :class:`JaxModel` (energy, forces, stress; one structure per call).

    Builds an exact neighbour list for every call, so it is the slow, simple reference path.
    Stress is the strain derivative (1/V) dE/d(eps) (ASE sign) for fully periodic cells.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model: JaxModel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        energy_fn, cutoff = model.energy_fn, model.cutoff

        def evaluate(params: Any, graph: AtomsGraph) -> tuple[jax.Array, ...]:
            def total(pos: jax.Array, eps: jax.Array) -> jax.Array:
                deform = jnp.eye(3) + 0.5 * (eps + eps.T)
                g = graph._replace(positions=pos @ deform, cell=graph.cell @ deform)
                g = within_cutoff(g, cutoff)
                e = jnp.mean(jnp.asarray(energy_fn(params, g), jnp.float64), axis=0)
                return jnp.sum(jnp.where(graph.structure_mask, e, 0.0))

            e, (g_pos, g_eps) = jax.value_and_grad(total, argnums=(0, 1))(
                graph.positions, jnp.zeros((3, 3), jnp.float64)
            )
            return e, -g_pos, g_eps

        self._fn = jax.jit(evaluate)

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        assert self.atoms is not None
        check_overlaps(self.atoms, MIN_DISTANCE)
        pairs = [neighbor_pairs(self.atoms, self.model.cutoff)]
        # Bucketed edge capacity: one compilation for all steps of a relaxation or band.
        graph = build_graph(
            [self.atoms],
            self.model.cutoff,
            self.model.type_map,
            n_edges=bucket(len(pairs[0][0])),
            n_neighbors=bucket(max_neighbors(pairs)),
            pairs=pairs,
        )
        e, forces, g_eps = jax.device_get(self._fn(self.model.params, _to_device(graph)))
        forces = np.asarray(forces)
        if not (np.isfinite(e) and np.all(np.isfinite(forces))):
            raise UserInputError("the potential returned non-finite energy or forces")
        self.results = {"energy": float(e), "free_energy": float(e), "forces": forces}
        if np.all(self.atoms.pbc):
            g = np.asarray(g_eps) / abs(self.atoms.get_volume())
            g = 0.5 * (g + g.T)
            self.results["stress"] = g[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]


def _to_device(graph: AtomsGraph) -> AtomsGraph:
    return AtomsGraph(*(jnp.asarray(x) for x in graph))


class CompiledCache:
    """Ahead-of-time compiled variants of one function, one per set of argument shapes.

    Compiling explicitly (``lower().compile()``) keeps compile time out of the run timings.
    Arguments must be arrays (no Python scalars), so that equal shapes mean one executable.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._jitted = jax.jit(fn)
        self._cache: dict[Any, Any] = {}
        self.compile_seconds = 0.0
        self.n_compiles = 0
        self.n_calls = 0

    def __call__(self, *args: Any) -> Any:
        key = tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in jax.tree.leaves(args))
        exe = self._cache.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe = self._jitted.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
            self.n_compiles += 1
            self._cache[key] = exe
        self.n_calls += 1
        return exe(*args)


# --------------------------------------------------------------------------------------------
# Neighbour lists with a skin
# --------------------------------------------------------------------------------------------


class SkinNeighbors:
    """Padded graphs of same-size structures with neighbours within ``cutoff + skin``.

    The edge capacity only grows (with ``headroom``), so repeated builds keep one padded shape
    and one compilation unless the structure gets denser. Graphs hold exactly the atoms given
    (no padding atoms) and B = number of structures.
    """

    def __init__(
        self,
        cutoff: float,
        skin: float,
        type_map: Mapping[int, int],
        *,
        headroom: float = 0.1,
        check_distance: float = MIN_DISTANCE,
    ) -> None:
        if not skin >= 0:
            raise ValueError(f"skin must be >= 0, got {skin}")
        self.cutoff = float(cutoff)
        self.skin = float(skin)
        self.type_map = dict(type_map)
        self.headroom = float(headroom)
        self.check_distance = float(check_distance)
        self.capacity = 0
        self.neighbor_capacity = 0
        self.n_builds = 0

    def _pairs(self, structures: Sequence[Atoms]) -> list[Any]:
        pairs = []
        for k, atoms in enumerate(structures):
            where = f" (image {k})" if len(structures) > 1 else ""
            species_indices(atoms, self.type_map, where=where)
            try:
                check_overlaps(atoms, self.check_distance)
            except UserInputError as exc:
                raise UserInputError(f"{exc}{where}") from None
            pairs.append(neighbor_pairs(atoms, self.cutoff + self.skin))
        return pairs

    def _grow(self, pairs: Sequence[Any], needed: int) -> None:
        if needed > self.capacity:
            # Multiples of 64 edges keep shapes stable across small changes.
            self.capacity = int(math.ceil(needed * (1.0 + self.headroom) / 64.0) * 64)
        per_atom = max_neighbors(pairs)
        # The first build sizes the table even for structures without neighbours.
        if per_atom > self.neighbor_capacity or self.neighbor_capacity == 0:
            self.neighbor_capacity = neighbor_slots(per_atom, self.headroom)

    def build(self, structures: Sequence[Atoms]) -> AtomsGraph:
        """Checked (overlaps, unknown elements) numpy graph of all ``structures`` together
        (B = len(structures) slots, one shared edge capacity)."""
        pairs = self._pairs(structures)
        self._grow(pairs, sum(len(p[0]) for p in pairs))
        self.n_builds += 1
        return build_graph(
            structures,
            self.cutoff + self.skin,
            self.type_map,
            n_edges=self.capacity,
            n_structures=len(structures),
            n_neighbors=self.neighbor_capacity,
            pairs=pairs,
        )

    def build_stacked(self, structures: Sequence[Atoms]) -> AtomsGraph:
        """One B = 1 graph per structure, stacked on a leading axis (S, ...); here
        ``capacity`` is the edge capacity of each structure (all same-size structures)."""
        pairs = self._pairs(structures)
        self._grow(pairs, max(len(p[0]) for p in pairs))
        self.n_builds += 1
        graphs = [
            build_graph(
                [atoms],
                self.cutoff + self.skin,
                self.type_map,
                n_edges=self.capacity,
                n_structures=1,
                n_neighbors=self.neighbor_capacity,
                pairs=[p],
            )
            for atoms, p in zip(structures, pairs, strict=True)
        ]
        return AtomsGraph(*(np.stack(leaves) for leaves in zip(*graphs, strict=True)))


# --------------------------------------------------------------------------------------------
# FIRE
# --------------------------------------------------------------------------------------------


class FireParams(NamedTuple):
    """FIRE settings (ASE units: Å, eV, time in Å·sqrt(u/eV) with unit masses)."""

    dt_max: float = 1.0
    maxstep: float = 0.2
    n_min: int = 5
    f_inc: float = 1.1
    f_dec: float = 0.5
    alpha_start: float = 0.1
    f_alpha: float = 0.99


class FireState(NamedTuple):
    """FIRE state; ``positions``/``velocities`` have shape (..., 3) (atoms, or images x atoms)."""

    positions: jax.Array
    velocities: jax.Array
    dt: jax.Array
    alpha: jax.Array
    n_pos: jax.Array
    started: jax.Array


def fire_init(positions: Any, dt: float, alpha_start: float = 0.1) -> FireState:
    """Start state: zero velocity, time step ``dt``."""
    x = jnp.asarray(positions, jnp.float64)
    return FireState(
        positions=x,
        velocities=jnp.zeros_like(x),
        dt=jnp.asarray(dt, jnp.float64),
        alpha=jnp.asarray(alpha_start, jnp.float64),
        n_pos=jnp.asarray(0, jnp.int32),
        started=jnp.asarray(False),
    )


def max_atom_norm(x: jax.Array) -> jax.Array:
    """Largest per-atom Euclidean norm of a (..., 3) array."""
    return jnp.sqrt(jnp.max(jnp.sum(x * x, axis=-1)))


def fire_update(state: FireState, forces: jax.Array, p: FireParams) -> FireState:
    """One FIRE step with ``forces`` (same shape as the positions; zero on fixed atoms).

    As ASE: the first step only accelerates; afterwards mix v towards F if P = F.v > 0 (and grow
    dt after N_min such steps), else stop and halve dt. Then v += dt F, x += dt v with the
    largest per-atom displacement capped at ``maxstep``.
    """
    f = jnp.asarray(forces, jnp.float64)
    v = state.velocities
    vf = jnp.vdot(f, v)
    f_norm = jnp.sqrt(jnp.vdot(f, f))
    v_norm = jnp.sqrt(jnp.vdot(v, v))
    downhill = state.started & (vf > 0.0)
    uphill = state.started & ~(vf > 0.0)
    mixed = (1.0 - state.alpha) * v + state.alpha * f / jnp.where(f_norm > 0, f_norm, 1.0) * v_norm
    grow = downhill & (state.n_pos > p.n_min)
    v = jnp.where(downhill, mixed, jnp.where(uphill, 0.0, v))
    dt = jnp.where(grow, jnp.minimum(state.dt * p.f_inc, p.dt_max), state.dt)
    dt = jnp.where(uphill, dt * p.f_dec, dt)
    alpha = jnp.where(grow, state.alpha * p.f_alpha, state.alpha)
    alpha = jnp.where(uphill, p.alpha_start, alpha)
    n_pos = jnp.where(downhill, state.n_pos + 1, jnp.where(uphill, 0, state.n_pos))
    v = v + dt * f
    dr = dt * v
    largest = max_atom_norm(dr)
    dr = dr * jnp.minimum(1.0, p.maxstep / jnp.where(largest > 0, largest, 1.0))
    return FireState(
        positions=state.positions + dr,
        velocities=v,
        dt=dt,
        alpha=alpha,
        n_pos=n_pos.astype(jnp.int32),
        started=jnp.asarray(True),
    )


# --------------------------------------------------------------------------------------------
# Jitted relaxation
# --------------------------------------------------------------------------------------------


class _Chunk(NamedTuple):
    state: FireState
    energy: jax.Array  # () at state.positions (valid unless moved)
    forces: jax.Array  # (N, 3) masked by movable
    fnorm: jax.Array  # () largest per-atom force
    n: jax.Array  # () steps taken in this chunk
    moved: jax.Array  # () True: an atom moved more than skin/2 since the build


@dataclass
class FireRelaxOutput:
    """What :func:`fire_relax` returns (arrays are numpy)."""

    positions: np.ndarray
    energy: float
    forces: np.ndarray
    max_force: float
    steps: int
    converged: bool
    frames: list[Atoms] = field(default_factory=list)
    n_rebuilds: int = 0
    n_compiles: int = 0
    n_calls: int = 0
    compile_seconds: float = 0.0
    run_seconds: float = 0.0


def _make_chunk(model: JaxModel, p: FireParams, skin: float) -> tuple[Callable, list[int]]:
    force_fn = make_force_fn(model.energy_fn, model.cutoff)
    traces = [0]

    def evaluate(params: Any, graph: AtomsGraph, x: jax.Array, movable: jax.Array):
        energy, forces = force_fn(params, graph._replace(positions=x))
        forces = jnp.where(movable[:, None], forces, 0.0)
        return energy[0], forces, max_atom_norm(forces)

    def chunk(
        params: Any,
        graph: AtomsGraph,
        state: FireState,
        movable: jax.Array,
        fmax: jax.Array,
        limit: jax.Array,
    ) -> _Chunk:
        traces[0] += 1  # runs only while tracing
        reference = graph.positions
        e0, f0, n0 = evaluate(params, graph, state.positions, movable)
        start = _Chunk(state, e0, f0, n0, jnp.asarray(0, jnp.int32), jnp.asarray(False))

        def cond(c: _Chunk) -> jax.Array:
            return (c.fnorm >= fmax) & (c.n < limit) & ~c.moved

        def body(c: _Chunk) -> _Chunk:
            new = fire_update(c.state, c.forces, p)
            moved = max_atom_norm(new.positions - reference) > 0.5 * skin
            e, f, fn = evaluate(params, graph, new.positions, movable)
            return _Chunk(new, e, f, fn, c.n + 1, moved)

        return jax.lax.while_loop(cond, body, start)

    return CompiledCache(chunk), traces


def fire_relax(
    atoms: Atoms,
    model: JaxModel,
    *,
    fmax: float,
    max_steps: int,
    movable: np.ndarray | None = None,
    dt: float = 0.05,
    params: FireParams | None = None,
    skin: float = DEFAULT_SKIN,
    trajectory_interval: int = 0,
    on_progress: Callable[[int, float], None] | None = None,
) -> FireRelaxOutput:
    """Relax positions (fixed cell) with jitted FIRE.

    Args:
        atoms: start structure (not modified).
        model: the potential.
        fmax: stop when the largest per-atom force is below this (eV/Å).
        max_steps: at most this many FIRE steps.
        movable: (N,) bool, False for fixed atoms (default: all movable).
        dt: initial time step.
        params: FIRE settings (default :class:`FireParams`).
        skin: neighbour-list skin in Å.
        trajectory_interval: keep a frame every this many steps (0: none), step 0 included.
        on_progress: called as ``on_progress(steps, max_force)`` after every chunk.

    Raises:
        UserInputError: overlapping atoms, unknown elements, non-finite energy or forces.
    """
    p = params or FireParams()
    n = len(atoms)
    mov = np.ones(n, bool) if movable is None else np.asarray(movable, bool)
    neighbors = SkinNeighbors(model.cutoff, skin, model.type_map)
    work = atoms.copy()
    work.calc = None
    chunk, traces = _make_chunk(model, p, skin)

    graph = _to_device(neighbors.build([work]))
    state = fire_init(work.positions, dt, p.alpha_start)
    mov_dev = jnp.asarray(mov)
    fmax_dev = jnp.asarray(fmax, jnp.float64)
    steps, next_frame = 0, 0 if trajectory_interval > 0 else math.inf
    frames: list[Atoms] = []
    out = FireRelaxOutput(
        positions=np.asarray(work.positions),
        energy=math.nan,
        forces=np.zeros((n, 3)),
        max_force=math.inf,
        steps=0,
        converged=False,
    )
    run_s = 0.0
    while True:
        limit = jnp.asarray(int(min(max_steps, next_frame) - steps), jnp.int32)
        before = chunk.compile_seconds
        t0 = time.perf_counter()
        res = jax.device_get(chunk(model.params, graph, state, mov_dev, fmax_dev, limit))
        run_s += time.perf_counter() - t0 - (chunk.compile_seconds - before)
        state = jax.tree.map(jnp.asarray, res.state)
        steps += int(res.n)
        if bool(res.moved):
            # Forces at these positions came from a list that may miss pairs: rebuild, redo.
            work.positions = np.asarray(res.state.positions)
            graph = _to_device(neighbors.build([work]))
            continue
        energy, forces, fnorm = float(res.energy), np.asarray(res.forces), float(res.fnorm)
        if not (math.isfinite(energy) and np.all(np.isfinite(forces))):
            raise UserInputError(
                f"the potential returned non-finite energy or forces at step {steps} (a "
                "structure far outside the training data, or atoms collapsing onto each other?)"
            )
        if on_progress is not None:
            on_progress(steps, fnorm)
        if steps >= next_frame:
            frame = work.copy()
            frame.positions = np.asarray(res.state.positions)
            frame.calc = SinglePointCalculator(frame, energy=energy, forces=forces)
            frame.info["step"] = steps
            frames.append(frame)
            next_frame += trajectory_interval
        if fnorm < fmax or steps >= max_steps:
            out.positions = np.asarray(res.state.positions)
            out.energy, out.forces, out.max_force = energy, forces, fnorm
            out.steps, out.converged = steps, fnorm < fmax
            break
    out.frames = frames
    out.n_rebuilds = neighbors.n_builds - 1
    out.n_compiles = traces[0]
    out.n_calls = chunk.n_calls
    out.compile_seconds, out.run_seconds = chunk.compile_seconds, run_s
    return out
