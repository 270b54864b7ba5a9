"""Summary statistics of a labelled dataset (JSON-serialisable), for reports and model scaling."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase.data import chemical_symbols

from mlipctl.data.io import Labelled
from mlipctl.data.neighbors import edge_vectors, neighbor_pairs
from mlipctl.data.offsets import offset_energy


def _summary(values: np.ndarray) -> dict[str, float] | None:
    if values.size == 0:
        return None
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


@dataclass
class DatasetStats:
    """Dataset statistics; every field is a plain int/float/str/dict/None.

    Attributes:
        n_structures, n_atoms: totals.
        element_counts: atoms per element symbol.
        config_type_counts: structures per config_type.
        n_with_energy, n_with_forces, n_with_stress: structures carrying each label.
        energy_per_atom: mean/std/min/max of E/N in eV (None without energies).
        energy_per_atom_minus_offsets: same after subtracting per-element offsets (if given).
        force_component_std: std of all force components, eV/Å; force_max_norm: max |F|.
        stress_component_std: std of all stress components, eV/Å³.
        cutoff: radius used for neighbour counts (None: not computed).
        neighbors_per_atom: mean/std/min/max neighbours within ``cutoff``.
        min_distance: smallest interatomic distance in Å (images included), with
            ``min_distance_structure`` the file index of that structure.
    """

    n_structures: int
    n_atoms: int
    element_counts: dict[str, int]
    config_type_counts: dict[str, int]
    n_with_energy: int
    n_with_forces: int
    n_with_stress: int
    energy_per_atom: dict[str, float] | None
    energy_per_atom_minus_offsets: dict[str, float] | None
    force_component_std: float | None
    force_max_norm: float | None
    stress_component_std: float | None
    cutoff: float | None
    neighbors_per_atom: dict[str, float] | None
    min_distance: float | None
    min_distance_structure: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def _min_distance(atoms: Any, start: float = 3.0, limit: float = 12.0) -> float | None:
    # Grow the search radius until a pair appears; isolated atoms have none within ``limit``.
    radius = start
    while radius <= limit:
        pairs = neighbor_pairs(atoms, radius)
        if len(pairs[0]):
            return float(np.linalg.norm(edge_vectors(atoms, pairs), axis=1).min())
        radius *= 2.0
    return None


def dataset_stats(
    structures: Sequence[Labelled],
    *,
    cutoff: float | None = None,
    offsets: Mapping[str, float] | None = None,
) -> DatasetStats:
    """Statistics of ``structures``; neighbour counts only when ``cutoff`` (Å) is given."""
    elements: Counter[str] = Counter()
    ctypes: Counter[str] = Counter()
    e_per_atom, e_resid, f_all, s_all, n_neigh = [], [], [], [], []
    min_d: float | None = None
    min_d_index: int | None = None
    for s in structures:
        n = len(s.atoms)
        zs, counts = np.unique(s.atoms.numbers, return_counts=True)
        for z, c in zip(zs.tolist(), counts.tolist(), strict=True):
            elements[chemical_symbols[z]] += c
        ctypes[s.config_type] += 1
        if s.energy is not None:
            e_per_atom.append(s.energy / n)
            if offsets is not None:
                e_resid.append((s.energy - offset_energy(s.atoms.numbers, offsets)) / n)
        if s.forces is not None:
            f_all.append(np.asarray(s.forces, dtype=np.float64).reshape(-1, 3))
        if s.stress is not None:
            s_all.append(np.asarray(s.stress, dtype=np.float64).ravel())
        if cutoff is not None:
            i, _, _ = neighbor_pairs(s.atoms, cutoff)
            n_neigh.append(np.bincount(i, minlength=n))
        d = _min_distance(s.atoms)
        if d is not None and (min_d is None or d < min_d):
            min_d, min_d_index = d, s.index

    forces = np.concatenate(f_all) if f_all else np.zeros((0, 3))
    stress = np.concatenate(s_all) if s_all else np.zeros(0)
    neigh = np.concatenate(n_neigh).astype(np.float64) if n_neigh else np.zeros(0)
    return DatasetStats(
        n_structures=len(structures),
        n_atoms=int(sum(len(s.atoms) for s in structures)),
        element_counts=dict(sorted(elements.items())),
        config_type_counts=dict(sorted(ctypes.items())),
        n_with_energy=len(e_per_atom),
        n_with_forces=len(f_all),
        n_with_stress=len(s_all),
        energy_per_atom=_summary(np.asarray(e_per_atom)),
        energy_per_atom_minus_offsets=_summary(np.asarray(e_resid)),
        force_component_std=float(forces.std()) if forces.size else None,
        force_max_norm=float(np.linalg.norm(forces, axis=1).max()) if forces.size else None,
        stress_component_std=float(stress.std()) if stress.size else None,
        cutoff=None if cutoff is None else float(cutoff),
        neighbors_per_atom=_summary(neigh),
        min_distance=min_d,
        min_distance_structure=min_d_index,
    )
