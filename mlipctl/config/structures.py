"""Where a command's atoms come from: a generated crystal or a structure file."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from mlipctl.config.base import InputPath, StrictModel

CrystalKind = Literal["fcc", "bcc", "hcp", "diamond", "sc"]


class CrystalConfig(StrictModel):
    """A bulk crystal of one element, repeated into a supercell."""

    kind: Literal["crystal"] = Field(default="crystal", description="Build a crystal supercell.")
    element: str = Field(description="Chemical symbol, e.g. 'Cu'.")
    structure: CrystalKind = Field(default="fcc", description="Crystal structure.")
    lattice_constant: float | None = Field(
        default=None,
        gt=0,
        description="Cubic (or hcp a) lattice constant in Å. None: the calculator's own equilibrium "
        "value where the command computes one (EOS fit), else ASE's reference value.",
    )
    c_over_a: float | None = Field(
        default=None, gt=0, description="hcp c/a ratio (None: ideal 1.633 or ASE's value)."
    )
    supercell: tuple[int, int, int] | None = Field(
        default=None,
        description="Repetitions of the conventional cubic cell (hcp: the orthorhombic cell). "
        "None: the smallest cubic repetition with at least min_atoms atoms.",
    )
    min_atoms: int = Field(
        default=250, ge=1, description="Minimum number of atoms when supercell is not given."
    )

    @model_validator(mode="after")
    def _element_known(self) -> CrystalConfig:
        from mlipctl.config.elements import check_symbol

        check_symbol(self.element)
        if self.supercell is not None and min(self.supercell) < 1:
            raise ValueError("supercell repetitions must be >= 1")
        if self.c_over_a is not None and self.structure != "hcp":
            raise ValueError("c_over_a applies to structure 'hcp' only")
        return self


class FileStructureConfig(StrictModel):
    """Structures read from any ASE-readable file."""

    kind: Literal["file"] = Field(default="file", description="Read the structure from a file.")
    path: InputPath = Field(description="Structure file (extxyz, POSCAR, cif, ...).")
    index: str = Field(
        default="-1", description="ASE index selector: '-1' last frame, ':' all, '0:10:2'."
    )
    format: str | None = Field(default=None, description="ASE format name (None: from the suffix).")


StructureSource = Annotated[CrystalConfig | FileStructureConfig, Field(discriminator="kind")]
