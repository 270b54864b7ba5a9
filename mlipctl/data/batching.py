"""Padded ``(AtomsGraph, Targets)`` batches with few distinct shapes.

Each batch holds ``batch_size`` structure slots plus one padding slot. The atom capacity is the
total atom count, raised to at least ``batch_size`` x the mean structure size (small batches are
cheap to pad, and this floor removes most small shapes), rounded up on a geometric
:func:`~mlipctl.data.neighbors.bucket` ladder. The edge capacity is a fixed function of the atom capacity (the dataset's largest edges-per-atom ratio
times the atom capacity, bucketed). So the number of compiled shapes equals the number of atom
buckets hit, and a batch can never overflow its edge capacity.

Neighbour lists are computed once per structure and reused every epoch. Energies in the targets
are total energies (no per-element offsets subtracted).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from ase.data import atomic_numbers

from mlipctl.data.graph import AtomsGraph, Targets
from mlipctl.data.io import Labelled
from mlipctl.data.neighbors import (
    Pairs,
    bucket,
    build_graph,
    max_neighbors,
    neighbor_pairs,
    species_indices,
)

Shape = tuple[int, int, int]
"""(atom capacity N, edge capacity E, structure capacity B)."""


def type_map_from_elements(elements: Sequence[str]) -> dict[int, int]:
    """Atomic number -> species index, in the order of ``elements`` (e.g. ["Ni", "Cu"])."""
    return {atomic_numbers[e]: k for k, e in enumerate(elements)}


def make_targets(items: Sequence[Labelled], n_atoms: int, n_structures: int) -> Targets:
    """Padded targets for ``items`` laid out like :func:`build_graph` with the same capacities.

    Shapes: energy (B,), forces (N, 3), stress (B, 3, 3), has_* (B,), weight (B,); all float
    arrays float64, padding entries zero.
    """
    energy = np.zeros(n_structures, dtype=np.float64)
    forces = np.zeros((n_atoms, 3), dtype=np.float64)
    stress = np.zeros((n_structures, 3, 3), dtype=np.float64)
    has_energy = np.zeros(n_structures, dtype=bool)
    has_forces = np.zeros(n_structures, dtype=bool)
    has_stress = np.zeros(n_structures, dtype=bool)
    weight = np.zeros(n_structures, dtype=np.float64)
    a0 = 0
    for s, item in enumerate(items):
        n = len(item.atoms)
        if item.energy is not None:
            energy[s], has_energy[s] = item.energy, True
        if item.forces is not None:
            forces[a0 : a0 + n], has_forces[s] = item.forces, True
        if item.stress is not None:
            stress[s], has_stress[s] = item.stress, True
        weight[s] = item.weight
        a0 += n
    return Targets(
        energy=energy,
        forces=forces,
        stress=stress,
        has_energy=has_energy,
        has_forces=has_forces,
        has_stress=has_stress,
        weight=weight,
    )


class BatchLoader:
    """Shuffled, padded, shape-bucketed batches over a fixed list of labelled structures.

    Args:
        structures: the dataset.
        cutoff: neighbour cutoff in Å.
        type_map: atomic number -> species index (unknown elements fail here, up front).
        batch_size: structures per batch (the last batch may hold fewer, same slot count).
        shuffle: reshuffle every epoch with ``numpy.random.default_rng([seed, epoch])``.
        seed: shuffle seed.
        ladder, multiple: bucket ladder for capacities (see :func:`bucket`).
        drop_last: skip a final incomplete batch.
    """

    def __init__(
        self,
        structures: Sequence[Labelled],
        cutoff: float,
        type_map: Mapping[int, int],
        *,
        batch_size: int = 4,
        shuffle: bool = True,
        seed: int = 0,
        ladder: float | Sequence[int] = 1.25,
        multiple: int = 8,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not structures:
            raise ValueError("BatchLoader needs at least one structure")
        self.structures = list(structures)
        self.cutoff = float(cutoff)
        self.type_map = dict(type_map)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.ladder = ladder
        self.multiple = int(multiple)
        self.drop_last = drop_last
        for item in self.structures:
            species_indices(item.atoms, self.type_map, where=f" in structure {item.index}")
        self.pairs: list[Pairs] = [neighbor_pairs(s.atoms, self.cutoff) for s in self.structures]
        self.sizes = np.array([len(s.atoms) for s in self.structures], dtype=np.int64)
        self.edge_counts = np.array([len(p[0]) for p in self.pairs], dtype=np.int64)
        # Bounds every batch's edges by ratio * atoms, so E can follow N without overflow.
        self.max_edges_per_atom = float((self.edge_counts / self.sizes).max())
        # One neighbour capacity for the whole dataset: it does not multiply the shapes.
        self.neighbor_capacity = bucket(max_neighbors(self.pairs), multiple=self.multiple)
        self.atom_floor = math.ceil(self.batch_size * float(self.sizes.mean()))
        self._seen: set[Shape] = set()

    def __len__(self) -> int:
        n = len(self.structures)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """Structure order of ``epoch`` (a permutation of range(len(structures)))."""
        n = len(self.structures)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n)

    def index_batches(self, epoch: int) -> list[np.ndarray]:
        """Indices of the structures in each batch of ``epoch``."""
        order = self.order(epoch)
        chunks = [order[k : k + self.batch_size] for k in range(0, len(order), self.batch_size)]
        if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
            chunks.pop()
        return chunks

    def shape_for(self, indices: np.ndarray) -> Shape:
        """Padded (N, E, B) of a batch of structures ``indices``."""
        need = max(int(self.sizes[indices].sum()), self.atom_floor)
        n_cap = bucket(need, self.ladder, multiple=self.multiple)
        e_cap = bucket(
            math.ceil(self.max_edges_per_atom * n_cap), self.ladder, multiple=self.multiple
        )
        return n_cap, e_cap, self.batch_size + 1

    def epoch_shapes(self, epoch: int) -> set[Shape]:
        """Distinct shapes an epoch produces (without building the batches)."""
        return {self.shape_for(idx) for idx in self.index_batches(epoch)}

    @property
    def seen_shapes(self) -> set[Shape]:
        """Shapes of all batches built so far by this loader."""
        return set(self._seen)

    def make_batch(self, indices: np.ndarray) -> tuple[AtomsGraph, Targets]:
        """Build the padded batch for structures ``indices``."""
        n_cap, e_cap, b_cap = self.shape_for(indices)
        items = [self.structures[i] for i in indices]
        graph = build_graph(
            [it.atoms for it in items],
            self.cutoff,
            self.type_map,
            n_atoms=n_cap,
            n_edges=e_cap,
            n_structures=b_cap,
            n_neighbors=self.neighbor_capacity,
            pairs=[self.pairs[i] for i in indices],
        )
        if bool(graph.overflow):  # cannot happen by construction; never train on a bad graph
            raise RuntimeError(f"edge capacity {e_cap} overflowed for structures {indices}")
        self._seen.add((n_cap, e_cap, b_cap))
        return graph, make_targets(items, n_cap, b_cap)

    def epoch(self, epoch: int) -> Iterator[tuple[AtomsGraph, Targets]]:
        """Batches of one epoch, in that epoch's order."""
        for idx in self.index_batches(epoch):
            yield self.make_batch(idx)

    def __iter__(self) -> Iterator[tuple[AtomsGraph, Targets]]:
        return self.epoch(0)
