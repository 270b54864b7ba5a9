"""`mlipctl validate`: defect energetics of a model against a reference calculator.

Every property is computed twice, by the model and by the reference, each at its *own*
equilibrium lattice constant, with the same structures, relaxation settings and NEB settings;
the report lists both numbers side by side with the error and one pass/fail criterion per
acceptance threshold (:class:`~mlipctl.config.validate.Thresholds`).

Checks (``cfg.checks``):

* ``vacancy``: formation energy E_f = E_vac − (N−1)/N·E_bulk (relaxed to ``fmax``), migration
  barrier of the nearest-neighbour hop by CI-NEB, RMS difference of the two energy profiles on
  the normalised reaction coordinate, and the model's energy/force consistency and smoothness on
  a dense spline through its converged path (:mod:`mlipctl.engines.validate_path`).
* ``interstitial``: fcc/hcp octahedral and <100> dumbbell, bcc <110> dumbbell, diamond
  tetrahedral and <110> dumbbell; the lowest of each calculator is compared.
* ``divacancy``: nearest-neighbour pair, formation and binding energy 2E_f(1v) − E_f(2v).
* ``surface``: relaxed (100), (110), (111) (cubic) or (0001) (hcp) surface energies, J/m².
* ``bulk``: lattice constant, EOS bulk modulus, cubic C11, C12, C44 (relaxed internal
  coordinates).

Always: the equilibrium crystal of both calculators; with ``test_set``: E/F/S errors against its
labels per config_type with parity plots; and the transferability map (force error per atom
against coordination and bond-angle disorder on ``transferability`` files, or on generated
surfaces and a reference melt-quenched amorphous cell) (:mod:`mlipctl.engines.validate_transfer`).

Library use: the ``validate_*`` functions take two calculators (an ASE calculator, a calculator
factory such as ``EMT``, a :class:`~mlipctl.model.potential.Potential` or a ``JaxModel``), so a
reference can be checked against itself; :func:`run_validate` is the CLI runner. Files (relaxed
structures, NEB bands, plots, tables) go to ``cfg.output``, each written atomically; with
``resume=True`` checks finished by an earlier run with the same config are reused.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from mlipctl.config.validate import Thresholds, ValidateConfig
from mlipctl.engines.validate_bulk import (
    CUBIC,
    BulkState,
    Engine,
    elastic_constants,
    energy_of,
    equilibrium_state,
    resolve,
)
from mlipctl.engines.validate_defects import (
    RelaxSettings,
    default_millers,
    divacancy,
    interstitial,
    interstitial_names,
    perfect_supercell,
    relax_defect,
    surface_energy,
    surface_label,
    surface_slab,
    vacancy_endpoints,
)
from mlipctl.engines.validate_path import migration_path, path_smoothness, profile_rms
from mlipctl.engines.validate_transfer import (
    AmorphousSettings,
    default_transfer_structures,
    evaluate_test_set,
    heatmap_png,
    parity_plot,
    transferability_map,
)
from mlipctl.errors import ModelBreakdown, UserInputError
from mlipctl.reports.base import Criterion, Environment, Report, atomic_write_bytes

SIDES = ("model", "reference")


@dataclass(frozen=True)
class Settings:
    """Computational settings shared by all checks (the thresholds are separate).

    Attributes:
        min_atoms: smallest defect supercell.
        relax: relaxation settings (fmax, optimiser, max steps).
        neb_images: intermediate NEB images.
        neb_fmax: NEB convergence, eV/Å.
        neb_max_steps: NEB steps before giving up.
        dense_points: points between images for the smoothness check.
        amorphous: melt-quench of the default transferability cell.
        seed: random seed of generated transferability structures.
    """

    min_atoms: int = 250
    relax: RelaxSettings = RelaxSettings()
    neb_images: int = 7
    neb_fmax: float = 0.01
    neb_max_steps: int = 2000
    dense_points: int = 10
    amorphous: AmorphousSettings = AmorphousSettings()
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: ValidateConfig) -> Settings:
        return cls(
            min_atoms=cfg.crystal.min_atoms,
            relax=RelaxSettings(fmax=cfg.fmax),
            neb_images=cfg.neb_images,
            neb_fmax=cfg.neb_fmax,
            dense_points=cfg.dense_points,
        )


@dataclass
class CheckOutcome:
    """What one check produced (in memory; :func:`write_outcome` puts it on disk).

    Attributes:
        name: check name.
        results: JSON-able numbers, side by side: ``{quantity: {model, reference, error}}``.
        criteria: pass/fail criteria.
        structures: extxyz file name -> frames (relaxed structures, bands).
        files: other file name -> bytes (PNG plots, CSV tables).
        timings: seconds by step.
        messages: notes for the user.
        shared: numbers later checks reuse (e.g. vacancy formation energies).
    """

    name: str
    results: dict[str, Any] = field(default_factory=dict)
    criteria: list[Criterion] = field(default_factory=list)
    structures: dict[str, list[Atoms]] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def resolve_crystal(element: str, structure: str | None) -> tuple[str, str]:
    """(element, structure) with the structure defaulting to ASE's reference state."""
    from mlipctl.data.crystals import reference_structure

    if structure is None:
        structure = reference_structure(element)[0]
    return element, structure


def _pair(model: float, reference: float) -> dict[str, float]:
    return {"model": float(model), "reference": float(reference), "error": float(model - reference)}


def _rel_pair(model: float, reference: float) -> dict[str, float]:
    out = _pair(model, reference)
    out["rel_error"] = _rel(model, reference)
    return out


def _rel(model: float, reference: float) -> float:
    if abs(reference) < 1e-12:
        return 0.0 if abs(model) < 1e-12 else math.inf
    return abs(model - reference) / abs(reference)


def _abs_criterion(
    name: str, model: float, reference: float, threshold: float, unit: str, what: str
) -> Criterion:
    return Criterion.at_most(
        name,
        abs(model - reference),
        threshold,
        unit,
        detail=f"{what}: model {model:.4f}, reference {reference:.4f} {unit}",
    )


def _rel_criterion(
    name: str, model: float, reference: float, threshold: float, what: str, unit: str = ""
) -> Criterion:
    return Criterion.at_most(
        name,
        _rel(model, reference),
        threshold,
        "",
        detail=f"{what}: model {model:.4f}, reference {reference:.4f} {unit}".rstrip(),
    )


@contextmanager
def _timed(timings: dict[str, float], key: str, side: str | None = None) -> Iterator[None]:
    """Time a block; with ``side``, name the calculator in its errors.

    What the model does wrong (NaN energies, collapsed atoms, no EOS minimum) is a validation
    finding (:class:`ModelBreakdown`); what the reference does wrong stays bad input.
    """
    t0 = time.perf_counter()
    try:
        yield
    except UserInputError as exc:
        if side is None:
            raise
        if side == "model":
            raise ModelBreakdown(f"model: {exc}") from None
        raise UserInputError(f"{side}: {exc}") from None
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def _engines(model: Any, reference: Any) -> dict[str, Engine]:
    return {"model": resolve(model, "model"), "reference": resolve(reference, "reference")}


def equilibrium_states(
    engines: dict[str, Engine],
    element: str,
    structure: str,
    timings: dict[str, float] | None = None,
) -> dict[str, BulkState]:
    """Each calculator's own equilibrium crystal (EOS fit)."""
    timings = {} if timings is None else timings
    out = {}
    for side, eng in engines.items():
        with _timed(timings, f"equilibrium.{side}", side):
            out[side] = equilibrium_state(eng.calc, element, structure)
    return out


def _states(
    engines: dict[str, Engine],
    element: str,
    structure: str | None,
    states: dict[str, BulkState] | None,
    timings: dict[str, float],
) -> dict[str, BulkState]:
    if states is not None:
        return states
    element, structure = resolve_crystal(element, structure)
    return equilibrium_states(engines, element, structure, timings)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _figure(width: float = 6.0, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    def fmt(v: Any) -> str:
        return f"{v:.10g}" if isinstance(v, float | np.floating) else str(v)

    lines = [",".join(header)] + [",".join(fmt(v) for v in row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def _tag(frames: list[Atoms], **info: Any) -> list[Atoms]:
    for f in frames:
        f.info.update(info)
    return frames


# --------------------------------------------------------------------------------------------
# Bulk
# --------------------------------------------------------------------------------------------


def _eos_plot(states: dict[str, BulkState]) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    for k, (side, st) in enumerate(states.items()):
        e = st.eos_energies - st.eos_energies.min()
        ax.plot(st.eos_volumes, e, "o-", color=f"C{k}", ms=4, label=f"{side}: a = {st.a:.4f} Å")
    ax.set_xlabel("volume per atom (Å³)")
    ax.set_ylabel("energy per atom − minimum (eV)")
    ax.set_title("equation of state (each calculator's own scan)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def equilibrium_outcome(states: dict[str, BulkState]) -> CheckOutcome:
    """Side-by-side equilibrium numbers (no criteria: the ``bulk`` check judges them)."""
    m, r = states["model"], states["reference"]
    out = CheckOutcome("equilibrium")
    out.results = {
        "lattice_constant_a": _rel_pair(m.a, r.a),
        "bulk_modulus_gpa": _rel_pair(m.bulk_modulus_gpa, r.bulk_modulus_gpa),
        "energy_per_atom_ev": {"model": m.energy_per_atom, "reference": r.energy_per_atom},
        "volume_per_atom_a3": _rel_pair(m.volume_per_atom, r.volume_per_atom),
    }
    if m.c_over_a is not None and r.c_over_a is not None:
        out.results["c_over_a"] = _rel_pair(m.c_over_a, r.c_over_a)
    for side, st in states.items():
        unit = st.unit()
        unit.info["lattice_constant"] = st.a
        out.structures[f"bulk_{side}.extxyz"] = [unit]
    out.files["eos.png"] = _eos_plot(states)
    out.shared["states"] = {side: st.to_dict() for side, st in states.items()}
    return out


def validate_bulk(
    model: Any,
    reference: Any,
    element: str,
    structure: str | None = None,
    *,
    thresholds: Thresholds | None = None,
    settings: Settings | None = None,
    states: dict[str, BulkState] | None = None,
) -> CheckOutcome:
    """Lattice constant, bulk modulus and cubic elastic constants of both calculators.

    Args:
        model, reference: ASE calculator, calculator factory, Potential or JaxModel.
        element, structure: the crystal (structure None: ASE's reference state).
        thresholds: acceptance thresholds (defaults of the config).
        settings: computational settings.
        states: precomputed equilibrium states (``{"model": ..., "reference": ...}``).
    """
    thr = thresholds or Thresholds()
    settings = settings or Settings()
    engines = _engines(model, reference)
    out = CheckOutcome("bulk")
    states = _states(engines, element, structure, states, out.timings)
    m, r = states["model"], states["reference"]
    out.results["lattice_constant_a"] = _rel_pair(m.a, r.a)
    out.results["bulk_modulus_gpa"] = _rel_pair(m.bulk_modulus_gpa, r.bulk_modulus_gpa)
    out.criteria.append(
        _rel_criterion(
            "bulk.lattice_constant_rel_error", m.a, r.a, thr.lattice_constant_rel, "a", "Å"
        )
    )
    if m.c_over_a is not None and r.c_over_a is not None:
        out.results["c_over_a"] = _rel_pair(m.c_over_a, r.c_over_a)
        out.criteria.append(
            _rel_criterion(
                "bulk.c_over_a_rel_error", m.c_over_a, r.c_over_a, thr.lattice_constant_rel, "c/a"
            )
        )
    out.criteria.append(
        _rel_criterion(
            "bulk.bulk_modulus_rel_error",
            m.bulk_modulus_gpa,
            r.bulk_modulus_gpa,
            thr.bulk_modulus_rel,
            "B",
            "GPa",
        )
    )
    if m.structure not in CUBIC:
        out.messages.append(
            f"bulk: elastic constants are computed for cubic crystals only, not {m.structure}"
        )
        return out
    cij = {}
    for side, eng in engines.items():
        with _timed(out.timings, f"bulk.elastic.{side}", side):
            cij[side] = elastic_constants(
                eng.calc, states[side], optimizer=settings.relax.optimizer
            )
    for key in ("c11", "c12", "c44"):
        out.results[f"{key}_gpa"] = _rel_pair(cij["model"][key], cij["reference"][key])
        out.criteria.append(
            _rel_criterion(
                f"bulk.{key}_rel_error",
                cij["model"][key],
                cij["reference"][key],
                thr.elastic_rel,
                key.upper(),
                "GPa",
            )
        )
    out.results["bulk_modulus_voigt_gpa"] = _pair(
        cij["model"]["bulk_modulus_voigt_gpa"], cij["reference"]["bulk_modulus_voigt_gpa"]
    )
    ok = cij["model"]["converged"] and cij["reference"]["converged"]
    out.criteria.append(
        Criterion.is_true(
            "bulk.converged", ok, detail="internal relaxations of the strained cells converged"
        )
    )
    return out


# --------------------------------------------------------------------------------------------
# Vacancy
# --------------------------------------------------------------------------------------------


def _profile_plot(s: np.ndarray, em: np.ndarray, er: np.ndarray, neb: dict[str, Any]) -> bytes:
    fig = _figure()
    ax = fig.add_subplot()
    for k, (side, e) in enumerate((("model", em), ("reference", er))):
        res = neb[side]
        x = res.reaction_coordinate / res.reaction_coordinate[-1]
        ax.plot(s, e, "-", color=f"C{k}", label=f"{side}: E_m = {res.barrier_forward:.3f} eV")
        ax.plot(x, res.energies - res.energies[0], "o", color=f"C{k}", ms=4)
    ax.set_xlabel("normalised reaction coordinate s")
    ax.set_ylabel("energy relative to the initial state (eV)")
    ax.set_title("vacancy migration (CI-NEB, tangent-force splines)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _smoothness_plot(sm: Any) -> bytes:
    fig = _figure(6.0, 6.0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    ax1.plot(sm.s, sm.energy, "-", color="C0")
    ax1.set_ylabel("model energy (eV)")
    ax2.plot(sm.s, sm.force_slope, "-", color="C1", label="−F·τ")
    ax2.plot(sm.s, sm.fd_slope, ".", color="C0", ms=3, label="finite-difference dE/ds")
    ax2.set_xlabel("arc length along the dense path (Å)")
    ax2.set_ylabel("dE/ds (eV/Å)")
    ax2.legend(fontsize=8)
    ax1.set_title(
        f"consistency {sm.consistency_rel:.2%}, jump ratios E {sm.energy_jump_ratio:.1f}, "
        f"F {sm.force_jump_ratio:.1f}",
        fontsize=9,
    )
    fig.tight_layout()
    return _png(fig)


def validate_vacancy(
    model: Any,
    reference: Any,
    element: str,
    structure: str | None = None,
    *,
    thresholds: Thresholds | None = None,
    settings: Settings | None = None,
    states: dict[str, BulkState] | None = None,
    progress: Callable[[str], None] | None = None,
) -> CheckOutcome:
    """Vacancy formation and migration of both calculators, profile shape and path smoothness.

    Args:
        model, reference: ASE calculator, calculator factory, Potential or JaxModel.
        element, structure: the crystal (structure None: ASE's reference state).
        thresholds, settings: acceptance thresholds and computational settings.
        states: precomputed equilibrium states.
        progress: called with a short description before each long step.
    """
    thr = thresholds or Thresholds()
    settings = settings or Settings()
    note = progress or (lambda _: None)
    engines = _engines(model, reference)
    out = CheckOutcome("vacancy")
    states = _states(engines, element, structure, states, out.timings)
    ef, neb, relaxed_ok = {}, {}, {}
    for side, eng in engines.items():
        note(f"vacancy: {side} relaxations")
        with _timed(out.timings, f"vacancy.relax.{side}", side):
            perfect = perfect_supercell(states[side], settings.min_atoms)
            e_bulk = energy_of(eng.calc, perfect)
            initial, final, _ = vacancy_endpoints(perfect)
            n = len(perfect)
            vi = relax_defect(eng.calc, initial, "vacancy", e_bulk, n, settings.relax)
            vf = relax_defect(eng.calc, final, "vacancy", e_bulk, n, settings.relax)
        ef[side] = vi.formation_energy
        relaxed_ok[side] = vi.converged and vf.converged
        out.results.setdefault("relaxation", {})[side] = {
            "n_atoms_bulk": n,
            "steps_initial": vi.steps,
            "steps_final": vf.steps,
            "converged": relaxed_ok[side],
            "end_state_energy_difference": vf.energy - vi.energy,
        }
        out.structures[f"vacancy_{side}.extxyz"] = _tag([vi.atoms, vf.atoms], side=side)
        note(f"vacancy: {side} CI-NEB")
        with _timed(out.timings, f"vacancy.neb.{side}", side):
            neb[side] = migration_path(
                eng,
                vi.atoms,
                vf.atoms,
                n_images=settings.neb_images,
                fmax=settings.neb_fmax,
                max_steps=settings.neb_max_steps,
            )
        for key in ("compile", "band_setup"):
            if key in neb[side].timings:
                out.timings[f"vacancy.neb.{side}.{key}"] = neb[side].timings[key]
        res = neb[side]
        out.structures[f"neb_{side}.extxyz"] = _tag(list(res.images), side=side)
        out.structures[f"saddle_{side}.extxyz"] = _tag([res.images[res.saddle_index]], side=side)
    em = {side: neb[side].barrier_forward for side in SIDES}
    out.results["formation_energy_ev"] = _pair(ef["model"], ef["reference"])
    out.results["migration_barrier_ev"] = _rel_pair(em["model"], em["reference"])
    out.results["neb"] = {
        side: {
            "driver": neb[side].driver,
            "steps": neb[side].steps,
            "converged": neb[side].converged,
            "max_force": neb[side].max_force,
            "barrier_backward": neb[side].barrier_backward,
            "spline_barrier": neb[side].spline_barrier_forward,
            "saddle_image": neb[side].saddle_index,
        }
        for side in SIDES
    }
    prof = profile_rms(neb["model"], neb["reference"])
    rms, shape, s, e_m, e_r = prof.rms, prof.shape_rms, prof.s, prof.energy_a, prof.energy_b
    out.results["profile_rms_ev"] = rms
    out.results["profile_shape_rms"] = shape
    out.files["neb_profiles.png"] = _profile_plot(s, e_m, e_r, neb)
    out.files["neb_profiles.csv"] = _csv(
        ("s", "energy_model_ev", "energy_reference_ev"), list(zip(s, e_m, e_r, strict=True))
    )
    note("vacancy: model smoothness along its path")
    with _timed(out.timings, "vacancy.smoothness.model", "model"):
        sm = path_smoothness(engines["model"], neb["model"].images, settings.dense_points)
    out.results["smoothness_model"] = sm.summary()
    out.files["path_smoothness.png"] = _smoothness_plot(sm)
    out.files["path_smoothness.csv"] = _csv(
        ("s_a", "energy_ev", "fd_dE_ds", "minus_F_dot_tau"),
        list(zip(sm.s, sm.energy, sm.fd_slope, sm.force_slope, strict=True)),
    )
    out.shared["formation_energy"] = dict(ef)

    out.criteria += [
        _abs_criterion(
            "vacancy.formation_abs_error",
            ef["model"],
            ef["reference"],
            thr.vacancy_formation_ev,
            "eV",
            "E_f",
        ),
        _rel_criterion(
            "vacancy.migration_rel_error",
            em["model"],
            em["reference"],
            thr.migration_rel,
            "E_m (CI-NEB)",
            "eV",
        ),
        Criterion.at_most(
            "vacancy.profile_shape_rms",
            shape,
            thr.profile_shape_rel,
            detail="RMS difference of the NEB energy profiles on s ∈ [0, 1], each divided by its "
            f"own barrier (unscaled RMS {rms:.3g} eV)",
        ),
        Criterion.at_most(
            "vacancy.force_consistency_rel",
            sm.consistency_rel,
            thr.force_consistency_rel,
            detail=f"model: max |dE/ds + F·τ| / max |F·τ| on {sm.n_evaluations} points "
            f"({sm.points_between_images}+ between images); abs {sm.consistency_abs:.3g} eV/Å",
        ),
        Criterion.at_most(
            "vacancy.energy_jump_ratio",
            sm.energy_jump_ratio,
            thr.jump_ratio,
            detail="model: largest |Δ²E| / median along the dense path",
        ),
        Criterion.at_most(
            "vacancy.force_jump_ratio",
            sm.force_jump_ratio,
            thr.jump_ratio,
            detail="model: largest ‖Δ²F‖ / median along the dense path",
        ),
        Criterion.is_true(
            "vacancy.converged",
            all(relaxed_ok.values()) and all(neb[s_].converged for s_ in SIDES),
            detail=f"relaxations to {settings.relax.fmax} eV/Å and CI-NEB to "
            f"{settings.neb_fmax} eV/Å, both calculators",
        ),
    ]
    for side in SIDES:
        if not neb[side].converged:
            out.messages.append(
                f"vacancy: the {side} CI-NEB did not converge in {neb[side].steps} steps "
                f"(max force {neb[side].max_force:.3f} eV/Å); its barrier is not reliable"
            )
    return out


# --------------------------------------------------------------------------------------------
# Interstitial, divacancy, surfaces
# --------------------------------------------------------------------------------------------


def validate_interstitial(
    model: Any,
    reference: Any,
    element: str,
    structure: str | None = None,
    *,
    thresholds: Thresholds | None = None,
    settings: Settings | None = None,
    states: dict[str, BulkState] | None = None,
) -> CheckOutcome:
    """Interstitial formation energies; the lowest configuration of each side is compared."""
    thr = thresholds or Thresholds()
    settings = settings or Settings()
    engines = _engines(model, reference)
    out = CheckOutcome("interstitial")
    states = _states(engines, element, structure, states, out.timings)
    names = interstitial_names(states["reference"].structure)
    energies: dict[str, dict[str, float]] = {}
    ok = True
    for side, eng in engines.items():
        with _timed(out.timings, f"interstitial.relax.{side}", side):
            perfect = perfect_supercell(states[side], settings.min_atoms)
            e_bulk = energy_of(eng.calc, perfect)
            frames = []
            for name in names:
                d = relax_defect(
                    eng.calc,
                    interstitial(states[side], perfect, name),
                    name,
                    e_bulk,
                    len(perfect),
                    settings.relax,
                )
                energies.setdefault(name, {})[side] = d.formation_energy
                out.results.setdefault("relaxation", {}).setdefault(name, {})[side] = {
                    "converged": d.converged,
                    "steps": d.steps,
                    "max_displacement": d.displacement,
                }
                ok = ok and d.converged
                frames.append(d.atoms)
        out.structures[f"interstitial_{side}.extxyz"] = _tag(frames, side=side)
    for name in names:
        out.results[f"{name}_formation_ev"] = _pair(
            energies[name]["model"], energies[name]["reference"]
        )
    lowest = {side: min(names, key=lambda n: energies[n][side]) for side in SIDES}
    low_m = energies[lowest["model"]]["model"]
    low_r = energies[lowest["reference"]]["reference"]
    out.results["lowest"] = {
        "model": lowest["model"],
        "reference": lowest["reference"],
        "formation_ev": _pair(low_m, low_r),
    }
    out.criteria.append(
        _abs_criterion(
            "interstitial.formation_abs_error",
            low_m,
            low_r,
            thr.defect_energy_ev,
            "eV",
            f"lowest E_f (model {lowest['model']}, reference {lowest['reference']})",
        )
    )
    if len(names) > 1:
        ranked = sorted(names, key=lambda n: energies[n]["reference"])
        gap = energies[ranked[1]]["reference"] - energies[ranked[0]]["reference"]
        same = lowest["model"] == lowest["reference"]
        out.criteria.append(
            Criterion.is_true(
                "interstitial.same_ground_state",
                same or gap < thr.defect_energy_ev,
                detail=f"model's lowest {lowest['model']}, reference's {lowest['reference']} "
                f"(reference gap to the next {gap:.3f} eV; a flip within defect_energy_ev passes)",
            )
        )
    out.criteria.append(
        Criterion.is_true("interstitial.converged", ok, detail="all relaxations converged")
    )
    return out


def validate_divacancy(
    model: Any,
    reference: Any,
    element: str,
    structure: str | None = None,
    *,
    thresholds: Thresholds | None = None,
    settings: Settings | None = None,
    states: dict[str, BulkState] | None = None,
    vacancy_formation: dict[str, float] | None = None,
) -> CheckOutcome:
    """Nearest-neighbour divacancy formation and binding energy E_b = 2E_f(1v) − E_f(2v).

    Args:
        vacancy_formation: ``{"model": E_f, "reference": E_f}`` of the single vacancy from the
            vacancy check (None: relaxed here).
    """
    thr = thresholds or Thresholds()
    settings = settings or Settings()
    engines = _engines(model, reference)
    out = CheckOutcome("divacancy")
    states = _states(engines, element, structure, states, out.timings)
    e2, e1, ok = {}, {}, True
    for side, eng in engines.items():
        with _timed(out.timings, f"divacancy.relax.{side}", side):
            perfect = perfect_supercell(states[side], settings.min_atoms)
            e_bulk = energy_of(eng.calc, perfect)
            atoms, _ = divacancy(perfect)
            d = relax_defect(eng.calc, atoms, "divacancy", e_bulk, len(perfect), settings.relax)
            e2[side] = d.formation_energy
            ok = ok and d.converged
            if vacancy_formation is not None:
                e1[side] = vacancy_formation[side]
            else:
                vac, _, _ = vacancy_endpoints(perfect)
                v = relax_defect(eng.calc, vac, "vacancy", e_bulk, len(perfect), settings.relax)
                e1[side] = v.formation_energy
                ok = ok and v.converged
        out.structures[f"divacancy_{side}.extxyz"] = _tag([d.atoms], side=side)
    eb = {side: 2.0 * e1[side] - e2[side] for side in SIDES}
    out.results["formation_energy_ev"] = _pair(e2["model"], e2["reference"])
    out.results["binding_energy_ev"] = _pair(eb["model"], eb["reference"])
    out.results["vacancy_formation_energy_ev"] = _pair(e1["model"], e1["reference"])
    out.criteria += [
        _abs_criterion(
            "divacancy.formation_abs_error",
            e2["model"],
            e2["reference"],
            thr.defect_energy_ev,
            "eV",
            "E_f(2v)",
        ),
        _abs_criterion(
            "divacancy.binding_abs_error",
            eb["model"],
            eb["reference"],
            thr.defect_energy_ev,
            "eV",
            "E_b = 2E_f(1v) − E_f(2v)",
        ),
        Criterion.is_true("divacancy.converged", ok, detail="all relaxations converged"),
    ]
    return out


def validate_surface(
    model: Any,
    reference: Any,
    element: str,
    structure: str | None = None,
    *,
    thresholds: Thresholds | None = None,
    settings: Settings | None = None,
    states: dict[str, BulkState] | None = None,
) -> CheckOutcome:
    """Relaxed surface energies (J/m²) of the low-index surfaces, each calculator's own slab."""
    thr = thresholds or Thresholds()
    settings = settings or Settings()
    engines = _engines(model, reference)
    out = CheckOutcome("surface")
    states = _states(engines, element, structure, states, out.timings)
    struct = states["reference"].structure
    values: dict[str, dict[str, float]] = {}
    ok = True
    for side, eng in engines.items():
        frames = []
        with _timed(out.timings, f"surface.relax.{side}", side):
            for miller in default_millers(struct):
                label = surface_label(struct, miller)
                slab = surface_slab(states[side], miller)
                se = surface_energy(
                    eng.calc, slab, label, states[side].energy_per_atom, settings.relax
                )
                values.setdefault(label, {})[side] = se.energy_j_m2
                out.results.setdefault("slabs", {}).setdefault(label, {})[side] = se.summary()
                ok = ok and se.relaxed.converged
                frames.append(se.relaxed.atoms)
        out.structures[f"surfaces_{side}.extxyz"] = _tag(frames, side=side)
    for label, v in values.items():
        out.results[f"surface_{label}_j_m2"] = _rel_pair(v["model"], v["reference"])
        out.criteria.append(
            _rel_criterion(
                f"surface.{label}_rel_error",
                v["model"],
                v["reference"],
                thr.surface_energy_rel,
                f"E_s({label})",
                "J/m²",
            )
        )
    out.criteria.append(
        Criterion.is_true("surface.converged", ok, detail="all slab relaxations converged")
    )
    return out


# --------------------------------------------------------------------------------------------
# Test set and transferability
# --------------------------------------------------------------------------------------------


def validate_test_set(model: Any, path: str | Path) -> CheckOutcome:
    """E/F/S errors of the model against a labelled file, per config_type, with parity plots."""
    from mlipctl.data.io import read_structures

    out = CheckOutcome("test_set")
    items = read_structures(path)
    with _timed(out.timings, "test_set.model", "model"):
        res = evaluate_test_set(resolve(model, "model"), items)
    out.results = {
        "file": str(path),
        "n_structures": len(items),
        "units": {"energy_per_atom": "meV/atom", "forces": "eV/Å", "stress": "GPa"},
        **res.metrics,
    }
    for qty, data in res.parity.items():
        out.files[f"parity_{qty}.png"] = parity_plot(qty, data)
    return out


def validate_transferability(
    model: Any,
    reference: Any,
    element: str,
    structure: str | None = None,
    *,
    structures: Sequence[Atoms] | None = None,
    settings: Settings | None = None,
    states: dict[str, BulkState] | None = None,
) -> CheckOutcome:
    """The (coordination, disorder) force-error map (see :mod:`validate_transfer`).

    Args:
        structures: structures to map (None: generated slabs, rattled bulk and a reference
            melt-quenched amorphous cell).
    """
    settings = settings or Settings()
    engines = _engines(model, reference)
    out = CheckOutcome("transferability")
    states = _states(engines, element, structure, states, out.timings)
    if structures is None:
        with _timed(out.timings, "transferability.generate"):
            structures = default_transfer_structures(
                engines["reference"],
                states["reference"],
                seed=settings.seed,
                amorphous=settings.amorphous,
            )
        source = "generated: rattled bulk, low-index slabs, reference melt-quenched cell"
    else:
        source = "given structures"
    with _timed(out.timings, "transferability.evaluate", "model"):
        res = transferability_map(
            engines["model"], engines["reference"], structures, states["reference"]
        )
    out.results = {"source": source, **res.summary()}
    out.files["transferability_map.png"] = heatmap_png(res)
    out.files["transferability_atoms.csv"] = res.csv()
    out.structures["transferability.extxyz"] = res.structures
    return out


# --------------------------------------------------------------------------------------------
# Writing and the CLI runner
# --------------------------------------------------------------------------------------------


def breakdown_outcome(step: str, reason: str) -> CheckOutcome:
    """A check the model broke down in: one failed criterion that says why."""
    out = CheckOutcome(name=step)
    out.results["model_breakdown"] = reason
    out.criteria.append(Criterion.is_true(f"{step}.model_breakdown", False, detail=reason))
    out.messages.append(f"{step}: the model broke down ({reason}); the check failed")
    return out


def write_outcome(outcome: CheckOutcome, out_dir: str | Path) -> dict[str, str]:
    """Write an outcome's structures (extxyz) and files atomically; returns role -> path."""
    from mlipctl.data.io import write_structures_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, str] = {}
    for name, frames in outcome.structures.items():
        clean = []
        for f in frames:
            g = f.copy()
            g.calc = f.calc  # keep energy/forces (SinglePointCalculator) in the file
            g.set_constraint()
            clean.append(g)
        path = write_structures_atomic(out / name, clean)
        artifacts[f"{outcome.name}.{Path(name).stem}"] = str(path)
    for name, data in outcome.files.items():
        atomic_write_bytes(out / name, data)
        artifacts[f"{outcome.name}.{Path(name).stem}"] = str(out / name)
    return artifacts


def _supercell_atoms(element: str, structure: str, min_atoms: int) -> int:
    from mlipctl.data.crystals import supercell_for, unit_cell

    return len(unit_cell(element, structure)) * int(np.prod(supercell_for(structure, min_atoms)))


def _json_safe(obj: Any) -> Any:
    """Plain JSON (NaN/inf -> None, numpy scalars -> Python numbers)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


_CACHE_DIR = ".validate-steps"


def _cache_key(cfg: ValidateConfig) -> dict[str, Any]:
    dump = cfg.model_dump(mode="json")
    dump.pop("output", None)
    dump.pop("checks", None)  # adding a check must not invalidate finished ones
    return dump


def _load_cached(out: Path, step: str, key: dict[str, Any]) -> dict[str, Any] | None:
    path = out / _CACHE_DIR / f"{step}.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data.get("key") != key:
        return None
    if not all(Path(p).exists() for p in data.get("artifacts", {}).values()):
        return None
    return data


def _save_cached(
    out: Path, step: str, key: dict[str, Any], outcome: CheckOutcome, artifacts: dict[str, str]
) -> None:
    data = {
        "key": key,
        "results": outcome.results,
        "criteria": [c.model_dump(mode="json") for c in outcome.criteria],
        "artifacts": artifacts,
        "timings": outcome.timings,
        "messages": outcome.messages,
        "shared": outcome.shared,
    }
    text = json.dumps(_json_safe(data), indent=1)
    atomic_write_bytes(out / _CACHE_DIR / f"{step}.json", text.encode())


def _from_cache(step: str, data: dict[str, Any]) -> tuple[CheckOutcome, dict[str, str]]:
    outcome = CheckOutcome(
        step,
        results=data["results"],
        criteria=[Criterion.model_validate(c) for c in data["criteria"]],
        timings={},
        messages=list(data["messages"]),
        shared=data["shared"],
    )
    return outcome, dict(data["artifacts"])


def load_model(path: str | Path) -> tuple[Any, tuple[str, ...], float | None]:
    """(Potential, its elements, its cutoff in Å) of a ``.mlip`` file (UserInputError if bad)."""
    from mlipctl.model.potential import load_potential

    potential = load_potential(path)
    return potential, tuple(potential.spec.species), potential.spec.cutoff


def _model_element(species: Sequence[str], element: str | None) -> str:
    if element is None:
        if len(species) != 1:
            raise UserInputError(
                f"the model knows {len(species)} elements ({', '.join(species)}); choose one "
                "with crystal.element (--element)"
            )
        return species[0]
    if element not in species:
        raise UserInputError(
            f"crystal.element {element} is not one of the model's elements ({', '.join(species)})"
        )
    return element


def _check_reference_supports(cfg: ValidateConfig, element: str) -> None:
    from mlipctl.reference.registry import supported_elements

    known = supported_elements(cfg.reference)
    if known is not None and element not in known:
        raise UserInputError(
            f"the reference {cfg.reference.kind} does not support {element} (it supports "
            f"{', '.join(sorted(known))}); choose another reference"
        )


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[..., None]]:
    """Yields ``update(description, advance=0)``; a rich bar on stderr when enabled."""
    if not enabled:
        yield lambda description, advance=0: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("validate"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    ) as bar:
        task = bar.add_task("starting", total=total)

        def update(description: str, advance: int = 0) -> None:
            bar.update(task, description=description, advance=advance)

        yield update


def run_validate(cfg: ValidateConfig, *, resume: bool = False, progress: bool = True) -> Report:
    """Run `mlipctl validate` (see the module docstring); the CLI writes report.json/.md."""
    from mlipctl.reference.registry import make_calculator

    t_start = time.perf_counter()
    out = Path(cfg.output)
    timings: dict[str, float] = {}
    messages: list[str] = []
    artifacts: dict[str, str] = {}
    criteria: list[Criterion] = []
    results: dict[str, Any] = {}

    with _timed(timings, "load_model"):
        loaded, species, cutoff = load_model(cfg.model)
    element = _model_element(species, cfg.crystal.element)
    element, structure = resolve_crystal(element, cfg.crystal.structure)
    _check_reference_supports(cfg, element)
    model = resolve(loaded, "model")
    reference = resolve(lambda: make_calculator(cfg.reference), "reference")
    engines = {"model": model, "reference": reference}
    settings = Settings.from_config(cfg)
    thr = cfg.thresholds
    results["setup"] = {
        "model": str(cfg.model),
        "model_species": list(species),
        "model_cutoff_a": cutoff,
        "reference": cfg.reference.kind,
        "element": element,
        "structure": structure,
        "defect_supercell_atoms": _supercell_atoms(element, structure, cfg.crystal.min_atoms),
    }
    key = _cache_key(cfg)
    steps = ["equilibrium", *cfg.checks]
    if cfg.test_set is not None:
        steps.append("test_set")
    steps.append("transferability")

    states: dict[str, BulkState] = {}
    shared: dict[str, Any] = {}
    broken = ""  # why the model has no equilibrium crystal, when it has none

    def compute(step: str, note: Callable[..., None]) -> CheckOutcome:
        kw: dict[str, Any] = {"thresholds": thr, "settings": settings, "states": states}
        if step == "equilibrium":
            return equilibrium_outcome(equilibrium_states(engines, element, structure, timings))
        if step == "bulk":
            return validate_bulk(model, reference, element, structure, **kw)
        if step == "vacancy":
            return validate_vacancy(
                model, reference, element, structure, progress=lambda d: note(d), **kw
            )
        if step == "interstitial":
            return validate_interstitial(model, reference, element, structure, **kw)
        if step == "divacancy":
            vac = shared.get("vacancy", {}).get("formation_energy")
            return validate_divacancy(
                model, reference, element, structure, vacancy_formation=vac, **kw
            )
        if step == "surface":
            return validate_surface(model, reference, element, structure, **kw)
        if step == "test_set":
            assert cfg.test_set is not None
            return validate_test_set(model, cfg.test_set)
        if step == "transferability":
            files = None
            if cfg.transferability:
                from mlipctl.data.sources import read_frames

                files = []
                for p in cfg.transferability:
                    for f in read_frames(str(p)):
                        f.info.setdefault("config_type", Path(p).stem)
                        files.append(f)
            return validate_transferability(
                model,
                reference,
                element,
                structure,
                structures=files,
                settings=settings,
                states=states,
            )
        raise UserInputError(f"unknown check {step!r}")  # pragma: no cover - config forbids it

    with _progress(progress, len(steps)) as update:
        for step in steps:
            update(step)
            cached = _load_cached(out, step, key) if resume else None
            if cached is not None:
                outcome, files = _from_cache(step, cached)
                messages.append(f"resume: reused the finished '{step}' step of an earlier run")
            else:
                with _timed(timings, f"{step}.total"):
                    try:
                        if broken:  # without its equilibrium crystal no check can run
                            raise ModelBreakdown(broken)
                        outcome = compute(step, lambda d: update(d))
                    except ModelBreakdown as exc:
                        outcome = breakdown_outcome(step, str(exc))
                with _timed(timings, "write"):
                    files = write_outcome(outcome, out)
                    _save_cached(out, step, key, outcome, files)
            if step == "equilibrium" and "model_breakdown" in outcome.results:
                broken = outcome.results["model_breakdown"]
            elif step == "equilibrium":
                states.update(
                    {s: BulkState.from_dict(d) for s, d in outcome.shared["states"].items()}
                )
            shared[step] = outcome.shared
            results[step] = outcome.results
            criteria += outcome.criteria
            for k, v in outcome.timings.items():
                timings.setdefault(k, v)
            messages += outcome.messages
            artifacts.update(files)
            update(step, advance=1)
    timings["total"] = time.perf_counter() - t_start
    failed = [c.name for c in criteria if not c.passed]
    results["verdict"] = {
        "passed": not failed,
        "criteria": len(criteria),
        "failed": failed,
    }
    return Report(
        command="validate",
        config=cfg.model_dump(mode="json"),
        environment=Environment.capture(),
        timings=timings,
        results=results,
        criteria=criteria,
        artifacts=artifacts,
        messages=messages,
    )
