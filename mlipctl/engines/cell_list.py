"""O(N) neighbour list that runs inside jitted MD loops: a fixed-capacity cell list.

One periodic structure (full pbc, any triclinic cell) is binned on a grid of ``dims`` cells
along the three lattice vectors, each at least ``r_list`` wide in the perpendicular direction,
so every pair closer than ``r_list`` sits in the same or an adjacent bin (27-cell stencil). With
at least three bins per axis the stencil visits 27 distinct bins, so each pair appears once with
one cell shift; smaller cells (or non-periodic axes) are left to the host builder
(:func:`mlipctl.data.neighbors.neighbor_pairs`), which handles several images of one atom.

Everything has a fixed shape: ``cell_capacity`` atoms per bin and ``edge_capacity`` edges. A
build that needs more sets an overflow flag and reports what it needed; the caller grows the
buffers and redoes the work. Neighbours are never dropped silently.

Edge convention (same as :mod:`mlipctl.data.neighbors`): ``r_ij = x[j] - x[i] + S @ cell`` with
``x`` the positions as given (not wrapped), integer shifts S stored as float64.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

Array = jax.Array

_STENCIL = np.array(list(itertools.product((-1, 0, 1), repeat=3)), dtype=np.int32)  # (27, 3)
MIN_BINS = 3


class NeighborList(NamedTuple):
    """Fixed-capacity edge list of one structure plus the reference it was built at.

    Attributes (shapes):
        senders: (E,) int32 centre atom i.
        receivers: (E,) int32 neighbour atom j.
        shifts: (E, 3) float64 integer cell shifts S.
        mask: (E,) bool, True for real edges (padding edges are 0 -> 0, zero shift).
        table: (N, K) int32 edges sent by each atom, padded with E (``AtomsGraph.neighbors``).
        ref_positions: (N, 3) positions the list was built at.
        ref_cell: (3, 3) cell the list was built at.
    """

    senders: Array
    receivers: Array
    shifts: Array
    mask: Array
    table: Array
    ref_positions: Array
    ref_cell: Array


class BuildStats(NamedTuple):
    """What a build needed, so the host can size buffers after an overflow.

    Attributes:
        n_edges: () int, directed edges found (exact unless a bin overflowed).
        max_bin: () int, largest number of atoms in one bin.
        max_neighbors: () int, largest number of edges sent by one atom.
        bins_ok: () bool, the grid is still valid for the cell (bins at least r_list wide).
    """

    n_edges: Array
    max_bin: Array
    max_neighbors: Array
    bins_ok: Array


def perpendicular_widths(cell: np.ndarray | Array) -> Array:
    """Widths (3,) of the cell perpendicular to each pair of lattice vectors (rows), Å."""
    cell = jnp.asarray(cell)
    vol = jnp.abs(jnp.linalg.det(cell))
    cross = jnp.stack(
        [
            jnp.cross(cell[1], cell[2]),
            jnp.cross(cell[2], cell[0]),
            jnp.cross(cell[0], cell[1]),
        ]
    )
    return vol / jnp.linalg.norm(cross, axis=1)


def plan_bins(
    cell: np.ndarray, pbc: np.ndarray | tuple[bool, bool, bool], r_list: float, margin: float = 0.0
) -> tuple[int, int, int] | None:
    """Bins per axis for a cell list, or None when the host builder must be used instead.

    Args:
        cell: (3, 3) lattice vectors as rows, Å.
        pbc: (3,) periodicity; the cell list needs all three axes periodic.
        r_list: list radius (cutoff + skin), Å.
        margin: relative slack, e.g. 0.05 lets the cell shrink by 5 % (NPT) before the grid is
            invalid.

    Returns:
        ``(na, nb, nc)`` with every entry >= 3, or None if the cell is too small along some axis
        (fewer than three bins of width ``r_list``) or not fully periodic.
    """
    cell = np.asarray(cell, dtype=np.float64)
    if not all(bool(p) for p in pbc) or abs(np.linalg.det(cell)) < 1e-9:
        return None
    widths = np.asarray(perpendicular_widths(cell))
    dims = tuple(int(math.floor(w / (r_list * (1.0 + margin)))) for w in widths)
    if min(dims) < MIN_BINS:
        return None
    return dims  # type: ignore[return-value]


def count_bin_occupancy(positions: np.ndarray, cell: np.ndarray, dims: tuple[int, int, int]) -> int:
    """Largest number of atoms in one bin (host side, to size ``cell_capacity``)."""
    frac = np.asarray(positions, dtype=np.float64) @ np.linalg.inv(np.asarray(cell, np.float64))
    frac -= np.floor(frac)
    idx = np.clip(np.floor(frac * np.asarray(dims)).astype(np.int64), 0, np.asarray(dims) - 1)
    flat = (idx[:, 0] * dims[1] + idx[:, 1]) * dims[2] + idx[:, 2]
    return int(np.bincount(flat, minlength=int(np.prod(dims))).max())


def build_cell_list(
    positions: Array,
    cell: Array,
    r_list: float,
    dims: tuple[int, int, int],
    cell_capacity: int,
    edge_capacity: int,
    neighbor_capacity: int,
) -> tuple[NeighborList, BuildStats]:
    """Full directed neighbour list within ``r_list`` via a cell list (jit-compatible).

    Args:
        positions: (N, 3) Cartesian positions, Å (any image; need not be wrapped).
        cell: (3, 3) lattice vectors as rows, Å; fully periodic.
        r_list: list radius, Å (pairs with distance < r_list).
        dims: static bins per axis, each >= 3 (from :func:`plan_bins`).
        cell_capacity: static atom slots per bin.
        edge_capacity: static edge slots E.
        neighbor_capacity: static slots K per atom in the table.

    Returns:
        ``(neighbor_list, stats)``. The list is only valid when ``stats.n_edges <=
        edge_capacity``, ``stats.max_bin <= cell_capacity``, ``stats.max_neighbors <=
        neighbor_capacity`` and ``stats.bins_ok``
        (see :func:`overflowed`); otherwise it is incomplete and must be rebuilt larger.
    """
    positions = jnp.asarray(positions, dtype=jnp.float64)
    cell = jnp.asarray(cell, dtype=jnp.float64)
    n = positions.shape[0]
    dims_arr = jnp.asarray(dims, dtype=jnp.int32)
    n_bins = int(np.prod(dims))

    frac = positions @ jnp.linalg.inv(cell)
    image = jnp.floor(frac)
    wrapped = frac - image
    idx3 = jnp.clip(jnp.floor(wrapped * dims_arr).astype(jnp.int32), 0, dims_arr - 1)
    bin_of = (idx3[:, 0] * dims[1] + idx3[:, 1]) * dims[2] + idx3[:, 2]

    # Bin table (n_bins, C) of atom ids; empty slots hold the sentinel n.
    order = jnp.argsort(bin_of, stable=True).astype(jnp.int32)
    counts = jnp.zeros(n_bins, jnp.int32).at[bin_of].add(1)
    starts = jnp.cumsum(counts) - counts
    sorted_bins = bin_of[order]
    rank = jnp.arange(n, dtype=jnp.int32) - starts[sorted_bins]
    table = (
        jnp.full((n_bins, cell_capacity), n, jnp.int32)
        .at[sorted_bins, rank]
        .set(order, mode="drop")
    )

    wpos = wrapped @ cell
    wpos_ext = jnp.concatenate([wpos, jnp.zeros((1, 3), wpos.dtype)])
    centre = jnp.arange(n, dtype=jnp.int32)
    r2 = r_list * r_list

    def visit(carry, offset):
        senders, receivers, shifts, count, nbr_table, per_atom = carry
        nb = idx3 + offset
        wrap = jnp.floor_divide(nb, dims_arr)
        nb = nb - wrap * dims_arr
        nbin = (nb[:, 0] * dims[1] + nb[:, 1]) * dims[2] + nb[:, 2]
        cand = table[nbin]  # (N, C)
        wrap_f = wrap.astype(jnp.float64)
        rij = wpos_ext[cand] + (wrap_f @ cell)[:, None, :] - wpos[:, None, :]
        d2 = jnp.sum(rij * rij, axis=-1)
        is_self = (cand == centre[:, None]) & jnp.all(offset == 0)
        valid = (cand < n) & (d2 < r2) & ~is_self
        flat = valid.reshape(-1)
        dest = jnp.where(flat, count + jnp.cumsum(flat) - 1, edge_capacity)
        j = cand.reshape(-1)
        i = jnp.broadcast_to(centre[:, None], cand.shape).reshape(-1)
        # Shift relative to the unwrapped positions: wrapped = x - image @ cell.
        s = (
            jnp.broadcast_to(wrap_f[:, None, :], (*cand.shape, 3))
            + image[:, None, :]
            - image[jnp.minimum(cand, n - 1)]
        ).reshape(-1, 3)
        senders = senders.at[dest].set(i, mode="drop")
        receivers = receivers.at[dest].set(j, mode="drop")
        shifts = shifts.at[dest].set(s, mode="drop")
        # Each atom's next free table slots, filled in the same order.
        # Out-of-range slots (not an edge, or past a capacity) are dropped, not wrapped.
        edge_of = dest.reshape(valid.shape).astype(jnp.int32)
        slot = per_atom[:, None] + jnp.cumsum(valid, axis=1) - 1
        slot = jnp.where(valid & (edge_of < edge_capacity), slot, neighbor_capacity)
        nbr_table = nbr_table.at[centre[:, None], slot].set(edge_of, mode="drop")
        per_atom = per_atom + jnp.sum(valid, axis=1, dtype=jnp.int32)
        return (
            senders,
            receivers,
            shifts,
            count + jnp.sum(flat, dtype=jnp.int32),
            nbr_table,
            per_atom,
        ), None

    init = (
        jnp.zeros(edge_capacity, jnp.int32),
        jnp.zeros(edge_capacity, jnp.int32),
        jnp.zeros((edge_capacity, 3), jnp.float64),
        jnp.zeros((), jnp.int32),
        jnp.full((n, neighbor_capacity), edge_capacity, jnp.int32),
        jnp.zeros(n, jnp.int32),
    )
    (senders, receivers, shifts, count, nbr_table, per_atom), _ = jax.lax.scan(
        visit, init, jnp.asarray(_STENCIL)
    )
    mask = jnp.arange(edge_capacity) < count
    widths = perpendicular_widths(cell)
    stats = BuildStats(
        n_edges=count,
        max_bin=jnp.max(counts),
        max_neighbors=jnp.max(per_atom),
        bins_ok=jnp.all(widths / dims_arr >= r_list),
    )
    nl = NeighborList(
        senders=senders,
        receivers=receivers,
        shifts=shifts,
        mask=mask,
        table=nbr_table,
        ref_positions=positions,
        ref_cell=cell,
    )
    return nl, stats


def overflowed(
    stats: BuildStats, cell_capacity: int, edge_capacity: int, neighbor_capacity: int
) -> Array:
    """True if a build with these capacities is incomplete (must grow and redo)."""
    return (
        (stats.n_edges > edge_capacity)
        | (stats.max_bin > cell_capacity)
        | (stats.max_neighbors > neighbor_capacity)
        | ~stats.bins_ok
    )


def needs_rebuild(
    nl: NeighborList,
    positions: Array,
    cell: Array,
    cutoff: float,
    skin: float,
    variable_cell: bool = True,
) -> Array:
    """Whether the list may miss a pair within ``cutoff`` at ``positions``/``cell``.

    A pair outside the list was at least ``r_list = cutoff + skin`` apart at the reference.
    Mapping the reference into the current cell (``T = inv(ref_cell) @ cell``) stretches that
    by at least the smallest singular value of T, and the atoms' own moves ``d`` (relative to
    the mapped reference) shorten it by at most ``2 max|d|``. Fixed cell (``variable_cell``
    False, also right for non-periodic structures with a zero cell): ``max|d| > skin/2``.
    """
    if not variable_cell:
        d = positions - nl.ref_positions
        return jnp.sqrt(jnp.max(jnp.sum(d * d, axis=1))) > 0.5 * skin
    t = jnp.linalg.solve(nl.ref_cell, cell)
    d = positions - nl.ref_positions @ t
    max_d = jnp.sqrt(jnp.max(jnp.sum(d * d, axis=1)))
    s_min = jnp.linalg.svd(t, compute_uv=False)[-1]
    return 2.0 * max_d > s_min * (cutoff + skin) - cutoff


def host_neighbor_list(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray | tuple[bool, bool, bool],
    r_list: float,
    edge_capacity: int | None = None,
    neighbor_capacity: int | None = None,
) -> tuple[NeighborList, int, int]:
    """The same list from the host builder (vesin), for cells too small for binning.

    Returns:
        ``(neighbor_list, n_edges, max_neighbors)``; if ``n_edges > edge_capacity`` or
        ``max_neighbors > neighbor_capacity`` the list holds no real edges (the caller must grow
        the capacity), never a partial list.
    """
    from ase import Atoms

    from mlipctl.data.neighbors import max_neighbors, neighbor_pairs, neighbor_table

    atoms = Atoms(positions=positions, cell=cell, pbc=pbc)
    i, j, s = neighbor_pairs(atoms, r_list)
    n_edges = len(i)
    per_atom = max_neighbors([(i, j, s)])
    cap = n_edges if edge_capacity is None else int(edge_capacity)
    k_cap = max(per_atom, 1) if neighbor_capacity is None else int(neighbor_capacity)
    senders = np.zeros(cap, np.int32)
    receivers = np.zeros(cap, np.int32)
    shifts = np.zeros((cap, 3), np.float64)
    mask = np.zeros(cap, bool)
    if n_edges <= cap and per_atom <= k_cap:
        senders[:n_edges] = i
        receivers[:n_edges] = j
        shifts[:n_edges] = s
        mask[:n_edges] = True
    nl = NeighborList(
        senders=jnp.asarray(senders),
        receivers=jnp.asarray(receivers),
        shifts=jnp.asarray(shifts),
        mask=jnp.asarray(mask),
        table=jnp.asarray(neighbor_table(senders, mask, len(positions), k_cap)),
        ref_positions=jnp.asarray(positions, dtype=jnp.float64),
        ref_cell=jnp.asarray(cell, dtype=jnp.float64),
    )
    return nl, n_edges, per_atom


def pad_neighbor_list(nl: NeighborList, edge_capacity: int, neighbor_capacity: int) -> NeighborList:
    """The same edges in larger buffers (padding edges 0 -> 0 appended, table slots added)."""
    n_old, k_old = int(nl.senders.shape[0]), int(nl.table.shape[1])
    extra = int(edge_capacity) - n_old
    k_extra = int(neighbor_capacity) - k_old
    if extra < 0 or k_extra < 0:
        raise ValueError(
            f"cannot shrink a neighbour list from ({n_old}, {k_old}) slots to "
            f"({edge_capacity}, {neighbor_capacity})"
        )
    if extra == 0 and k_extra == 0:
        return nl
    table = np.asarray(nl.table)
    table = np.where(table == n_old, int(edge_capacity), table)
    table = np.pad(table, ((0, 0), (0, k_extra)), constant_values=int(edge_capacity))

    # Host-side padding: no device kernels to compile for a one-off resize.
    def pad(a: Array, shape: tuple[int, ...]) -> Array:
        a = np.asarray(a)
        return jnp.asarray(np.concatenate([a, np.zeros(shape, a.dtype)]))

    return nl._replace(
        senders=pad(nl.senders, (extra,)),
        receivers=pad(nl.receivers, (extra,)),
        shifts=pad(nl.shifts, (extra, 3)),
        mask=pad(nl.mask, (extra,)),
        table=jnp.asarray(table.astype(np.int32)),
    )
