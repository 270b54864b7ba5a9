"""Per-element reference energies ("offsets"): E_total ~ sum_Z n_Z e_Z.

The least-squares fit is done per atom, (E / N) ~ sum_Z (n_Z / N) e_Z, so that large cells do not
dominate small ones; for a single element this is exactly the mean energy per atom.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from mlipctl.data.io import Labelled
from mlipctl.errors import UserInputError


def _elements_of(structures: Iterable[Labelled]) -> list[str]:
    zs: set[int] = set()
    for s in structures:
        zs.update(np.unique(s.atoms.numbers).tolist())
    return [chemical_symbols[z] for z in sorted(zs)]


def composition_matrix(structures: Sequence[Labelled], elements: Sequence[str]) -> np.ndarray:
    """(S, K) counts of each of K ``elements`` in each of S structures (float64)."""
    col = {atomic_numbers[e]: k for k, e in enumerate(elements)}
    out = np.zeros((len(structures), len(elements)), dtype=np.float64)
    for r, s in enumerate(structures):
        zs, counts = np.unique(s.atoms.numbers, return_counts=True)
        for z, c in zip(zs.tolist(), counts.tolist(), strict=True):
            if z not in col:
                raise UserInputError(
                    f"structure {s.index} contains {chemical_symbols[z]}, which is not among the "
                    f"elements {list(elements)}"
                )
            out[r, col[z]] = c
    return out


def fit_reference_energies(
    structures: Sequence[Labelled], elements: Sequence[str] | None = None
) -> dict[str, float]:
    """Least-squares per-element energies (eV) from structures that have an energy.

    Args:
        structures: labelled structures; those without an energy are ignored.
        elements: symbols to fit (default: all elements present).

    Returns:
        {symbol: eV per atom}.

    Raises:
        UserInputError: no energies, or an element in ``elements`` never occurs.
    """
    labelled = [s for s in structures if s.energy is not None]
    if not labelled:
        raise UserInputError("cannot fit reference energies: no structure has an energy label")
    elements = list(elements) if elements is not None else _elements_of(labelled)
    counts = composition_matrix(labelled, elements)
    missing = [e for e, c in zip(elements, counts.sum(axis=0), strict=True) if c == 0]
    if missing:
        raise UserInputError(
            f"cannot fit reference energies for {missing}: no labelled structure contains them"
        )
    n_atoms = counts.sum(axis=1)
    energies = np.array([s.energy for s in labelled], dtype=np.float64)
    fractions = counts / n_atoms[:, None]
    solution, _, rank, _ = np.linalg.lstsq(fractions, energies / n_atoms, rcond=None)
    if rank < len(elements):
        # E.g. every structure has the same stoichiometry: only the sum is determined.
        warnings.warn(
            f"reference energies of {elements} are not all determined by the data (rank {rank} "
            f"< {len(elements)}); using the minimum-norm solution",
            stacklevel=2,
        )
    return {e: float(v) for e, v in zip(elements, solution, strict=True)}


def reference_energies(
    spec: Any, structures: Sequence[Labelled], elements: Sequence[str] | None = None
) -> dict[str, float]:
    """Offsets from a ``DataConfig.reference_energies`` spec (``kind`` least_squares,
    isolated_atoms or none) for ``elements`` (default: those in ``structures``)."""
    elements = list(elements) if elements is not None else _elements_of(structures)
    if spec.kind == "least_squares":
        return fit_reference_energies(structures, elements)
    if spec.kind == "isolated_atoms":
        missing = [e for e in elements if e not in spec.energies]
        if missing:
            raise UserInputError(
                f"reference_energies.energies lacks {missing}; given: {sorted(spec.energies)}"
            )
        return {e: float(spec.energies[e]) for e in elements}
    if spec.kind == "none":
        return dict.fromkeys(elements, 0.0)
    raise ValueError(f"unknown reference_energies kind {spec.kind!r}")


def offset_energy(numbers: np.ndarray, offsets: Mapping[str, float]) -> float:
    """Sum of per-element offsets (eV) for atomic ``numbers`` (N,)."""
    zs, counts = np.unique(np.asarray(numbers), return_counts=True)
    total = 0.0
    for z, c in zip(zs.tolist(), counts.tolist(), strict=True):
        symbol = chemical_symbols[z]
        if symbol not in offsets:
            raise UserInputError(f"no reference energy for {symbol}; known: {sorted(offsets)}")
        total += c * float(offsets[symbol])
    return total
