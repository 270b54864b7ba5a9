"""Turn a config's structure source (crystal or file) into ASE atoms."""

from __future__ import annotations

from typing import Any

from ase import Atoms

from mlipctl.errors import UserInputError


def load_structure(source: Any) -> Atoms:
    """One structure from a :data:`~mlipctl.config.structures.StructureSource`."""
    frames = load_structures(source)
    if len(frames) != 1:
        raise UserInputError(
            f"expected one structure from {getattr(source, 'path', source)} but the index "
            f"{getattr(source, 'index', '')!r} selects {len(frames)}; use e.g. index: '-1'"
        )
    return frames[0]


def load_structures(source: Any) -> list[Atoms]:
    """All structures selected by a structure source."""
    if source.kind == "crystal":
        from mlipctl.data.crystals import build_crystal

        return [
            build_crystal(
                source.element,
                source.structure,
                a=source.lattice_constant,
                c_over_a=source.c_over_a,
                supercell=source.supercell,
                min_atoms=source.min_atoms,
            )
        ]
    return read_frames(str(source.path), source.index, source.format)


def read_frames(path: str, index: str = ":", fmt: str | None = None) -> list[Atoms]:
    """Read frames with ASE; any failure becomes one clear :class:`UserInputError`."""
    from pathlib import Path

    import ase.io

    if not Path(path).exists():
        raise UserInputError(f"structure file not found: {path}")
    try:
        out = ase.io.read(path, index=index, format=fmt)
    except Exception as exc:  # noqa: BLE001 - ASE raises many types for unreadable files
        raise UserInputError(
            f"cannot read structures from {path}: {type(exc).__name__}: {exc}"
        ) from None
    frames = out if isinstance(out, list) else [out]
    if not frames:
        raise UserInputError(f"no structures selected from {path} with index {index!r}")
    return frames
