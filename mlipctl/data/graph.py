"""Fixed-shape, padded batches of atomic structures: the one data structure potentials see.

A batch holds B structure slots, N atom slots and E edge slots, flattened across structures.
Shapes are chosen from size buckets so that a mixed dataset compiles a handful of times, not once
per structure. Padding atoms and edges are masked; potentials must give them zero energy and must
not take ``norm`` of a zero-length padding edge without a guard (NaN gradients otherwise).

The neighbour list is *data*: capacity (E) and an ``overflow`` flag travel with it. Builders never
drop neighbours silently: if a structure needs more edges than the capacity, ``overflow`` is set and
the caller must rebuild with a larger capacity.
"""

from __future__ import annotations

from typing import Any, NamedTuple

Array = Any  # numpy or jax array


class AtomsGraph(NamedTuple):
    """A padded batch of periodic (or not) structures.

    Attributes (shapes):
        positions: (N, 3) Cartesian positions in Å.
        species: (N,) int32 index into the model's species table (padding atoms: 0).
        cell: (B, 3, 3) lattice vectors as rows, Å (non-periodic structures: any cell, all shifts 0).
        structure: (N,) int32 structure slot of each atom (padding atoms: B - 1, a padding slot
            whenever the batch has one; otherwise their mask keeps them out).
        atom_mask: (N,) bool, True for real atoms.
        senders: (E,) int32 centre atom i of each directed edge.
        receivers: (E,) int32 neighbour atom j of each directed edge.
        shifts: (E, 3) float, integer cell shifts S so that
            r_ij = positions[j] - positions[i] + S @ cell[structure[i]].
        edge_mask: (E,) bool, True for real edges (padding edges point 0 -> 0 with zero shift).
        neighbors: (N, K) int32 indices of the edges sent by each atom (senders == n), in any
            order, padded with E (one past the last edge slot). K is the per-atom neighbour
            capacity: potentials work on this dense (atom, neighbour) layout, where a neighbour
            sum is a batched matmul instead of a slow scatter.
        structure_mask: (B,) bool, True for real structures.
        n_atoms: (B,) int32 number of real atoms per structure slot (0 for padding slots).
        overflow: () bool, True if some structure needed more edges than the capacity E, or
            some atom more neighbours than K.
    """

    positions: Array
    species: Array
    cell: Array
    structure: Array
    atom_mask: Array
    senders: Array
    receivers: Array
    shifts: Array
    edge_mask: Array
    neighbors: Array
    structure_mask: Array
    n_atoms: Array
    overflow: Array


class Targets(NamedTuple):
    """Reference labels aligned with an :class:`AtomsGraph` (padding entries are zero).

    Attributes (shapes):
        energy: (B,) total energy in eV (float64).
        forces: (N, 3) eV/Å.
        stress: (B, 3, 3) eV/Å³, ASE sign convention (positive = tensile).
        has_energy: (B,) bool.
        has_forces: (B,) bool (per structure; broadcast to atoms with ``structure``).
        has_stress: (B,) bool.
        weight: (B,) per-structure weight (config_type weight x structure weight; 0 for padding).
    """

    energy: Array
    forces: Array
    stress: Array
    has_energy: Array
    has_forces: Array
    has_stress: Array
    weight: Array
