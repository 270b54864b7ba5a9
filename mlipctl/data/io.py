"""Reading labelled structures (energy, forces, stress) and writing them atomically.

Labels may live in ``atoms.info`` / ``atoms.arrays`` under user-chosen keys, or in a
SinglePointCalculator: ASE's extxyz reader moves ``energy``, ``forces`` and ``stress`` into one.
Both places are searched, info/arrays first. Stress is stored as 3x3 in ASE's convention (eV/Å³,
positive = tensile); files may give it as 3x3, 9 numbers or Voigt (xx, yy, zz, yz, xz, xy).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from mlipctl.errors import UserInputError

# Keys ASE's extxyz writer takes from a calculator; removed from info/arrays before writing so
# they cannot clash with the calculator's copy.
_CALC_KEYS = ("energy", "free_energy", "forces", "stress")


@dataclass
class Labelled:
    """One structure with its reference labels.

    Attributes:
        atoms: the structure (no calculator attached).
        energy: total energy in eV, or None.
        forces: (n, 3) eV/Å, or None.
        stress: (3, 3) eV/Å³ (ASE sign: positive = tensile), or None.
        config_type: group label ("default" when the file has none).
        weight: per-structure weight from the file (1.0 when absent).
        index: position of the structure in its source file (0-based).
    """

    atoms: Atoms
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    config_type: str = "default"
    weight: float = 1.0
    index: int = 0


def stress_to_3x3(value: Any) -> np.ndarray:
    """(3, 3) float64 stress from a 3x3, 9-vector or Voigt 6-vector (xx, yy, zz, yz, xz, xy)."""
    s = np.asarray(value, dtype=np.float64)
    if s.shape in ((3, 3), (9,)):
        return s.reshape(3, 3).copy()
    if s.shape == (6,):
        xx, yy, zz, yz, xz, xy = s
        return np.array([[xx, xy, xz], [xy, yy, yz], [xz, yz, zz]])
    raise ValueError(f"stress must have 6 (Voigt) or 9 (3x3) components, got shape {s.shape}")


def _lookup(atoms: Atoms, key: str, per_atom: bool) -> Any:
    store = atoms.arrays if per_atom else atoms.info
    if key in store:
        return store[key]
    calc = atoms.calc
    results = getattr(calc, "results", None) or {}
    return results.get(key)


def _resolve_index(n: int, index: str | int | slice) -> list[int]:
    """File positions selected by an ASE index selector among ``n`` frames."""
    from ase.io.formats import string2index

    sel = string2index(index) if isinstance(index, str) else index
    positions = list(range(n))
    picked = positions[sel]
    return picked if isinstance(picked, list) else [picked]


def read_structures(
    path: str | os.PathLike[str],
    *,
    index: str = ":",
    energy_key: str = "energy",
    forces_key: str = "forces",
    stress_key: str = "stress",
    config_type_key: str = "config_type",
    weight_key: str | None = None,
    format: str | None = None,
) -> list[Labelled]:
    """Read labelled structures from any ASE-readable file.

    Args:
        path: structure file (extxyz first; anything ``ase.io.read`` understands).
        index: ASE selector (":" all, "-1" last, "0:100:2").
        energy_key, forces_key, stress_key: label keys (info/arrays or calculator results).
        config_type_key: info key of the group label.
        weight_key: info key of a per-structure weight (None: 1.0).
        format: ASE format name (None: guessed from the file).

    Returns:
        One :class:`Labelled` per selected structure, ``index`` = position in the file.

    Raises:
        UserInputError: missing file, unreadable or non-structure file, empty selection,
            NaN/inf or mis-shaped labels (naming the file and the structure index).
    """
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"data file not found: {path}")
    try:
        frames = ase.io.read(path, index=":", format=format)
    except Exception as exc:  # noqa: BLE001 - ASE raises many exception types for bad files
        raise UserInputError(
            f"cannot read structures from {path}: {type(exc).__name__}: {exc}"
        ) from None
    frames = frames if isinstance(frames, list) else [frames]
    if not frames or not all(isinstance(f, Atoms) for f in frames):
        raise UserInputError(f"{path} contains no structures")
    try:
        positions = _resolve_index(len(frames), index)
    except (ValueError, IndexError, TypeError) as exc:
        raise UserInputError(
            f"index {index!r} is not a valid selector for {path} ({len(frames)} structures): {exc}"
        ) from None
    if not positions:
        raise UserInputError(f"index {index!r} selects no structures from {path}")

    out = []
    for pos in positions:
        where = f"{path}, structure {pos}"
        out.append(
            _label(
                frames[pos],
                pos,
                where,
                energy_key=energy_key,
                forces_key=forces_key,
                stress_key=stress_key,
                config_type_key=config_type_key,
                weight_key=weight_key,
            )
        )
    return out


def _label(
    atoms: Atoms,
    pos: int,
    where: str,
    *,
    energy_key: str,
    forces_key: str,
    stress_key: str,
    config_type_key: str,
    weight_key: str | None,
) -> Labelled:
    n = len(atoms)
    if n == 0:
        raise UserInputError(f"{where}: structure has no atoms")
    if not np.all(np.isfinite(atoms.positions)) or not np.all(np.isfinite(atoms.cell[:])):
        raise UserInputError(f"{where}: non-finite (NaN/inf) positions or cell")

    energy = _lookup(atoms, energy_key, per_atom=False)
    if energy is not None:
        try:
            energy = float(np.asarray(energy, dtype=np.float64).reshape(()))
        except (TypeError, ValueError):
            raise UserInputError(
                f"{where}: energy {energy_key!r} is not a number: {energy!r}"
            ) from None
        if not np.isfinite(energy):
            raise UserInputError(f"{where}: energy {energy_key!r} is {energy}")

    forces = _lookup(atoms, forces_key, per_atom=True)
    if forces is not None:
        forces = np.array(forces, dtype=np.float64)
        if forces.shape != (n, 3):
            raise UserInputError(
                f"{where}: forces {forces_key!r} have shape {forces.shape}, expected ({n}, 3)"
            )
        if not np.all(np.isfinite(forces)):
            bad = int(np.flatnonzero(~np.isfinite(forces).all(axis=1))[0])
            raise UserInputError(f"{where}: forces {forces_key!r} contain NaN/inf (atom {bad})")

    stress = _lookup(atoms, stress_key, per_atom=False)
    if stress is not None:
        try:
            stress = stress_to_3x3(stress)
        except (TypeError, ValueError) as exc:
            raise UserInputError(f"{where}: stress {stress_key!r}: {exc}") from None
        if not np.all(np.isfinite(stress)):
            raise UserInputError(f"{where}: stress {stress_key!r} contains NaN/inf")

    config_type = atoms.info.get(config_type_key, "default")
    config_type = str(config_type)

    weight = 1.0
    if weight_key is not None and weight_key in atoms.info:
        try:
            weight = float(atoms.info[weight_key])
        except (TypeError, ValueError):
            raise UserInputError(
                f"{where}: weight {weight_key!r} is not a number: {atoms.info[weight_key]!r}"
            ) from None
        if not (np.isfinite(weight) and weight >= 0.0):
            raise UserInputError(
                f"{where}: weight {weight_key!r} must be finite and >= 0, got {weight}"
            )

    clean = atoms.copy()  # copy() drops the calculator; labels live in Labelled only
    return Labelled(
        atoms=clean,
        energy=energy,
        forces=forces,
        stress=stress,
        config_type=config_type,
        weight=weight,
        index=pos,
    )


def to_atoms(item: Labelled) -> Atoms:
    """An ASE Atoms copy carrying the labels in a SinglePointCalculator (for writing/export)."""
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = item.atoms.copy()
    for key in _CALC_KEYS:
        atoms.info.pop(key, None)
        if key in atoms.arrays and key not in ("numbers", "positions"):
            del atoms.arrays[key]
    atoms.info["config_type"] = item.config_type
    if item.weight != 1.0:
        atoms.info["weight"] = item.weight
    results: dict[str, Any] = {}
    if item.energy is not None:
        results["energy"] = item.energy
    if item.forces is not None:
        results["forces"] = item.forces
    if item.stress is not None:
        results["stress"] = item.stress
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def write_structures_atomic(
    path: str | os.PathLike[str], structures: Sequence[Labelled | Atoms]
) -> Path:
    """Write structures to extended XYZ atomically (temp file in the same folder + os.replace).

    ``Labelled`` items are written with energy/forces/stress in the standard extxyz keys,
    ``config_type`` and (if not 1) ``weight`` in the info line, so :func:`read_structures` with
    default keys (and ``weight_key="weight"``) reads them back. ASE's extxyz writer rounds
    per-atom columns (positions, forces) to 8 decimals; info values keep full precision.
    """
    import ase.io

    path = Path(path)
    frames = [to_atoms(s) if isinstance(s, Labelled) else s for s in structures]
    if not frames:
        raise ValueError("nothing to write: empty structure list")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            ase.io.write(handle, frames, format="extxyz")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
