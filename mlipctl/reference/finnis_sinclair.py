"""The Finnis–Sinclair N-body potential for bcc transition metals, as an ASE calculator.

M. W. Finnis and J. E. Sinclair, "A simple empirical N-body potential for transition metals",
Phil. Mag. A 50, 45 (1984); erratum Phil. Mag. A 53, 161 (1986), which replaced the Fe parameters.

    E = Σ_i F(ρ_i) + ½ Σ_{i≠j} V(r_ij),   F(ρ) = −A √ρ,   ρ_i = Σ_{j≠i} φ(r_ij)
    V(r) = (r − c)² (c0 + c1 r + c2 r²)   for r < c, else 0
    φ(r) = (r − d)² + β (r − d)³ / d      for r < d, else 0

Both cutoffs lie between the second and third neighbour shells of the bcc lattice, and V and φ
reach zero with zero slope, so in condensed phases (bulk, defects, surfaces) energies and forces
are continuous: fine for MD and NEB. Not so for an atom whose density comes from a single
neighbour near d (a dimer, an atom evaporating): there F′(ρ) ∝ 1/√ρ grows as φ → 0, and the
embedding force stays finite (≈ A) up to r = d, then drops to zero.

With β > 0 (Cr, Fe) φ has its maximum inside the first-neighbour distance, falls to zero at
r = d (β − 1)/β (≈ 0.44 d) and would turn negative closer in, where √ρ is undefined. There φ is
taken as 0, as other implementations do; atoms that close (< 1.6 Å for Fe, < 1.75 Å for Cr) are
far outside the potential's fitted range in any case. A site with ρ = 0 (an isolated atom) has
F = 0 and no embedding force.

Energies, forces and stress are analytic; the stress is the strain derivative of the energy over
the cell volume (ASE's sign convention), available when the cell spans three dimensions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes

from mlipctl.config.reference import FINNIS_SINCLAIR_ELEMENTS
from mlipctl.errors import UserInputError


@dataclass(frozen=True)
class FSParameters:
    """One element's Finnis–Sinclair parameters (Å, eV) and the bcc values they were fitted to."""

    d: float
    """Cutoff of the density function φ, Å."""
    A: float
    """Embedding strength, eV (F(ρ) = −A √ρ)."""
    beta: float
    """Cubic term of φ (dimensionless); 0 for all but Cr and Fe."""
    c: float
    """Cutoff of the pair term V, Å."""
    c0: float
    """Pair polynomial coefficient, eV/Å²."""
    c1: float
    """Pair polynomial coefficient, eV/Å³."""
    c2: float
    """Pair polynomial coefficient, eV/Å⁴."""
    a0: float | None = None
    """bcc lattice constant the parameters reproduce, Å (None: not a published set)."""
    cohesive_energy: float | None = None
    """Cohesive energy the parameters reproduce, eV/atom (None: not a published set)."""

    @property
    def cutoff(self) -> float:
        """Range of the potential, Å: the larger of c and d."""
        return max(self.c, self.d)

    @property
    def phi_zero(self) -> float:
        """Distance below which φ is taken as 0 (Å): where (r−d)²(1 + β(r−d)/d) changes sign."""
        return self.d * (self.beta - 1.0) / self.beta if self.beta > 1.0 else 0.0


FS1984: dict[str, FSParameters] = {
    "V": FSParameters(3.692767, 2.010637, 0.0, 3.8, -0.8816318, 1.4907756, -0.3976370, 3.0399, 5.31),
    "Nb": FSParameters(3.915354, 3.013789, 0.0, 4.2, -1.5640104, 2.0055779, -0.4663764, 3.3008, 7.57),
    "Ta": FSParameters(4.076980, 2.591061, 0.0, 4.2, 1.2157373, 0.0271471, -0.1217350, 3.3058, 8.10),
    "Cr": FSParameters(3.915720, 1.453418, 1.8, 2.9, 29.1429813, -23.3975027, 4.7578297, 2.8845, 4.10),
    "Mo": FSParameters(4.114825, 1.887117, 0.0, 3.25, 43.4475218, -31.9332978, 6.0804249, 3.1472, 6.82),
    "W": FSParameters(4.400224, 1.896373, 0.0, 3.25, 47.1346499, -33.7665655, 6.2541999, 3.1652, 8.90),
    # Fe as corrected in the 1986 erratum (the 1984 set had d=3.699579, A=1.889846, c0=1.2110601,
    # c1=-0.7510840, c2=0.1380773; both give the same a0 and cohesive energy).
    "Fe": FSParameters(3.569745, 1.828905, 1.8, 3.4, 1.2371147, -0.3592185, -0.0385607, 2.8665, 4.28),
}  # fmt: skip
"""Finnis & Sinclair (1984), Table 1, with the erratum's Fe; a0 and cohesive energies as fitted."""

if tuple(FS1984) != FINNIS_SINCLAIR_ELEMENTS:  # pragma: no cover - a programming error
    raise AssertionError("FS1984 and config.reference.FINNIS_SINCLAIR_ELEMENTS disagree")


def fs_parameters(element: str | None, **overrides: float) -> dict[str, FSParameters]:
    """The parameter table for a calculator: one element (with ``overrides`` applied) or all.

    Raises:
        UserInputError: the element is not tabulated, or overrides are given without an element.
    """
    if element is None:
        if overrides:
            raise UserInputError(
                f"Finnis-Sinclair parameter overrides ({', '.join(sorted(overrides))}) need an "
                "element to apply to"
            )
        return dict(FS1984)
    if element not in FS1984:
        raise UserInputError(
            f"the Finnis-Sinclair reference does not tabulate {element} (it has "
            f"{', '.join(FS1984)})"
        )
    base = FS1984[element]
    if not overrides:
        return {element: base}
    # A changed parameter set no longer reproduces the published a0 and cohesive energy.
    return {
        element: dataclasses.replace(base, **overrides, a0=None, cohesive_energy=None),
    }


def _pair(p: FSParameters, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """V(r) and dV/dr (zero beyond c)."""
    x = np.where(r < p.c, r - p.c, 0.0)
    poly = p.c0 + r * (p.c1 + r * p.c2)
    dpoly = p.c1 + 2.0 * p.c2 * r
    return x * x * poly, x * (2.0 * poly + x * dpoly)


def _density(p: FSParameters, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """φ(r) and dφ/dr (zero beyond d and, for β > 1, below :attr:`FSParameters.phi_zero`)."""
    inside = (r < p.d) & (r > p.phi_zero)
    x = np.where(inside, r - p.d, 0.0)
    b = p.beta / p.d
    return x * x * (1.0 + b * x), x * (2.0 + 3.0 * b * x)


class FinnisSinclair(Calculator):
    """Finnis–Sinclair (1984) bcc metals: energy, free_energy, forces, stress.

    Args:
        parameters: the elements this calculator serves and their parameters (default: all of
            :data:`FS1984`). One element per structure: the 1984 potential defines no cross terms.
        **kwargs: passed to :class:`ase.calculators.calculator.Calculator` (e.g. ``label``).

    Raises (from ``calculate``):
        UserInputError: an element without parameters, or a structure mixing elements.
        PropertyNotImplementedError: stress of a structure whose cell does not span 3-D.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(self, parameters: Mapping[str, FSParameters] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.table: dict[str, FSParameters] = dict(FS1984 if parameters is None else parameters)
        if not self.table:
            raise ValueError("FinnisSinclair needs parameters for at least one element")

    @property
    def elements(self) -> set[str]:
        """Chemical symbols this calculator has parameters for."""
        return set(self.table)

    def _parameters_for(self, atoms: Atoms) -> FSParameters:
        present = sorted(set(atoms.get_chemical_symbols()))
        unknown = [s for s in present if s not in self.table]
        if unknown:
            raise UserInputError(
                f"the Finnis-Sinclair reference has no parameters for {', '.join(unknown)} "
                f"(it supports {', '.join(sorted(self.table))})"
            )
        if len(present) > 1:
            raise UserInputError(
                f"the Finnis-Sinclair reference treats one element at a time; this structure "
                f"mixes {', '.join(present)} (the 1984 potential defines no cross terms)"
            )
        return self.table[present[0]]

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | tuple[str, ...] = ("energy",),
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        assert self.atoms is not None  # set by Calculator.calculate
        atoms = self.atoms
        n = len(atoms)
        cell = np.asarray(atoms.cell[:], dtype=np.float64)
        full_cell = atoms.cell.rank == 3
        if "stress" in properties and not full_cell:
            raise PropertyNotImplementedError(
                "stress needs a cell spanning three dimensions; this structure's cell has rank "
                f"{atoms.cell.rank}"
            )
        if n == 0:
            self.results = {
                "energy": 0.0,
                "free_energy": 0.0,
                "energies": np.zeros(0),
                "forces": np.zeros((0, 3)),
            }
            if full_cell:
                self.results["stress"] = np.zeros(6)
            return
        p = self._parameters_for(atoms)

        from vesin import NeighborList

        positions = np.ascontiguousarray(atoms.positions, dtype=np.float64)
        # Full list: every pair appears as i -> j and j -> i; vec = r_j - r_i (+ periodic shift).
        i, j, vec = NeighborList(cutoff=p.cutoff, full_list=True).compute(
            positions, np.ascontiguousarray(cell), [bool(b) for b in atoms.pbc], quantities="ijD"
        )
        i = np.asarray(i, dtype=np.int64)
        j = np.asarray(j, dtype=np.int64)
        vec = np.asarray(vec, dtype=np.float64).reshape(-1, 3)
        r = np.linalg.norm(vec, axis=1)
        keep = r > 0.0  # an atom sitting on another's image would have no direction
        i, j, vec, r = i[keep], j[keep], vec[keep], r[keep]

        v, dv = _pair(p, r)
        phi, dphi = _density(p, r)
        rho = np.bincount(i, weights=phi, minlength=n)
        sqrt_rho = np.sqrt(np.maximum(rho, 0.0))
        embed = -p.A * sqrt_rho
        safe = np.where(sqrt_rho > 0.0, sqrt_rho, 1.0)
        dembed = np.where(sqrt_rho > 0.0, -0.5 * p.A / safe, 0.0)

        energies = embed + 0.5 * np.bincount(i, weights=v, minlength=n)
        # dE/d|r_ij| for the directed pair i -> j: half the pair term (the reverse pair carries
        # the other half) and the embedding of i through the density j lends it.
        g = 0.5 * dv + dembed[i] * dphi
        dedvec = (g / r)[:, None] * vec  # dE/d(vec_ij); vec_ij = r_j - r_i
        forces = np.zeros((n, 3))
        for k in range(3):
            forces[:, k] = np.bincount(i, weights=dedvec[:, k], minlength=n) - np.bincount(
                j, weights=dedvec[:, k], minlength=n
            )

        energy = float(energies.sum())
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "energies": energies,
            "forces": forces,
        }
        if full_cell:
            virial = vec.T @ dedvec  # Σ vec ⊗ dE/dvec = dE/dε (symmetric for central forces)
            sigma = 0.5 * (virial + virial.T) / atoms.get_volume()
            self.results["stress"] = sigma.flat[[0, 4, 8, 5, 2, 1]]
