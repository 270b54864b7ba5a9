"""Point defects and surfaces for `validate`: structures, relaxations, formation energies.

Formation energies are relative to the perfect supercell of the same calculator at its own
equilibrium lattice constant: E_f = E_defect − (n/N)·E_bulk(N) for a defect cell of n atoms cut
from (or added to) an N-atom perfect supercell (vacancy n = N − 1, divacancy N − 2, interstitial
N + 1). Surface energies: E_s = (E_slab − n·e_bulk)/(2A). All relaxations keep the cell fixed
(a dilute defect in a large cell; the slab's in-plane lattice is the bulk one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator

from mlipctl.data.crystals import build_crystal, supercell_for, vacancy_hop
from mlipctl.engines.validate_bulk import EV_A2_TO_J_M2, BulkState, energy_of
from mlipctl.errors import UserInputError


@dataclass(frozen=True)
class RelaxSettings:
    """How `validate` relaxes structures.

    Attributes:
        fmax: convergence threshold on the largest force, eV/Å.
        optimizer: ASE optimiser kind ('fire', 'lbfgs', 'bfgs') of :func:`relax_atoms`.
        max_steps: steps before a relaxation counts as not converged.
    """

    fmax: float = 0.01
    optimizer: str = "fire"
    max_steps: int = 2000


@dataclass
class DefectEnergy:
    """A relaxed defect cell.

    Attributes:
        name: e.g. 'vacancy', 'octahedral', 'dumbbell_100', 'divacancy'.
        atoms: relaxed structure with energy and forces in a SinglePointCalculator.
        energy: total energy, eV.
        formation_energy: E − (n/N)·E_bulk, eV.
        converged: the relaxation reached ``fmax`` within ``max_steps``.
        steps: optimiser steps.
        max_force: largest force at the end, eV/Å.
        displacement: largest displacement of an atom during the relaxation, Å (a defect that
            relaxed into another one shows up here).
        seconds: wall time.
    """

    name: str
    atoms: Atoms
    energy: float
    formation_energy: float
    converged: bool
    steps: int
    max_force: float
    displacement: float
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "formation_energy": self.formation_energy,
            "energy": self.energy,
            "n_atoms": len(self.atoms),
            "converged": self.converged,
            "steps": self.steps,
            "max_force": self.max_force,
            "max_displacement": self.displacement,
        }


def perfect_supercell(state: BulkState, min_atoms: int) -> Atoms:
    """Perfect periodic supercell (n×n×n conventional cells, ≥ ``min_atoms``) at ``state.a``."""
    reps = supercell_for(state.structure, min_atoms)
    atoms = build_crystal(
        state.element, state.structure, a=state.a, c_over_a=state.c_over_a, supercell=reps
    )
    atoms.info.pop("config_type", None)
    return atoms


def relax_defect(
    calc: Any,
    atoms: Atoms,
    name: str,
    bulk_energy: float,
    n_bulk: int,
    settings: RelaxSettings,
) -> DefectEnergy:
    """Relax a defect cell at fixed cell and return its formation energy.

    Args:
        calc: ASE calculator.
        atoms: unrelaxed defect cell.
        name: label of the defect.
        bulk_energy: energy of the perfect N-atom supercell, eV.
        n_bulk: N.
        settings: relaxation settings.
    """
    from mlipctl.engines.relax import relax_atoms

    t0 = time.perf_counter()
    res = relax_atoms(
        atoms,
        calc,
        optimizer=settings.optimizer,
        fmax=settings.fmax,
        max_steps=settings.max_steps,
    )
    moved = np.linalg.norm(res.atoms.positions - atoms.positions, axis=1)
    relaxed = res.atoms
    relaxed.info["defect"] = name
    return DefectEnergy(
        name=name,
        atoms=relaxed,
        energy=res.energy,
        formation_energy=res.energy - len(atoms) / n_bulk * bulk_energy,
        converged=res.converged,
        steps=res.steps,
        max_force=res.max_force,
        displacement=float(moved.max()),
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------------
# Defect structures
# --------------------------------------------------------------------------------------------


def vacancy_endpoints(perfect: Atoms) -> tuple[Atoms, Atoms, int]:
    """Initial and final states of the nearest-neighbour vacancy hop (vacancy at atom 0).

    In diamond the nearest-neighbour hop is the one that takes the vacancy from one sublattice
    to the other, the elementary step of vacancy diffusion there too.
    """
    initial, final, hop = vacancy_hop(perfect, 0)
    for s in (initial, final):
        s.info.pop("config_type", None)
    return initial, final, hop


def divacancy(perfect: Atoms) -> tuple[Atoms, tuple[int, int]]:
    """Perfect cell without atom 0 and its nearest neighbour; returns (atoms, removed sites)."""
    d = perfect.get_distances(0, list(range(len(perfect))), mic=True)
    d[0] = np.inf
    j = int(np.argmin(d))
    atoms = perfect.copy()
    del atoms[[0, j]]
    return atoms, (0, j)


# Interstitial configurations per structure: fractional sites of the conventional cell (hcp:
# ASE's orthorhombic cell) or dumbbells (pair replacing a host atom, along a direction).
_INTERSTITIALS: dict[str, dict[str, tuple[str, tuple[float, float, float]]]] = {
    "fcc": {"octahedral": ("site", (0.5, 0.5, 0.5)), "dumbbell_100": ("dumbbell", (0, 0, 1))},
    "hcp": {
        "octahedral": ("site", (0.0, 1.0 / 3.0, 0.25)),
        "dumbbell_100": ("dumbbell", (1, 0, 0)),  # basal split along a1 ([100] = <11-20>)
    },
    "bcc": {"dumbbell_110": ("dumbbell", (1, 1, 0))},
    "diamond": {
        "tetrahedral": ("site", (0.5, 0.5, 0.5)),
        "dumbbell_110": ("dumbbell", (1, 1, 0)),
    },
    "sc": {"cube_centre": ("site", (0.5, 0.5, 0.5)), "dumbbell_100": ("dumbbell", (0, 0, 1))},
}

DUMBBELL_SEPARATION = 0.8
"""Initial dumbbell bond length in units of the nearest-neighbour distance (relaxed anyway)."""


def interstitial_names(structure: str) -> list[str]:
    """Interstitial configurations computed for a crystal structure."""
    if structure not in _INTERSTITIALS:
        raise UserInputError(f"no interstitial configurations known for {structure}")
    return list(_INTERSTITIALS[structure])


def interstitial(state: BulkState, perfect: Atoms, name: str) -> Atoms:
    """The perfect supercell with one extra atom in configuration ``name``.

    Sites are placed in the conventional cell at the middle of the supercell; a dumbbell
    replaces the host atom nearest the middle by a pair centred on its site.
    """
    kind, where = _INTERSTITIALS[state.structure][name]
    atoms = perfect.copy()
    unit = state.unit()
    reps = np.rint(np.linalg.norm(perfect.cell[:], axis=1) / np.linalg.norm(unit.cell[:], axis=1))
    middle = np.floor(reps / 2)
    if kind == "site":
        pos = ((np.asarray(where) + middle) / reps) @ perfect.cell[:]
        atoms += Atoms([state.element], positions=[pos])
        return atoms
    centre = (middle / reps) @ perfect.cell[:]
    k = int(np.argmin(np.linalg.norm(atoms.positions - centre, axis=1)))
    d = atoms.get_distances(k, list(range(len(atoms))), mic=True)
    d[k] = np.inf
    u = np.asarray(where, dtype=np.float64)
    half = 0.5 * DUMBBELL_SEPARATION * float(d.min()) * u / np.linalg.norm(u)
    site = atoms.positions[k].copy()
    del atoms[k]
    atoms += Atoms([state.element] * 2, positions=[site - half, site + half])
    return atoms


# --------------------------------------------------------------------------------------------
# Surfaces
# --------------------------------------------------------------------------------------------

SLAB_MIN_THICKNESS = 12.0
"""Å of material between the outermost atomic planes (both surfaces decoupled for metals)."""

SLAB_VACUUM = 10.0
"""Å of vacuum on each side (more than any short-ranged potential's cutoff)."""


def default_millers(structure: str) -> list[tuple[int, int, int]]:
    """(100), (110), (111) for cubic crystals; (0001) for hcp (Miller (001) of ASE's cell)."""
    return [(0, 0, 1)] if structure == "hcp" else [(1, 0, 0), (1, 1, 0), (1, 1, 1)]


def surface_label(structure: str, miller: tuple[int, int, int]) -> str:
    if structure == "hcp" and tuple(miller) == (0, 0, 1):
        return "0001"
    return "".join(str(i) for i in miller)


def surface_slab(state: BulkState, miller: tuple[int, int, int], min_atoms: int = 1) -> Atoms:
    """Slab of the equilibrium crystal, ≥ 12 Å thick, 10 Å vacuum each side, periodic in 3D."""
    from mlipctl.data.generate import build_slab

    slab, _, _ = build_slab(state.unit(), miller, SLAB_MIN_THICKNESS, SLAB_VACUUM, min_atoms)
    slab.info["miller"] = surface_label(state.structure, miller)
    return slab


@dataclass
class SurfaceEnergy:
    """A relaxed slab and its surface energy."""

    label: str
    relaxed: DefectEnergy
    area: float
    energy_j_m2: float
    unrelaxed_j_m2: float

    def summary(self) -> dict[str, Any]:
        return {
            "surface_energy_j_m2": self.energy_j_m2,
            "unrelaxed_j_m2": self.unrelaxed_j_m2,
            "area_a2": self.area,
            "n_atoms": len(self.relaxed.atoms),
            "converged": self.relaxed.converged,
            "steps": self.relaxed.steps,
            "max_force": self.relaxed.max_force,
        }


def surface_energy(
    calc: BaseCalculator, slab: Atoms, label: str, e_bulk: float, settings: RelaxSettings
) -> SurfaceEnergy:
    """Relaxed surface energy (J/m²) of a symmetric slab: (E_slab − n·e_bulk)/(2A)."""
    area = float(np.linalg.norm(np.cross(slab.cell[0], slab.cell[1])))
    n = len(slab)
    e0 = energy_of(calc, slab)
    # relax_defect's formation energy with E_bulk(N = n) = n·e_bulk is exactly E_slab − n·e_bulk.
    relaxed = relax_defect(calc, slab, f"surface_{label}", n * e_bulk, n, settings)
    return SurfaceEnergy(
        label=label,
        relaxed=relaxed,
        area=area,
        energy_j_m2=relaxed.formation_energy / (2 * area) * EV_A2_TO_J_M2,
        unrelaxed_j_m2=(e0 - n * e_bulk) / (2 * area) * EV_A2_TO_J_M2,
    )
