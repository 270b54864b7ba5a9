"""Bulk properties for `validate`: each calculator's own equilibrium crystal and elastic response.

Every defect energy in `validate` is computed by a calculator at *its own* equilibrium lattice
constant (comparing a model in the reference's lattice would mix a lattice-constant error into
every defect energy). :func:`equilibrium_state` finds it from a Birch-Murnaghan equation of state
(two passes: a coarse ±3 % lattice scan, then ±6 % in volume around the first minimum; hcp also
optimises c/a at the equilibrium volume). :func:`elastic_constants` gives cubic C11, C12, C44 from
stresses at ±0.5 % strains with the atoms relaxed inside every strained cell (diamond needs that
internal relaxation for C44; for fcc/bcc the forces vanish by symmetry and it costs nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import BaseCalculator

from mlipctl.data.crystals import unit_cell
from mlipctl.errors import UserInputError

CUBIC = ("fcc", "bcc", "sc", "diamond")
"""Structures whose elastic constants are the three cubic ones."""

EV_A2_TO_J_M2 = 16.021766339
"""1 eV/Å² in J/m² (surface energies)."""


# --------------------------------------------------------------------------------------------
# Calculators
# --------------------------------------------------------------------------------------------


def as_ase_calculator(obj: Any) -> BaseCalculator:
    """An ASE calculator for an ASE calculator, a Potential or a JaxModel.

    A :class:`~mlipctl.model.potential.Potential` gets a calculator whose forces and stress are
    the derivatives of the ensemble-mean energy (one reverse pass; ``member_forces=False``):
    validation needs no force spreads, and the mean's gradient is exactly what an optimiser of
    the mean energy must see.
    """
    if isinstance(obj, BaseCalculator):
        return obj
    from mlipctl.engines.fire import JaxModel
    from mlipctl.model.potential import Potential

    if isinstance(obj, Potential):
        return obj.calculator(member_forces=False)
    if isinstance(obj, JaxModel):
        return obj.calculator()
    raise UserInputError(
        f"cannot validate with {type(obj).__name__}: expected an ASE calculator, a Potential or "
        "a JaxModel"
    )


@dataclass
class Engine:
    """One side of a comparison, resolved from what the caller passed.

    Attributes:
        name: 'model' or 'reference' (labels in results and file names).
        calc: ASE calculator for single points and relaxations.
        neb: what :func:`~mlipctl.engines.neb.run_neb_images` gets: the Potential/JaxModel
            (batched jitted band), a calculator factory (one calculator per image), or the shared
            calculator.
        batch: the Potential when structures can be evaluated in padded batches, else None.
    """

    name: str
    calc: BaseCalculator
    neb: Any
    batch: Any = None


def resolve(obj: Any, name: str) -> Engine:
    """An :class:`Engine` for an ASE calculator, a calculator factory, a Potential or JaxModel.

    Pass a factory (e.g. the class ``EMT`` or ``lambda: make_calculator(cfg)``) rather than an
    instance where possible: ASE's NEB then gives every image its own calculator, which for
    calculators that update neighbour lists incrementally (EMT) is ~8× faster than one shared
    instance that rebuilds its list whenever it switches image.
    """
    from mlipctl.engines.fire import JaxModel
    from mlipctl.model.potential import Potential

    if isinstance(obj, Engine):
        return obj
    if isinstance(obj, Potential):
        return Engine(name, as_ase_calculator(obj), obj, obj)
    if isinstance(obj, JaxModel):
        return Engine(name, obj.calculator(), obj, None)
    if isinstance(obj, BaseCalculator):
        return Engine(name, obj, obj, None)
    if callable(obj):
        calc = obj()
        if not isinstance(calc, BaseCalculator):
            raise UserInputError(
                f"the {name} calculator factory returned {type(calc).__name__}, not an ASE "
                "calculator"
            )
        return Engine(name, calc, obj, None)
    raise UserInputError(
        f"cannot use {type(obj).__name__} as the {name}: expected an ASE calculator, a "
        "calculator factory, a Potential or a JaxModel"
    )


def evaluate_structures(
    engine: Engine, frames: list[Atoms], *, stress: bool = False, batch: bool = True
) -> list[dict[str, Any]]:
    """Energy (eV), forces (N, 3) and, for periodic cells when asked, stress (6,) of each frame.

    With ``batch``, models are evaluated in padded batches (one compiled call for many
    structures of different sizes); otherwise, and for other calculators, one structure at a
    time (for many frames of one shape this reuses the compilation of a relaxation).

    Raises:
        UserInputError: non-finite results.
    """
    out: list[dict[str, Any]] = []
    if batch and engine.batch is not None:
        from mlipctl.model.calculator import Evaluator

        res = Evaluator(engine.batch, member_forces=False).evaluate(frames)
        for r in res:
            item = {"energy": float(r["energy"]), "forces": np.asarray(r["forces"], np.float64)}
            if stress and "stress" in r:
                item["stress"] = np.asarray(r["stress"], np.float64)
            out.append(item)
    else:
        for at in frames:
            work = at.copy()
            work.calc = engine.calc
            item = {
                "energy": float(work.get_potential_energy()),
                "forces": np.asarray(work.get_forces(), np.float64),
            }
            if stress and np.all(work.pbc):
                item["stress"] = np.asarray(work.get_stress(voigt=True), np.float64)
            out.append(item)
    for k, item in enumerate(out):
        if not all(np.all(np.isfinite(v)) for v in item.values()):
            raise UserInputError(
                f"the {engine.name} returned non-finite energy/forces/stress for structure {k} "
                f"({frames[k].get_chemical_formula()})"
            )
    return out


def energy_of(calc: BaseCalculator, atoms: Atoms) -> float:
    """Potential energy (eV) of a copy of ``atoms`` with ``calc``; non-finite -> UserInputError."""
    work = atoms.copy()
    work.calc = calc
    energy = float(work.get_potential_energy())
    if not math.isfinite(energy):
        raise UserInputError(
            f"the calculator returned a non-finite energy for {work.get_chemical_formula()}"
        )
    return energy


def stress_of(calc: BaseCalculator, atoms: Atoms) -> np.ndarray:
    """(6,) Voigt stress (eV/Å³, ASE sign: positive = tensile) of a copy of ``atoms``."""
    work = atoms.copy()
    work.calc = calc
    try:
        stress = np.asarray(work.get_stress(voigt=True), dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - calculators signal a missing stress many ways
        raise UserInputError(
            f"the calculator gives no stress ({type(exc).__name__}: {exc}); elastic constants "
            "need one (drop the 'bulk' check for this calculator)"
        ) from None
    if not np.all(np.isfinite(stress)):
        raise UserInputError("the calculator returned a non-finite stress")
    return stress


# --------------------------------------------------------------------------------------------
# Equilibrium crystal
# --------------------------------------------------------------------------------------------


@dataclass
class BulkState:
    """A calculator's equilibrium crystal.

    Attributes:
        element, structure: the crystal.
        a: equilibrium lattice constant (cubic a, hcp a), Å.
        c_over_a: hcp c/a at equilibrium (None for cubic structures).
        bulk_modulus_gpa: B from the Birch-Murnaghan fit, GPa.
        energy_per_atom: energy per atom of the conventional cell at ``a``, eV.
        volume_per_atom: Å³.
        eos_volumes: (P,) volumes per atom of the final EOS scan, Å³.
        eos_energies: (P,) energies per atom of the final EOS scan, eV.
    """

    element: str
    structure: str
    a: float
    c_over_a: float | None
    bulk_modulus_gpa: float
    energy_per_atom: float
    volume_per_atom: float
    eos_volumes: np.ndarray
    eos_energies: np.ndarray

    def unit(self) -> Atoms:
        """Conventional cell at the equilibrium lattice constant (cubic; hcp: orthorhombic)."""
        return unit_cell(self.element, self.structure, self.a, self.c_over_a)

    def to_dict(self) -> dict[str, Any]:
        return {
            "element": self.element,
            "structure": self.structure,
            "a": self.a,
            "c_over_a": self.c_over_a,
            "bulk_modulus_gpa": self.bulk_modulus_gpa,
            "energy_per_atom": self.energy_per_atom,
            "volume_per_atom": self.volume_per_atom,
            "eos_volumes": [float(v) for v in self.eos_volumes],
            "eos_energies": [float(e) for e in self.eos_energies],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BulkState:
        return cls(
            element=str(data["element"]),
            structure=str(data["structure"]),
            a=float(data["a"]),
            c_over_a=None if data["c_over_a"] is None else float(data["c_over_a"]),
            bulk_modulus_gpa=float(data["bulk_modulus_gpa"]),
            energy_per_atom=float(data["energy_per_atom"]),
            volume_per_atom=float(data["volume_per_atom"]),
            eos_volumes=np.asarray(data["eos_volumes"], dtype=np.float64),
            eos_energies=np.asarray(data["eos_energies"], dtype=np.float64),
        )


def _scaled(cell0: Atoms, scale: float) -> Atoms:
    at = cell0.copy()
    at.set_cell(cell0.cell[:] * scale, scale_atoms=True)
    return at


def _eos_fit(volumes: np.ndarray, energies: np.ndarray) -> tuple[float, float, float]:
    """(v0, e0, B in eV/Å³) of a Birch-Murnaghan fit; UserInputError if there is no minimum."""
    import warnings

    from ase.eos import EquationOfState

    try:
        with warnings.catch_warnings():
            # A minimum outside the scan is handled (re-centred or reported) by the callers.
            warnings.simplefilter("ignore", UserWarning)
            v0, e0, b = EquationOfState(volumes, energies, eos="birchmurnaghan").fit()
    except Exception as exc:  # noqa: BLE001 - scipy/ASE fit failures come in several types
        raise UserInputError(
            f"equation-of-state fit failed ({type(exc).__name__}: {exc}); the calculator has no "
            f"energy minimum between {volumes.min():.3f} and {volumes.max():.3f} Å³"
        ) from None
    if not (math.isfinite(v0) and math.isfinite(b) and b > 0):
        raise UserInputError(
            f"equation-of-state fit gave V0 = {v0}, B = {b}: the calculator's E(V) has no "
            "minimum there"
        )
    return float(v0), float(e0), float(b)


def _eos_scan(calc: BaseCalculator, cell0: Atoms, scales: np.ndarray) -> tuple[Any, Any]:
    vols, ens = [], []
    for s in scales:
        at = _scaled(cell0, float(s))
        vols.append(at.get_volume())
        ens.append(energy_of(calc, at))
    return np.asarray(vols), np.asarray(ens)


def _hcp_unit(element: str, v_cell: float, q: float) -> Atoms:
    """Orthorhombic 4-atom hcp cell of volume ``v_cell`` and c/a = ``q`` (V = √3 a³ q)."""
    a = (v_cell / (math.sqrt(3.0) * q)) ** (1.0 / 3.0)
    return unit_cell(element, "hcp", a, q)


def _optimise_c_over_a(calc: BaseCalculator, element: str, v_cell: float, q0: float) -> float:
    """c/a minimising the energy at fixed volume: parabola through 7 points, re-centred ≤ 4×."""
    q = q0
    for _ in range(4):
        qs = q * np.linspace(0.96, 1.04, 7)
        es = np.array([energy_of(calc, _hcp_unit(element, v_cell, float(x))) for x in qs])
        c2, c1, _ = np.polyfit(qs, es, 2)
        if c2 <= 0:
            raise UserInputError(
                f"the calculator's hcp energy has no minimum in c/a near {q:.3f} (at fixed volume)"
            )
        best = float(-c1 / (2 * c2))
        if qs[0] <= best <= qs[-1]:
            return best
        q = float(np.clip(best, qs[0], qs[-1]))
    raise UserInputError(f"the hcp c/a of the calculator did not converge (last {q:.3f})")


def equilibrium_state(
    calc: BaseCalculator,
    element: str,
    structure: str,
    *,
    a_guess: float | None = None,
    c_over_a: float | None = None,
    n_points: int = 11,
    volume_span: float = 0.06,
) -> BulkState:
    """The calculator's equilibrium crystal from a Birch-Murnaghan equation of state.

    Args:
        calc: ASE calculator.
        element, structure: the crystal ('fcc', 'bcc', 'sc', 'diamond', 'hcp').
        a_guess: start lattice constant (None: ASE's reference value).
        c_over_a: hcp start c/a (None: ASE's value); optimised at the equilibrium volume.
        n_points: volumes in the final scan.
        volume_span: relative half-width of the final volume scan (B and a0 come from it).

    Raises:
        UserInputError: no energy minimum in the scanned range, non-finite energies.
    """
    cell0 = unit_cell(element, structure, a_guess, c_over_a)
    q = None
    if structure == "hcp":
        q = float(np.linalg.norm(cell0.cell[2]) / np.linalg.norm(cell0.cell[0]))
    # Pass 1: coarse lattice scan, re-centred until the minimum lies inside it.
    scale = 1.0
    for _ in range(4):
        scales = scale * np.linspace(0.97, 1.03, 7)
        vols, ens = _eos_scan(calc, cell0, scales)
        v0, _, _ = _eos_fit(vols, ens)
        scale = float((v0 / cell0.get_volume()) ** (1.0 / 3.0))
        if scales[1] <= scale <= scales[-2]:
            break
    else:
        raise UserInputError(
            f"the calculator's {structure} {element} lattice constant is outside ±12 % of "
            f"{np.linalg.norm(cell0.cell[0]):.3f} Å; set crystal.structure correctly or check it"
        )
    if structure == "hcp":
        assert q is not None
        q = _optimise_c_over_a(calc, element, v0, q)
        cell0 = _hcp_unit(element, v0, q)
        scale = 1.0
    # Pass 2: the equation of state proper, symmetric in volume around the first estimate.
    v_ref = cell0.get_volume() * scale**3
    volumes = v_ref * (1.0 + np.linspace(-volume_span, volume_span, n_points))
    scales = (volumes / cell0.get_volume()) ** (1.0 / 3.0)
    vols, ens = _eos_scan(calc, cell0, scales)
    v0, _, b = _eos_fit(vols, ens)
    if not vols.min() < v0 < vols.max():
        raise UserInputError(
            f"the equation-of-state minimum V0 = {v0:.3f} Å³ lies outside the scanned volumes "
            f"({vols.min():.3f}-{vols.max():.3f} Å³); the calculator's E(V) is not convex there"
        )
    n = len(cell0)
    final = _scaled(cell0, float((v0 / cell0.get_volume()) ** (1.0 / 3.0)))
    a0 = float(np.linalg.norm(final.cell[0]))
    return BulkState(
        element=element,
        structure=structure,
        a=a0,
        c_over_a=q,
        bulk_modulus_gpa=b / units.GPa,
        energy_per_atom=energy_of(calc, final) / n,
        volume_per_atom=v0 / n,
        eos_volumes=vols / n,
        eos_energies=ens / n,
    )


# --------------------------------------------------------------------------------------------
# Elastic constants
# --------------------------------------------------------------------------------------------


def _strained(unit: Atoms, eps: np.ndarray) -> Atoms:
    at = unit.copy()
    at.set_cell(unit.cell[:] @ (np.eye(3) + eps), scale_atoms=True)
    return at


def _relaxed_stress(
    calc: BaseCalculator, atoms: Atoms, fmax: float, optimizer: str, max_steps: int
) -> tuple[np.ndarray, bool]:
    from mlipctl.engines.relax import relax_atoms

    res = relax_atoms(atoms, calc, optimizer=optimizer, fmax=fmax, max_steps=max_steps)
    return stress_of(calc, res.atoms), res.converged


def elastic_constants(
    calc: BaseCalculator,
    state: BulkState,
    *,
    delta: float = 0.005,
    fmax: float = 1e-3,
    optimizer: str = "fire",
    max_steps: int = 500,
) -> dict[str, Any]:
    """Cubic C11, C12, C44 (GPa) from central differences of the stress at ±``delta`` strain.

    C11 = dσxx/dεxx and C12 = dσyy/dεxx (uniaxial strain along x); C44 = dσyz/dγyz (engineering
    shear γ = 2εyz). Atoms are relaxed to ``fmax`` inside every strained cell. Also returns the
    Voigt bulk modulus (C11 + 2 C12)/3 as a check of the EOS value and ``converged``.

    Raises:
        UserInputError: a non-cubic structure, or a calculator without stress.
    """
    if state.structure not in CUBIC:
        raise UserInputError(
            f"elastic constants are implemented for cubic crystals ({', '.join(CUBIC)}), not "
            f"{state.structure}"
        )
    unit = state.unit()
    converged = True
    out: dict[str, float] = {}
    uni = np.zeros((3, 3))
    uni[0, 0] = delta
    shear = np.zeros((3, 3))
    shear[1, 2] = shear[2, 1] = 0.5 * delta  # engineering shear strain γyz = delta
    s_plus, ok1 = _relaxed_stress(calc, _strained(unit, uni), fmax, optimizer, max_steps)
    s_minus, ok2 = _relaxed_stress(calc, _strained(unit, -uni), fmax, optimizer, max_steps)
    d = (s_plus - s_minus) / (2.0 * delta) / units.GPa
    out["c11"] = float(d[0])
    out["c12"] = float(0.5 * (d[1] + d[2]))
    t_plus, ok3 = _relaxed_stress(calc, _strained(unit, shear), fmax, optimizer, max_steps)
    t_minus, ok4 = _relaxed_stress(calc, _strained(unit, -shear), fmax, optimizer, max_steps)
    out["c44"] = float((t_plus[3] - t_minus[3]) / (2.0 * delta) / units.GPa)
    converged = ok1 and ok2 and ok3 and ok4
    return {
        **out,
        "bulk_modulus_voigt_gpa": (out["c11"] + 2.0 * out["c12"]) / 3.0,
        "converged": bool(converged),
    }
