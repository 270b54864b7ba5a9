"""`mlipctl label`: reference energies, forces and stress for every structure of a file.

Labels stream to the output file as they finish, so an interrupted run loses nothing; running
the same config again labels only what is missing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mlipctl.config.base import InputPath, StrictModel
from mlipctl.config.reference import ParallelConfig, ReferenceConfig, default_reference

Property = Literal["energy", "forces", "stress"]


class LabelConfig(StrictModel):
    """Config of `mlipctl label`."""

    input: InputPath = Field(description="Structure file to label (extxyz, POSCAR, cif, ...).")
    index: str = Field(default=":", description="ASE index of the frames to label (':' all).")
    format: str | None = Field(default=None, description="ASE format name (None: from the suffix).")
    reference: ReferenceConfig = Field(
        default_factory=default_reference, description="Reference calculator (default: EMT)."
    )
    parallel: ParallelConfig = Field(
        default_factory=ParallelConfig,
        description="Where calculations run: serial, a local process pool or dask.",
    )
    properties: list[Property] = Field(
        default=["energy", "forces", "stress"],
        min_length=1,
        description="Labels to compute; energy is always computed. Stress only for cells "
        "periodic in all three directions.",
    )
    filename: str = Field(
        default="labelled.extxyz", description="Name of the extxyz file written into output."
    )
    overwrite: bool = Field(
        default=False,
        description="Discard an existing output (by default a run resumes it, and refuses an "
        "output made from a different input, reference or properties).",
    )
    max_failed_fraction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Largest fraction of failed structures for the run to pass (failures are "
        "always recorded in failed.json and never stop the batch).",
    )
    output: str = Field(default="runs/label", description="Output directory.")

    @model_validator(mode="after")
    def _check(self) -> LabelConfig:
        if len(set(self.properties)) != len(self.properties):
            raise ValueError("properties lists a property twice")
        if not self.filename.endswith(".extxyz") or "/" in self.filename:
            raise ValueError(
                f"filename {self.filename!r} must be a plain file name ending in .extxyz"
            )
        return self
