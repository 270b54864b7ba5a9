"""Candidate structures for a training set (`mlipctl generate`).

Generators: strained bulk (EOS scan, random elastic strains), rattled bulk, vacancies and hops,
interstitials, surface slabs, reference-driven MD snapshots and melt-quenched cells. Every structure
carries ``info["config_type"]`` and ``info["provenance"]`` (compact JSON: generator, system, seed and
the parameters that made it) and no labels: labelling is `mlipctl label`'s job.

Randomness: each (system, generator) pair draws from its own stream seeded by
``(seed, crc32(system label), generator id)``, so switching one generator off, or adding a system,
leaves the others' structures unchanged. Each pair's output is cached in ``output/.generate-parts``
(named by a hash of everything it depends on) so ``resume=True`` skips finished pairs.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from mlipctl.config.generate import (
    AmorphousConfig,
    GenerateConfig,
    GenerateCrystalSystem,
    GenerateFileSystem,
    InterstitialConfig,
    MDSnapshotsConfig,
    RattleConfig,
    StrainConfig,
    SurfaceConfig,
    VacancyConfig,
)
from mlipctl.errors import UserInputError

# Experimental melting points (K, CRC Handbook), used to scale MD temperatures.
MELTING_POINTS_K: dict[str, float] = {
    "Li": 453.65,
    "Na": 370.94,
    "K": 336.7,
    "Be": 1560.0,
    "Mg": 923.0,
    "Al": 933.47,
    "Si": 1687.0,
    "Ti": 1941.0,
    "V": 2183.0,
    "Cr": 2180.0,
    "Fe": 1811.0,
    "Co": 1768.0,
    "Ni": 1728.0,
    "Cu": 1357.77,
    "Zn": 692.68,
    "Ge": 1211.40,
    "Zr": 2128.0,
    "Nb": 2750.0,
    "Mo": 2896.0,
    "Pd": 1828.05,
    "Ag": 1234.93,
    "Sn": 505.08,
    "Ta": 3290.0,
    "W": 3695.0,
    "Pt": 2041.4,
    "Au": 1337.33,
    "Pb": 600.61,
}

GENERATORS = ("strain", "rattle", "vacancy", "interstitial", "surface", "md", "amorphous")
"""Generator names, in output order; each is a block of :class:`GenerateConfig`."""

# Which generators call the reference calculator (and so need it to support the elements).
_USES_REFERENCE = {"md", "amorphous"}

# Fractional interstitial sites in the conventional cell (hcp: ASE's orthorhombic 4-atom cell).
_SITES: dict[str, dict[str, tuple[float, float, float]]] = {
    "fcc": {"octahedral": (0.5, 0.5, 0.5), "tetrahedral": (0.25, 0.25, 0.25)},
    "bcc": {"octahedral": (0.5, 0.5, 0.0), "tetrahedral": (0.5, 0.25, 0.0)},
    "diamond": {"tetrahedral": (0.5, 0.5, 0.5), "hexagonal": (0.625, 0.625, 0.625)},
    "hcp": {"octahedral": (0.0, 1.0 / 3.0, 0.25), "tetrahedral": (0.0, 0.0, 0.375)},
}
_DUMBBELLS = {"dumbbell_100": (1, 0, 0), "dumbbell_110": (1, 1, 0), "dumbbell_111": (1, 1, 1)}
_DEFAULT_SITES: dict[str | None, list[str]] = {
    "fcc": ["octahedral", "tetrahedral", "dumbbell_100", "dumbbell_110"],
    "bcc": ["octahedral", "tetrahedral", "dumbbell_110", "dumbbell_111"],
    "hcp": ["octahedral", "tetrahedral"],
    "diamond": ["tetrahedral", "hexagonal", "dumbbell_110"],
    "sc": ["void", "dumbbell_100"],
    None: ["void"],
}
_CUBIC = {"fcc", "bcc", "sc", "diamond"}


@dataclass(frozen=True)
class System:
    """A system resolved from its config: the unit cell at the lattice parameter used.

    Attributes:
        label: short name used in provenance, e.g. 'Cu-fcc'.
        structure: crystal kind, or None for a cell read from a file.
        unit: conventional (hcp: orthorhombic) periodic cell, (n_unit,) atoms.
        nn_distance: nearest-neighbour distance of ``unit``, Å.
        melting_point_k: melting point, K, or None when unknown.
        lattice: how the cell size was chosen: {'source': 'config'|'fitted'|'tabulated'|'file',
            'volume_per_atom': Å³, 'a': Å for crystals}.
    """

    label: str
    structure: str | None
    unit: Atoms
    nn_distance: float
    melting_point_k: float | None
    lattice: dict[str, Any]


@dataclass
class _Context:
    """What every generator gets besides its own config block."""

    system: System
    rng: np.random.Generator
    seed: int
    min_distance: float
    make_calc: Callable[[], Any]
    tick: Callable[[int], None]
    notes: list[str]


# --------------------------------------------------------------------------- helpers


def _clean(atoms: Atoms, config_type: str, provenance: dict[str, Any]) -> Atoms:
    """A bare copy (no calculator, velocities or stray info) tagged with type and provenance."""
    out = Atoms(
        numbers=atoms.numbers.copy(),
        positions=atoms.positions.copy(),
        cell=atoms.cell[:].copy(),
        pbc=atoms.pbc.copy(),
    )
    out.info["config_type"] = config_type
    out.info["provenance"] = json.dumps(provenance, separators=(",", ":"), sort_keys=True)
    return out


def _round(x: Any) -> Any:
    """Provenance numbers to 6 significant digits (short lines, still exact enough to redo)."""
    if isinstance(x, float | np.floating):
        return float(f"{float(x):.6g}")
    if isinstance(x, list | tuple | np.ndarray):
        return [_round(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    return x


def min_distance(atoms: Atoms, cutoff: float) -> float:
    """Smallest interatomic distance (periodic images included) below ``cutoff``, else inf."""
    from mlipctl.data.neighbors import edge_vectors, neighbor_pairs

    pairs = neighbor_pairs(atoms, cutoff)
    if len(pairs[0]) == 0:
        return math.inf
    return float(np.min(np.linalg.norm(edge_vectors(atoms, pairs), axis=1)))


def _rattle(atoms: Atoms, std: float, ctx: _Context, tries: int = 25) -> Atoms:
    """Gaussian displacements, redrawn while any pair ends up closer than ``ctx.min_distance``."""
    if std == 0:
        return atoms.copy()
    for _ in range(tries):
        trial = atoms.copy()
        trial.positions += ctx.rng.normal(0.0, std, size=trial.positions.shape)
        if min_distance(trial, ctx.min_distance) >= ctx.min_distance:
            return trial
    raise UserInputError(
        f"{ctx.system.label}: displacements of std {std} Å keep bringing atoms closer than "
        f"{ctx.min_distance:.2f} Å ({tries} draws); lower the rattle amplitude or "
        "min_distance_ratio"
    )


def _perp_heights(cell: np.ndarray) -> np.ndarray:
    """Distances between opposite faces of a cell, (3,) Å."""
    vol = abs(np.linalg.det(cell))
    return np.array(
        [vol / np.linalg.norm(np.cross(cell[(i + 1) % 3], cell[(i + 2) % 3])) for i in range(3)]
    )


def supercell_reps(system: System, min_atoms: int) -> tuple[int, int, int]:
    """Repetitions of the unit cell with at least ``min_atoms`` atoms.

    Cubic crystals repeat n×n×n (cubic supercells); hcp and file cells grow the thinnest
    direction first so the supercell stays as close to isotropic as the cell allows.
    """
    n_unit = len(system.unit)
    if system.structure in _CUBIC:
        n = max(1, math.ceil((min_atoms / n_unit) ** (1 / 3) - 1e-9))
        return (n, n, n)
    reps = np.ones(3, dtype=int)
    heights = _perp_heights(system.unit.cell[:])
    while n_unit * int(np.prod(reps)) < min_atoms:
        reps[int(np.argmin(reps * heights))] += 1
    return (int(reps[0]), int(reps[1]), int(reps[2]))


def _supercell(system: System, min_atoms: int) -> tuple[Atoms, tuple[int, int, int]]:
    reps = supercell_reps(system, min_atoms)
    return system.unit.repeat(reps), reps


def _check_finite(atoms: Atoms, what: str, label: str) -> None:
    forces = atoms.get_forces()
    if not (np.all(np.isfinite(forces)) and np.all(np.isfinite(atoms.positions))):
        raise UserInputError(
            f"{label}: the reference calculator returned non-finite forces or positions during "
            f"{what}; check the reference and the structure"
        )


# --------------------------------------------------------------------------- systems


def _melting_point(symbols: list[str], given: float | None) -> float | None:
    if given is not None:
        return given
    species = sorted(set(symbols))
    if len(species) == 1:
        return MELTING_POINTS_K.get(species[0])
    return None


def equilibrium_scale(unit: Atoms, make_calc: Callable[[], Any], *, span: float = 0.03) -> float:
    """Isotropic scale factor that puts ``unit`` at the calculator's equilibrium volume.

    Energies on 7 scales within ±``span`` (linear) are fitted with a Birch–Murnaghan EOS; the
    window moves (up to 4 times) while the lowest energy sits at its edge.
    """
    from ase.eos import EquationOfState

    centre = 1.0
    v_ref = unit.get_volume()
    for _ in range(5):
        scales = centre * (1.0 + np.linspace(-span, span, 7))
        energies = []
        for s in scales:
            trial = unit.copy()
            trial.set_cell(unit.cell[:] * s, scale_atoms=True)
            trial.calc = make_calc()
            energies.append(trial.get_potential_energy())
        energies_arr = np.asarray(energies)
        if not np.all(np.isfinite(energies_arr)):
            raise UserInputError("the reference returned non-finite energies in the lattice fit")
        k = int(np.argmin(energies_arr))
        if 0 < k < len(scales) - 1:
            volumes = v_ref * scales**3
            try:
                v0, _, _ = EquationOfState(volumes, energies_arr, eos="birchmurnaghan").fit()
            except Exception as exc:  # ASE raises several types when a fit fails
                raise UserInputError(f"EOS fit of the unit cell failed: {exc}") from None
            return float((v0 / v_ref) ** (1 / 3))
        centre = float(scales[k])
    raise UserInputError(
        "the reference's equilibrium volume is more than 15 % away from the starting lattice "
        "constant; set lattice_constant explicitly (or fit_lattice: false)"
    )


def resolve_system(
    cfg: GenerateCrystalSystem | GenerateFileSystem,
    *,
    make_calc: Callable[[], Any] | None = None,
    allowed_elements: set[str] | None = None,
    reference_name: str = "reference",
) -> System:
    """Build the unit cell of one system.

    Args:
        cfg: the system's config.
        make_calc: reference calculator factory; given, a cell without an explicit lattice
            constant is scaled to the reference's equilibrium volume.
        allowed_elements: elements the reference can treat (None: no limit known).
        reference_name: names the reference in error messages.

    Raises:
        UserInputError: unreadable or non-periodic file, unknown crystal, element the reference
            cannot treat, failed fit.
    """
    from mlipctl.data.crystals import nearest_neighbor_distance, reference_structure, unit_cell

    lattice: dict[str, Any]
    if isinstance(cfg, GenerateCrystalSystem):
        structure = cfg.structure or reference_structure(cfg.element)[0]
        unit = unit_cell(cfg.element, structure, cfg.lattice_constant, cfg.c_over_a)
        source = "config" if cfg.lattice_constant is not None else "tabulated"
        label = f"{cfg.element}-{structure}"
    else:
        from mlipctl.data.sources import read_frames

        frames = read_frames(str(cfg.path), cfg.index, cfg.format)
        if len(frames) != 1:
            raise UserInputError(
                f"system file {cfg.path}: index {cfg.index!r} selects {len(frames)} frames; "
                "select one unit cell, e.g. index: '-1'"
            )
        src = frames[0]
        if not src.pbc.all() or abs(src.get_volume()) < 1e-6:
            raise UserInputError(
                f"system file {cfg.path}: the cell must be periodic in 3D with a non-zero volume "
                f"(pbc={src.pbc.tolist()})"
            )
        unit = Atoms(numbers=src.numbers, positions=src.positions, cell=src.cell, pbc=True)
        unit.wrap()
        structure = None
        source = "file"
        label = cfg.label()
    if allowed_elements is not None:
        missing = sorted(set(unit.get_chemical_symbols()) - allowed_elements)
        if missing:
            raise UserInputError(
                f"reference '{reference_name}' cannot treat {', '.join(missing)} (system "
                f"{label}); it supports {', '.join(sorted(allowed_elements))}. Choose another "
                "reference, or switch off md, amorphous, interstitial relaxation and fit_lattice"
            )
    if source in ("tabulated", "file") and make_calc is not None:
        unit.set_cell(unit.cell[:] * equilibrium_scale(unit, make_calc), scale_atoms=True)
        source = "fitted"
    nn = (
        min(nearest_neighbor_distance(unit, i) for i in range(len(unit)))
        if len(unit) > 1
        else min_distance(unit.repeat(2), 10.0)
    )
    if not math.isfinite(nn) or nn < 0.5:
        raise UserInputError(f"{label}: nearest-neighbour distance {nn:.3f} Å is not physical")
    lattice = {"source": source, "volume_per_atom": _round(unit.get_volume() / len(unit))}
    if structure is not None:
        lattice["a"] = _round(float(np.linalg.norm(unit.cell[0])))
    return System(
        label=label,
        structure=structure,
        unit=unit,
        nn_distance=float(nn),
        melting_point_k=_melting_point(unit.get_chemical_symbols(), cfg.melting_point_k),
        lattice=lattice,
    )


# --------------------------------------------------------------------------- generators


def gen_strain(cfg: StrainConfig, ctx: _Context) -> list[Atoms]:
    """EOS scan (isotropic volume changes) and random symmetric strains of the bulk supercell."""
    base, reps = _supercell(ctx.system, cfg.min_atoms)
    out = []
    for v in np.linspace(1 - cfg.volume_range, 1 + cfg.volume_range, cfg.n_volumes):
        atoms = base.copy()
        atoms.set_cell(base.cell[:] * v ** (1 / 3), scale_atoms=True)
        atoms = _rattle(atoms, cfg.rattle, ctx)
        prov = {"volume_ratio": v, "rattle": cfg.rattle, "reps": reps}
        out.append(_tag(atoms, "bulk_eos", "strain", prov, ctx))
        ctx.tick(1)
    for _ in range(cfg.n_shears):
        voigt = ctx.rng.uniform(-cfg.max_strain, cfg.max_strain, size=6)
        eps = np.array(
            [
                [voigt[0], voigt[5], voigt[4]],
                [voigt[5], voigt[1], voigt[3]],
                [voigt[4], voigt[3], voigt[2]],
            ]
        )
        atoms = base.copy()
        # Row-vector cells: r' = r (I + ε)ᵀ and ε is symmetric.
        atoms.set_cell(base.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
        atoms = _rattle(atoms, cfg.rattle, ctx)
        prov = {"strain_voigt": voigt, "rattle": cfg.rattle, "reps": reps}
        out.append(_tag(atoms, "bulk_strain", "strain", prov, ctx))
        ctx.tick(1)
    return out


def gen_rattle(cfg: RattleConfig, ctx: _Context) -> list[Atoms]:
    """Bulk with Gaussian displacements at each amplitude and a small random volume change."""
    base, reps = _supercell(ctx.system, cfg.min_atoms)
    out = []
    for amp in cfg.amplitudes:
        for _ in range(cfg.n_per_amplitude):
            v = 1.0 + ctx.rng.uniform(-cfg.volume_jitter, cfg.volume_jitter)
            atoms = base.copy()
            atoms.set_cell(base.cell[:] * v ** (1 / 3), scale_atoms=True)
            atoms = _rattle(atoms, amp, ctx)
            prov = {"rattle": amp, "volume_ratio": v, "reps": reps}
            out.append(_tag(atoms, "bulk_rattle", "rattle", prov, ctx))
            ctx.tick(1)
    return out


def gen_vacancy(cfg: VacancyConfig, ctx: _Context) -> list[Atoms]:
    """Rattled single vacancies, and snapshots along nearest-neighbour hops (see ``hop_path``)."""
    from mlipctl.data.crystals import vacancy_hop

    host, reps = _supercell(ctx.system, cfg.min_atoms)
    out = []
    for _ in range(cfg.n_rattled):
        site = int(ctx.rng.integers(len(host)))
        atoms = host.copy()
        del atoms[site]
        atoms = _rattle(atoms, cfg.rattle, ctx)
        prov = {"site": site, "rattle": cfg.rattle, "reps": reps}
        out.append(_tag(atoms, "vacancy", "vacancy", prov, ctx))
        ctx.tick(1)
    hop_sizes = cfg.hop_min_atoms or [cfg.min_atoms]
    for i_hop in range(cfg.n_hops):
        hop_host, hop_reps = _supercell(ctx.system, hop_sizes[i_hop % len(hop_sizes)])
        site = int(ctx.rng.integers(len(hop_host)))
        initial, final, hop = vacancy_hop(hop_host, site)
        base = {"site": site, "hop_atom": hop, "reps": hop_reps}
        if cfg.hop_path == "neb":
            images, steps = _reference_band(initial, final, cfg.hop_images, ctx)
            prov = {**base, "relaxed": True, "neb_steps": steps}
            out.append(_tag(images[0], "vacancy", "vacancy", prov, ctx))
            for k, atoms in enumerate(images[1:-1], start=1):
                prov = {**base, "neb_image": k, "neb_steps": steps}
                out.append(_tag(atoms, "vacancy_hop", "vacancy", prov, ctx))
                for _ in range(cfg.hop_rattled):
                    rattled = _rattle(atoms, cfg.rattle, ctx)
                    out.append(
                        _tag(rattled, "vacancy_hop", "vacancy", {**prov, "rattle": cfg.rattle}, ctx)
                    )
        else:
            for t in np.linspace(0.0, 1.0, cfg.hop_images + 2)[1:-1]:
                atoms = initial.copy()
                atoms.positions = (1 - t) * initial.positions + t * final.positions
                atoms = _rattle(atoms, cfg.rattle, ctx)
                prov = {**base, "fraction": t, "rattle": cfg.rattle}
                out.append(_tag(atoms, "vacancy_hop", "vacancy", prov, ctx))
        ctx.tick(1)
    return out


def _reference_band(
    initial: Atoms, final: Atoms, n_images: int, ctx: _Context
) -> tuple[list[Atoms], int]:
    """End points relaxed and a CI-NEB band converged with the reference (fmax 0.05 eV/Å).

    Training data only needs the band near the minimum-energy path, not a converged barrier:
    a loose tolerance and a step cap keep this cheap. Returns the n_images + 2 structures
    (without calculators) and the NEB steps taken.
    """
    from ase.mep import NEB
    from ase.optimize import FIRE

    ends = []
    for state in (initial, final):
        atoms = state.copy()
        atoms.calc = ctx.make_calc()
        FIRE(atoms, logfile=None, maxstep=0.1).run(fmax=0.05, steps=300)
        _check_finite(atoms, "the vacancy end-point relaxation", ctx.system.label)
        ends.append(atoms)
    band = [ends[0]] + [ends[0].copy() for _ in range(n_images)] + [ends[1]]
    for image in band[1:-1]:
        image.calc = ctx.make_calc()
    neb = NEB(band, climb=True, method="improvedtangent", allow_shared_calculator=False)
    neb.interpolate(method="idpp", mic=True)
    opt = FIRE(neb, logfile=None, maxstep=0.1)
    opt.run(fmax=0.05, steps=300)
    for image in band[1:-1]:
        _check_finite(image, "the vacancy-hop NEB", ctx.system.label)
    images = []
    for image in band:
        clean = image.copy()
        clean.calc = None
        images.append(clean)
    return images, int(opt.nsteps)


def interstitial_sites(system: System, requested: list[str] | None) -> list[str]:
    """Site names for ``system`` (defaults by structure); unknown ones raise UserInputError."""
    sites = list(requested) if requested is not None else _DEFAULT_SITES[system.structure]
    allowed = set(_SITES.get(system.structure or "", {})) | {"void"}
    if system.structure in _CUBIC:
        allowed |= set(_DUMBBELLS)
    bad = [s for s in sites if s not in allowed]
    if bad:
        raise UserInputError(
            f"{system.label}: interstitial site(s) {', '.join(bad)} not available for "
            f"{system.structure or 'a file cell'}; available: {', '.join(sorted(allowed))}"
        )
    return sites


def largest_void(unit: Atoms, spacing: float = 0.2) -> np.ndarray:
    """Fractional position in ``unit`` farthest from every atom (grid search), (3,)."""
    cell = unit.cell[:]
    n = np.maximum(4, np.ceil(np.linalg.norm(cell, axis=1) / spacing).astype(int))
    grid = np.stack(np.meshgrid(*(np.arange(k) / k for k in n), indexing="ij"), axis=-1).reshape(
        -1, 3
    )
    frac_atoms = unit.get_scaled_positions(wrap=True)
    shifts = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)])
    images = (frac_atoms[None, :, :] + shifts[:, None, :]).reshape(-1, 3) @ cell
    best = np.empty(len(grid))
    for start in range(0, len(grid), 4096):  # chunks keep the distance matrix small
        pts = grid[start : start + 4096] @ cell
        d2 = ((pts[:, None, :] - images[None, :, :]) ** 2).sum(-1)
        best[start : start + 4096] = d2.min(axis=1)
    return grid[int(np.argmax(best))]


def insert_interstitial(
    system: System,
    host: Atoms,
    reps: tuple[int, int, int],
    site: str,
    dumbbell_separation: float = 0.8,
) -> Atoms:
    """Host supercell with one extra atom of the host's majority species at ``site``.

    Octahedral/tetrahedral/hexagonal/void sites are placed in the unit cell nearest the middle of
    the supercell; a dumbbell replaces the atom nearest the middle by a pair along <hkl>.
    """
    symbols = host.get_chemical_symbols()
    species = Counter(symbols).most_common(1)[0][0]
    atoms = host.copy()
    centre = 0.5 * atoms.cell[:].sum(axis=0)
    if site in _DUMBBELLS:
        direction = np.asarray(_DUMBBELLS[site], dtype=float)
        direction /= np.linalg.norm(direction)
        d = np.linalg.norm(atoms.positions - centre, axis=1)
        k = int(np.argmin(d))
        mid = atoms.positions[k].copy()
        species = symbols[k]
        del atoms[k]
        half = 0.5 * dumbbell_separation * system.nn_distance * direction
        atoms += Atoms([species, species], positions=[mid - half, mid + half])
        return atoms
    frac = (
        np.asarray(_SITES[system.structure][site]) if site != "void" else largest_void(system.unit)
    )
    middle = np.asarray(reps) // 2
    pos = ((frac + middle) / np.asarray(reps)) @ atoms.cell[:]
    atoms += Atoms([species], positions=[pos])
    return atoms


def gen_interstitial(cfg: InterstitialConfig, ctx: _Context) -> list[Atoms]:
    """Each site: unrelaxed structure, then snapshots along a short FIRE relaxation, rattled."""
    from ase.optimize import FIRE

    host, reps = _supercell(ctx.system, cfg.min_atoms)
    out = []
    for site in interstitial_sites(ctx.system, cfg.sites):
        atoms = insert_interstitial(ctx.system, host, reps, site, cfg.dumbbell_separation)
        path = [atoms.positions.copy()]
        if cfg.relax_steps > 0 and (cfg.n_per_site > 1 or not cfg.include_unrelaxed):
            atoms.calc = ctx.make_calc()
            _check_finite(atoms, f"the {site} interstitial relaxation", ctx.system.label)
            opt = FIRE(atoms, logfile=None, maxstep=0.1)
            for _ in opt.irun(fmax=0.02, steps=cfg.relax_steps):
                path.append(atoms.positions.copy())
            _check_finite(atoms, f"the {site} interstitial relaxation", ctx.system.label)
            path = path[1:]  # irun yields before its first step too: drop the duplicate start
        last = len(path) - 1  # FIRE may converge before relax_steps
        first = 0 if cfg.include_unrelaxed or last == 0 else last / max(cfg.n_per_site, 1)
        picks = np.round(np.linspace(first, last, cfg.n_per_site)).astype(int)
        for k in picks:
            snap = atoms.copy()
            snap.calc = None
            snap.positions = path[k]
            snap = _rattle(snap, cfg.rattle, ctx)
            prov = {"site": site, "relax_step": int(k), "rattle": cfg.rattle, "reps": reps}
            out.append(_tag(snap, "interstitial", "interstitial", prov, ctx))
        ctx.tick(1)
    return out


def default_millers(system: System) -> list[tuple[int, int, int]]:
    if system.structure in _CUBIC:
        return [(1, 0, 0), (1, 1, 0), (1, 1, 1)]
    return [(0, 0, 1)]


def build_slab(
    unit: Atoms, miller: tuple[int, int, int], min_thickness: float, vacuum: float, min_atoms: int
) -> tuple[Atoms, int, tuple[int, int]]:
    """Periodic slab at least ``min_thickness`` Å thick with ``vacuum`` Å on each side.

    Returns:
        (slab, layers, (nx, ny)) with ``layers`` as counted by :func:`ase.build.surface`.
    """
    from ase.build import surface

    for layers in range(1, 200):
        slab = surface(unit, miller, layers, vacuum=None, periodic=True)
        # ase 3.29 can leave an atom of the bottom plane at fractional height 1.0 instead of 0;
        # centring would then put it one period above the slab.
        slab.wrap(eps=1e-6)
        z = slab.positions[:, 2]
        if np.ptp(z) >= min_thickness:
            break
    else:  # pragma: no cover - only for absurd thicknesses
        raise UserInputError(f"cannot build a {min_thickness} Å slab for {miller}")
    lengths = np.linalg.norm(slab.cell[:2], axis=1)
    nx = ny = 1
    while len(slab) * nx * ny < min_atoms:
        if nx * lengths[0] <= ny * lengths[1]:
            nx += 1
        else:
            ny += 1
    slab = slab.repeat((nx, ny, 1))
    slab.center(vacuum=vacuum, axis=2)
    slab.pbc = True
    return slab, layers, (nx, ny)


def gen_surface(cfg: SurfaceConfig, ctx: _Context) -> list[Atoms]:
    """Rattled slabs for each Miller index."""
    out = []
    for miller in cfg.millers or default_millers(ctx.system):
        slab, layers, lateral = build_slab(
            ctx.system.unit, tuple(miller), cfg.min_thickness, cfg.vacuum, cfg.min_atoms
        )
        for _ in range(cfg.n_per_surface):
            atoms = _rattle(slab, cfg.rattle, ctx)
            prov = {
                "miller": list(miller),
                "layers": layers,
                "lateral": lateral,
                "vacuum": cfg.vacuum,
                "rattle": cfg.rattle,
            }
            out.append(_tag(atoms, "surface", "surface", prov, ctx))
        ctx.tick(1)
    return out


def _temperatures(cfg: MDSnapshotsConfig, system: System) -> list[float]:
    if cfg.temperatures_k is not None:
        return list(cfg.temperatures_k)
    if system.melting_point_k is None:
        raise UserInputError(
            f"{system.label}: no melting point known; set melting_point_k on the system or "
            "md.temperatures_k"
        )
    return [h * system.melting_point_k for h in cfg.homologous_temperatures]


def _langevin(
    atoms: Atoms,
    timestep_fs: float,
    temperature_k: float,
    friction_per_ps: float,
    rng: np.random.Generator,
) -> Any:
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin

    atoms.set_constraint(FixCom())
    # fixcm=False with a FixCom constraint samples NVT correctly (ASE >= 3.28 advice).
    return Langevin(
        atoms,
        timestep_fs * units.fs,
        temperature_K=temperature_k,
        friction=friction_per_ps / (1000.0 * units.fs),
        fixcm=False,
        rng=rng,
    )


def _init_velocities(atoms: Atoms, temperature_k: float, rng: np.random.Generator) -> None:
    from ase.md import velocitydistribution as vd

    thermalize = getattr(vd, "thermalize_momenta", None)  # ASE >= 3.29; older: the old name
    if thermalize is not None:
        thermalize(atoms, temperature_K=temperature_k, rng=rng)
    else:  # pragma: no cover - ASE < 3.29
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
    vd.Stationary(atoms)


def _md_ok(atoms: Atoms, ctx: _Context, what: str) -> bool:
    """Whether an MD frame is sane; blown-up frames are noted and skipped, never kept."""
    _check_finite(atoms, what, ctx.system.label)
    d = min_distance(atoms, ctx.min_distance)
    if d < ctx.min_distance:
        ctx.notes.append(
            f"{ctx.system.label}: skipped a {what} frame with atoms {d:.2f} Å apart (< "
            f"{ctx.min_distance:.2f} Å): the reference MD is unstable there"
        )
        return False
    return True


def gen_md(cfg: MDSnapshotsConfig, ctx: _Context) -> list[Atoms]:
    """Langevin MD with the reference at each temperature; snapshots at fixed intervals."""
    base, reps = _supercell(ctx.system, cfg.min_atoms)
    out = []
    for temp in _temperatures(cfg, ctx.system):
        atoms = base.copy()
        atoms.calc = ctx.make_calc()
        _init_velocities(atoms, temp, ctx.rng)
        dyn = _langevin(atoms, cfg.timestep_fs, temp, cfg.friction_per_ps, ctx.rng)
        dyn.run(cfg.equilibration_steps)
        ctx.tick(cfg.equilibration_steps)
        for k in range(cfg.n_snapshots):
            dyn.run(cfg.interval_steps)
            ctx.tick(cfg.interval_steps)
            if not _md_ok(atoms, ctx, f"MD at {temp:.0f} K"):
                continue
            step = cfg.equilibration_steps + (k + 1) * cfg.interval_steps
            prov = {
                "temperature_k": temp,
                "instant_temperature_k": atoms.get_temperature(),
                "step": step,
                "timestep_fs": cfg.timestep_fs,
                "reps": reps,
            }
            out.append(_tag(atoms, "md", "md", prov, ctx))
    return out


def gen_amorphous(cfg: AmorphousConfig, ctx: _Context) -> list[Atoms]:
    """Melt at melt_homologous·Tm, then ramp linearly to quench_homologous·Tm; snapshots."""
    if ctx.system.melting_point_k is None:
        raise UserInputError(
            f"{ctx.system.label}: no melting point known for the melt-quench; set "
            "melting_point_k on the system"
        )
    tm = ctx.system.melting_point_k
    t_melt, t_end = cfg.melt_homologous * tm, cfg.quench_homologous * tm
    base, reps = _supercell(ctx.system, cfg.n_atoms)
    v_atom = cfg.volume_scale * ctx.system.unit.get_volume() / len(ctx.system.unit)
    melt_at = _spread(cfg.melt_steps // 2, cfg.melt_steps, cfg.n_melt_snapshots)
    quench_at = _spread(
        cfg.quench_steps // max(cfg.n_quench_snapshots, 1), cfg.quench_steps, cfg.n_quench_snapshots
    )
    out = []
    for run in range(cfg.n_runs):
        atoms = base.copy()
        del atoms[ctx.rng.choice(len(base), len(base) - cfg.n_atoms, replace=False)]
        scale = (cfg.n_atoms * v_atom / base.get_volume()) ** (1 / 3)
        atoms.set_cell(base.cell[:] * scale, scale_atoms=True)
        atoms.calc = ctx.make_calc()
        _init_velocities(atoms, t_melt, ctx.rng)
        dyn = _langevin(atoms, cfg.timestep_fs, t_melt, cfg.friction_per_ps, ctx.rng)
        common = {
            "run": run,
            "n_atoms": cfg.n_atoms,
            "volume_scale": cfg.volume_scale,
            "timestep_fs": cfg.timestep_fs,
            "reps": reps,
        }
        done = 0
        for step in melt_at:
            dyn.run(step - done)
            done = step
            if _md_ok(atoms, ctx, "melt"):
                prov = {**common, "stage": "melt", "temperature_k": t_melt, "step": step}
                out.append(_tag(atoms, "liquid", "amorphous", prov, ctx))
        dyn.run(cfg.melt_steps - done)
        ctx.tick(cfg.melt_steps)
        for step in range(1, cfg.quench_steps + 1):
            temp = t_melt + (t_end - t_melt) * step / cfg.quench_steps
            dyn.set_temperature(temperature_K=temp)
            dyn.run(1)
            if step in quench_at and _md_ok(atoms, ctx, "quench"):  # noqa: SIM102
                prov = {**common, "stage": "quench", "temperature_k": temp, "step": step}
                out.append(_tag(atoms, "amorphous", "amorphous", prov, ctx))
        ctx.tick(cfg.quench_steps)
    return out


def _spread(start: int, stop: int, n: int) -> list[int]:
    """``n`` distinct steps evenly spread over [start, stop] (ascending, all >= 1)."""
    if n == 0:
        return []
    steps = np.round(np.linspace(max(start, 1), stop, n)).astype(int)
    return sorted(set(steps.tolist()))


def _tag(
    atoms: Atoms, config_type: str, generator: str, params: dict[str, Any], ctx: _Context
) -> Atoms:
    prov = {"generator": generator, "system": ctx.system.label, "seed": ctx.seed}
    prov.update({k: _round(v) for k, v in params.items()})
    return _clean(atoms, config_type, prov)


_FUNCS: dict[str, Callable[[Any, _Context], list[Atoms]]] = {
    "strain": gen_strain,
    "rattle": gen_rattle,
    "vacancy": gen_vacancy,
    "interstitial": gen_interstitial,
    "surface": gen_surface,
    "md": gen_md,
    "amorphous": gen_amorphous,
}


def _work_units(name: str, gcfg: Any, system: System) -> int:
    """Progress units of one generator: structures, hops, sites/surfaces, or MD steps."""
    if name == "strain":
        return gcfg.n_volumes + gcfg.n_shears
    if name == "rattle":
        return len(gcfg.amplitudes) * gcfg.n_per_amplitude
    if name == "vacancy":
        return gcfg.n_rattled + gcfg.n_hops
    if name == "interstitial":
        return len(interstitial_sites(system, gcfg.sites))
    if name == "surface":
        return len(gcfg.millers or default_millers(system))
    if name == "md":
        n_t = len(gcfg.temperatures_k or gcfg.homologous_temperatures)
        return n_t * (gcfg.equilibration_steps + gcfg.n_snapshots * gcfg.interval_steps)
    return gcfg.n_runs * (gcfg.melt_steps + gcfg.quench_steps)


# --------------------------------------------------------------------------- driver


def _seed_for(seed: int, label: str, generator: str) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, zlib.crc32(label.encode()), GENERATORS.index(generator)])


def _part_key(cfg: GenerateConfig, sys_cfg: Any, system: System, name: str) -> str:
    """Hash of everything one (system, generator) part depends on."""
    payload = {
        "version": 1,
        "system": sys_cfg.model_dump(mode="json"),
        "unit_cell": np.round(system.unit.cell[:], 9).tolist(),
        "generator": name,
        "block": getattr(cfg, name).model_dump(mode="json"),
        "reference": cfg.reference.model_dump(mode="json"),
        "seed": cfg.seed,
        "min_distance_ratio": cfg.min_distance_ratio,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


class _Progress:
    """A rich progress bar on stderr (or nothing)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: Any = None

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if not self.enabled:
            yield lambda n: None
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=False,
        ) as bar:
            tid = bar.add_task(description, total=max(total, 1))
            yield lambda n: bar.advance(tid, n)
            bar.update(tid, completed=max(total, 1))


def generate_structures(
    cfg: GenerateConfig,
    *,
    progress: bool = False,
    parts_dir: str | Path | None = None,
    reuse_parts: bool = False,
    timings: dict[str, float] | None = None,
    stats: dict[str, Any] | None = None,
) -> list[Atoms]:
    """All candidate structures of ``cfg``, systems in order, generators in :data:`GENERATORS` order.

    Args:
        cfg: the generate config.
        progress: show rich progress bars on stderr.
        parts_dir: cache folder for finished (system, generator) parts; None: no cache.
        reuse_parts: read parts already in ``parts_dir`` instead of regenerating them.
        timings: filled with wall seconds per generator (and ``lattice_fit``), if given.
        stats: filled with per-system lattice info, reused parts and notes, if given.

    Raises:
        UserInputError: the reference cannot treat an element, a file is unreadable, a site or
            Miller index does not apply, or the reference blows up.
    """
    from mlipctl.data.io import write_structures_atomic
    from mlipctl.data.sources import read_frames
    from mlipctl.reference.registry import make_calculator, supported_elements

    timings = timings if timings is not None else {}
    stats = stats if stats is not None else {}
    notes: list[str] = stats.setdefault("notes", [])
    reused: list[str] = stats.setdefault("reused_parts", [])
    lattices: dict[str, Any] = stats.setdefault("systems", {})
    enabled = [g for g in GENERATORS if getattr(cfg, g).enabled]
    needs_ref = (
        bool(set(enabled) & _USES_REFERENCE)
        or cfg.fit_lattice
        or ("interstitial" in enabled and cfg.interstitial.relax_steps > 0)
    )

    def make_calc() -> Any:
        return make_calculator(cfg.reference)

    allowed = supported_elements(cfg.reference) if needs_ref else None
    pbar = _Progress(progress)
    out: list[Atoms] = []
    for sys_cfg in cfg.systems:
        t0 = time.perf_counter()
        system = resolve_system(
            sys_cfg,
            make_calc=make_calc if cfg.fit_lattice else None,
            allowed_elements=allowed,
            reference_name=cfg.reference.kind,
        )
        timings["lattice_fit"] = timings.get("lattice_fit", 0.0) + time.perf_counter() - t0
        lattices[system.label] = {
            **system.lattice,
            "nn_distance": _round(system.nn_distance),
            "melting_point_k": system.melting_point_k,
        }
        for name in enabled:
            gcfg = getattr(cfg, name)
            key = _part_key(cfg, sys_cfg, system, name)
            part = (
                Path(parts_dir) / f"{_safe(system.label)}-{name}-{key}.extxyz"
                if parts_dir
                else None
            )
            t0 = time.perf_counter()
            if reuse_parts and part is not None and part.exists():
                frames = read_frames(str(part), ":", "extxyz")
                frames = [
                    _clean(a, a.info["config_type"], json.loads(a.info["provenance"]))
                    for a in frames
                ]
                reused.append(part.name)
            else:
                ctx = _Context(
                    system=system,
                    rng=np.random.default_rng(_seed_for(cfg.seed, system.label, name)),
                    seed=cfg.seed,
                    min_distance=cfg.min_distance_ratio * system.nn_distance,
                    make_calc=make_calc,
                    tick=lambda n: None,
                    notes=notes,
                )
                with pbar.task(f"{system.label} {name}", _work_units(name, gcfg, system)) as tick:
                    ctx.tick = tick
                    frames = _FUNCS[name](gcfg, ctx)
                if part is not None and frames:
                    write_structures_atomic(part, frames)
            timings[f"generate_{name}"] = (
                timings.get(f"generate_{name}", 0.0) + time.perf_counter() - t0
            )
            out.extend(frames)
    return out


def run_generate(cfg: GenerateConfig, *, resume: bool = False, progress: bool = True) -> Any:
    """`mlipctl generate`: write ``output/filename`` (extxyz, atomically) and return a Report.

    With ``resume=True``, (system, generator) parts finished by an interrupted run are reused.
    """
    from mlipctl.data.io import write_structures_atomic
    from mlipctl.reports.base import Criterion, Environment, Report

    t_start = time.perf_counter()
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = out_dir / ".generate-parts"
    timings: dict[str, float] = {}
    stats: dict[str, Any] = {}
    structures = generate_structures(
        cfg, progress=progress, parts_dir=parts, reuse_parts=resume, timings=timings, stats=stats
    )
    if not structures:
        raise UserInputError("the config generates no structures: every generator is off or empty")

    t0 = time.perf_counter()
    ratio = cfg.min_distance_ratio
    nn = {label: s["nn_distance"] for label, s in stats["systems"].items()}
    too_close = []
    for i, atoms in enumerate(structures):
        label = json.loads(atoms.info["provenance"])["system"]
        limit = ratio * nn[label]
        if min_distance(atoms, limit) < limit:
            too_close.append(i)
    timings["check"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    path = out_dir / cfg.filename
    write_structures_atomic(path, structures)
    timings["write"] = time.perf_counter() - t0
    shutil.rmtree(parts, ignore_errors=True)  # the full set is on disk now
    timings["total"] = time.perf_counter() - t_start

    n_atoms = [len(a) for a in structures]
    by_type = Counter(a.info["config_type"] for a in structures)
    by_system = Counter(json.loads(a.info["provenance"])["system"] for a in structures)
    results = {
        "n_structures": len(structures),
        "n_atoms_total": int(sum(n_atoms)),
        "n_atoms_min": int(min(n_atoms)),
        "n_atoms_max": int(max(n_atoms)),
        "by_config_type": dict(sorted(by_type.items())),
        "by_system": dict(by_system),
        "systems": stats["systems"],
        "reused_parts": len(stats["reused_parts"]),
        "too_close": too_close,
    }
    messages = list(stats["notes"])
    if stats["reused_parts"]:
        messages.append(f"resumed: reused {len(stats['reused_parts'])} finished part(s)")
    messages.append(f"structures are unlabelled; label them with `mlipctl label` (input: {path})")
    return Report(
        command="generate",
        config=cfg.model_dump(mode="json"),
        environment=Environment.capture(),
        timings=timings,
        results=results,
        criteria=[
            Criterion.is_true(
                "no_overlapping_atoms",
                not too_close,
                detail=f"every pair ≥ {ratio} × the bulk nearest-neighbour distance",
            ),
        ],
        artifacts={"structures": str(path)},
        messages=messages,
    )
