"""Reference ("QM") calculators that label structures, and how labelling runs in parallel.

``ReferenceConfig`` is a discriminated union on ``kind``; :func:`default_reference` is EMT.
Nothing heavy is imported here: :mod:`mlipctl.reference.registry` turns a config into an ASE
calculator, :mod:`mlipctl.reference.labelling` runs it over many structures.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from mlipctl.config.base import InputPath, StrictModel

EAM_SUFFIXES: dict[str, str] = {
    ".alloy": "setfl (eam/alloy)",
    ".fs": "Finnis-Sinclair (eam/fs)",
    ".eam": "funcfl (eam, one element)",
    ".adp": "angular-dependent potential (adp)",
}
"""Potential file suffixes understood by the EAM reference, with the format each one means."""

FINNIS_SINCLAIR_ELEMENTS: tuple[str, ...] = ("V", "Nb", "Ta", "Cr", "Mo", "W", "Fe")
"""Elements with published Finnis-Sinclair (1984) parameters (the table itself lives in
:mod:`mlipctl.reference.finnis_sinclair`)."""

# Girifalco & Weizer (1959) Morse parameters for Cu: the defaults, so `{kind: morse}` is usable.
_CU_MORSE_ALPHA = 1.3588  # 1/Å
# ASE's MorsePotential smooth cutoff runs from 1.9 r0 to 2.7 r0; we keep that ratio.
_MORSE_ONSET_RATIO = 1.9 / 2.7


class EMTReference(StrictModel):
    """ASE's effective-medium theory: fast, built in, H C N O Al Ni Cu Pd Ag Pt Au only."""

    kind: Literal["emt"] = Field(default="emt", description="ASE's EMT (no parameters).")


class LJReference(StrictModel):
    """Lennard-Jones pair potential (ASE ``LennardJones``); defaults are argon."""

    kind: Literal["lj"] = Field(default="lj", description="Lennard-Jones pair potential.")
    epsilon: float = Field(default=0.0104, gt=0, description="Well depth ε, eV (default: Ar).")
    sigma: float = Field(default=3.40, gt=0, description="Zero-crossing distance σ, Å (Ar).")
    rc: float | None = Field(
        default=None, gt=0, description="Cutoff, Å (None: 3σ). The energy is shifted to 0 at rc."
    )
    smooth: bool = Field(
        default=False,
        description="Multiply a smooth cutoff function between ro and rc so forces are continuous "
        "too (false: forces jump to zero at rc).",
    )
    ro: float | None = Field(
        default=None,
        gt=0,
        description="Onset of the smooth cutoff, Å (None: 0.66 rc; smooth only).",
    )

    @model_validator(mode="after")
    def _check(self) -> LJReference:
        if self.ro is not None and not self.smooth:
            raise ValueError("ro (smooth-cutoff onset) applies only with smooth: true")
        rc = self.rc if self.rc is not None else 3.0 * self.sigma
        if self.ro is not None and self.ro >= rc:
            raise ValueError(f"ro ({self.ro} Å) must be below the cutoff rc ({rc} Å)")
        if rc <= self.sigma:
            raise ValueError(f"rc ({rc} Å) must be larger than sigma ({self.sigma} Å)")
        return self


class MorseReference(StrictModel):
    """Morse pair potential (ASE ``MorsePotential``); defaults are Cu (Girifalco & Weizer 1959).

    V(r) = ε [exp(−2α(r − r0)) − 2 exp(−α(r − r0))], with α = rho0 / r0.
    """

    kind: Literal["morse"] = Field(default="morse", description="Morse pair potential.")
    epsilon: float = Field(default=0.3429, gt=0, description="Well depth ε, eV (default: Cu).")
    r0: float = Field(default=2.866, gt=0, description="Position of the minimum r0, Å (Cu).")
    alpha: float | None = Field(
        default=None,
        gt=0,
        description="Width α, 1/Å. Give alpha or rho0, not both; neither: α = 1.3588 1/Å (Cu).",
    )
    rho0: float | None = Field(
        default=None, gt=0, description="Dimensionless width ρ0 = α r0 (ASE's parameter)."
    )
    rc: float | None = Field(
        default=None, gt=0, description="Outer end of the smooth cutoff, Å (None: 2.7 r0)."
    )
    rc_onset: float | None = Field(
        default=None, gt=0, description="Start of the smooth cutoff, Å (None: rc × 1.9/2.7)."
    )

    @model_validator(mode="after")
    def _check(self) -> MorseReference:
        if self.alpha is not None and self.rho0 is not None:
            raise ValueError("give either alpha or rho0 (= alpha * r0), not both")
        rc, onset = self.cutoffs()
        if rc <= self.r0:
            raise ValueError(f"rc ({rc} Å) must be larger than r0 ({self.r0} Å)")
        if onset >= rc:
            raise ValueError(f"rc_onset ({onset} Å) must be below rc ({rc} Å)")
        return self

    def rho0_value(self) -> float:
        """ρ0 = α r0 from whichever of alpha/rho0 was given (Cu's α when neither)."""
        if self.rho0 is not None:
            return self.rho0
        return (self.alpha if self.alpha is not None else _CU_MORSE_ALPHA) * self.r0

    def cutoffs(self) -> tuple[float, float]:
        """(rc, rc_onset) in Å with defaults filled in."""
        rc = self.rc if self.rc is not None else 2.7 * self.r0
        onset = self.rc_onset if self.rc_onset is not None else _MORSE_ONSET_RATIO * rc
        return rc, onset


class EAMReference(StrictModel):
    """Embedded-atom method from a LAMMPS-style potential file."""

    kind: Literal["eam"] = Field(default="eam", description="EAM/ADP from a potential file.")
    path: InputPath = Field(
        description="Potential file: .alloy (setfl), .fs (Finnis-Sinclair), .eam (funcfl) or .adp."
    )
    backend: Literal["ase", "matscipy"] = Field(
        default="ase",
        description="Implementation: 'ase' (ase.calculators.eam, all formats) or 'matscipy' "
        "(faster, no .adp).",
    )

    @model_validator(mode="after")
    def _check(self) -> EAMReference:
        suffix = Path(self.path).suffix.lower()
        if suffix not in EAM_SUFFIXES:
            known = ", ".join(f"{s} ({d})" for s, d in EAM_SUFFIXES.items())
            raise ValueError(
                f"unknown EAM potential suffix {suffix or '(none)'!r} of {self.path}; known: {known}"
            )
        if suffix == ".adp" and self.backend == "matscipy":
            raise ValueError("matscipy's EAM cannot read .adp potentials; use backend: ase")
        return self


class TBLiteReference(StrictModel):
    """Extended tight binding through the ``tblite`` package (``pip install mlipctl[dft]``)."""

    kind: Literal["tblite"] = Field(default="tblite", description="GFN-xTB via tblite.")
    method: Literal["GFN2-xTB", "GFN1-xTB"] = Field(
        default="GFN2-xTB", description="Tight-binding Hamiltonian."
    )
    accuracy: float = Field(
        default=1.0, gt=0, description="tblite accuracy factor (smaller: tighter convergence)."
    )
    electronic_temperature_k: float = Field(
        default=300.0, gt=0, description="Electronic temperature for Fermi smearing, K."
    )
    charge: int = Field(default=0, description="Total charge of the system, e.")
    multiplicity: int = Field(default=1, ge=1, description="Spin multiplicity 2S + 1.")


class PySCFReference(StrictModel):
    """Molecular DFT/HF through PySCF (``pip install mlipctl[dft]``).

    Molecules and clusters only: structures must be non-periodic (``pbc`` all false); periodic
    structures fail with a clear reason. Energies and analytic forces, no stress.
    """

    kind: Literal["pyscf"] = Field(default="pyscf", description="PySCF DFT/HF (non-periodic).")
    basis: str = Field(default="def2-svp", description="Gaussian basis set name, e.g. 'def2-svp'.")
    xc: str = Field(
        default="PBE", description="Exchange-correlation functional (libxc name) or 'HF'."
    )
    charge: int = Field(default=0, description="Total charge, e.")
    spin: int = Field(
        default=0,
        ge=0,
        description="2S = N_alpha − N_beta (PySCF's convention). 0: restricted, else unrestricted.",
    )
    conv_tol: float = Field(default=1e-9, gt=0, description="SCF energy convergence, Hartree.")


class FinnisSinclairReference(StrictModel):
    """Finnis & Sinclair's N-body potential for bcc transition metals (Phil. Mag. A 50, 45 (1984)).

    Built in, no files: V, Nb, Ta, Cr, Mo, W and Fe (Fe as corrected in the 1986 erratum). Each
    published set reproduces its element's bcc lattice constant and cohesive energy. The 1984
    potential has no cross terms, so a structure holds one element.
    """

    kind: Literal["finnis_sinclair"] = Field(
        default="finnis_sinclair", description="Finnis-Sinclair (1984) bcc-metal potential."
    )
    element: str | None = Field(
        default=None,
        description="One of V, Nb, Ta, Cr, Mo, W, Fe: serve only this element (and allow "
        "parameter overrides). None: each structure gets its own element's published parameters.",
    )
    A: float | None = Field(
        default=None, gt=0, description="Override: embedding strength A, eV (F(ρ) = −A √ρ)."
    )
    d: float | None = Field(default=None, gt=0, description="Override: density cutoff d, Å.")
    beta: float | None = Field(
        default=None, ge=0, description="Override: cubic term β of the density function."
    )
    c: float | None = Field(default=None, gt=0, description="Override: pair-term cutoff c, Å.")
    c0: float | None = Field(default=None, description="Override: pair coefficient c0, eV/Å².")
    c1: float | None = Field(default=None, description="Override: pair coefficient c1, eV/Å³.")
    c2: float | None = Field(default=None, description="Override: pair coefficient c2, eV/Å⁴.")

    @field_validator("element")
    @classmethod
    def _tabulated(cls, value: str | None) -> str | None:
        if value is not None and value not in FINNIS_SINCLAIR_ELEMENTS:
            raise ValueError(
                f"{value!r} has no Finnis-Sinclair parameters; tabulated elements: "
                f"{', '.join(FINNIS_SINCLAIR_ELEMENTS)}"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> FinnisSinclairReference:
        if self.element is None and self.overrides():
            raise ValueError(
                f"parameter overrides ({', '.join(sorted(self.overrides()))}) need an element "
                "to apply to; set element"
            )
        return self

    def overrides(self) -> dict[str, float]:
        """The parameters given explicitly (to replace the element's published ones)."""
        names = ("A", "d", "beta", "c", "c0", "c1", "c2")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


_CLASS_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*)?$")


class ImportReference(StrictModel):
    """Any ASE calculator importable by path, e.g. ``ase.calculators.emt:EMT``.

    The target may be a Calculator class or a factory function returning a Calculator instance.
    """

    kind: Literal["import"] = Field(default="import", description="Import an ASE calculator.")
    class_path: str = Field(
        description="'package.module:ClassName' (or 'package.module.ClassName'): a Calculator "
        "class or a function returning a Calculator."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the class or function."
    )

    @model_validator(mode="after")
    def _check(self) -> ImportReference:
        if not _CLASS_PATH.match(self.class_path):
            raise ValueError(
                f"class_path {self.class_path!r} is not of the form 'package.module:ClassName'"
            )
        if ":" not in self.class_path and "." not in self.class_path:
            raise ValueError(
                f"class_path {self.class_path!r} names no module; write 'package.module:ClassName'"
            )
        return self

    def split(self) -> tuple[str, str]:
        """(module, attribute) of ``class_path``; the attribute may be dotted ('Outer.Inner')."""
        if ":" in self.class_path:
            module, _, attr = self.class_path.partition(":")
            return module, attr
        module, _, attr = self.class_path.rpartition(".")
        return module, attr


ReferenceConfig = Annotated[
    EMTReference
    | LJReference
    | MorseReference
    | EAMReference
    | FinnisSinclairReference
    | TBLiteReference
    | PySCFReference
    | ImportReference,
    Field(discriminator="kind"),
]
"""One reference calculator, chosen by ``kind``: emt, lj, morse, eam, finnis_sinclair, tblite,
pyscf, import."""


def default_reference() -> EMTReference:
    """The default reference calculator: EMT."""
    return EMTReference()


class ParallelConfig(StrictModel):
    """How :func:`mlipctl.reference.labelling.label_structures` spreads calculations."""

    backend: Literal["serial", "processes", "dask"] = Field(
        default="serial",
        description="serial: in this process; processes: a local process pool; dask: a "
        "dask.distributed cluster (local, or the one at scheduler_address).",
    )
    workers: int = Field(
        default=1,
        ge=1,
        description="Worker processes (processes backend, or the local dask cluster's size).",
    )
    scheduler_address: str | None = Field(
        default=None,
        description="Address of a running dask scheduler, e.g. 'tcp://10.0.0.5:8786' (dask only; "
        "None: start a local cluster).",
    )
    timeout_s: float | None = Field(
        default=None,
        gt=0,
        description="Wall-time limit of one calculation, s; slower ones are recorded as failed "
        "(None: no limit).",
    )

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.scheduler_address is not None and self.backend != "dask":
            raise ValueError(
                f"scheduler_address is only used with backend: dask (backend is {self.backend!r})"
            )
        if self.backend == "serial" and self.workers != 1:
            raise ValueError(
                f"workers: {self.workers} needs backend 'processes' or 'dask' (serial uses one)"
            )
        if self.scheduler_address is not None and self.workers != 1:
            raise ValueError(
                "workers sizes a local dask cluster; with scheduler_address the remote cluster's "
                "workers are used, so leave workers unset"
            )
        return self


SERIAL = ParallelConfig()
"""Label in the calling process, one structure after another."""
