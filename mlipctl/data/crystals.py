"""Crystals, supercells and point defects built from a config (shared by generate, neb, validate)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from ase import Atoms
from ase.build import bulk

from mlipctl.errors import UserInputError

# Atoms in the conventional cell each structure is repeated from.
_ATOMS_PER_CELL = {"fcc": 4, "bcc": 2, "sc": 1, "diamond": 8, "hcp": 4}


def reference_structure(element: str) -> tuple[str, float]:
    """ASE's reference crystal structure and lattice constant of an element (Å)."""
    from ase.data import atomic_numbers, reference_states

    state = reference_states[atomic_numbers[element]]
    if not state or state.get("symmetry") not in _ATOMS_PER_CELL:
        got = state.get("symmetry") if state else None
        raise UserInputError(
            f"no cubic/hcp reference crystal known for {element} (ASE gives {got!r}); "
            "set crystal.structure and lattice_constant explicitly"
        )
    return state["symmetry"], float(state["a"])


def unit_cell(
    element: str, structure: str, a: float | None = None, c_over_a: float | None = None
) -> Atoms:
    """Conventional cell: cubic for fcc/bcc/sc/diamond, orthorhombic (4 atoms) for hcp."""
    if a is None:
        ref_struct, ref_a = reference_structure(element)
        a = ref_a if ref_struct == structure else _guess_a(element, structure)
    if structure == "hcp" and c_over_a is None:
        c_over_a = _reference_c_over_a(element)
    try:
        if structure == "hcp":
            return bulk(
                element, "hcp", a=a, c=a * (c_over_a or math.sqrt(8 / 3)), orthorhombic=True
            )
        return bulk(element, structure, a=a, cubic=True)
    except (ValueError, KeyError) as exc:
        raise UserInputError(f"cannot build {structure} {element}: {exc}") from None


def _reference_c_over_a(element: str) -> float:
    from ase.data import atomic_numbers, reference_states

    state = reference_states[atomic_numbers[element]] or {}
    return (
        float(state.get("c/a", math.sqrt(8 / 3)))
        if state.get("symmetry") == "hcp"
        else math.sqrt(8 / 3)
    )


def _guess_a(element: str, structure: str) -> float:
    """Lattice constant for a non-reference structure, from the reference atomic volume."""
    ref_struct, ref_a = reference_structure(element)
    ref = unit_cell(element, ref_struct, ref_a)
    vol_per_atom = ref.get_volume() / len(ref)
    if structure == "hcp":  # V/atom = sqrt(3)/4 · (c/a) · a³ at the ideal c/a
        return (4 * vol_per_atom / (math.sqrt(3) * math.sqrt(8 / 3))) ** (1 / 3)
    return (vol_per_atom * _ATOMS_PER_CELL[structure]) ** (1 / 3)


def supercell_for(structure: str, min_atoms: int) -> tuple[int, int, int]:
    """Smallest isotropic repetition n×n×n of the conventional cell with ≥ ``min_atoms`` atoms."""
    per = _ATOMS_PER_CELL[structure]
    n = max(1, math.ceil((min_atoms / per) ** (1 / 3) - 1e-9))
    return (n, n, n)


def build_crystal(
    element: str,
    structure: str,
    *,
    a: float | None = None,
    c_over_a: float | None = None,
    supercell: Sequence[int] | None = None,
    min_atoms: int = 1,
) -> Atoms:
    """A periodic supercell of the conventional cell."""
    cell = unit_cell(element, structure, a, c_over_a)
    reps = tuple(supercell) if supercell is not None else supercell_for(structure, min_atoms)
    atoms = cell.repeat(reps)
    atoms.info["config_type"] = "bulk"
    return atoms


def nearest_neighbor_distance(atoms: Atoms, index: int = 0) -> float:
    d = atoms.get_distances(index, list(range(len(atoms))), mic=True)
    return float(np.min(d[d > 1e-6]))


def vacancy_hop(atoms: Atoms, site: int = 0) -> tuple[Atoms, Atoms, int]:
    """Initial and final states of a nearest-neighbour vacancy hop.

    The vacancy sits at ``site``; the hopping atom is its nearest neighbour. Both states hold the
    same atoms in the same order (the hopping atom moves into the vacant site), as NEB requires.

    Returns:
        (initial, final, hop_index) where ``hop_index`` indexes the moving atom in both states.
    """
    pos = atoms.get_positions()
    d = atoms.get_distances(site, list(range(len(atoms))), mic=True, vector=False)
    d[site] = np.inf
    neighbor = int(np.argmin(d))
    initial = atoms.copy()
    del initial[site]
    hop = neighbor - 1 if neighbor > site else neighbor
    final = initial.copy()
    # Move along the minimum-image vector so the hop does not cross the cell the long way round.
    vec = atoms.get_distance(neighbor, site, mic=True, vector=True)
    final.positions[hop] = pos[neighbor] + vec
    for s in (initial, final):
        s.info["config_type"] = "vacancy"
        s.info["vacancy_site"] = site
    return initial, final, hop
