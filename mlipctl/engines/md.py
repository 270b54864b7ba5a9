"""`mlipctl md`: molecular dynamics with in-loop neighbour lists, thermostats, monitors,
checkpoints and blow-up detection.

Two drivers behind one config and one set of outputs:

* :class:`JaxMD` (model files, or any ``energy_fn(params, graph) -> (K, B)``): jitted chunks of
  ``chunk_steps`` steps (``lax.scan``). The neighbour list (cutoff + skin) lives in the scan
  state and is rebuilt inside the loop by a cell list (:mod:`mlipctl.engines.cell_list`) when an
  atom has moved more than skin/2. Cells too small for three bins per axis (or non-periodic
  structures) use the host builder instead: the loop halts at the step that needs a rebuild, the
  host rebuilds and the next chunk continues. A build that overflows its buffers (atoms per bin,
  edges, or a grid that no longer fits an NPT cell) halts the chunk; the host grows the buffers
  and redoes the chunk from its start state. Neighbours are never dropped.
* :class:`AseMD` (registry reference calculators): ASE's own VelocityVerlet, Langevin, Bussi,
  NoseHooverChainNVT and NPTBerendsen, with the same log, trajectory, checkpoint, monitors
  (evaluated on the host) and blow-up checks.

Outputs in ``cfg.output``: ``trajectory.extxyz`` (every ``trajectory_interval`` steps, appended,
each frame written in one piece), ``thermo.log`` (whitespace table), ``flagged.extxyz`` (monitor
hits, values in ``atoms.info``), ``checkpoint.npz`` (every ``checkpoint_interval`` steps and at
the end, atomic, no pickle) and ``last_good.extxyz`` after a blow-up. A checkpoint records the
byte sizes of the appended files; ``resume=True`` truncates them back to those sizes and
continues from the saved state bit for bit.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ase import Atoms, units

from mlipctl.data.graph import AtomsGraph
from mlipctl.data.neighbors import max_neighbors, neighbor_pairs, neighbor_slots
from mlipctl.engines import integrators as integ
from mlipctl.engines.cell_list import (
    BuildStats,
    NeighborList,
    build_cell_list,
    count_bin_occupancy,
    host_neighbor_list,
    needs_rebuild,
    overflowed,
    pad_neighbor_list,
    plan_bins,
)
from mlipctl.engines.monitors import (
    FlagState,
    Monitor,
    MonitorContext,
    Prediction,
    build_monitors,
    evaluate_monitors,
    initial_flags,
    update_flags,
)
from mlipctl.errors import UserInputError

jax.config.update("jax_enable_x64", True)

EnergyFn = Callable[[Any, AtomsGraph], Any]
"""``energy_fn(params, graph) -> (K, B)`` energies of K ensemble members per structure slot."""

# Scan status codes (carried in the loop state).
RUNNING, PAUSED, HOST_REBUILD, OVERFLOW, BLOW_UP, STOPPED = range(6)
_BLOW_REASONS = {1: "non-finite energy, forces or positions", 2: "temperature", 3: "max_force"}

LOG_COLUMNS = (
    "step",
    "time_fs",
    "temperature_K",
    "e_pot_eV",
    "e_kin_eV",
    "e_tot_eV",
    "pressure_GPa",
    "conserved_eV",
    "volume_A3",
    "max_force_eV_A",
)

TRAJECTORY, THERMO, FLAGGED = "trajectory.extxyz", "thermo.log", "flagged.extxyz"
CHECKPOINT, LAST_GOOD = "checkpoint.npz", "last_good.extxyz"
_CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Forces from an energy function
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def make_force_fn(energy_fn: EnergyFn) -> Callable:
    """Ensemble-mean energy, forces and stress of one structure from ``energy_fn``.

    Forces are ``-dE/dx`` and the stress is the strain derivative ``(1/V) dE/dε`` (ASE sign),
    both from one ``jax.value_and_grad`` of the mean over the K members.

    Returns:
        ``f(params, graph) -> (energy (), forces (N, 3), stress (3, 3), Prediction)`` where
        the prediction holds the member energies (K, B) and the mean force as (1, N, 3).
    """

    def fn(params: Any, graph: AtomsGraph):
        cell = graph.cell

        def total(pos, strain):
            g = graph._replace(positions=pos + pos @ strain, cell=cell + cell @ strain)
            e = jnp.asarray(energy_fn(params, g), jnp.float64)
            return jnp.sum(jnp.mean(e, axis=0) * graph.structure_mask), e

        (etot, members), (g_pos, g_strain) = jax.value_and_grad(
            total, argnums=(0, 1), has_aux=True
        )(graph.positions, jnp.zeros((3, 3), jnp.float64))
        volume = jnp.abs(jnp.linalg.det(cell[0]))
        # Non-periodic structures (zero cell) have no stress: NaN, so the log shows "no value".
        stress = jnp.where(
            volume > 1e-9,
            0.5 * (g_strain + g_strain.T) / jnp.where(volume > 1e-9, volume, 1.0),
            jnp.nan,
        )
        forces = -jnp.asarray(g_pos, jnp.float64)
        pred = Prediction(
            energy=members, forces=forces[None], stress=stress[None, None], atom_energy=None
        )
        return etot, forces, stress, pred

    return fn


@functools.lru_cache(maxsize=32)
def make_member_fn(energy_fn: EnergyFn) -> Callable:
    """Per-member forces (K, N, 3) via ``jax.jacrev`` (for monitors with ``needs_members``)."""

    def fn(params: Any, graph: AtomsGraph) -> Prediction:
        def per_member(pos):
            e = jnp.asarray(energy_fn(params, graph._replace(positions=pos)), jnp.float64)
            return jnp.sum(e * graph.structure_mask, axis=1), e

        jac, e = jax.jacrev(per_member, has_aux=True)(graph.positions)
        return Prediction(energy=e, forces=-jac, stress=None, atom_energy=None)

    return fn


def md_graph(
    positions: Any,
    cell: Any,
    nbr: NeighborList,
    species: Any,
    cutoff: float,
    capacity: tuple[int, int] | None = None,
) -> tuple[AtomsGraph, Any]:
    """One-structure :class:`AtomsGraph` (B = 1, no padding atoms) from the MD neighbour list.

    Only edges currently within ``cutoff`` are real, so the model sees exactly the graph a fresh
    build at ``cutoff`` would give. With ``capacity = (edges, per_atom)`` they are also
    compacted (order kept) into that many edge slots and per-atom table slots, so the model
    does not pay for the skin shell (~40 % of a skin list).

    Returns:
        ``(graph, need)``: need (2,) int32 = (edges within the cutoff, most of them sent by one
        atom); the graph is incomplete if either exceeds its capacity (overflow).
    """
    n = positions.shape[0]
    rij = positions[nbr.receivers] - positions[nbr.senders] + nbr.shifts @ cell
    within = nbr.mask & (jnp.sum(rij * rij, axis=1) < cutoff * cutoff)
    count = jnp.sum(within, dtype=jnp.int32)
    senders, receivers, shifts, mask = nbr.senders, nbr.receivers, nbr.shifts, within
    e = within.shape[0]
    # Which slots of the skin list's per-atom table hold edges now within the cutoff.
    inside = jnp.concatenate([within, jnp.zeros(1, bool)])[nbr.table]  # (N, K_skin)
    need = jnp.stack([count, jnp.max(jnp.sum(inside, axis=1, dtype=jnp.int32))])
    if capacity is None:
        table = jnp.where(inside, nbr.table, e)
    else:
        capacity, per_atom = capacity
        # Row-wise compaction into per_atom slots (order kept; extra edges dropped = overflow).
        slot = jnp.where(inside, jnp.cumsum(inside, axis=1) - 1, per_atom)
        table = (
            jnp.full((n, per_atom), e, jnp.int32)
            .at[jnp.arange(n)[:, None], slot]
            .set(nbr.table, mode="drop")
        )
        idx = jnp.nonzero(within, size=capacity, fill_value=e)[0]
        # Index e is a padding edge 0 -> 0 with zero shift appended to the list.
        senders = jnp.concatenate([senders, jnp.zeros(1, senders.dtype)])[idx]
        receivers = jnp.concatenate([receivers, jnp.zeros(1, receivers.dtype)])[idx]
        shifts = jnp.concatenate([shifts, jnp.zeros((1, 3), shifts.dtype)])[idx]
        mask = jnp.arange(capacity) < count
        # Skin-list index -> compacted index (edges past the capacity: sentinel, overflow).
        new_index = jnp.where(within, jnp.cumsum(within) - 1, capacity)
        new_index = jnp.minimum(new_index, capacity).astype(jnp.int32)
        table = jnp.concatenate([new_index, jnp.full(1, capacity, jnp.int32)])[table]
    graph = AtomsGraph(
        positions=positions,
        species=species,
        cell=cell[None],
        structure=jnp.zeros(n, jnp.int32),
        atom_mask=jnp.ones(n, bool),
        senders=senders,
        receivers=receivers,
        shifts=shifts,
        edge_mask=mask,
        neighbors=table,
        structure_mask=jnp.ones(1, bool),
        n_atoms=jnp.full(1, n, jnp.int32),
        overflow=jnp.zeros((), bool),
    )
    return graph, need


# --------------------------------------------------------------------------------------------
# The jitted driver
# --------------------------------------------------------------------------------------------


class Carry(NamedTuple):
    """Scan state of a chunk.

    Attributes:
        state: the MD state (last accepted step).
        flags: monitor bookkeeping.
        status: () int32, one of RUNNING, PAUSED, HOST_REBUILD, OVERFLOW, BLOW_UP, STOPPED.
        need_edges: () int32 edges an overflowing build needed.
        need_bin: () int32 atoms per bin an overflowing build needed.
        need_graph: (2,) int32 edges within the cutoff, and most of them sent by one atom, when
            the model graph overflowed.
        need_neighbors: () int32 edges of one atom an overflowing build needed.
        bins_ok: () bool, False if the bin grid no longer fits the cell.
        blow_reason: () int32 (0 none, 1 NaN, 2 temperature, 3 force).
        blow_step: () int64 step that failed.
        blow_value: () float64 offending value.
    """

    state: integ.MDState
    flags: FlagState
    status: Any
    need_edges: Any
    need_bin: Any
    need_graph: Any
    need_neighbors: Any
    bins_ok: Any
    blow_reason: Any
    blow_step: Any
    blow_value: Any


@dataclass(frozen=True)
class LoopSettings:
    """Static settings of the compiled loop (hashable: part of the compile cache key)."""

    ensemble: integ.Ensemble
    dt: float
    n_dof: int
    cutoff: float
    skin: float
    chunk_steps: int
    monitor_interval: int = 10
    cooldown_steps: int = 100
    hysteresis: float = 0.9
    stop_on_trigger: bool = False
    max_temperature_k: float = 1.0e4
    max_force: float = 50.0


@dataclass
class Event:
    """Why :meth:`JaxMD.advance` / :meth:`AseMD.advance` returned before the target step.

    Attributes:
        kind: "flagged" (frame flagged, run goes on), "stopped" (monitor stop policy) or
            "blow_up" (state reverted to the last good step).
        step: step of the event (for a blow-up: the step that failed).
        values: monitor values by name (flagged/stopped) or {reason: value} (blow-up).
        flagged_by: names of the monitors that flagged.
        reason: blow-up reason text.
    """

    kind: str
    step: int
    values: dict[str, float] = field(default_factory=dict)
    flagged_by: list[str] = field(default_factory=list)
    reason: str = ""


def _capacity(needed: int, headroom: float = 0.1) -> int:
    """Buffer size for ``needed`` items with some headroom for thermal fluctuations of neighbour
    counts, rounded up to a multiple of 64."""
    return max(64, 64 * math.ceil((1.0 + headroom) * needed / 64))


def _blank_records(m: int) -> dict[str, Any]:
    nan = jnp.full((), jnp.nan)
    return {
        "step": jnp.zeros((), jnp.int64),
        "executed": jnp.zeros((), bool),
        "temperature": nan,
        "e_pot": nan,
        "e_kin": nan,
        "conserved": nan,
        "pressure": nan,
        "volume": nan,
        "max_force": nan,
        "mon_values": jnp.full(m, jnp.nan),
        "flagged_by": jnp.zeros(m, bool),
        "flagged": jnp.zeros((), bool),
    }


class _MonitorSpec(NamedTuple):
    """The static (hashable) part of a :class:`Monitor`; its params are traced arguments."""

    name: str
    fn: Callable
    threshold: float
    needs_members: bool


# Compiled loops are cached per process and keyed by everything static, so runs with the same
# potential function, settings and buffer sizes (tests, repeated runs in a workflow) compile once.
@functools.lru_cache(maxsize=32)
def _make_chunk_fn(
    settings: LoopSettings,
    force_fn: Callable,
    member_fn: Callable | None,
    monitor_specs: tuple[_MonitorSpec, ...],
    mode: str,
    dims: tuple[int, int, int] | None,
    cell_capacity: int,
    edge_capacity: int,
    graph_capacity: tuple[int, int],
    neighbor_capacity: int,
    periodic: bool = True,
) -> Callable:
    """The jitted chunk ``(params, mon_params, species, carry, n_active) -> (carry, records)``."""
    s = settings
    ens = s.ensemble
    r_list = s.cutoff + s.skin
    monitors = [
        Monitor(x.name, x.fn, x.threshold, needs_members=x.needs_members) for x in monitor_specs
    ]
    m = len(monitors)
    thresholds = jnp.asarray([mon.threshold for mon in monitors], jnp.float64)
    want_members = member_fn is not None and any(mon.needs_members for mon in monitors)

    def chunk(params, mon_params, species, carry: Carry, n_active):
        def evaluate(st: integ.MDState):
            need = needs_rebuild(st.nbr, st.positions, st.cell, s.cutoff, s.skin, ens.variable_cell)
            if mode == "cells":
                zero = BuildStats(
                    n_edges=jnp.zeros((), jnp.int32),
                    max_bin=jnp.zeros((), jnp.int32),
                    max_neighbors=jnp.zeros((), jnp.int32),
                    bins_ok=jnp.ones((), bool),
                )
                nl, stats = jax.lax.cond(
                    need,
                    lambda: build_cell_list(
                        st.positions,
                        st.cell,
                        r_list,
                        dims,
                        cell_capacity,
                        edge_capacity,
                        neighbor_capacity,
                    ),
                    lambda: (st.nbr, zero),
                )
                bad = need & overflowed(stats, cell_capacity, edge_capacity, neighbor_capacity)
                halt = jnp.zeros((), bool)
            else:
                nl = st.nbr
                stats = BuildStats(
                    n_edges=jnp.zeros((), jnp.int32),
                    max_bin=jnp.zeros((), jnp.int32),
                    max_neighbors=jnp.zeros((), jnp.int32),
                    bins_ok=jnp.ones((), bool),
                )
                bad = jnp.zeros((), bool)
                halt = need
            graph, n_within = md_graph(st.positions, st.cell, nl, species, s.cutoff, graph_capacity)
            bad = bad | jnp.any(n_within > jnp.asarray(graph_capacity))
            energy, forces, stress, pred = force_fn(params, graph)
            new = st._replace(
                nbr=nl,
                forces=forces,
                energy=energy,
                stress=stress,
                n_rebuilds=st.n_rebuilds + need.astype(jnp.int64),
            )
            return new, (bad, halt, stats, n_within, graph, pred)

        def do_step(c: Carry):
            st0 = c.state
            st1, (bad, halt, stats, n_within, graph, pred) = integ.step(
                st0, evaluate, ens, s.dt, s.n_dof
            )
            ke = integ.kinetic_energy(st1.velocities, st1.masses)
            temp = 2.0 * ke / (s.n_dof * units.kB)
            fmax = jnp.sqrt(jnp.max(jnp.sum(st1.forces * st1.forces, axis=1)))
            finite = (
                jnp.isfinite(st1.energy)
                & jnp.all(jnp.isfinite(st1.forces))
                & jnp.all(jnp.isfinite(st1.positions))
                & jnp.all(jnp.isfinite(st1.velocities))
            )
            reason = jnp.where(
                ~finite,
                1,
                jnp.where(temp > s.max_temperature_k, 2, jnp.where(fmax > s.max_force, 3, 0)),
            ).astype(jnp.int32)
            blow_value = jnp.where(reason == 2, temp, jnp.where(reason == 3, fmax, jnp.nan))

            if m:
                evaluate_now = (st1.step % s.monitor_interval) == 0

                def run_monitors():
                    members = member_fn(params, graph) if want_members else None
                    return evaluate_monitors(monitors, mon_params, st1, graph, pred, members)

                values, trig = jax.lax.cond(
                    evaluate_now,
                    run_monitors,
                    lambda: (jnp.full(m, jnp.nan), jnp.zeros(m, bool)),
                )
                new_flags, frame, by = update_flags(
                    c.flags,
                    st1.step,
                    values,
                    trig,
                    thresholds,
                    hysteresis=s.hysteresis,
                    cooldown_steps=s.cooldown_steps,
                )
                flags = jax.tree.map(lambda a, b: jnp.where(evaluate_now, a, b), new_flags, c.flags)
                frame = frame & evaluate_now
                by = by & evaluate_now
            else:
                values, by = jnp.zeros(0), jnp.zeros(0, bool)
                flags, frame = c.flags, jnp.zeros((), bool)

            status = jnp.where(
                bad,
                OVERFLOW,
                jnp.where(
                    halt,
                    HOST_REBUILD,
                    jnp.where(
                        reason > 0,
                        BLOW_UP,
                        jnp.where(frame, STOPPED if s.stop_on_trigger else PAUSED, RUNNING),
                    ),
                ),
            ).astype(jnp.int32)
            revert = bad | halt | (reason > 0)
            state = jax.tree.map(lambda a, b: jnp.where(revert, a, b), st0, st1)
            flags = jax.tree.map(lambda a, b: jnp.where(revert, a, b), c.flags, flags)
            volume = jnp.abs(jnp.linalg.det(st1.cell))
            records = {
                "step": st1.step,
                "executed": ~revert,
                "temperature": temp,
                "e_pot": st1.energy,
                "e_kin": ke,
                "conserved": integ.conserved_energy(st1, ens, s.n_dof),
                # Without periodicity on all axes there is no volume, so no pressure.
                "pressure": integ.pressure(st1) if periodic else jnp.full((), jnp.nan),
                "volume": volume if periodic else jnp.full((), jnp.nan),
                "max_force": fmax,
                "mon_values": values,
                "flagged_by": by & ~revert,
                "flagged": frame & ~revert,
            }
            new_c = Carry(
                state=state,
                flags=flags,
                status=status,
                need_edges=jnp.maximum(c.need_edges, jnp.where(bad, stats.n_edges, 0)),
                need_bin=jnp.maximum(c.need_bin, jnp.where(bad, stats.max_bin, 0)),
                need_graph=jnp.maximum(c.need_graph, jnp.where(bad, n_within, 0)),
                need_neighbors=jnp.maximum(
                    c.need_neighbors, jnp.where(bad, stats.max_neighbors, 0)
                ),
                bins_ok=c.bins_ok & ~(bad & ~stats.bins_ok),
                blow_reason=jnp.where(bad | halt, 0, reason).astype(jnp.int32),
                blow_step=st1.step,
                blow_value=blow_value,
            )
            return new_c, records

        def body(c: Carry, i):
            active = (c.status == RUNNING) & (i < n_active)
            return jax.lax.cond(active, do_step, lambda c: (c, _blank_records(m)), c)

        return jax.lax.scan(body, carry, jnp.arange(s.chunk_steps))

    return jax.jit(chunk)


def _prng_key(seed: int) -> np.ndarray:
    """Raw uint32[2] PRNG key, as ``jax.random.PRNGKey(seed)`` (built on the host)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return np.array([s >> 32, s & 0xFFFFFFFF], dtype=np.uint32)


@functools.lru_cache(maxsize=32)
def _initial_eval_fn(force_fn: Callable, cutoff: float) -> Callable:
    """Jitted ``(params, species, state, capacity) -> (state with forces, need)`` (md_graph)."""

    def init(params, species, st, capacity):
        graph, n_within = md_graph(st.positions, st.cell, st.nbr, species, cutoff, capacity)
        energy, forces, stress, _ = force_fn(params, graph)
        return st._replace(energy=energy, forces=forces, stress=stress), n_within

    return jax.jit(init, static_argnums=3)


class JaxMD:
    """MD of one structure with a JAX potential, in jitted chunks.

    Args:
        energy_fn: ``energy_fn(params, graph) -> (K, B)``.
        params: potential parameters (pytree).
        atoms: starting structure (its velocities are ignored; see ``velocities``).
        species: (N,) int species indices for the potential.
        cutoff: potential cutoff, Å.
        settings: loop settings (ensemble, dt, skin, chunk length, monitors policy, limits).
        monitors: monitors to evaluate in the loop.
        velocities: (N, 3) initial velocities, Å/ASE time (default: zero).
        seed: PRNG seed of the stochastic thermostats.
        member_fn: ``member_fn(params, graph) -> Prediction`` with per-member forces, used on
            monitor steps when a monitor ``needs_members`` (default: from ``energy_fn``).
        edge_capacity, cell_capacity, graph_capacity, neighbor_capacity,
            graph_neighbor_capacity: initial sizes of the skin list, of the bins, of the model
            graph (edges within the cutoff), of the skin list's per-atom table and of the model
            graph's; default: measured with a margin. Too small is fine: they grow on overflow.
    """

    def __init__(
        self,
        energy_fn: EnergyFn,
        params: Any,
        atoms: Atoms,
        species: np.ndarray,
        cutoff: float,
        settings: LoopSettings,
        monitors: Sequence[Monitor] = (),
        *,
        velocities: np.ndarray | None = None,
        seed: int = 0,
        member_fn: Callable | None = None,
        edge_capacity: int | None = None,
        cell_capacity: int | None = None,
        graph_capacity: int | None = None,
        neighbor_capacity: int | None = None,
        graph_neighbor_capacity: int | None = None,
    ) -> None:
        self.settings = settings
        self.params = params
        self.monitors = list(monitors)
        self.mon_params = [mon.params for mon in self.monitors]
        self.species = jnp.asarray(np.asarray(species, np.int32))
        self.numbers = np.asarray(atoms.numbers).copy()
        self.pbc = np.asarray(atoms.pbc, bool).copy()
        self.n_atoms = len(atoms)
        self.cutoff = float(cutoff)
        self.r_list = float(cutoff) + float(settings.skin)
        self._force_fn = make_force_fn(energy_fn)
        needs_members = any(mon.needs_members for mon in self.monitors)
        self._member_fn = (member_fn or make_member_fn(energy_fn)) if needs_members else None
        self._compiled: dict[tuple, Callable] = {}
        self.compile_seconds = 0.0
        self.run_seconds = 0.0
        self.overflow_redos = 0
        self.host_rebuilds = 0
        self.grid_margin = 0.03 if settings.ensemble.variable_cell else 0.0

        cell = np.asarray(atoms.cell[:], np.float64)
        positions = np.asarray(atoms.positions, np.float64)
        self.dims = plan_bins(cell, self.pbc, self.r_list, self.grid_margin)
        self.mode = "cells" if self.dims is not None else "host"
        skin_pairs = neighbor_pairs(atoms, self.r_list)
        n_pairs = len(skin_pairs[0])
        cut_pairs = neighbor_pairs(atoms, self.cutoff)
        n_within = len(cut_pairs[0])
        # The skin list only costs memory and rebuild time, so it gets more headroom than the
        # model graph, whose every slot costs model time.
        self.edge_capacity = int(edge_capacity or _capacity(n_pairs, 0.25))
        self.graph_capacity = int(graph_capacity or _capacity(n_within))
        self.neighbor_capacity = int(
            neighbor_capacity or neighbor_slots(max_neighbors([skin_pairs]))
        )
        self.graph_neighbor_capacity = int(
            graph_neighbor_capacity or neighbor_slots(max_neighbors([cut_pairs]), 0.25)
        )
        if self.mode == "cells":
            # A perfect lattice can sit exactly on bin edges, so its occupancy understates what
            # thermal motion brings; also allow for density fluctuations around the mean.
            occ = count_bin_occupancy(positions, cell, self.dims)
            mean = self.n_atoms / math.prod(self.dims)
            self.cell_capacity = int(
                cell_capacity
                or max(math.ceil(1.5 * occ) + 2, math.ceil(mean + 4.0 * math.sqrt(mean) + 4.0))
            )
        else:
            self.cell_capacity = 0

        masses = np.asarray(atoms.get_masses(), np.float64)
        v0 = np.zeros((self.n_atoms, 3)) if velocities is None else np.asarray(velocities)
        nbr = self._initial_neighbors(positions, cell)
        # Host-built (numpy) leaves: strongly typed, so a carry restored from a checkpoint has
        # the same signature and reuses the compiled loop; no eager device ops to compile.
        th = integ.initial_thermostat(settings.ensemble)
        state = integ.MDState(
            step=np.zeros((), np.int64),
            positions=positions,
            velocities=np.asarray(v0, np.float64),
            cell=cell,
            masses=masses,
            forces=np.zeros((self.n_atoms, 3)),
            energy=np.zeros(()),
            stress=np.zeros((3, 3)),
            thermostat=jax.tree.map(np.asarray, th),
            key=_prng_key(seed),
            nbr=jax.tree.map(np.asarray, nbr),
            n_rebuilds=np.zeros((), np.int64),
        )
        state = jax.tree.map(jnp.asarray, state)
        state = self._evaluate_initial(state)
        self.carry = self._fresh_carry(state, initial_flags(len(self.monitors)))

    # -- set-up ---------------------------------------------------------------------------

    def _initial_neighbors(self, positions: np.ndarray, cell: np.ndarray) -> NeighborList:
        """Skin list from the host builder (any mode: the in-loop cell list takes over at the
        first rebuild; building on the host saves compiling the builder a second time)."""
        while True:
            nl, n_edges, per_atom = host_neighbor_list(
                positions, cell, self.pbc, self.r_list, self.edge_capacity, self.neighbor_capacity
            )
            need_bin = 0
            if self.mode == "cells":
                need_bin = count_bin_occupancy(positions, cell, self.dims)
            if (
                n_edges <= self.edge_capacity
                and need_bin <= self.cell_capacity
                and per_atom <= self.neighbor_capacity
            ):
                return nl
            self._grow(need_edges=n_edges, need_bin=need_bin, need_neighbors=per_atom)

    def _evaluate_initial(self, state: integ.MDState) -> integ.MDState:
        init_jit = _initial_eval_fn(self._force_fn, self.cutoff)
        while True:
            t0 = time.perf_counter()
            capacity = (self.graph_capacity, self.graph_neighbor_capacity)
            out, need = init_jit(self.params, self.species, state, capacity)
            jax.block_until_ready(out)
            self.compile_seconds += time.perf_counter() - t0
            need = tuple(int(x) for x in need)
            if need[0] <= capacity[0] and need[1] <= capacity[1]:
                break
            self._grow(need_graph=need)
        if not (bool(jnp.isfinite(out.energy)) and bool(jnp.all(jnp.isfinite(out.forces)))):
            raise UserInputError(
                "the potential gives non-finite (NaN/inf) energy or forces for the starting "
                "structure; check for overlapping atoms or elements the model was not trained on"
            )
        return out

    @staticmethod
    def _fresh_carry(state: integ.MDState, flags: FlagState) -> Carry:
        carry = Carry(
            state=state,
            flags=flags,
            status=np.asarray(RUNNING, np.int32),
            need_edges=np.zeros((), np.int32),
            need_bin=np.zeros((), np.int32),
            need_graph=np.zeros(2, np.int32),
            need_neighbors=np.zeros((), np.int32),
            bins_ok=np.ones((), bool),
            blow_reason=np.zeros((), np.int32),
            blow_step=np.zeros((), np.int64),
            blow_value=np.full((), np.nan),
        )
        return jax.tree.map(jnp.asarray, carry)

    def _grow(
        self,
        *,
        need_edges: int = 0,
        need_bin: int = 0,
        need_graph: tuple[int, int] = (0, 0),
        need_neighbors: int = 0,
        bins_ok: bool = True,
        cell: np.ndarray | None = None,
    ) -> None:
        """Enlarge whatever overflowed (never shrink): edges, bin slots, model-graph edges,
        per-atom neighbour slots, or re-plan the bin grid for the current cell."""
        if need_edges > self.edge_capacity:
            self.edge_capacity = _capacity(need_edges, 0.25)
        if need_neighbors > self.neighbor_capacity:
            self.neighbor_capacity = neighbor_slots(need_neighbors)
        if need_graph[0] > self.graph_capacity:
            self.graph_capacity = _capacity(need_graph[0])
        if need_graph[1] > self.graph_neighbor_capacity:
            self.graph_neighbor_capacity = neighbor_slots(need_graph[1])
        if need_bin > self.cell_capacity:
            self.cell_capacity = need_bin + max(2, math.ceil(0.25 * need_bin))
        if not bins_ok:
            dims = plan_bins(cell, self.pbc, self.r_list, max(self.grid_margin, 0.03))
            if dims is None:
                self.mode, self.dims, self.cell_capacity = "host", None, 0
            else:
                self.dims = dims

    def _chunk_fn(self) -> Callable:
        buffers = (
            self.mode,
            self.dims,
            self.cell_capacity,
            self.edge_capacity,
            (self.graph_capacity, self.graph_neighbor_capacity),
            self.neighbor_capacity,
        )
        fn = self._compiled.get(buffers)
        if fn is None:
            specs = tuple(
                _MonitorSpec(m.name, m.fn, float(m.threshold), bool(m.needs_members))
                for m in self.monitors
            )
            fn = _make_chunk_fn(
                self.settings,
                self._force_fn,
                self._member_fn,
                specs,
                *buffers,
                bool(self.pbc.all()),
            )
            # A call with no active step compiles (or finds the cached executable) without
            # advancing the state, so compile time is measured apart from MD time.
            t0 = time.perf_counter()
            jax.block_until_ready(
                fn(self.params, self.mon_params, self.species, self.carry, jnp.int32(0))
            )
            self.compile_seconds += time.perf_counter() - t0
            self._compiled[buffers] = fn
        return fn

    # -- running ----------------------------------------------------------------------------

    @property
    def step(self) -> int:
        return int(self.carry.state.step)

    def compile(self) -> None:
        """Compile the chunk function now (so timing of the first chunk excludes it)."""
        self._chunk_fn()

    def advance(self, target_step: int) -> tuple[dict[str, np.ndarray], Event | None]:
        """Run until ``target_step`` or an event (flagged frame, stop, blow-up).

        Returns:
            ``(records, event)``: per accepted step arrays (``step``, ``temperature``,
            ``e_pot``, ``e_kin``, ``conserved``, ``pressure``, ``volume``, ``max_force``,
            ``mon_values`` (S, M)), and the event that ended the call early (or None).
        """
        pieces: list[dict[str, np.ndarray]] = []
        event: Event | None = None
        while self.step < target_step and event is None:
            n_active = min(self.settings.chunk_steps, target_step - self.step)
            start = self.carry._replace(status=jnp.asarray(RUNNING, jnp.int32))
            fn = self._chunk_fn()
            t0 = time.perf_counter()
            out, rec = fn(self.params, self.mon_params, self.species, start, jnp.int32(n_active))
            status = int(out.status)
            self.run_seconds += time.perf_counter() - t0
            if status == OVERFLOW:
                self.overflow_redos += 1
                self._grow(
                    need_edges=int(out.need_edges),
                    need_bin=int(out.need_bin),
                    need_graph=tuple(int(x) for x in out.need_graph),
                    need_neighbors=int(out.need_neighbors),
                    bins_ok=bool(out.bins_ok),
                    cell=np.asarray(out.state.cell),
                )
                self.carry = self._resize(start)
                continue
            rec = jax.tree.map(np.asarray, rec)
            keep = rec["executed"]
            pieces.append({k: v[keep] for k, v in rec.items()})
            self.carry = out
            if status == HOST_REBUILD:
                self._host_rebuild()
            elif status in (PAUSED, STOPPED):
                last = {k: v[keep][-1] for k, v in rec.items()}
                event = Event(
                    kind="flagged" if status == PAUSED else "stopped",
                    step=int(last["step"]),
                    values={
                        mon.name: float(last["mon_values"][k])
                        for k, mon in enumerate(self.monitors)
                    },
                    flagged_by=[
                        mon.name for k, mon in enumerate(self.monitors) if last["flagged_by"][k]
                    ],
                )
            elif status == BLOW_UP:
                reason = int(out.blow_reason)
                event = Event(
                    kind="blow_up",
                    step=int(out.blow_step),
                    values={_BLOW_REASONS[reason]: float(out.blow_value)},
                    reason=_BLOW_REASONS[reason],
                )
        records = (
            {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
            if pieces
            else {k: np.asarray(v)[None][:0] for k, v in _blank_records(len(self.monitors)).items()}
        )
        return records, event

    def _resize(self, carry: Carry) -> Carry:
        """The carry with its neighbour list in the current buffers (redo after an overflow)."""
        st = carry.state
        if (
            self.mode == "host"
            or st.nbr.senders.shape[0] > self.edge_capacity
            or st.nbr.table.shape[1] > self.neighbor_capacity
        ):
            nbr = self._initial_neighbors(np.asarray(st.positions), np.asarray(st.cell))
            # A fresh list must reproduce the same forces: re-evaluate from it.
            st = self._evaluate_initial(st._replace(nbr=nbr))
        else:
            st = st._replace(
                nbr=pad_neighbor_list(st.nbr, self.edge_capacity, self.neighbor_capacity)
            )
        return carry._replace(state=st)

    def _host_rebuild(self) -> None:
        st = self.carry.state
        pos, cell = np.asarray(st.positions), np.asarray(st.cell)
        nl, n_edges, per_atom = host_neighbor_list(
            pos, cell, self.pbc, self.r_list, self.edge_capacity, self.neighbor_capacity
        )
        if n_edges > self.edge_capacity or per_atom > self.neighbor_capacity:
            self._grow(need_edges=n_edges, need_neighbors=per_atom)
            nl, *_ = host_neighbor_list(
                pos, cell, self.pbc, self.r_list, self.edge_capacity, self.neighbor_capacity
            )
        self.host_rebuilds += 1
        st = st._replace(nbr=nl, n_rebuilds=st.n_rebuilds + 1)
        self.carry = self.carry._replace(state=st)

    # -- views and checkpoints ----------------------------------------------------------------

    def atoms(self) -> Atoms:
        """The current state as ASE atoms with velocities, energy, forces and stress."""
        st = jax.tree.map(np.asarray, self.carry.state)
        return _snapshot(
            self.numbers,
            st.positions,
            st.cell,
            self.pbc,
            st.velocities,
            float(st.energy),
            st.forces,
            st.stress if self.pbc.all() else None,
        )

    def flag_summary(self) -> dict[str, dict[str, Any]]:
        f = jax.tree.map(np.asarray, self.carry.flags)
        return _flag_summary(self.monitors, f)

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        return _flatten_tree(self.carry)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "driver": "jax",
            "mode": self.mode,
            "dims": list(self.dims) if self.dims else None,
            "cell_capacity": self.cell_capacity,
            "edge_capacity": self.edge_capacity,
            "graph_capacity": self.graph_capacity,
            "neighbor_capacity": self.neighbor_capacity,
            "graph_neighbor_capacity": self.graph_neighbor_capacity,
            "overflow_redos": self.overflow_redos,
            "host_rebuilds": self.host_rebuilds,
        }

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Continue from a checkpoint (same buffers, so the run continues bit for bit)."""
        if meta.get("driver") != "jax":
            raise UserInputError("the checkpoint was written by a different MD driver")
        missing = sorted(set(self.checkpoint_meta()) - set(meta))
        if missing:
            raise UserInputError(
                f"checkpoint is missing {', '.join(missing)}; was it written by this version?"
            )
        self.mode = meta["mode"]
        self.dims = tuple(meta["dims"]) if meta["dims"] else None
        self.cell_capacity = int(meta["cell_capacity"])
        self.edge_capacity = int(meta["edge_capacity"])
        self.graph_capacity = int(meta["graph_capacity"])
        self.neighbor_capacity = int(meta["neighbor_capacity"])
        self.graph_neighbor_capacity = int(meta["graph_neighbor_capacity"])
        self.overflow_redos = int(meta["overflow_redos"])
        self.host_rebuilds = int(meta["host_rebuilds"])
        self.carry = _unflatten_tree(self.carry, arrays)

    def stats(self) -> dict[str, Any]:
        st = self.carry.state
        return {
            "driver": "jax",
            "neighbor_mode": "cell_list" if self.mode == "cells" else "host",
            "bins": list(self.dims) if self.dims else None,
            "edge_capacity": self.edge_capacity,
            "graph_capacity": self.graph_capacity,
            "neighbor_capacity": self.neighbor_capacity,
            "graph_neighbor_capacity": self.graph_neighbor_capacity,
            "bin_capacity": self.cell_capacity,
            "neighbor_rebuilds": int(st.n_rebuilds),
            "overflow_redos": self.overflow_redos,
        }


# --------------------------------------------------------------------------------------------
# ASE driver for reference calculators
# --------------------------------------------------------------------------------------------


class AseMD:
    """MD through ASE's own integrators with any ASE calculator (same outputs as :class:`JaxMD`).

    Args:
        atoms: starting structure (copied; the calculator is attached to the copy).
        calc: ASE calculator.
        ensemble_cfg: an ``mlipctl.config.md`` ensemble config.
        timestep_fs: time step, fs.
        monitors, monitor_interval, cooldown_steps, hysteresis, stop_on_trigger: as in the
            config's ``monitoring`` (monitors evaluated on the host with numpy inputs).
        max_temperature_k, max_force: blow-up limits.
        velocities: (N, 3) initial velocities, Å/ASE time.
        seed: seed of the numpy Generator used by the stochastic drivers.
        log_interval: steps whose records are computed (pressure needs a stress call).
    """

    def __init__(
        self,
        atoms: Atoms,
        calc: Any,
        ensemble_cfg: Any,
        timestep_fs: float,
        monitors: Sequence[Monitor] = (),
        *,
        monitor_interval: int = 10,
        cooldown_steps: int = 100,
        hysteresis: float = 0.9,
        stop_on_trigger: bool = False,
        max_temperature_k: float = 1.0e4,
        max_force: float = 50.0,
        velocities: np.ndarray | None = None,
        seed: int = 0,
        log_interval: int = 1,
    ) -> None:
        self.atoms_ = atoms.copy()
        self.atoms_.calc = calc
        if velocities is not None:
            self.atoms_.set_velocities(velocities)
        self.kind = ensemble_cfg.kind
        self.ens_cfg = ensemble_cfg
        self.dt = timestep_fs * units.fs
        self.n_atoms = len(atoms)
        self.n_dof = integ.degrees_of_freedom(self.n_atoms)
        self.monitors = list(monitors)
        self.monitor_interval = monitor_interval
        self.cooldown_steps = cooldown_steps
        self.hysteresis = hysteresis
        self.stop_on_trigger = stop_on_trigger
        self.max_temperature_k = max_temperature_k
        self.max_force = max_force
        self.log_interval = log_interval
        self.flags = initial_flags(len(self.monitors))
        self.rng = np.random.default_rng(seed)
        self._step = 0
        self.compile_seconds = 0.0
        self.run_seconds = 0.0
        if any(m.needs_members for m in self.monitors):
            raise UserInputError(
                "a monitor needs ensemble members, but the calculator is a single reference "
                "calculator; use an ensemble model file"
            )
        self.dyn = self._make_dynamics()
        f = self.atoms_.get_forces()
        if not (np.all(np.isfinite(f)) and np.isfinite(self.atoms_.get_potential_energy())):
            raise UserInputError(
                "the calculator gives non-finite energy or forces for the starting structure"
            )

    def _make_dynamics(self) -> Any:
        cfg, a = self.ens_cfg, self.atoms_
        fs = units.fs
        if self.kind == "nve":
            from ase.md.verlet import VelocityVerlet

            return VelocityVerlet(a, timestep=self.dt)
        if self.kind == "langevin":
            from ase.constraints import FixCom
            from ase.md.langevin import Langevin

            # FixCom instead of the deprecated fixcm: zero total momentum as in the JAX path.
            a.set_constraint(FixCom())
            return Langevin(
                a,
                timestep=self.dt,
                temperature_K=cfg.temperature_k,
                friction=cfg.friction_per_ps / (1000.0 * fs),
                fixcm=False,
                rng=self.rng,
            )
        if self.kind == "bussi":
            from ase.md.bussi import Bussi

            if a.get_kinetic_energy() <= 0:
                raise UserInputError(
                    "Bussi rescaling cannot start from zero velocities: set "
                    "initial_temperature_k > 0"
                )
            return Bussi(
                a,
                timestep=self.dt,
                temperature_K=cfg.temperature_k,
                taut=cfg.taut_fs * fs,
                rng=self.rng,
            )
        if self.kind == "nose_hoover_chain":
            from ase.md.nose_hoover_chain import NoseHooverChainNVT

            return NoseHooverChainNVT(
                a,
                timestep=self.dt,
                temperature_K=cfg.temperature_k,
                tdamp=cfg.tdamp_fs * fs,
                tchain=cfg.chain_length,
            )
        if self.kind == "npt_berendsen":
            import warnings

            from ase.md.nptberendsen import NPTBerendsen

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return NPTBerendsen(
                    a,
                    timestep=self.dt,
                    temperature_K=cfg.temperature_k,
                    pressure_au=cfg.pressure_gpa * units.GPa,
                    taut=cfg.taut_fs * fs,
                    taup=cfg.taup_fs * fs,
                    compressibility_au=cfg.compressibility_per_gpa / units.GPa,
                    fixcm=True,
                )
        raise ValueError(f"unknown ensemble kind {self.kind!r}")

    @property
    def step(self) -> int:
        return self._step

    def compile(self) -> None:  # nothing to compile; same interface as JaxMD
        return None

    def _kinetic(self) -> float:
        p = self.atoms_.get_momenta()
        return float(0.5 * np.sum(p * p / self.atoms_.get_masses()[:, None]))

    def _conserved(self, e_pot: float, e_kin: float) -> float:
        if self.kind == "nve":
            return e_pot + e_kin
        if self.kind == "bussi":
            return e_pot + e_kin - float(self.dyn.transferred_energy)
        if self.kind == "nose_hoover_chain":
            return float(self.dyn.get_conserved_energy())
        # ASE's Langevin does not expose the heat it exchanges; Berendsen conserves nothing.
        return math.nan

    def _pressure(self, e_kin: float) -> float:
        from ase.calculators.calculator import PropertyNotImplementedError

        if not np.all(self.atoms_.pbc):
            return math.nan
        try:
            stress = self.atoms_.get_stress(voigt=False)
        except PropertyNotImplementedError:
            return math.nan
        return 2.0 * e_kin / (3.0 * self.atoms_.get_volume()) - float(np.trace(stress)) / 3.0

    def _save(self) -> dict[str, Any]:
        a = self.atoms_
        saved = {
            "positions": a.positions.copy(),
            "momenta": a.get_momenta().copy(),
            "cell": a.cell[:].copy(),
        }
        if self.kind == "nose_hoover_chain":
            th = self.dyn._thermostat  # ASE keeps the chain state privately
            saved["eta"], saved["p_eta"] = th._eta.copy(), th._p_eta.copy()
        if self.kind == "bussi":
            saved["transferred"] = float(self.dyn.transferred_energy)
        return saved

    def _load(self, saved: Mapping[str, Any]) -> None:
        a = self.atoms_
        a.set_cell(np.asarray(saved["cell"]), scale_atoms=False)
        a.set_positions(np.asarray(saved["positions"]), apply_constraint=False)
        a.set_momenta(np.asarray(saved["momenta"]), apply_constraint=False)
        if self.kind == "nose_hoover_chain":
            self.dyn._q = a.get_positions()
            self.dyn._p = a.get_momenta()
            self.dyn._thermostat._eta = np.asarray(saved["eta"], np.float64).copy()
            self.dyn._thermostat._p_eta = np.asarray(saved["p_eta"], np.float64).copy()
        if self.kind == "bussi":
            self.dyn.transferred_energy = float(saved["transferred"])

    def advance(self, target_step: int) -> tuple[dict[str, np.ndarray], Event | None]:
        """Same contract as :meth:`JaxMD.advance` (records only at log steps)."""
        rows: list[dict[str, Any]] = []
        event: Event | None = None
        names = [m.name for m in self.monitors]
        t0 = time.perf_counter()
        while self._step < target_step and event is None:
            good = self._save()
            self.dyn.step()
            self._step += 1
            a = self.atoms_
            forces = a.get_forces()
            e_pot = float(a.get_potential_energy())
            e_kin = self._kinetic()
            temp = 2.0 * e_kin / (self.n_dof * units.kB)
            fmax = float(np.sqrt(np.max(np.sum(forces * forces, axis=1))))
            reason = 0
            if not (
                np.isfinite(e_pot)
                and np.all(np.isfinite(forces))
                and np.all(np.isfinite(a.positions))
            ):
                reason = 1
            elif temp > self.max_temperature_k:
                reason = 2
            elif fmax > self.max_force:
                reason = 3
            if reason:
                value = {1: math.nan, 2: temp, 3: fmax}[reason]
                self._load(good)
                self._step -= 1
                event = Event(
                    kind="blow_up",
                    step=self._step + 1,
                    values={_BLOW_REASONS[reason]: value},
                    reason=_BLOW_REASONS[reason],
                )
                break
            values = np.full(len(self.monitors), np.nan)
            by = np.zeros(len(self.monitors), bool)
            frame = False
            if self.monitors and self._step % self.monitor_interval == 0:
                state = _HostState(
                    positions=a.positions,
                    velocities=a.get_velocities(),
                    masses=a.get_masses(),
                    cell=a.cell[:],
                    step=self._step,
                )
                stress = None
                pred = Prediction(
                    energy=np.array([[e_pot]]),
                    forces=forces[None],
                    stress=stress,
                    atom_energy=None,
                )
                graph = self._graph() if any(m.needs_graph for m in self.monitors) else None
                vals, trig = evaluate_monitors(
                    self.monitors, [m.params for m in self.monitors], state, graph, pred
                )
                values, trig = np.asarray(vals), np.asarray(trig)
                self.flags, frame, by = update_flags(
                    self.flags,
                    self._step,
                    values,
                    trig,
                    np.asarray([m.threshold for m in self.monitors]),
                    hysteresis=self.hysteresis,
                    cooldown_steps=self.cooldown_steps,
                    xp=np,
                )
                frame = bool(frame)
                if frame:
                    event = Event(
                        kind="stopped" if self.stop_on_trigger else "flagged",
                        step=self._step,
                        values=dict(zip(names, map(float, values), strict=True)),
                        flagged_by=[n for n, b in zip(names, by, strict=True) if b],
                    )
            if self._step % self.log_interval == 0:
                rows.append(
                    {
                        "step": self._step,
                        "temperature": temp,
                        "e_pot": e_pot,
                        "e_kin": e_kin,
                        "conserved": self._conserved(e_pot, e_kin),
                        "pressure": self._pressure(e_kin),
                        "volume": float(a.get_volume()) if np.all(a.pbc) else math.nan,
                        "max_force": fmax,
                        "mon_values": values,
                        "flagged_by": by,
                        "flagged": frame,
                    }
                )
        self.run_seconds += time.perf_counter() - t0
        m = len(self.monitors)
        keys = (
            "step",
            "temperature",
            "e_pot",
            "e_kin",
            "conserved",
            "pressure",
            "volume",
            "max_force",
            "mon_values",
            "flagged_by",
            "flagged",
        )
        if rows:
            records = {k: np.asarray([r[k] for r in rows]) for k in keys}
        else:
            records = {
                k: np.zeros((0, m) if k in ("mon_values", "flagged_by") else 0) for k in keys
            }
        return records, event

    def _graph(self) -> AtomsGraph:
        from mlipctl.data.neighbors import build_graph

        z = sorted(set(self.atoms_.numbers.tolist()))
        return build_graph([self.atoms_], 1.0, {v: i for i, v in enumerate(z)})

    def atoms(self) -> Atoms:
        a = self.atoms_
        stress = None
        if np.all(a.pbc):
            try:
                stress = a.get_stress(voigt=False)
            except Exception:  # noqa: BLE001 - calculators without stress
                stress = None
        return _snapshot(
            a.numbers,
            a.positions,
            a.cell[:],
            a.pbc,
            a.get_velocities(),
            float(a.get_potential_energy()),
            a.get_forces(),
            stress,
        )

    def flag_summary(self) -> dict[str, dict[str, Any]]:
        return _flag_summary(self.monitors, self.flags)

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        saved = self._save()
        out = {f"ase.{k}": np.asarray(v) for k, v in saved.items()}
        out.update(_flatten_tree(self.flags, "flags"))
        return out

    def checkpoint_meta(self) -> dict[str, Any]:
        return {
            "driver": "ase",
            "step": self._step,
            "rng": self.rng.bit_generator.state,
        }

    def restore(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        if meta.get("driver") != "ase":
            raise UserInputError("the checkpoint was written by a different MD driver")
        saved = {k[4:]: arrays[k] for k in arrays if k.startswith("ase.")}
        self._load(saved)
        self._step = int(meta["step"])
        self.rng.bit_generator.state = meta["rng"]
        self.flags = _unflatten_tree(self.flags, arrays, "flags")
        self.flags = FlagState(*[np.asarray(x) for x in self.flags])

    def stats(self) -> dict[str, Any]:
        return {"driver": "ase", "integrator": type(self.dyn).__name__}


class _HostState(NamedTuple):
    """The fields of :class:`~mlipctl.engines.integrators.MDState` monitors may read on the host."""

    positions: np.ndarray
    velocities: np.ndarray
    masses: np.ndarray
    cell: np.ndarray
    step: int


# --------------------------------------------------------------------------------------------
# Helpers: snapshots, flattening, files
# --------------------------------------------------------------------------------------------


def _snapshot(
    numbers: np.ndarray,
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    velocities: np.ndarray,
    energy: float,
    forces: np.ndarray,
    stress: np.ndarray | None,
) -> Atoms:
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = Atoms(numbers=numbers, positions=np.asarray(positions), cell=cell, pbc=pbc)
    atoms.set_velocities(np.asarray(velocities))
    kw: dict[str, Any] = {"energy": energy, "forces": np.asarray(forces)}
    if stress is not None and np.all(np.isfinite(stress)):
        kw["stress"] = np.asarray(stress)
    atoms.calc = SinglePointCalculator(atoms, **kw)
    return atoms


def _flag_summary(monitors: Sequence[Monitor], flags: FlagState) -> dict[str, dict[str, Any]]:
    out = {}
    for k, mon in enumerate(monitors):
        first = int(flags.first_trigger_step[k])
        mx = float(flags.max_value[k])
        out[mon.name] = {
            "threshold": mon.threshold,
            "unit": mon.unit,
            "first_trigger_step": first if first >= 0 else None,
            "n_triggered": int(flags.n_triggered[k]),
            "n_flagged": int(flags.n_flagged[k]),
            "max_value": mx if math.isfinite(mx) else None,
        }
    return out


def _path_name(path: Sequence[Any]) -> str:
    parts = []
    for p in path:
        name = getattr(p, "name", None)
        if name is None:
            name = getattr(p, "idx", None)
        if name is None:
            name = getattr(p, "key", p)
        parts.append(str(name))
    return ".".join(parts)


def _flatten_tree(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    pre = f"{prefix}." if prefix else ""
    return {pre + _path_name(path): np.asarray(leaf) for path, leaf in leaves}


def _unflatten_tree(template: Any, arrays: Mapping[str, np.ndarray], prefix: str = "") -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    pre = f"{prefix}." if prefix else ""
    out = []
    for path, leaf in leaves:
        name = pre + _path_name(path)
        if name not in arrays:
            raise UserInputError(f"checkpoint is missing {name!r}; was it written by this version?")
        arr = np.asarray(arrays[name])
        if arr.dtype != np.asarray(leaf).dtype:
            raise UserInputError(f"checkpoint entry {name!r} has dtype {arr.dtype}")
        out.append(jnp.asarray(arr) if isinstance(leaf, jax.Array) else arr)
    return jax.tree_util.tree_unflatten(treedef, out)


def _frame_text(atoms: Atoms) -> str:
    import ase.io

    buf = io.StringIO()
    ase.io.write(buf, atoms, format="extxyz")
    return buf.getvalue()


class _Outputs:
    """Append-only output files whose sizes a checkpoint records (truncated back on resume)."""

    def __init__(self, out: Path, offsets: Mapping[str, int] | None) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.handles: dict[str, Any] = {}
        for name in (TRAJECTORY, THERMO, FLAGGED):
            path = out / name
            if offsets is None:
                fh = open(path, "wb")  # noqa: SIM115 - kept open for the run
            else:
                want = int(offsets.get(name, 0))
                size = path.stat().st_size if path.exists() else 0
                if size < want:
                    raise UserInputError(
                        f"cannot resume: {path} is shorter ({size} bytes) than at the "
                        f"checkpoint ({want} bytes); was it edited or deleted?"
                    )
                fh = open(path, "r+b" if path.exists() else "wb")  # noqa: SIM115
                fh.truncate(want)
                fh.seek(want)
            self.handles[name] = fh
        if offsets is None:
            self._write(THERMO, "# " + " ".join(LOG_COLUMNS) + "\n")

    def _write(self, name: str, text: str) -> None:
        # One write call per frame/block so that a reader never sees a frame split by our own
        # buffering; a crash mid-write leaves a tail that --resume truncates.
        self.handles[name].write(text.encode("utf-8"))

    def log(self, records: Mapping[str, np.ndarray], timestep_fs: float, interval: int) -> None:
        steps = np.asarray(records["step"])
        lines = []
        for k in np.flatnonzero(steps % interval == 0):
            e_pot, e_kin = float(records["e_pot"][k]), float(records["e_kin"][k])
            row = (
                int(steps[k]),
                steps[k] * timestep_fs,
                float(records["temperature"][k]),
                e_pot,
                e_kin,
                e_pot + e_kin,
                float(records["pressure"][k]) / units.GPa,
                float(records["conserved"][k]),
                float(records["volume"][k]),
                float(records["max_force"][k]),
            )
            lines.append(
                "{:d} {:.4f} {:.6f} {:.12e} {:.12e} {:.12e} {:.8e} {:.12e} {:.8e} {:.8e}\n".format(
                    *row
                )
            )
        if lines:
            self._write(THERMO, "".join(lines))

    def frame(self, atoms: Atoms) -> None:
        self._write(TRAJECTORY, _frame_text(atoms))

    def flagged(self, atoms: Atoms) -> None:
        self._write(FLAGGED, _frame_text(atoms))

    def sync(self) -> dict[str, int]:
        sizes = {}
        for name, fh in self.handles.items():
            fh.flush()
            os.fsync(fh.fileno())
            sizes[name] = fh.tell()
        return sizes

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()


def _write_checkpoint(
    path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> None:
    from mlipctl.reports.base import atomic_write_bytes

    buf = io.BytesIO()
    payload = dict(arrays)
    payload["__meta__"] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    np.savez(buf, **payload)
    atomic_write_bytes(path, buf.getvalue())


def read_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays and metadata of an MD checkpoint (npz without pickles)."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"cannot resume: no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a user-facing problem
        raise UserInputError(f"cannot read checkpoint {path}: {exc}") from None
    meta = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    if meta.get("version") != _CHECKPOINT_VERSION:
        raise UserInputError(f"checkpoint {path} has unsupported version {meta.get('version')}")
    return arrays, meta


# --------------------------------------------------------------------------------------------
# The run loop shared by both drivers, and the report
# --------------------------------------------------------------------------------------------


def _check_structure(cfg: Any, atoms: Atoms) -> None:
    from mlipctl.data.neighbors import check_overlaps

    if not np.all(np.isfinite(atoms.positions)):
        raise UserInputError("starting structure has non-finite (NaN/inf) positions")
    check_overlaps(atoms)
    if cfg.ensemble.kind == "npt_berendsen" and not np.all(atoms.pbc):
        raise UserInputError(
            f"npt_berendsen needs a periodic cell on all three axes; the structure has "
            f"pbc={atoms.pbc.tolist()}"
        )


def _monitor_context(n_atoms: int, potential: Any = None) -> MonitorContext:
    return MonitorContext(
        n_atoms=n_atoms, n_dof=integ.degrees_of_freedom(n_atoms), potential=potential
    )


def _resume_meta(cfg: Any, out: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    arrays, meta = read_checkpoint(out / CHECKPOINT)
    old = dict(meta["config"])
    new = cfg.model_dump(mode="json")
    # More steps extend a run; the output directory may have been moved or copied.
    for key in ("steps", "output"):
        old.pop(key, None)
        new.pop(key, None)
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise UserInputError(
            f"cannot resume: the config differs from the checkpoint's in {', '.join(diff)} "
            "(only `steps` and `output` may change on resume)"
        )
    return arrays, meta


def _simulate(
    cfg: Any,
    driver: JaxMD | AseMD,
    *,
    resume: bool,
    progress: bool,
    resume_data: tuple[dict[str, np.ndarray], dict[str, Any]] | None,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Drive ``driver`` to ``cfg.steps`` writing every output; returns run facts for the report."""
    out = Path(cfg.output)
    offsets = None
    if resume and resume_data is not None:
        arrays, meta = resume_data
        driver.restore(arrays, meta)
        offsets = meta["offsets"]
    outputs = _Outputs(out, offsets)
    t_start = time.perf_counter()
    t_io = 0.0
    start_step = driver.step
    events: list[Event] = []
    stop: Event | None = None

    def checkpoint() -> None:
        meta = driver.checkpoint_meta()
        meta.update(
            version=_CHECKPOINT_VERSION,
            step=driver.step,
            offsets=outputs.sync(),
            config=cfg.model_dump(mode="json"),
        )
        _write_checkpoint(out / CHECKPOINT, driver.checkpoint_arrays(), meta)

    bar = _progress_bar(progress, cfg.steps, start_step)
    try:
        if start_step == 0:
            first = driver.atoms()
            first.info.update(step=0, time_fs=0.0)
            outputs.frame(first)
            outputs.log(_initial_record(driver, first), cfg.timestep_fs, cfg.log_interval)
        while driver.step < cfg.steps and stop is None:
            step = driver.step
            boundary = min(
                cfg.steps,
                _next_multiple(step, cfg.trajectory_interval),
                _next_multiple(step, cfg.checkpoint_interval),
            )
            records, event = driver.advance(boundary)
            t0 = time.perf_counter()
            outputs.log(records, cfg.timestep_fs, cfg.log_interval)
            if event is not None and event.kind in ("flagged", "stopped"):
                events.append(event)
                frame = driver.atoms()
                frame.info.update(step=event.step, time_fs=event.step * cfg.timestep_fs)
                frame.info.update({f"monitor_{k}": v for k, v in event.values.items()})
                frame.info["flagged_by"] = ",".join(event.flagged_by)
                outputs.flagged(frame)
                if event.kind == "stopped":
                    stop = event
            elif event is not None and event.kind == "blow_up":
                stop = event
                events.append(event)
                good = driver.atoms()
                good.info.update(
                    step=driver.step, time_fs=driver.step * cfg.timestep_fs, last_good=True
                )
                if driver.step % cfg.trajectory_interval != 0:  # else it is there already
                    outputs.frame(good)
                from mlipctl.data.io import write_structures_atomic

                write_structures_atomic(out / LAST_GOOD, [good])
            now = driver.step
            if stop is None and now % cfg.trajectory_interval == 0:
                frame = driver.atoms()
                frame.info.update(step=now, time_fs=now * cfg.timestep_fs)
                outputs.frame(frame)
            # A monitor stop is a normal end: checkpoint so that --resume can go on past it.
            at_checkpoint = now % cfg.checkpoint_interval == 0 or now == cfg.steps
            monitor_stop = stop is not None and stop.kind == "stopped"
            if (stop is None and at_checkpoint) or monitor_stop:
                checkpoint()
            t_io += time.perf_counter() - t0
            if bar is not None:
                bar[0].update(bar[1], completed=now)
    finally:
        outputs.sync()
        outputs.close()
        if bar is not None:
            bar[0].stop()
    timings["io"] = timings.get("io", 0.0) + t_io
    timings["loop"] = timings.get("loop", 0.0) + time.perf_counter() - t_start
    return {"start_step": start_step, "events": events, "stop": stop}


def _initial_record(driver: JaxMD | AseMD, atoms: Atoms) -> dict[str, np.ndarray]:
    n_dof = integ.degrees_of_freedom(len(atoms))
    e_kin = float(atoms.get_kinetic_energy())
    forces = atoms.get_forces()
    try:
        stress = atoms.get_stress(voigt=False)
        p = 2.0 * e_kin / (3.0 * atoms.get_volume()) - float(np.trace(stress)) / 3.0
    except Exception:  # noqa: BLE001 - no stress available
        p = math.nan
    if not np.all(atoms.pbc) or not np.isfinite(p):
        p = math.nan
    if isinstance(driver, JaxMD):
        # Step 0: every extended variable is still zero, so the conserved quantity is E_tot.
        kind = driver.settings.ensemble.kind
        e_tot = float(atoms.get_potential_energy()) + e_kin
        conserved = math.nan if kind == "npt_berendsen" else e_tot
    else:
        conserved = driver._conserved(float(atoms.get_potential_energy()), e_kin)
    return {
        "step": np.array([0]),
        "temperature": np.array([2.0 * e_kin / (n_dof * units.kB)]),
        "e_pot": np.array([atoms.get_potential_energy()]),
        "e_kin": np.array([e_kin]),
        "conserved": np.array([conserved]),
        "pressure": np.array([p]),
        "volume": np.array([atoms.get_volume() if np.all(atoms.pbc) else math.nan]),
        "max_force": np.array([np.sqrt(np.max(np.sum(forces * forces, axis=1)))]),
    }


def _next_multiple(step: int, interval: int) -> int:
    return (step // interval + 1) * interval


def _progress_bar(progress: bool, total: int, start: int):
    if not progress:
        return None
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn("md"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )
    bar.start()
    task = bar.add_task("md", total=total, completed=start)
    return bar, task


def read_thermo_log(path: str | Path) -> dict[str, np.ndarray]:
    """Columns of a ``thermo.log`` as arrays keyed by :data:`LOG_COLUMNS`."""
    data = np.loadtxt(path, comments="#", ndmin=2)
    if data.size == 0:
        return {c: np.zeros(0) for c in LOG_COLUMNS}
    return {c: data[:, k] for k, c in enumerate(LOG_COLUMNS)}


def drift_mev_per_atom_ps(time_fs: np.ndarray, energy: np.ndarray, n_atoms: int) -> float:
    """Slope of a least-squares line through ``energy(time)``, meV/atom/ps."""
    ok = np.isfinite(energy)
    if ok.sum() < 2:
        return math.nan
    slope = np.polyfit(time_fs[ok] / 1000.0, energy[ok], 1)[0]
    return float(slope * 1000.0 / n_atoms)


def _results_from_log(cfg: Any, n_atoms: int, out: Path) -> dict[str, Any]:
    log = read_thermo_log(out / THERMO)
    if len(log["step"]) == 0:
        return {}
    t, conserved = log["time_fs"], log["conserved_eV"]
    res: dict[str, Any] = {
        "log_lines": len(t),
        "temperature_mean_k": float(np.mean(log["temperature_K"])),
        "temperature_std_k": float(np.std(log["temperature_K"])),
        "temperature_final_k": float(log["temperature_K"][-1]),
        "e_pot_mean_ev": float(np.mean(log["e_pot_eV"])),
        "pressure_mean_gpa": float(np.nanmean(log["pressure_GPa"]))
        if np.isfinite(log["pressure_GPa"]).any()
        else None,
        "volume_final_a3": float(log["volume_A3"][-1]),
        "max_force_max_ev_a": float(np.max(log["max_force_eV_A"])),
    }
    if np.isfinite(conserved).all():
        res["conserved_drift_mev_per_atom_ps"] = drift_mev_per_atom_ps(t, conserved, n_atoms)
        res["conserved_max_deviation_mev_per_atom"] = float(
            np.max(np.abs(conserved - conserved[0])) * 1000.0 / n_atoms
        )
    return res


def _report(
    cfg: Any,
    driver: JaxMD | AseMD,
    run: dict[str, Any],
    timings: dict[str, float],
    messages: list[str],
) -> Any:
    from mlipctl.reports.base import Criterion, Environment, Report

    out = Path(cfg.output)
    n = driver.n_atoms
    timings["compile"] = driver.compile_seconds
    timings["md"] = driver.run_seconds
    steps_run = driver.step - run["start_step"]
    stop: Event | None = run["stop"]
    results: dict[str, Any] = {
        "n_atoms": n,
        "ensemble": cfg.ensemble.kind,
        "steps_requested": cfg.steps,
        "steps_completed": driver.step,
        "steps_this_session": steps_run,
        "resumed_from_step": run["start_step"] or None,
        "simulated_time_ps": driver.step * cfg.timestep_fs / 1000.0,
        "throughput_atom_steps_per_s": (
            n * steps_run / driver.run_seconds if driver.run_seconds > 0 else None
        ),
        **driver.stats(),
        **_results_from_log(cfg, n, out),
    }
    summary = driver.flag_summary()
    results["monitors"] = summary
    results["flagged_frames"] = int(sum(e.kind in ("flagged", "stopped") for e in run["events"]))
    firsts = [
        v["first_trigger_step"] for v in summary.values() if v["first_trigger_step"] is not None
    ]
    results["first_trigger_step"] = min(firsts) if firsts else None
    blow = stop if stop is not None and stop.kind == "blow_up" else None
    results["blow_up"] = (
        {"step": blow.step, "reason": blow.reason, "values": blow.values} if blow else None
    )
    criteria = [
        Criterion.is_true(
            "stable",
            blow is None,
            detail=(
                f"blow-up at step {blow.step}: {blow.reason} {blow.values}; last good frame "
                f"(step {driver.step}) written to {LAST_GOOD}"
                if blow
                else f"no NaN, T <= {cfg.blow_up.max_temperature_k} K, "
                f"|F| <= {cfg.blow_up.max_force} eV/Å"
            ),
        ),
        Criterion.is_true(
            "completed",
            driver.step >= cfg.steps,
            detail=f"{driver.step} of {cfg.steps} steps"
            + (
                f"; stopped by monitor at step {stop.step}"
                if stop and stop.kind == "stopped"
                else ""
            ),
        ),
    ]
    if cfg.monitoring.monitors and cfg.monitoring.on_trigger == "stop":
        criteria.append(
            Criterion.is_true(
                "monitors_quiet",
                not (stop and stop.kind == "stopped"),
                detail="policy 'stop': a monitor trigger ends the run",
            )
        )
    if blow:
        messages.append(
            f"MD became unstable at step {blow.step} ({blow.reason}); the last good frame is in "
            f"{out / LAST_GOOD}"
        )
    artifacts = {
        "trajectory": str(out / TRAJECTORY),
        "thermo_log": str(out / THERMO),
        "flagged_frames": str(out / FLAGGED),
        "checkpoint": str(out / CHECKPOINT),
    }
    if blow:
        artifacts["last_good_frame"] = str(out / LAST_GOOD)
    return Report(
        command="md",
        config=cfg.model_dump(mode="json"),
        environment=Environment.capture(),
        timings=timings,
        results=results,
        criteria=criteria,
        artifacts=artifacts,
        messages=messages,
    )


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------


def loop_settings(cfg: Any, cutoff: float, n_atoms: int) -> LoopSettings:
    """Static loop settings from an :class:`~mlipctl.config.md.MDConfig`."""
    return LoopSettings(
        ensemble=integ.Ensemble.from_config(cfg.ensemble),
        dt=cfg.timestep_fs * units.fs,
        n_dof=integ.degrees_of_freedom(n_atoms),
        cutoff=float(cutoff),
        skin=float(cfg.skin),
        chunk_steps=int(cfg.chunk_steps),
        monitor_interval=cfg.monitoring.interval,
        cooldown_steps=cfg.monitoring.cooldown_steps,
        hysteresis=cfg.monitoring.hysteresis,
        stop_on_trigger=cfg.monitoring.on_trigger == "stop",
        max_temperature_k=cfg.blow_up.max_temperature_k,
        max_force=cfg.blow_up.max_force,
    )


def _initial_velocities(cfg: Any, atoms: Atoms) -> np.ndarray:
    if cfg.ensemble.kind == "bussi" and cfg.initial_temperature_k <= 0:
        raise UserInputError(
            "Bussi rescaling cannot start from zero velocities: set initial_temperature_k > 0"
        )
    return integ.maxwell_boltzmann(atoms.get_masses(), cfg.initial_temperature_k, cfg.seed)


def run_md_with_potential(
    cfg: Any,
    energy_fn: EnergyFn,
    params: Any,
    *,
    cutoff: float,
    type_map: Mapping[int, int],
    member_fn: Callable | None = None,
    potential: Any = None,
    atoms: Atoms | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Any:
    """`mlipctl md` with any JAX potential ``energy_fn(params, graph) -> (K, B)``.

    Args:
        cfg: :class:`~mlipctl.config.md.MDConfig` (its ``calculator`` is not used here).
        energy_fn, params: the potential.
        cutoff: its cutoff, Å.
        type_map: atomic number -> species index.
        member_fn: per-member prediction for monitors that need it (default from energy_fn).
        potential: the loaded ``Potential`` (handed to monitor factories), if any.
        atoms: starting structure (default: ``load_structure(cfg.structure)``).
        resume: continue from ``cfg.output/checkpoint.npz``.
        progress: show a progress bar on stderr.
    """
    from mlipctl.data.neighbors import species_indices
    from mlipctl.data.sources import load_structure

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out = Path(cfg.output)
    resume_data = _resume_meta(cfg, out) if resume else None
    atoms = load_structure(cfg.structure) if atoms is None else atoms.copy()
    _check_structure(cfg, atoms)
    species = species_indices(atoms, type_map)
    settings = loop_settings(cfg, cutoff, len(atoms))
    monitors = build_monitors(cfg.monitoring.monitors, _monitor_context(len(atoms), potential))
    driver = JaxMD(
        energy_fn,
        params,
        atoms,
        species,
        cutoff,
        settings,
        monitors,
        velocities=_initial_velocities(cfg, atoms),
        seed=cfg.seed,
        member_fn=member_fn,
    )
    timings["setup"] = time.perf_counter() - t0
    run = _simulate(
        cfg, driver, resume=resume, progress=progress, resume_data=resume_data, timings=timings
    )
    timings["total"] = time.perf_counter() - t0
    return _report(cfg, driver, run, timings, [])


def run_md_with_calculator(
    cfg: Any,
    calc: Any,
    *,
    atoms: Atoms | None = None,
    resume: bool = False,
    progress: bool = True,
) -> Any:
    """`mlipctl md` with any ASE calculator through ASE's own MD drivers."""
    from mlipctl.data.sources import load_structure

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out = Path(cfg.output)
    resume_data = _resume_meta(cfg, out) if resume else None
    atoms = load_structure(cfg.structure) if atoms is None else atoms.copy()
    _check_structure(cfg, atoms)
    monitors = build_monitors(cfg.monitoring.monitors, _monitor_context(len(atoms)))
    m = cfg.monitoring
    driver = AseMD(
        atoms,
        calc,
        cfg.ensemble,
        cfg.timestep_fs,
        monitors,
        monitor_interval=m.interval,
        cooldown_steps=m.cooldown_steps,
        hysteresis=m.hysteresis,
        stop_on_trigger=m.on_trigger == "stop",
        max_temperature_k=cfg.blow_up.max_temperature_k,
        max_force=cfg.blow_up.max_force,
        velocities=_initial_velocities(cfg, atoms),
        seed=cfg.seed,
        log_interval=cfg.log_interval,
    )
    timings["setup"] = time.perf_counter() - t0
    run = _simulate(
        cfg, driver, resume=resume, progress=progress, resume_data=resume_data, timings=timings
    )
    timings["total"] = time.perf_counter() - t0
    messages = []
    if cfg.ensemble.kind == "langevin":
        messages.append("conserved_eV is NaN: ASE's Langevin does not report its heat exchange")
    elif cfg.ensemble.kind == "npt_berendsen":
        messages.append("conserved_eV is NaN: Berendsen NPT has no conserved quantity")
    return _report(cfg, driver, run, timings, messages)


def run_md(cfg: Any, *, resume: bool = False, progress: bool = True) -> Any:
    """Entry point of `mlipctl md`: jitted chunks for model files, ASE drivers otherwise."""
    from mlipctl.engines.calculators import is_model, load_potential_for, make_calculator

    if is_model(cfg.calculator):
        pot = load_potential_for(cfg.calculator)
        from mlipctl.model.potential import make_energy, make_predict

        # Only used on monitor steps, and only if some monitor needs ensemble members.
        member_fn = make_predict(pot.spec, stress=False)
        return run_md_with_potential(
            cfg,
            make_energy(pot.spec),
            pot.params,
            cutoff=float(pot.spec.cutoff),
            type_map=pot.spec.type_map(),
            member_fn=member_fn,
            potential=pot,
            resume=resume,
            progress=progress,
        )
    return run_md_with_calculator(
        cfg, make_calculator(cfg.calculator), resume=resume, progress=progress
    )
