"""Neighbour lists and packing of structures into one padded :class:`AtomsGraph`.

Edge convention (shared with the model): for a directed edge i -> j with integer cell shift S,
``r_ij = positions[j] - positions[i] + S @ cell``. Lists are *full* (both i -> j and j -> i).

Backend: vesin (fast, handles cells smaller than the cutoff, skewed cells, mixed and no pbc; all
checked against ASE in ``tests/test_data_neighbors.py``). ASE and matscipy are kept as selectable
backends for cross-checks and the benchmark.

Overflow contract of :func:`build_graph`: if the edge capacity (or the per-atom neighbour
capacity) is too small, the returned graph has ``overflow=True`` and *no* real edges
(``edge_mask`` all False). A partly filled list would give a
plausible but wrong energy, so nothing is filled; the caller must rebuild with at least
:func:`count_edges` slots (usually the next :func:`bucket` size).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from mlipctl.data.graph import AtomsGraph
from mlipctl.errors import UserInputError

Backend = Literal["vesin", "ase", "matscipy"]
Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]
"""``(i, j, S)``: (P,) int64, (P,) int64, (P, 3) int64."""


def _validate_atoms(atoms: Atoms, cutoff: float) -> None:
    if not cutoff > 0 or not math.isfinite(cutoff):
        raise ValueError(f"cutoff must be a positive finite number, got {cutoff}")
    if len(atoms) == 0:
        raise UserInputError("structure has no atoms")
    if not np.all(np.isfinite(atoms.positions)):
        raise UserInputError("structure has non-finite (NaN/inf) positions")
    cell = np.asarray(atoms.cell[:], dtype=np.float64)
    if not np.all(np.isfinite(cell)):
        raise UserInputError("structure has a non-finite (NaN/inf) cell")
    pbc = np.asarray(atoms.pbc, dtype=bool)
    if pbc.any():
        # A periodic axis needs a lattice vector independent of the other periodic ones.
        vecs = cell[pbc]
        if np.linalg.matrix_rank(vecs, tol=1e-8) < int(pbc.sum()):
            raise UserInputError(
                f"structure is periodic along axes {np.flatnonzero(pbc).tolist()} but its cell "
                f"vectors there are zero or linearly dependent: cell={cell.tolist()}"
            )


def _complete_cell(
    cell: np.ndarray, pbc: np.ndarray, positions: np.ndarray, cutoff: float
) -> np.ndarray:
    """(3, 3) invertible cell equal to ``cell`` on periodic axes; non-periodic axes get vectors
    orthogonal to the periodic ones, long enough to span the structure plus the cutoff."""
    if abs(np.linalg.det(cell)) > 1e-9:
        return cell
    out = cell.copy()
    length = float(np.ptp(positions, axis=0).max()) + 2.0 * cutoff + 1.0
    basis = [out[k] for k in range(3) if pbc[k]]
    for k in range(3):
        if pbc[k]:
            continue
        for trial in np.eye(3):
            v = trial - sum((trial @ b) * b / (b @ b) for b in basis)
            if np.linalg.norm(v) > 1e-6:
                out[k] = v / np.linalg.norm(v) * length
                basis.append(out[k])
                break
    return out


def neighbor_pairs(atoms: Atoms, cutoff: float, *, backend: Backend = "vesin") -> Pairs:
    """Full directed neighbour list of one structure within ``cutoff`` (Å).

    Args:
        atoms: structure; ``atoms.pbc`` decides periodicity per axis, positions may lie outside
            the cell (shifts are relative to the positions as given).
        cutoff: radius in Å (pairs with distance < cutoff).
        backend: "vesin" (default), "ase" or "matscipy"; all give the same set of pairs.

    Returns:
        ``(i, j, S)`` with shapes (P,), (P,), (P, 3), int64, such that
        ``positions[j] - positions[i] + S @ cell`` is the edge vector. Self-pairs with zero shift
        are excluded; an atom's own periodic images are included.

    Raises:
        UserInputError: empty structure, non-finite positions or cell, degenerate periodic cell.
    """
    _validate_atoms(atoms, cutoff)
    positions = np.ascontiguousarray(atoms.positions, dtype=np.float64)
    cell = np.ascontiguousarray(atoms.cell[:], dtype=np.float64)
    pbc = [bool(p) for p in atoms.pbc]
    if backend == "vesin":
        from vesin import NeighborList

        i, j, S = NeighborList(cutoff=float(cutoff), full_list=True).compute(
            positions, cell, pbc, quantities="ijS"
        )
    elif backend == "ase":
        from ase.neighborlist import neighbor_list

        i, j, S = neighbor_list("ijS", atoms, float(cutoff))
    elif backend == "matscipy":
        from matscipy.neighbours import neighbour_list

        # matscipy inverts the cell, so give zero non-periodic vectors a stand-in (their
        # shifts are always 0, so the stand-in never enters an edge vector).
        surrogate = _complete_cell(cell, np.asarray(pbc), positions, cutoff)
        i, j, S = neighbour_list(
            "ijS", positions=positions, cell=surrogate, pbc=np.asarray(pbc), cutoff=float(cutoff)
        )
    else:
        raise ValueError(f"unknown neighbour-list backend {backend!r}")
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    S = np.asarray(S, dtype=np.int64).reshape(-1, 3)
    keep = ~((i == j) & ~S.any(axis=1))
    return i[keep], j[keep], S[keep]


def edge_vectors(atoms: Atoms, pairs: Pairs) -> np.ndarray:
    """Edge vectors ``r_ij`` (P, 3) in Å for ``pairs`` of ``atoms`` (the graph's formula)."""
    i, j, S = pairs
    pos = np.asarray(atoms.positions, dtype=np.float64)
    return pos[j] - pos[i] + S.astype(np.float64) @ np.asarray(atoms.cell[:], dtype=np.float64)


def check_overlaps(atoms: Atoms, min_distance: float = 0.5) -> None:
    """Raise :class:`UserInputError` if two atoms (or an atom and an image) are closer than
    ``min_distance`` Å; the message names the closest such pair and its distance."""
    pairs = neighbor_pairs(atoms, min_distance)
    if len(pairs[0]) == 0:
        return
    d = np.linalg.norm(edge_vectors(atoms, pairs), axis=1)
    k = int(np.argmin(d))
    i, j, S = int(pairs[0][k]), int(pairs[1][k]), pairs[2][k]
    sym = atoms.get_chemical_symbols()
    other = (
        f"atom {j} ({sym[j]})"
        if not S.any()
        else f"periodic image {S.tolist()} of atom {j} ({sym[j]})"
    )
    raise UserInputError(
        f"overlapping atoms: atom {i} ({sym[i]}) and {other} are {d[k]:.4f} Å apart "
        f"(minimum allowed {min_distance} Å)"
    )


def bucket(n: int, ladder: float | Sequence[int] = 1.25, *, multiple: int = 8) -> int:
    """Round ``n`` up to the next size on a ladder so that varied sizes share few shapes.

    Args:
        n: needed size (>= 0).
        ladder: growth factor > 1 of a geometric ladder ``multiple, ceil8(multiple*f), ...``
            (each step rounded up to a multiple of ``multiple``), or an explicit increasing
            sequence of allowed sizes.
        multiple: granularity of the geometric ladder.

    Returns:
        The smallest ladder size >= max(n, 1).
    """
    if n < 0:
        raise ValueError(f"size must be >= 0, got {n}")
    n = max(int(n), 1)
    if isinstance(ladder, (int, float)):
        factor = float(ladder)
        if not factor > 1.0:
            raise ValueError(f"ladder growth factor must be > 1, got {factor}")
        if multiple < 1:
            raise ValueError(f"multiple must be >= 1, got {multiple}")
        size = multiple
        while size < n:
            # Always advance by at least one multiple so small sizes do not stall.
            size = max(size + multiple, math.ceil(size * factor / multiple) * multiple)
        return size
    sizes = sorted(int(s) for s in ladder)
    for s in sizes:
        if s >= n:
            return s
    raise ValueError(f"size {n} exceeds the largest ladder size {sizes[-1] if sizes else None}")


def count_edges(pairs: Sequence[Pairs]) -> int:
    """Total number of directed edges in a list of per-structure pairs."""
    return int(sum(len(p[0]) for p in pairs))


def max_neighbors(pairs: Sequence[Pairs]) -> int:
    """Largest number of edges sent by one atom in a list of per-structure pairs."""
    return max((int(np.bincount(p[0]).max()) for p in pairs if len(p[0])), default=0)


def neighbor_slots(needed: int, headroom: float = 0.1) -> int:
    """Per-atom neighbour capacity for ``needed`` slots: headroom, a multiple of 8, at least 8
    (so structures without any neighbour still get a valid table)."""
    return max(8, 8 * math.ceil((1.0 + headroom) * needed / 8))


def neighbor_table(senders: np.ndarray, edge_mask: np.ndarray, n_atoms: int, k: int) -> np.ndarray:
    """(N, K) int32 table of the real edges sent by each atom, padded with E = len(senders).

    Args:
        senders: (E,) centre atom of each edge; edge_mask: (E,) bool real edges;
        n_atoms: N; k: neighbour capacity K (>= the largest per-atom count).
    """
    n_edges = len(senders)
    real = np.flatnonzero(edge_mask)
    order = real[np.argsort(senders[real], kind="stable")]
    counts = np.bincount(senders[real], minlength=n_atoms)
    if counts.size and counts.max() > k:
        raise ValueError(f"an atom has {counts.max()} neighbours, capacity is {k}")
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(order)) - starts[senders[order]]
    table = np.full((n_atoms, k), n_edges, dtype=np.int32)
    table[senders[order], rank] = order
    return table


def species_indices(atoms: Atoms, type_map: Mapping[int, int], *, where: str = "") -> np.ndarray:
    """Map atomic numbers to model species indices, (N,) int32.

    Raises:
        UserInputError: an element missing from ``type_map`` (names it and the known ones).
    """
    numbers = np.asarray(atoms.numbers)
    unknown = sorted(set(numbers.tolist()) - set(type_map))
    if unknown:
        names = ", ".join(f"{chemical_symbols[z]} (Z={z})" for z in unknown)
        known = ", ".join(chemical_symbols[z] for z in sorted(type_map)) or "none"
        raise UserInputError(
            f"element {names}{where} is not in the species table; known elements: {known}"
        )
    lut = np.full(max(max(type_map), int(numbers.max())) + 1, -1, dtype=np.int32)
    for z, idx in type_map.items():
        lut[z] = idx
    return lut[numbers]


def build_graph(
    structures: Sequence[Atoms],
    cutoff: float,
    type_map: Mapping[int, int],
    *,
    n_atoms: int | None = None,
    n_edges: int | None = None,
    n_structures: int | None = None,
    n_neighbors: int | None = None,
    pairs: Sequence[Pairs] | None = None,
) -> AtomsGraph:
    """Pack structures into one padded :class:`AtomsGraph` (numpy arrays).

    Args:
        structures: S structures.
        cutoff: neighbour cutoff in Å (ignored for structures whose ``pairs`` are given).
        type_map: atomic number -> species index.
        n_atoms: atom capacity N (default: exact total). Too small -> ValueError.
        n_edges: edge capacity E (default: exact total). Too small -> ``overflow=True`` and no
            real edges at all (see module docstring); rebuild with >= :func:`count_edges`.
        n_structures: structure capacity B (default: S, plus one padding slot if there are
            padding atoms). Too small -> ValueError.
        n_neighbors: per-atom neighbour capacity K (default: the largest count, at least 1).
            Too small -> ``overflow=True`` and no real edges, as for ``n_edges``.
        pairs: precomputed :func:`neighbor_pairs` per structure (e.g. cached across epochs).

    Returns:
        AtomsGraph with float64 positions/cell/shifts and int32 indices. Padding atoms sit at
        the origin with species 0 and structure B - 1 (a padding slot whenever B > S).
    """
    n_struct = len(structures)
    if n_struct == 0:
        raise ValueError("build_graph needs at least one structure")
    if pairs is None:
        pairs = [neighbor_pairs(a, cutoff) for a in structures]
    elif len(pairs) != n_struct:
        raise ValueError(f"got {len(pairs)} neighbour lists for {n_struct} structures")
    sizes = np.array([len(a) for a in structures], dtype=np.int64)
    total_atoms = int(sizes.sum())
    total_edges = count_edges(pairs)

    cap_atoms = total_atoms if n_atoms is None else int(n_atoms)
    if cap_atoms < total_atoms:
        raise ValueError(f"atom capacity {cap_atoms} < {total_atoms} atoms in the batch")
    if n_structures is None:
        cap_structs = n_struct + (1 if cap_atoms > total_atoms else 0)
    else:
        cap_structs = int(n_structures)
        if cap_structs < n_struct:
            raise ValueError(
                f"structure capacity {cap_structs} < {n_struct} structures in the batch"
            )
    cap_edges = total_edges if n_edges is None else int(n_edges)
    if cap_edges < 0:
        raise ValueError(f"edge capacity must be >= 0, got {cap_edges}")
    need_neighbors = max_neighbors(pairs)
    cap_neighbors = max(need_neighbors, 1) if n_neighbors is None else int(n_neighbors)
    if cap_neighbors < 1:
        raise ValueError(f"neighbour capacity must be >= 1, got {cap_neighbors}")
    overflow = cap_edges < total_edges or cap_neighbors < need_neighbors

    positions = np.zeros((cap_atoms, 3), dtype=np.float64)
    species = np.zeros(cap_atoms, dtype=np.int32)
    cell = np.zeros((cap_structs, 3, 3), dtype=np.float64)
    structure = np.full(cap_atoms, cap_structs - 1, dtype=np.int32)
    atom_mask = np.zeros(cap_atoms, dtype=bool)
    senders = np.zeros(cap_edges, dtype=np.int32)
    receivers = np.zeros(cap_edges, dtype=np.int32)
    shifts = np.zeros((cap_edges, 3), dtype=np.float64)
    edge_mask = np.zeros(cap_edges, dtype=bool)
    structure_mask = np.zeros(cap_structs, dtype=bool)
    n_atoms_arr = np.zeros(cap_structs, dtype=np.int32)

    offsets = np.concatenate([[0], np.cumsum(sizes)])
    e = 0
    for s, (atoms, (pi, pj, pS)) in enumerate(zip(structures, pairs, strict=True)):
        a0, a1 = int(offsets[s]), int(offsets[s + 1])
        positions[a0:a1] = atoms.positions
        species[a0:a1] = species_indices(atoms, type_map, where=f" in structure {s}")
        cell[s] = atoms.cell[:]
        structure[a0:a1] = s
        atom_mask[a0:a1] = True
        structure_mask[s] = True
        n_atoms_arr[s] = a1 - a0
        if not overflow:
            k = len(pi)
            senders[e : e + k] = pi + a0
            receivers[e : e + k] = pj + a0
            shifts[e : e + k] = pS
            edge_mask[e : e + k] = True
            e += k

    return AtomsGraph(
        positions=positions,
        species=species,
        cell=cell,
        structure=structure,
        atom_mask=atom_mask,
        senders=senders,
        receivers=receivers,
        shifts=shifts,
        edge_mask=edge_mask,
        neighbors=neighbor_table(senders, edge_mask, cap_atoms, cap_neighbors),
        structure_mask=structure_mask,
        n_atoms=n_atoms_arr,
        overflow=np.asarray(overflow, dtype=bool),
    )
