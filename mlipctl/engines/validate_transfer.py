"""Test-set metrics and the transferability map of `validate`.

* :func:`evaluate_test_set`: energy (per atom), force and stress MAE/RMSE of a model against the
  labels of a test file, overall and per ``config_type``, plus parity plots.
* :func:`transferability_map`: for every atom of a set of structures, its coordination number
  (neighbours within the midpoint of the ideal crystal's first and second shells), a bond-angle
  disorder metric (RMS deviation of its bond angles from the nearest angle the ideal crystal has,
  in degrees: 0 in a perfect or uniformly strained crystal, also 0 for an unrelaxed surface atom
  that merely misses neighbours) and the error of its force |F_model − F_ref|. Binned tables,
  Spearman rank correlations and a 2-D heat map of the mean error per (CN, disorder) bin show
  where the model leaves its training domain: error rises as CN drops and disorder grows.
  The generalised coordination number GCN_i = Σ_j CN_j / CN_ideal over the neighbours j of i
  (Calle-Vallejo et al., Angew. Chem. Int. Ed. 53, 8316 (2014)) is reported too: it also sees
  the sub-surface atoms, whose first shell is complete but whose neighbours are not, and whose
  force errors are often as large as those of the surface atoms themselves.
* :func:`default_transfer_structures`: low-index slabs and a melt-quenched amorphous cell made
  with the reference itself (short Langevin melt and quench with ASE), so no extra input is
  needed.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ase import Atoms, units

from mlipctl.engines.validate_bulk import BulkState, Engine, evaluate_structures
from mlipctl.errors import UserInputError

# --------------------------------------------------------------------------------------------
# Test-set metrics
# --------------------------------------------------------------------------------------------


def _stats(err: np.ndarray) -> dict[str, float]:
    if err.size == 0:
        return {}
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err * err))),
        "count": int(err.size),
    }


@dataclass
class HeldOutResult:
    """Model vs labels on a test set.

    Attributes:
        metrics: ``{group: {quantity: {mae, rmse, count}}}`` with groups ``overall`` and each
            config_type; quantities ``energy_per_atom`` (meV/atom), ``forces`` (eV/Å per
            component), ``stress`` (GPa per component).
        parity: ``{quantity: (labels, predictions, config_types)}`` arrays for the plots, in
            eV/atom, eV/Å and GPa.
    """

    metrics: dict[str, dict[str, dict[str, float]]]
    parity: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]


def evaluate_test_set(model: Engine, items: Sequence[Any]) -> HeldOutResult:
    """Metrics of ``model`` on labelled structures (:class:`~mlipctl.data.io.Labelled`).

    Raises:
        UserInputError: no structure carries an energy, force or stress label.
    """
    frames = [it.atoms for it in items]
    want_stress = any(it.stress is not None for it in items)
    preds = evaluate_structures(model, frames, stress=want_stress)
    rows: dict[str, list[tuple[float, float, str]]] = {"energy": [], "forces": [], "stress": []}
    per_group: dict[str, dict[str, list[np.ndarray]]] = {}

    def add(group: str, qty: str, err: np.ndarray) -> None:
        for g in ("overall", group):
            per_group.setdefault(g, {}).setdefault(qty, []).append(err.ravel())

    for it, p in zip(items, preds, strict=True):
        n = len(it.atoms)
        ct = it.config_type
        if it.energy is not None:
            e_lab, e_pred = it.energy / n, p["energy"] / n
            rows["energy"].append((e_lab, e_pred, ct))
            add(ct, "energy_per_atom", np.array([1000.0 * (e_pred - e_lab)]))
        if it.forces is not None:
            f_lab, f_pred = np.asarray(it.forces).ravel(), p["forces"].ravel()
            rows["forces"].extend(zip(f_lab, f_pred, [ct] * f_lab.size, strict=True))
            add(ct, "forces", f_pred - f_lab)
        if it.stress is not None and "stress" in p:
            from mlipctl.data.io import stress_to_3x3

            s_lab = stress_to_3x3(it.stress) / units.GPa
            s_pred = stress_to_3x3(p["stress"]) / units.GPa
            idx = np.triu_indices(3)
            rows["stress"].extend(zip(s_lab[idx], s_pred[idx], [ct] * 6, strict=True))
            add(ct, "stress", s_pred[idx] - s_lab[idx])
    if not any(rows.values()):
        raise UserInputError("the test set has no energy, force or stress labels to compare with")
    metrics = {
        g: {q: _stats(np.concatenate(v)) for q, v in qs.items()} for g, qs in per_group.items()
    }
    parity = {
        q: (
            np.array([r[0] for r in rs], dtype=np.float64),
            np.array([r[1] for r in rs], dtype=np.float64),
            np.array([r[2] for r in rs], dtype=object),
        )
        for q, rs in rows.items()
        if rs
    }
    return HeldOutResult(metrics=metrics, parity=parity)


_PARITY_UNITS = {"energy": "eV/atom", "forces": "eV/Å", "stress": "GPa"}


def parity_plot(quantity: str, data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> bytes:
    """PNG parity plot (reference label vs model) coloured by config_type."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lab, pred, groups = data
    fig = Figure(figsize=(5.0, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, g in enumerate(sorted(set(groups.tolist()))):
        sel = groups == g
        ax.plot(lab[sel], pred[sel], ".", ms=3, alpha=0.6, color=f"C{k % 10}", label=str(g))
    lo, hi = float(min(lab.min(), pred.min())), float(max(lab.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
    unit = _PARITY_UNITS[quantity]
    ax.set_xlabel(f"test-set label: {quantity} ({unit})")
    ax.set_ylabel(f"model {quantity} ({unit})")
    rmse = float(np.sqrt(np.mean((pred - lab) ** 2)))
    ax.set_title(f"{quantity}: RMSE {rmse:.4g} {unit}, {lab.size} values", fontsize=9)
    ax.legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Local environment descriptors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShellInfo:
    """Ideal-crystal reference for the local descriptors.

    Attributes:
        cutoff: midpoint between the first and second neighbour shells, Å.
        cn_ideal: coordination number of the ideal crystal within ``cutoff``.
        angles: sorted distinct bond angles (degrees) of an atom of the ideal crystal.
    """

    cutoff: float
    cn_ideal: int
    angles: tuple[float, ...]


def _shells(distances: np.ndarray, tol: float = 0.15) -> list[float]:
    """Distinct neighbour-shell radii (distances closer than ``tol`` Å are one shell)."""
    d = np.sort(distances[distances > 1e-6])
    shells = [float(d[0])]
    for x in d[1:]:
        if x - shells[-1] > tol:
            shells.append(float(x))
    return shells


def shell_info(state: BulkState) -> ShellInfo:
    """Cutoff, ideal coordination and ideal bond angles of ``state``'s crystal."""
    from mlipctl.data.crystals import build_crystal

    ideal = build_crystal(
        state.element, state.structure, a=state.a, c_over_a=state.c_over_a, supercell=(3, 3, 3)
    )
    d = ideal.get_distances(0, list(range(len(ideal))), mic=True)
    shells = _shells(d)
    if len(shells) < 2:
        raise UserInputError("cannot find two neighbour shells in the ideal crystal")
    cutoff = 0.5 * (shells[0] + shells[1])
    cn, angles = local_environment(ideal, cutoff, None)
    # Angles closer than 0.1° are one (a non-ideal hcp c/a splits them slightly).
    distinct: list[float] = []
    for a in np.sort(_atom_angles(ideal, cutoff, 0)):
        if not distinct or a - distinct[-1] > 0.1:
            distinct.append(round(float(a), 2))
    return ShellInfo(cutoff=cutoff, cn_ideal=int(cn[0]), angles=tuple(distinct))


def _edges(atoms: Atoms, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """(i (P,), r_ij (P, 3)) of the full neighbour list, sorted by i."""
    from mlipctl.data.neighbors import edge_vectors, neighbor_pairs

    pairs = neighbor_pairs(atoms, cutoff)
    vec = edge_vectors(atoms, pairs)
    order = np.argsort(pairs[0], kind="stable")
    return pairs[0][order], vec[order]


def _angles(vectors: np.ndarray) -> np.ndarray:
    """All bond angles (degrees) between pairs of the given bond vectors (k, 3)."""
    if len(vectors) < 2:
        return np.zeros(0)
    u = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    cos = np.clip(u @ u.T, -1.0, 1.0)
    iu = np.triu_indices(len(u), 1)
    return np.degrees(np.arccos(cos[iu]))


def _atom_angles(atoms: Atoms, cutoff: float, index: int) -> np.ndarray:
    i, vec = _edges(atoms, cutoff)
    return _angles(vec[i == index])


def local_environment(
    atoms: Atoms, cutoff: float, ideal_angles: Sequence[float] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Coordination numbers (N,) and bond-angle disorder (N,) in degrees.

    The disorder of atom i is the RMS over all pairs of its bonds of the distance from the bond
    angle to the nearest ideal angle; NaN for atoms with fewer than two neighbours (no angle) or
    when ``ideal_angles`` is None.
    """
    i, vec = _edges(atoms, cutoff)
    n = len(atoms)
    cn = np.bincount(i, minlength=n)
    return cn, _disorder(i, vec, cn, ideal_angles)


def generalized_coordination(atoms: Atoms, cutoff: float, cn_ideal: int) -> np.ndarray:
    """(N,) GCN_i = Σ_j CN_j / cn_ideal over the neighbours j of i (bulk: cn_ideal)."""
    from mlipctl.data.neighbors import neighbor_pairs

    i, j, _ = neighbor_pairs(atoms, cutoff)
    cn = np.bincount(i, minlength=len(atoms))
    return np.bincount(i, weights=cn[j], minlength=len(atoms)) / float(cn_ideal)


def _disorder(
    i: np.ndarray, vec: np.ndarray, cn: np.ndarray, ideal_angles: Sequence[float] | None
) -> np.ndarray:
    n = len(cn)
    disorder = np.full(n, np.nan)
    if ideal_angles is None:
        return disorder
    ref = np.asarray(sorted(ideal_angles), dtype=np.float64)
    starts = np.concatenate([[0], np.cumsum(cn)])
    for k in range(n):
        theta = _angles(vec[starts[k] : starts[k + 1]])
        if theta.size:
            dev = np.min(np.abs(theta[:, None] - ref[None, :]), axis=1)
            disorder[k] = float(np.sqrt(np.mean(dev * dev)))
    return disorder


# --------------------------------------------------------------------------------------------
# Default structures
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AmorphousSettings:
    """Melt-quench of the default transferability cell (reference Langevin MD).

    Attributes:
        min_atoms: smallest cell (cubic repetition of the conventional cell).
        melt_temperature_k: None: twice the experimental melting point (3000 K if unknown).
        melt_steps, quench_steps: Langevin steps at the melt temperature and of the linear
            ramp down to ``final_temperature_k``.
        timestep_fs: MD time step.
        volume_scale: volume per atom relative to the crystal (liquids are less dense).
        friction_per_ps: Langevin friction.
    """

    min_atoms: int = 100
    melt_temperature_k: float | None = None
    melt_steps: int = 250
    quench_steps: int = 350
    final_temperature_k: float = 300.0
    timestep_fs: float = 2.0
    volume_scale: float = 1.05
    friction_per_ps: float = 5.0


def _melt_temperature(element: str, given: float | None) -> float:
    if given is not None:
        return given
    from mlipctl.data.generate import MELTING_POINTS_K

    tm = MELTING_POINTS_K.get(element)
    return 2.0 * tm if tm is not None else 3000.0


def amorphous_cell(
    reference: Engine, state: BulkState, settings: AmorphousSettings, seed: int = 0
) -> Atoms:
    """A melt-quenched cell made with the reference calculator (Langevin, ASE)."""
    from ase.constraints import FixCom
    from ase.md import velocitydistribution as vd
    from ase.md.langevin import Langevin

    from mlipctl.data.crystals import build_crystal

    rng = np.random.default_rng(seed)
    atoms = build_crystal(
        state.element,
        state.structure,
        a=state.a * settings.volume_scale ** (1.0 / 3.0),
        c_over_a=state.c_over_a,
        min_atoms=settings.min_atoms,
    )
    atoms.calc = reference.calc
    atoms.set_constraint(FixCom())
    t_melt = _melt_temperature(state.element, settings.melt_temperature_k)
    thermalize = getattr(vd, "thermalize_momenta", None)  # ASE >= 3.29; older: the old name
    if thermalize is not None:
        thermalize(atoms, temperature_K=t_melt, rng=rng)
    else:  # pragma: no cover - ASE < 3.29
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=t_melt, rng=rng)
    vd.Stationary(atoms)
    dyn = Langevin(
        atoms,
        settings.timestep_fs * units.fs,
        temperature_K=t_melt,
        friction=settings.friction_per_ps / (1000.0 * units.fs),
        fixcm=False,  # the FixCom constraint keeps the centre of mass (ASE >= 3.28 advice)
        rng=rng,
    )
    dyn.run(settings.melt_steps)
    for step in range(1, settings.quench_steps + 1):
        frac = step / settings.quench_steps
        dyn.set_temperature(temperature_K=t_melt + (settings.final_temperature_k - t_melt) * frac)
        dyn.run(1)
    if not np.all(np.isfinite(atoms.positions)):
        raise UserInputError("the reference melt-quench MD diverged (non-finite positions)")
    out = Atoms(atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=True)
    out.wrap()
    out.info["config_type"] = "amorphous"
    return out


def default_transfer_structures(
    reference: Engine,
    state: BulkState,
    *,
    seed: int = 0,
    rattle: float = 0.03,
    amorphous: AmorphousSettings | None = None,
) -> list[Atoms]:
    """Low-index slabs (rattled by ``rattle`` Å so interior forces are not zero by symmetry),
    a rattled bulk cell as the in-domain baseline and a melt-quenched amorphous cell."""
    from mlipctl.data.crystals import build_crystal
    from mlipctl.engines.validate_defects import default_millers, surface_label, surface_slab

    rng = np.random.default_rng(seed)
    out: list[Atoms] = []
    bulk = build_crystal(
        state.element, state.structure, a=state.a, c_over_a=state.c_over_a, min_atoms=60
    )
    bulk.positions += rng.normal(0.0, rattle, bulk.positions.shape)
    bulk.info["config_type"] = "bulk"
    out.append(bulk)
    for miller in default_millers(state.structure):
        slab = surface_slab(state, miller, min_atoms=60)
        slab.positions += rng.normal(0.0, rattle, slab.positions.shape)
        slab.info["config_type"] = f"surface_{surface_label(state.structure, miller)}"
        out.append(slab)
    out.append(amorphous_cell(reference, state, amorphous or AmorphousSettings(), seed))
    return out


# --------------------------------------------------------------------------------------------
# The map
# --------------------------------------------------------------------------------------------


@dataclass
class TransferResult:
    """Per-atom descriptors and force errors, with their summaries.

    Attributes:
        cn: (A,) coordination numbers of all atoms of all structures.
        gcn: (A,) generalised coordination numbers.
        disorder: (A,) bond-angle disorder, degrees (NaN: fewer than two neighbours).
        force_error: (A,) |F_model − F_ref|, eV/Å.
        structure: (A,) index of the structure each atom belongs to.
        config_type: (A,) label of that structure.
        shells: the ideal-crystal reference.
        cn_table: rows {cn, count, mean, median, p90} of the force error per CN.
        gcn_table: rows {low, high, count, mean, median, p90} per unit-wide GCN bin.
        disorder_table: rows {low, high, count, mean, median, p90} per disorder bin.
        group_table: rows {config_type, atoms, mean, median, p90, max} per structure label.
        spearman_cn: Spearman ρ(CN, error) (negative when error grows as CN drops).
        spearman_disorder: Spearman ρ(disorder, error).
        spearman_gcn: Spearman ρ(GCN, error) (negative like ρ(CN, error)).
        grid: mean error per (CN, disorder bin) cell: (cn values, disorder edges,
            (len(cn values), len(edges) − 1) array with NaN for empty cells, counts).
        structures: the evaluated structures with per-atom arrays ``cn``, ``disorder``,
            ``force_error``, ``forces_model``, ``forces_reference``.
    """

    cn: np.ndarray
    gcn: np.ndarray
    disorder: np.ndarray
    force_error: np.ndarray
    structure: np.ndarray
    config_type: np.ndarray
    shells: ShellInfo
    cn_table: list[dict[str, float]]
    gcn_table: list[dict[str, float]]
    disorder_table: list[dict[str, float]]
    group_table: list[dict[str, Any]]
    spearman_cn: float
    spearman_disorder: float
    spearman_gcn: float
    grid: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    structures: list[Atoms] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "n_atoms": int(self.cn.size),
            "n_structures": len(self.structures),
            "cn_cutoff": self.shells.cutoff,
            "cn_ideal": self.shells.cn_ideal,
            "ideal_angles_deg": list(self.shells.angles),
            "spearman_cn": self.spearman_cn,
            "spearman_disorder": self.spearman_disorder,
            "spearman_gcn": self.spearman_gcn,
            "by_config_type": self.group_table,
            "by_cn": self.cn_table,
            "by_gcn": self.gcn_table,
            "by_disorder": self.disorder_table,
        }

    def csv(self) -> bytes:
        """Per-atom table: structure, config_type, atom, cn, gcn, disorder_deg, force_error."""
        lines = ["structure,config_type,atom,cn,gcn,disorder_deg,force_error_ev_a"]
        atom = 0
        for k, at in enumerate(self.structures):
            for j in range(len(at)):
                lines.append(
                    f"{k},{self.config_type[atom]},{j},{int(self.cn[atom])},"
                    f"{self.gcn[atom]:.6g},{self.disorder[atom]:.6g},{self.force_error[atom]:.8g}"
                )
                atom += 1
        return ("\n".join(lines) + "\n").encode()


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan
    return float(spearmanr(x[ok], y[ok]).statistic)


def _row(err: np.ndarray) -> dict[str, float]:
    if err.size == 0:
        return {"count": 0}
    return {
        "count": int(err.size),
        "mean": float(err.mean()),
        "median": float(np.median(err)),
        "p90": float(np.percentile(err, 90)),
    }


def disorder_edges(disorder: np.ndarray, n_bins: int = 8) -> np.ndarray:
    """Equal-width bins from 0 to the largest finite disorder value (at least 1°)."""
    finite = disorder[np.isfinite(disorder)]
    top = max(float(finite.max()) if finite.size else 0.0, 1.0)
    return np.linspace(0.0, top * (1 + 1e-9), n_bins + 1)


def transferability_map(
    model: Engine,
    reference: Engine,
    structures: Sequence[Atoms],
    state: BulkState,
    *,
    n_bins: int = 8,
) -> TransferResult:
    """Force errors of ``model`` against ``reference`` per atom, mapped on (CN, disorder).

    Both calculators are evaluated on the given structures (the reference labels them afresh,
    so any file works). CN and disorder use the ideal crystal of ``state`` (the reference's).

    Raises:
        UserInputError: no structures, or an element missing from the model.
    """
    if not structures:
        raise UserInputError("the transferability map needs at least one structure")
    shells = shell_info(state)
    frames = [Atoms(s.numbers, positions=s.positions, cell=s.cell, pbc=s.pbc) for s in structures]
    for f, s in zip(frames, structures, strict=True):
        f.info["config_type"] = str(s.info.get("config_type", "default"))
    pm = evaluate_structures(model, frames)
    pr = evaluate_structures(reference, frames)
    cn_all, gcn_all, dis_all, err_all, idx_all, ct_all = [], [], [], [], [], []
    out_frames = []
    for k, (f, a, b) in enumerate(zip(frames, pm, pr, strict=True)):
        cn, dis = local_environment(f, shells.cutoff, shells.angles)
        gcn = generalized_coordination(f, shells.cutoff, shells.cn_ideal)
        err = np.linalg.norm(a["forces"] - b["forces"], axis=1)
        cn_all.append(cn)
        gcn_all.append(gcn)
        dis_all.append(dis)
        err_all.append(err)
        idx_all.append(np.full(len(f), k))
        ct_all.append(np.full(len(f), f.info["config_type"], dtype=object))
        rec = f.copy()
        rec.arrays["cn"] = cn.astype(np.int64)
        rec.arrays["gcn"] = gcn
        rec.arrays["disorder"] = dis
        rec.arrays["force_error"] = err
        rec.arrays["forces_model"] = a["forces"]
        rec.arrays["forces_reference"] = b["forces"]
        rec.info["energy_model"] = a["energy"]
        rec.info["energy_reference"] = b["energy"]
        out_frames.append(rec)
    cn = np.concatenate(cn_all)
    gcn = np.concatenate(gcn_all)
    dis = np.concatenate(dis_all)
    err = np.concatenate(err_all)
    cts = np.concatenate(ct_all)

    cn_values = np.unique(cn)
    cn_table = [{"cn": int(c), **_row(err[cn == c])} for c in cn_values]
    gcn_floor = np.floor(gcn)
    gcn_table = [
        {"low": float(g), "high": float(g + 1), **_row(err[gcn_floor == g])}
        for g in np.unique(gcn_floor)
    ]
    edges = disorder_edges(dis, n_bins)
    which = np.digitize(dis, edges[1:-1])  # NaN disorder lands past the last bin: excluded
    finite = np.isfinite(dis)
    dis_table = [
        {"low": float(edges[b]), "high": float(edges[b + 1]), **_row(err[finite & (which == b)])}
        for b in range(n_bins)
    ]
    groups = []
    for g in dict.fromkeys(cts.tolist()):
        e = err[cts == g]
        groups.append({"config_type": g, "atoms": int(e.size), **_row(e), "max": float(e.max())})
    grid = np.full((cn_values.size, n_bins), np.nan)
    counts = np.zeros((cn_values.size, n_bins), dtype=np.int64)
    for r, c in enumerate(cn_values):
        for b in range(n_bins):
            sel = finite & (cn == c) & (which == b)
            counts[r, b] = int(sel.sum())
            if counts[r, b]:
                grid[r, b] = float(err[sel].mean())
    return TransferResult(
        cn=cn,
        gcn=gcn,
        disorder=dis,
        force_error=err,
        structure=np.concatenate(idx_all),
        config_type=cts,
        shells=shells,
        cn_table=cn_table,
        gcn_table=gcn_table,
        disorder_table=dis_table,
        group_table=groups,
        spearman_cn=_spearman(cn.astype(np.float64), err),
        spearman_disorder=_spearman(dis, err),
        spearman_gcn=_spearman(gcn, err),
        grid=(cn_values, edges, grid, counts),
        structures=out_frames,
    )


def heatmap_png(res: TransferResult, title: str = "") -> bytes:
    """2-D map of the mean force error per (CN, disorder) bin, with atom counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cn_values, edges, grid, counts = res.grid
    fig = Figure(figsize=(7.0, 5.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    y_edges = np.concatenate([cn_values - 0.5, [cn_values[-1] + 0.5]])
    mesh = ax.pcolormesh(edges, y_edges, np.ma.masked_invalid(grid), cmap="viridis", shading="flat")
    fig.colorbar(mesh, ax=ax, label="mean |F_model − F_ref| (eV/Å)")
    for r, c in enumerate(cn_values):
        for b in range(len(edges) - 1):
            if counts[r, b]:
                ax.text(
                    0.5 * (edges[b] + edges[b + 1]),
                    c,
                    str(counts[r, b]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white",
                )
    ax.axhline(res.shells.cn_ideal, color="w", lw=0.6, ls="--")
    ax.set_xlabel("bond-angle disorder (° RMS from the ideal crystal's angles)")
    ax.set_ylabel(f"coordination number (r < {res.shells.cutoff:.2f} Å)")
    ax.set_title(
        f"{title} Spearman ρ(CN, err) = {res.spearman_cn:.2f}, "
        f"ρ(disorder, err) = {res.spearman_disorder:.2f}; numbers: atoms per bin",
        fontsize=8,
    )
    fig.tight_layout()
    return _png(fig)
