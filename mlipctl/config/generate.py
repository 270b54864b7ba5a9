"""`mlipctl generate`: candidate structures for a training set, one block per generator.

Each block has its own counts and cell size, so a set can be tuned (or a generator switched off
with ``enabled: false``) without touching the others. Sizes are minimum atom counts: the
conventional cell is repeated n×n×n until it holds at least that many atoms.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from mlipctl.config.base import InputPath, StrictModel
from mlipctl.config.reference import ReferenceConfig, default_reference
from mlipctl.config.structures import CrystalKind

InterstitialSite = Literal[
    "octahedral",
    "tetrahedral",
    "hexagonal",
    "dumbbell_100",
    "dumbbell_110",
    "dumbbell_111",
    "void",
]
Miller = tuple[int, int, int]


class GenerateCrystalSystem(StrictModel):
    """One element in one crystal structure."""

    kind: Literal["crystal"] = Field(default="crystal", description="Build from a crystal.")
    element: str = Field(description="Chemical symbol, e.g. 'Cu'.")
    structure: CrystalKind | None = Field(
        default=None, description="Crystal structure (None: ASE's reference state of the element)."
    )
    lattice_constant: float | None = Field(
        default=None,
        gt=0,
        description="Cubic (or hcp a) lattice constant, Å. None: the reference's equilibrium "
        "value when fit_lattice is true, else ASE's tabulated value.",
    )
    c_over_a: float | None = Field(
        default=None, gt=0, description="hcp c/a (None: ASE's value or the ideal 1.633)."
    )
    melting_point_k: float | None = Field(
        default=None,
        gt=0,
        description="Melting point that scales the MD and melt-quench temperatures, K "
        "(None: the experimental value for common elements).",
    )

    @model_validator(mode="after")
    def _check(self) -> GenerateCrystalSystem:
        from mlipctl.config.elements import check_symbol

        check_symbol(self.element)
        if self.c_over_a is not None and self.structure != "hcp":
            raise ValueError("c_over_a applies to structure 'hcp' only (set structure: hcp)")
        return self

    def label(self) -> str:
        return f"{self.element}-{self.structure or 'ref'}"


class GenerateFileSystem(StrictModel):
    """A periodic bulk cell read from a file (any composition), used as the unit cell."""

    kind: Literal["file"] = Field(default="file", description="Unit cell from a structure file.")
    path: InputPath = Field(description="Structure file (extxyz, POSCAR, cif, ...).")
    index: str = Field(default="-1", description="ASE index of the frame to use ('-1': last).")
    format: str | None = Field(default=None, description="ASE format name (None: from the suffix).")
    name: str | None = Field(
        default=None, description="Label used in provenance (None: the file's stem)."
    )
    melting_point_k: float | None = Field(
        default=None,
        gt=0,
        description="Melting point for MD and melt-quench temperatures, K (None: from the "
        "table if the cell holds one element, else MD and melt-quench need it).",
    )

    def label(self) -> str:
        from pathlib import Path

        return self.name or Path(self.path).stem


GenerateSystem = Annotated[GenerateCrystalSystem | GenerateFileSystem, Field(discriminator="kind")]


class StrainConfig(StrictModel):
    """Homogeneously strained bulk: an equation-of-state scan and random elastic-range strains."""

    enabled: bool = Field(default=True, description="Generate strained bulk cells.")
    min_atoms: int = Field(default=32, ge=1, description="Smallest cell, atoms.")
    volume_range: float = Field(
        default=0.06, gt=0, lt=0.5, description="EOS scan covers volumes V0·(1 ± volume_range)."
    )
    n_volumes: int = Field(
        default=9, ge=0, description="Evenly spaced volumes of the EOS scan (isotropic scaling)."
    )
    n_shears: int = Field(
        default=16, ge=0, description="Cells with a random symmetric strain tensor (shear+normal)."
    )
    max_strain: float = Field(
        default=0.03,
        gt=0,
        lt=0.3,
        description="Largest component of the random strain tensors (elastic range: a few %).",
    )
    rattle: float = Field(
        default=0.0,
        ge=0,
        description="Gaussian displacement std added to strained cells, Å (0: ideal positions).",
    )


class RattleConfig(StrictModel):
    """Bulk with random atomic displacements at several amplitudes."""

    enabled: bool = Field(default=True, description="Generate rattled bulk cells.")
    min_atoms: int = Field(default=32, ge=1, description="Smallest cell, atoms.")
    amplitudes: list[float] = Field(
        default=[0.03, 0.06, 0.1, 0.15],
        min_length=1,
        description="Gaussian displacement std per Cartesian component, Å.",
    )
    n_per_amplitude: int = Field(default=8, ge=0, description="Cells per amplitude.")
    volume_jitter: float = Field(
        default=0.03,
        ge=0,
        lt=0.3,
        description="Each cell's volume is also scaled by a uniform factor in 1 ± volume_jitter.",
    )

    @model_validator(mode="after")
    def _check(self) -> RattleConfig:
        if any(a <= 0 for a in self.amplitudes):
            raise ValueError("rattle amplitudes must be > 0 Å")
        return self


class VacancyConfig(StrictModel):
    """Single vacancies, and snapshots along nearest-neighbour vacancy hops."""

    enabled: bool = Field(default=True, description="Generate vacancy cells.")
    min_atoms: int = Field(
        default=32,
        ge=2,
        description="Smallest host cell, atoms. Small hosts (the size of the bulk cells) tie the "
        "vacancy's energy to the bulk's: in an N-atom cell a per-atom bulk error ε moves a "
        "fitted E_f by ~N·ε, so large hosts let a 1 meV/atom bias become 0.1 eV.",
    )
    n_rattled: int = Field(default=8, ge=0, description="Rattled cells with one vacancy.")
    n_hops: int = Field(
        default=3, ge=0, description="Hops sampled (each from a different vacancy site)."
    )
    hop_min_atoms: list[Annotated[int, Field(ge=2)]] | None = Field(
        default=None,
        description="Smallest host cell of each hop, atoms, cycled over the hops (None: "
        "min_atoms for all). In one small cubic host every nearest-neighbour hop is the same "
        "by symmetry; a larger host adds the saddle's longer-range relaxation.",
    )
    hop_images: int = Field(
        default=5, ge=0, description="Images per hop strictly between the end points."
    )
    hop_path: Literal["neb", "linear"] = Field(
        default="neb",
        description="neb: end points relaxed and the band converged (CI-NEB, fmax 0.05 eV/Å) "
        "with the reference, images kept unrattled, plus the relaxed vacancy cell (one "
        "reference NEB per hop: cheap with EMT, costly with DFT); linear: rattled snapshots "
        "on the straight line between unrelaxed end points.",
    )
    hop_rattled: int = Field(
        default=4,
        ge=0,
        description="Rattled copies (std `rattle`) of every hop image. The images alone are "
        "points on one path; near the saddle a model fitted to them alone can be right on "
        "those points and off by 0.1 eV/Å on the hopping atom a little away from them.",
    )
    rattle: float = Field(default=0.04, ge=0, description="Displacement std, Å.")


class InterstitialConfig(StrictModel):
    """Self-interstitials at the crystal's high-symmetry sites, optionally partly relaxed."""

    enabled: bool = Field(default=True, description="Generate interstitial cells.")
    min_atoms: int = Field(default=64, ge=1, description="Smallest host cell, atoms.")
    sites: list[InterstitialSite] | None = Field(
        default=None,
        description="Sites to fill. None: the sensible ones for the structure (fcc: octahedral, "
        "tetrahedral, dumbbell_100, dumbbell_110; bcc: octahedral, tetrahedral, dumbbell_110, "
        "dumbbell_111; hcp: octahedral, tetrahedral; diamond: tetrahedral, hexagonal, "
        "dumbbell_110; sc and files: void, the largest empty space).",
    )
    n_per_site: int = Field(
        default=3, ge=0, description="Snapshots per site, evenly spaced along the relaxation."
    )
    include_unrelaxed: bool = Field(
        default=False,
        description="Make the first snapshot the unrelaxed insertion (forces of tens of eV/Å); "
        "false: snapshots end at relax_steps and start relax_steps/n_per_site steps in.",
    )
    relax_steps: int = Field(
        default=30,
        ge=0,
        description="FIRE steps with the reference calculator (0: unrelaxed snapshots only).",
    )
    rattle: float = Field(default=0.04, ge=0, description="Displacement std added, Å.")
    dumbbell_separation: float = Field(
        default=0.8,
        gt=0.5,
        lt=1.5,
        description="Initial distance between the two dumbbell atoms / nearest-neighbour distance.",
    )


class SurfaceConfig(StrictModel):
    """Periodic slabs with vacuum on both sides, rattled."""

    enabled: bool = Field(default=True, description="Generate surface slabs.")
    millers: list[Miller] | None = Field(
        default=None,
        description="Miller indices in the conventional cell (hcp: the orthorhombic cell, whose "
        "(0, 0, 1) is the basal (0001) plane). None: (100), (110), (111) for cubic crystals, "
        "(001) for hcp and files.",
    )
    min_thickness: float = Field(
        default=7.0, gt=0, description="Smallest slab thickness (outermost atom planes), Å."
    )
    vacuum: float = Field(default=8.0, gt=0, description="Vacuum on each side of the slab, Å.")
    min_atoms: int = Field(
        default=32, ge=1, description="In-plane repetition until the slab has this many atoms."
    )
    n_per_surface: int = Field(default=3, ge=0, description="Rattled slabs per Miller index.")
    rattle: float = Field(default=0.05, ge=0, description="Displacement std, Å.")

    @model_validator(mode="after")
    def _check(self) -> SurfaceConfig:
        if self.millers is not None and any(m == (0, 0, 0) for m in self.millers):
            raise ValueError("Miller index (0, 0, 0) names no plane")
        return self


class MDSnapshotsConfig(StrictModel):
    """Langevin MD driven by the reference calculator; snapshots at intervals."""

    enabled: bool = Field(default=True, description="Generate MD snapshots.")
    min_atoms: int = Field(default=64, ge=2, description="Smallest cell, atoms.")
    temperatures_k: list[float] | None = Field(
        default=None, description="Temperatures, K (None: homologous_temperatures × melting point)."
    )
    homologous_temperatures: list[float] = Field(
        default=[0.25, 0.5, 0.75, 1.0],
        min_length=1,
        description="Temperatures as fractions of the melting point (used when temperatures_k "
        "is None).",
    )
    timestep_fs: float = Field(default=2.0, gt=0, le=10, description="Time step, fs.")
    friction_per_ps: float = Field(
        default=10.0, gt=0, description="Langevin friction, 1/ps (strong: fast equilibration)."
    )
    equilibration_steps: int = Field(
        default=150, ge=0, description="Steps before the first snapshot."
    )
    n_snapshots: int = Field(default=10, ge=0, description="Snapshots per temperature.")
    interval_steps: int = Field(default=25, ge=1, description="Steps between snapshots.")

    @model_validator(mode="after")
    def _check(self) -> MDSnapshotsConfig:
        if self.temperatures_k is not None and any(t <= 0 for t in self.temperatures_k):
            raise ValueError("temperatures_k must be > 0 K")
        if any(t <= 0 for t in self.homologous_temperatures):
            raise ValueError("homologous_temperatures must be > 0")
        return self


class AmorphousConfig(StrictModel):
    """Melt far above the melting point with the reference, quench fast, take snapshots."""

    enabled: bool = Field(default=True, description="Generate melt-quenched cells.")
    n_atoms: int = Field(
        default=100,
        ge=2,
        description="Atoms per cell: random atoms are removed from the smallest crystal "
        "supercell that holds this many. A count that does not tile the crystal (100, not 108 "
        "for fcc) keeps the small periodic box from recrystallising during the quench.",
    )
    n_runs: int = Field(default=1, ge=0, description="Independent melt-quench runs.")
    melt_homologous: float = Field(
        default=2.0, gt=1, description="Melt temperature / melting point."
    )
    quench_homologous: float = Field(
        default=0.2, gt=0, description="Final quench temperature / melting point."
    )
    volume_scale: float = Field(
        default=1.05,
        gt=0.8,
        lt=1.5,
        description="Volume per atom / the crystal's volume per atom (liquids expand).",
    )
    timestep_fs: float = Field(default=2.0, gt=0, le=10, description="Time step, fs.")
    friction_per_ps: float = Field(default=10.0, gt=0, description="Langevin friction, 1/ps.")
    melt_steps: int = Field(default=500, ge=1, description="Steps at the melt temperature.")
    quench_steps: int = Field(
        default=500, ge=1, description="Steps of the linear temperature ramp down."
    )
    n_melt_snapshots: int = Field(
        default=3, ge=0, description="Snapshots of the liquid (end of the melt stage)."
    )
    n_quench_snapshots: int = Field(
        default=5, ge=0, description="Snapshots evenly spaced along the quench (last: its end)."
    )

    @model_validator(mode="after")
    def _check(self) -> AmorphousConfig:
        if self.quench_homologous >= self.melt_homologous:
            raise ValueError("quench_homologous must be below melt_homologous")
        if self.n_melt_snapshots > self.melt_steps:
            raise ValueError("n_melt_snapshots cannot exceed melt_steps")
        if self.n_quench_snapshots > self.quench_steps:
            raise ValueError("n_quench_snapshots cannot exceed quench_steps")
        return self


class GenerateConfig(StrictModel):
    """Config of `mlipctl generate`."""

    systems: list[GenerateSystem] = Field(
        min_length=1, description="Elements/crystals (or unit-cell files) to build sets for."
    )
    reference: ReferenceConfig = Field(
        default_factory=default_reference,
        description="Calculator that drives MD, melt-quench, interstitial relaxation and the "
        "lattice fit. The output is unlabelled; label it with `mlipctl label`.",
    )
    fit_lattice: bool = Field(
        default=True,
        description="Scale each system to the reference's equilibrium volume (EOS fit on the "
        "unit cell) unless it gives lattice_constant.",
    )
    seed: int = Field(default=0, ge=0, description="Random seed; the same seed gives the same set.")
    min_distance_ratio: float = Field(
        default=0.5,
        gt=0,
        lt=1,
        description="Reject (and redraw) random displacements that bring two atoms closer than "
        "this × the bulk nearest-neighbour distance.",
    )
    strain: StrainConfig = Field(default_factory=StrainConfig, description="Strained bulk.")
    rattle: RattleConfig = Field(default_factory=RattleConfig, description="Rattled bulk.")
    vacancy: VacancyConfig = Field(default_factory=VacancyConfig, description="Vacancies, hops.")
    interstitial: InterstitialConfig = Field(
        default_factory=InterstitialConfig, description="Self-interstitials."
    )
    surface: SurfaceConfig = Field(default_factory=SurfaceConfig, description="Surface slabs.")
    md: MDSnapshotsConfig = Field(
        default_factory=MDSnapshotsConfig, description="Reference-driven MD snapshots."
    )
    amorphous: AmorphousConfig = Field(
        default_factory=AmorphousConfig, description="Melt-quenched cells."
    )
    filename: str = Field(
        default="structures.extxyz", description="Name of the extxyz file written into output."
    )
    output: str = Field(default="runs/generate", description="Output directory.")

    @model_validator(mode="after")
    def _check(self) -> GenerateConfig:
        labels = [s.label() for s in self.systems]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"systems listed twice: {', '.join(dup)} (set a distinct name)")
        if not self.filename.endswith(".extxyz") or "/" in self.filename:
            raise ValueError(
                f"filename {self.filename!r} must be a plain file name ending in .extxyz"
            )
        return self
