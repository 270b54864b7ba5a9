"""`mlipctl uncertainty`: calibrate an ensemble's spread, measure its calibration and check the
domain of applicability of a model.

The numbers come from :mod:`mlipctl.uncertainty` (closed-form NLL scale, metrics, the
:class:`~mlipctl.uncertainty.domain.DomainModel`); this module feeds it with the model's own
predictions and descriptors, computed in padded batches by jitted functions (compile time is
timed apart from run time):

* :func:`ensemble_predictions` — per-structure member energies and per-atom member forces, with
  the raw (ddof=1) spreads;
* :func:`fit_calibration` — one global scale per quantity (energy per atom, force components),
  fitted on a calibration split; :func:`apply_calibration` stores ``scale * sqrt(c)`` in the
  potential's ``calibration`` dict (what the ASE calculator and the MD monitors multiply the raw
  spread by) and the full records in its metadata;
* :func:`structure_descriptors`, :func:`save_domain`, :func:`load_domain` — the domain model is
  tied to the parameters it was fitted for (descriptors are learned) by a SHA-256 of the
  parameters stored in the ``.npz``;
* :func:`frame_scores` — per-structure values of every monitor (``ensemble_std_forces``,
  ``ensemble_std_energy``, ``mahalanobis``, ``gamma``, ``hull``, ``kernel``) with the same
  definitions as the in-loop MD monitors of :mod:`mlipctl.engines.monitors`;
* :func:`run_uncertainty` — the command.

Outputs in ``cfg.output``: ``domain.npz``, ``reliability_{energy,forces}.png``,
``rmse_vs_rmv_{energy,forces}.png``, ``domain_trajectory.csv`` (per-frame domain values of the
trajectory) and ``domain_test.csv`` (per-structure values and errors of the test data); every
file is written atomically.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from ase import Atoms

from mlipctl.data.graph import AtomsGraph
from mlipctl.errors import UserInputError
from mlipctl.model.potential import (
    ModelSpec,
    Potential,
    make_descriptors,
    make_predict,
)
from mlipctl.uncertainty import calibration as C
from mlipctl.uncertainty import metrics as M
from mlipctl.uncertainty.domain import DomainModel, first_exit

if TYPE_CHECKING:  # pragma: no cover
    from mlipctl.reports.base import Report

jax.config.update("jax_enable_x64", True)

DOMAIN_FILE = "domain.npz"
DIGEST_KEY = "model_params_sha256"
TRAINING_KEY = "training_fingerprint"
METADATA_KEY = "uncertainty_calibration"
SCORE_UNITS = {
    "ensemble_std_forces": "eV/Å",
    "ensemble_std_energy": "eV/atom",
    "mahalanobis": "d²/threshold",
    "gamma": "",
    "hull": "PCA units",
    "kernel": "",
}


# --------------------------------------------------------------------------------------------
# Batched jitted evaluation
# --------------------------------------------------------------------------------------------


class _Compiled:
    """Ahead-of-time compiled ``fn(params, graph)`` per padded shape, with compile time kept
    apart from run time."""

    def __init__(self, fn: Callable[[Any, AtomsGraph], Any]) -> None:
        self._jit = jax.jit(fn)
        self._cache: dict[tuple, Any] = {}
        self.compile_seconds = 0.0
        self.run_seconds = 0.0

    def __call__(self, params: Any, graph: AtomsGraph) -> Any:
        key = tuple((np.shape(x), np.asarray(x).dtype.str) for x in graph)
        if key not in self._cache:
            t0 = time.perf_counter()
            self._cache[key] = self._jit.lower(params, graph).compile()
            self.compile_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        out = jax.tree.map(np.asarray, self._cache[key](params, graph))
        self.run_seconds += time.perf_counter() - t0
        return out


@functools.lru_cache(maxsize=8)
def _spec_functions(spec: ModelSpec) -> dict[str, _Compiled]:
    # Keyed by the spec, not the Potential object: parameters are arguments, so every load of
    # the same model (a workflow, repeated runs in one process) reuses the compiled shapes.
    return {
        "predict": _Compiled(make_predict(spec, stress=False)),
        "descriptors": _Compiled(make_descriptors(spec)),
    }


def _functions(potential: Potential) -> dict[str, _Compiled]:
    """The compiled predict/descriptor functions of the potential's architecture."""
    return _spec_functions(potential.spec)


def compile_seconds(potential: Potential) -> float:
    """Seconds spent so far compiling this module's functions for the potential's
    architecture (in this process)."""
    return sum(f.compile_seconds for f in _functions(potential).values())


def _batches(
    potential: Potential, structures: Sequence[Atoms], max_batch_atoms: int
) -> Iterator[tuple[list[int], AtomsGraph]]:
    """Consecutive chunks of at most ``max_batch_atoms`` atoms as checked, padded graphs
    (bucketed capacities, so similar chunks share one compilation)."""
    from mlipctl.model.calculator import Evaluator

    ev = Evaluator(potential)
    chunk: list[int] = []
    count = 0
    for k, atoms in enumerate(structures):
        if chunk and count + len(atoms) > max_batch_atoms:
            yield chunk, ev.graph([structures[i] for i in chunk])
            chunk, count = [], 0
        chunk.append(k)
        count += len(atoms)
    if chunk:
        yield chunk, ev.graph([structures[i] for i in chunk])


@dataclass
class EnsembleSet:
    """Ensemble predictions for B structures (K members).

    Attributes:
        n_atoms: (B,) atoms per structure.
        energy_members: (K, B) total energies, eV.
        forces_members: per structure (K, n_b, 3) forces, eV/Å.
    """

    n_atoms: np.ndarray
    energy_members: np.ndarray
    forces_members: list[np.ndarray]

    @property
    def ensemble_size(self) -> int:
        return int(self.energy_members.shape[0])

    @property
    def energy_mean(self) -> np.ndarray:
        """(B,) ensemble-mean energy, eV."""
        return self.energy_members.mean(axis=0)

    def energy_std(self) -> np.ndarray:
        """(B,) raw (uncalibrated) ddof=1 spread of the energy, eV."""
        return self.energy_members.std(axis=0, ddof=1)

    def forces_mean(self, b: int) -> np.ndarray:
        """(n_b, 3) ensemble-mean forces of structure b."""
        return self.forces_members[b].mean(axis=0)

    def forces_std(self, b: int) -> np.ndarray:
        """(n_b, 3) raw ddof=1 spread per Cartesian component of structure b."""
        return self.forces_members[b].std(axis=0, ddof=1)


def ensemble_predictions(
    potential: Potential,
    structures: Sequence[Atoms],
    *,
    max_batch_atoms: int = 2048,
    on_batch: Callable[[int], None] | None = None,
) -> EnsembleSet:
    """Member energies and forces of ``structures`` from the model's jitted predict.

    Args:
        potential: the model (any ensemble kind; K = 1 has no spread).
        structures: B structures (checked for unknown elements and overlapping atoms).
        max_batch_atoms: atoms per padded batch.
        on_batch: called with the number of structures done after each batch (progress).
    """
    fn = _functions(potential)["predict"]
    k = potential.spec.n_members
    energy = np.zeros((k, len(structures)))
    forces: list[np.ndarray] = [np.zeros((k, 0, 3))] * len(structures)
    for chunk, graph in _batches(potential, structures, max_batch_atoms):
        pred = fn(potential.params, graph)
        start = 0
        for slot, idx in enumerate(chunk):
            n = len(structures[idx])
            energy[:, idx] = pred.energy[:, slot]
            forces[idx] = pred.forces[:, start : start + n].copy()
            start += n
        if not (np.all(np.isfinite(pred.energy)) and np.all(np.isfinite(pred.forces))):
            raise UserInputError(
                f"the model returned non-finite energies or forces for structures {chunk[:5]} "
                "(far outside its training data, or a corrupted model)"
            )
        if on_batch is not None:
            on_batch(len(chunk))
    n_atoms = np.array([len(a) for a in structures], dtype=np.int64)
    return EnsembleSet(n_atoms=n_atoms, energy_members=energy, forces_members=forces)


def structure_descriptors(
    potential: Potential,
    structures: Sequence[Atoms],
    *,
    max_batch_atoms: int = 2048,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-atom model descriptors of ``structures`` (member 0's for deep ensembles).

    Returns:
        ``(desc (N, D), species (N,), structure (N,))`` over the real atoms, in order.
    """
    fn = _functions(potential)["descriptors"]
    descs, species, owner = [], [], []
    for chunk, graph in _batches(potential, structures, max_batch_atoms):
        d = fn(potential.params, graph)
        n_real = sum(len(structures[i]) for i in chunk)
        descs.append(np.asarray(d[:n_real], np.float64))
        species.append(np.asarray(graph.species[:n_real], np.int64))
        owner.append(np.repeat(chunk, [len(structures[i]) for i in chunk]))
        if on_batch is not None:
            on_batch(len(chunk))
    if not descs:
        raise UserInputError("no structures to compute descriptors for")
    desc = np.concatenate(descs)
    if not np.all(np.isfinite(desc)):
        raise UserInputError("the model's descriptors are NaN or inf for some atoms")
    return desc, np.concatenate(species), np.concatenate(owner).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


@dataclass
class Residuals:
    """Flat errors and raw spreads of one labelled set (zero-spread values dropped).

    Attributes:
        energy: ``(r, sigma)`` per structure, per atom (eV/atom).
        forces: ``(r, sigma)`` per force component (eV/Å).
        dropped_forces: force components with exactly zero spread (symmetry-fixed forces that
            every member predicts as 0), left out because a zero sigma has no scale.
        structure_force_rmse: (B,) force RMSE of the ensemble mean per structure, eV/Å.
    """

    energy: tuple[np.ndarray, np.ndarray]
    forces: tuple[np.ndarray, np.ndarray]
    dropped_forces: int
    dropped_energy: int
    structure_force_rmse: np.ndarray


def residuals(ens: EnsembleSet, labelled: Sequence[Any], *, name: str) -> Residuals:
    """Errors ``reference - ensemble mean`` and raw spreads of labelled structures.

    Args:
        ens: :func:`ensemble_predictions` of the structures (K >= 2).
        labelled: :class:`~mlipctl.data.io.Labelled` items with energy and forces.
        name: what the set is, for messages.
    """
    if ens.ensemble_size < 2:
        raise UserInputError(
            f"the model is a single potential (K = {ens.ensemble_size}): spreads and their "
            "calibration need an ensemble (model.ensemble kind deep or shallow, size >= 2); "
            "set calibration.enabled: false to run the domain checks only"
        )
    missing = [i for i, s in enumerate(labelled) if s.energy is None or s.forces is None]
    if missing:
        raise UserInputError(
            f"{name}: structures {missing[:10]} have no energy or forces labels (calibration and "
            "metrics need both)"
        )
    ref_e = np.array([s.energy for s in labelled], dtype=np.float64)
    r_e, s_e = C.energy_errors(ens.energy_mean, ens.energy_std(), ref_e, ens.n_atoms)
    keep_e = s_e > 0.0
    r_f, s_f, rmse = [], [], []
    for b, item in enumerate(labelled):
        r, s = C.force_component_errors(ens.forces_mean(b), ens.forces_std(b), item.forces)
        r_f.append(r)
        s_f.append(s)
        rmse.append(float(np.sqrt(np.mean(r * r))) if r.size else 0.0)
    rf, sf = np.concatenate(r_f), np.concatenate(s_f)
    keep_f = sf > 0.0
    if not keep_f.any() or not keep_e.any():
        raise UserInputError(
            f"{name}: the ensemble members agree exactly on every value: there is no spread to "
            "calibrate (identical members?)"
        )
    return Residuals(
        energy=(r_e[keep_e], s_e[keep_e]),
        forces=(rf[keep_f], sf[keep_f]),
        dropped_forces=int((~keep_f).sum()),
        dropped_energy=int((~keep_e).sum()),
        structure_force_rmse=np.asarray(rmse),
    )


def fit_calibration(res: Residuals, cfg: Any, ensemble_size: int) -> dict[str, C.Calibration]:
    """One global scale for the energy (per atom) and one for the force components.

    Args:
        res: :func:`residuals` of the calibration split.
        cfg: :class:`~mlipctl.config.uncertainty.CalibrationConfig`.
        ensemble_size: K.
    """
    out = {}
    for quantity, target in (("energy", "energy_per_atom"), ("forces", "forces")):
        r, s = getattr(res, quantity)
        if cfg.predictive == "student_t":
            out[quantity] = C.fit_scale_student_t(r, s, ensemble_size=ensemble_size, target=target)
        else:
            out[quantity] = C.fit_scale(
                r,
                s,
                ensemble_size=ensemble_size,
                finite_ensemble_correction=cfg.finite_ensemble_correction,
                target=target,
            )
    return out


def apply_calibration(potential: Potential, cals: dict[str, C.Calibration]) -> None:
    """Store the multipliers of the raw spreads (``scale * sqrt(c)``) in
    ``potential.calibration`` and the full records in ``potential.metadata``.

    Other entries of ``potential.calibration`` (e.g. ``stress``) are kept.
    """
    new = dict(potential.calibration)
    for quantity, cal in cals.items():
        new[quantity] = float(cal.sigma_factor)
    potential.calibration = new
    potential.metadata = {
        **potential.metadata,
        METADATA_KEY: {q: cal.to_dict() for q, cal in cals.items()},
    }


# --------------------------------------------------------------------------------------------
# Domain model storage (tied to the model parameters)
# --------------------------------------------------------------------------------------------


def params_digest(params: Any) -> str:
    """SHA-256 of a parameter tree (paths, shapes, dtypes and bytes of every leaf)."""
    h = hashlib.sha256(b"mlipctl-params-v1")
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def save_domain(
    domain: DomainModel, path: str | Path, *, model_digest: str, training_fingerprint: str = ""
) -> Path:
    """Write the domain model as an uncompressed ``.npz`` atomically, with the digest of the
    parameters whose descriptors it was fitted on (and the training-data fingerprint)."""
    from mlipctl.reports.base import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(
        buf,
        **domain.to_dict(),
        **{DIGEST_KEY: np.asarray(model_digest), TRAINING_KEY: np.asarray(training_fingerprint)},
    )
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def domain_tags(path: str | Path) -> dict[str, str]:
    """The model digest and training fingerprint stored by :func:`save_domain` ('' if absent)."""
    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"domain model file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: str(data[k]) if k in data.files else "" for k in (DIGEST_KEY, TRAINING_KEY)}
    except (ValueError, OSError) as exc:
        raise UserInputError(f"cannot read domain model {p}: {exc}") from exc


def load_domain(path: str | Path, potential: Potential | None = None) -> DomainModel:
    """Read a domain model; with ``potential``, check that it was fitted for these parameters
    and this species table and descriptor size.

    Raises:
        UserInputError: unreadable file, or a domain model of another model.
    """
    domain = DomainModel.load(path)
    if potential is not None:
        tags = domain_tags(path)
        digest = params_digest(potential.params)
        if tags[DIGEST_KEY] != digest:
            raise UserInputError(
                f"domain model {path} was fitted for other model parameters (its descriptors "
                "are learned, so it only fits the model it was made for); run `mlipctl "
                "uncertainty` on this model to make a new one"
            )
        if domain.n_species != potential.spec.n_species:
            raise UserInputError(
                f"domain model {path} has {domain.n_species} species, the model "
                f"{potential.spec.n_species}"
            )
    return domain


# --------------------------------------------------------------------------------------------
# Per-structure scores (the monitors' definitions, evaluated on the host)
# --------------------------------------------------------------------------------------------


def _per_structure_max(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, -np.inf)
    np.maximum.at(out, owner, values)
    return out


def hull_excess(domain: DomainModel, desc: np.ndarray, species: np.ndarray) -> np.ndarray:
    """(N,) largest facet violation in the hull's PCA space (<= 0 inside), as
    :func:`~mlipctl.uncertainty.domain.jax_hull_excess`; inf for untrained species, NaN where a
    species' hull has no facets."""
    y = domain.hull_project(desc, species)
    out = np.full(desc.shape[0], np.inf)
    offs = domain.hull_equation_offsets
    for s in range(domain.n_species):
        sel = np.flatnonzero(species == s)
        if sel.size == 0 or not domain.fitted[s]:
            continue
        eq = domain.hull_equations[offs[s] : offs[s + 1]]
        if eq.shape[0] == 0:
            out[sel] = np.nan
            continue
        out[sel] = np.max(y[sel] @ eq[:, :-1].T + eq[:, -1], axis=1)
    return out


def domain_atom_values(
    domain: DomainModel,
    desc: np.ndarray,
    species: np.ndarray,
    owner: np.ndarray,
    sizes: np.ndarray,
    *,
    alpha: float,
    sidak: bool,
) -> dict[str, np.ndarray]:
    """Per-atom domain values: ``mahalanobis`` (d² over the frame's F-rule threshold at
    false-alarm rate ``alpha``, Šidák over the frame's atoms), ``gamma``, ``hull`` (facet
    excess), ``hull_inside`` (bool, facets or LP) and ``kernel`` distance."""
    d2 = domain.mahalanobis_sq(desc, species)
    thr = np.zeros(desc.shape[0])
    for n in np.unique(sizes):
        t = domain.mahalanobis_thresholds(alpha, n_atoms=int(n), sidak=sidak)
        sel = sizes[owner] == n
        thr[sel] = t[species[sel]]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(thr > 0, d2 / np.where(thr > 0, thr, 1.0), np.inf)
    out = {
        "mahalanobis": ratio,
        "hull": hull_excess(domain, desc, species),
        "hull_inside": domain.hull_inside(desc, species),
        "kernel": domain.kernel_distance(desc, species),
    }
    if bool(np.all(domain.gamma_available[domain.fitted])):
        out["gamma"] = domain.gamma(desc, species)
    return out


def frame_scores(
    potential: Potential,
    frames: Sequence[Atoms],
    domain: DomainModel | None = None,
    *,
    alpha: float = 0.01,
    sidak: bool = True,
    ensemble: EnsembleSet | None = None,
    calibration: dict[str, float] | None = None,
    max_batch_atoms: int = 2048,
) -> dict[str, np.ndarray]:
    """Per-frame values of every uncertainty monitor, as the MD monitors define them.

    * ``ensemble_std_forces``: largest per-atom ``sqrt(sum_c sigma_c^2)`` times the model's
      ``calibration["forces"]`` (eV/Å); ``ensemble_std_energy``: ``sigma_E / n_atoms`` times
      ``calibration["energy"]`` (eV/atom) — ensembles only;
    * with ``domain``: ``mahalanobis`` (largest d²/threshold; > 1 is an alarm), ``gamma``
      (largest γ, if fitted), ``hull`` (largest facet excess; > 0 outside), ``kernel`` (largest
      kernel distance), and ``hull_inside`` (bool: every atom inside).

    Args:
        potential: the model.
        frames: B structures.
        domain: fitted domain model of this model.
        alpha, sidak: Mahalanobis false-alarm rate per frame and Šidák correction.
        ensemble: precomputed :func:`ensemble_predictions` of ``frames`` (else computed).
        calibration: spread multipliers to use instead of ``potential.calibration``.

    Returns:
        name -> (B,) array.
    """
    b = len(frames)
    out: dict[str, np.ndarray] = {}
    if potential.spec.n_members >= 2:
        ens = ensemble if ensemble is not None else ensemble_predictions(potential, frames)
        cal = potential.calibration if calibration is None else calibration
        out["ensemble_std_forces"] = float(cal.get("forces", 1.0)) * np.array(
            [np.max(np.linalg.norm(ens.forces_std(k), axis=1)) for k in range(b)]
        )
        out["ensemble_std_energy"] = float(cal.get("energy", 1.0)) * (
            ens.energy_std() / ens.n_atoms
        )
    if domain is not None:
        desc, species, owner = structure_descriptors(
            potential, frames, max_batch_atoms=max_batch_atoms
        )
        sizes = np.array([len(a) for a in frames])
        atom = domain_atom_values(domain, desc, species, owner, sizes, alpha=alpha, sidak=sidak)
        for name in ("mahalanobis", "gamma", "hull", "kernel"):
            if name in atom:
                out[name] = _per_structure_max(atom[name], owner, b)
        inside = np.ones(b, bool)
        np.logical_and.at(inside, owner, atom["hull_inside"])
        out["hull_inside"] = inside
    return out


# --------------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------------


def _read_labelled(path: Path, name: str) -> list[Any]:
    from mlipctl.data.io import read_structures

    items = read_structures(path)
    if not items:
        raise UserInputError(f"{name} {path} contains no structures")
    return items


def fit_splits(potential: Potential, model_path: Path) -> tuple[Any, str] | None:
    """The train/valid/test splits of the model's fit, rebuilt from the ``fit_config`` in its
    metadata and checked against the stored training fingerprint.

    Relative data paths are tried from the working directory and from the model's folder and
    its parents (the fit may have run elsewhere). Returns ``(DatasetSplits, data path)``, or
    None when the model file has no fit config (e.g. not written by `mlipctl fit`).

    Raises:
        UserInputError: the data cannot be found or no longer matches the fingerprint.
    """
    from mlipctl.config.data import DataConfig
    from mlipctl.data.dataset import load_dataset

    fit = potential.metadata.get("fit_config")
    if not isinstance(fit, dict) or "data" not in fit:
        return None
    data = DataConfig.model_validate(fit["data"])
    # Absolute paths stay as they are: base / absolute == absolute.
    bases = [Path.cwd(), *list(model_path.resolve().parents)[:4]]
    tried: list[Path] = []
    for base in bases:
        cand = base / data.path
        if not cand.is_file() or cand in tried:
            continue
        tried.append(cand)
        update: dict[str, Any] = {"path": cand}
        for key in ("valid_path", "test_path"):
            p = getattr(data, key)
            if p is not None:
                update[key] = base / p
        resolved = data.model_copy(update=update)
        splits = load_dataset(resolved)
        if potential.fingerprint is None or splits.fingerprints()["train"] == potential.fingerprint:
            return splits, str(cand)
    where = ", ".join(str(p) for p in tried) or f"{data.path} (not found)"
    raise UserInputError(
        f"cannot rebuild the training data of {model_path}: tried {where}"
        + (" but the data no longer matches the model's fingerprint" if tried else "")
        + "; give training_data (and calibration_data) in the config"
    )


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


@dataclass
class _Phases:
    """A rich progress bar on stderr with one task per phase (nothing when disabled)."""

    enabled: bool
    bar: Any = None

    def __enter__(self) -> _Phases:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=Console(file=sys.stderr),
                transient=True,
            )
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()

    def callback(self, name: str, total: int) -> Callable[[int], None] | None:
        if self.bar is None:
            return None
        task = self.bar.add_task(name, total=total)
        return lambda n: self.bar.advance(task, n)


@contextmanager
def _timed(timings: dict[str, float], key: str, potential: Potential) -> Iterator[None]:
    """Wall time of a block in ``timings[key]`` minus compilation, which goes to
    ``timings["compile"]``."""
    c0, t0 = compile_seconds(potential), time.perf_counter()
    try:
        yield
    finally:
        dc = compile_seconds(potential) - c0
        timings["compile"] = timings.get("compile", 0.0) + dc
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0 - dc


def _metrics_pair(
    r: np.ndarray, s_raw: np.ndarray, factor: float, cfg: Any
) -> dict[str, dict[str, Any]]:
    kw = {"n_quantiles": cfg.metrics.n_quantiles, "n_bins": cfg.metrics.n_bins}
    return {
        "before": M.evaluate(r, s_raw, **kw).to_dict(),
        "after": M.evaluate(r, s_raw * factor, **kw).to_dict(),
    }


def _write_csv(path: Path, columns: dict[str, np.ndarray]) -> Path:
    from mlipctl.reports.base import atomic_write_text

    names = list(columns)
    rows = [",".join(names)]
    n = len(next(iter(columns.values()))) if columns else 0
    for i in range(n):
        cells = []
        for k in names:
            v = columns[k][i]
            cells.append(str(int(v)) if isinstance(v, np.integer | np.bool_ | bool) else f"{v:.8g}")
        rows.append(",".join(cells))
    atomic_write_text(path, "\n".join(rows) + "\n")
    return path


def _quantiles(scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Median, 95th percentile and maximum of each per-structure score."""
    return {
        name: {
            "median": float(np.median(v)),
            "q95": float(np.quantile(v, 0.95)),
            "max": float(np.max(v)),
        }
        for name, v in scores.items()
        if v.dtype != bool and np.all(np.isfinite(v))
    }


def _domain_summary(scores: dict[str, np.ndarray], gamma_threshold: float) -> dict[str, Any]:
    inside = scores["hull_inside"]
    alarm = scores["mahalanobis"] > 1.0
    out: dict[str, Any] = {
        "n_frames": int(inside.size),
        "n_outside_hull": int((~inside).sum()),
        "first_exit_hull": first_exit(inside),
        "n_mahalanobis_alarms": int(alarm.sum()),
        "first_mahalanobis_alarm": first_exit(~alarm),
        "mahalanobis_ratio_max": float(np.max(scores["mahalanobis"])),
        "kernel_distance_max": float(np.max(scores["kernel"])),
        "kernel_distance_median": float(np.median(scores["kernel"])),
    }
    if "gamma" in scores:
        g = scores["gamma"]
        out.update(
            gamma_max=float(np.max(g)),
            n_gamma_above_1=int((g > 1.0).sum()),
            n_gamma_above_threshold=int((g > gamma_threshold).sum()),
            gamma_threshold=gamma_threshold,
            first_gamma_above_threshold=first_exit(g <= gamma_threshold),
        )
    return out


def run_uncertainty(cfg: Any, *, resume: bool = False, progress: bool = True) -> Report:
    """`mlipctl uncertainty`: calibration, calibration metrics before/after, plots, and domain
    checks on test data and a trajectory.

    Args:
        cfg: :class:`~mlipctl.config.uncertainty.UncertaintyConfig`.
        resume: reuse ``domain.npz`` in the output folder if it was fitted for this model and
            training data (the rest is recomputed: it is cheap next to descriptor extraction).
        progress: progress bars on stderr.

    Returns:
        The report (``command="uncertainty"``).
    """
    from mlipctl.data.sources import read_frames
    from mlipctl.model.potential import load_potential
    from mlipctl.reports.base import Criterion, Environment, Report
    from mlipctl.uncertainty import plots as P

    t_total = time.perf_counter()
    timings: dict[str, float] = {"compile": 0.0}
    messages: list[str] = []
    artifacts: dict[str, str] = {}
    criteria: list[Any] = []
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    model_path = Path(cfg.model)

    t0 = time.perf_counter()
    pot = load_potential(model_path)
    k = pot.spec.n_members
    results: dict[str, Any] = {
        "model": str(model_path),
        "ensemble": {"kind": pot.spec.config.ensemble.kind, "size": k},
        "calibration_in_model_before": dict(pot.calibration),
    }
    required = (cfg.calibration.enabled and cfg.calibration_data is None) or (
        cfg.domain.enabled and cfg.training_data is None
    )
    splits_info = None
    if required or cfg.test_data is None:
        try:
            splits_info = fit_splits(pot, model_path)
        except UserInputError as exc:
            if required:
                raise
            messages.append(f"no test split of the fit: {exc}")
    splits = splits_info[0] if splits_info else None
    timings["load"] = time.perf_counter() - t0

    def data_set(path: Path | None, split: str) -> tuple[list[Any], str]:
        if path is not None:
            return _read_labelled(Path(path), f"{split} data"), str(path)
        if splits is None:
            return [], ""
        return list(getattr(splits, split)), f"{split} split of the fit ({splits_info[1]})"

    with _Phases(progress) as phases:
        # --- calibration --------------------------------------------------------------------
        cal_items: list[Any] = []
        cal_res: Residuals | None = None
        factors = {
            "energy": float(pot.calibration.get("energy", 1.0)),
            "forces": float(pot.calibration.get("forces", 1.0)),
        }
        if cfg.calibration.enabled:
            cal_items, cal_source = data_set(cfg.calibration_data, "valid")
            if not cal_items:
                raise UserInputError(
                    "calibration needs labelled structures: give calibration_data, or use a model "
                    "fitted with a validation split (data.valid_fraction > 0 or valid_path)"
                )
            with _timed(timings, "calibration", pot):
                ens = ensemble_predictions(
                    pot,
                    [s.atoms for s in cal_items],
                    on_batch=phases.callback("calibration: predict", len(cal_items)),
                )
                cal_res = residuals(ens, cal_items, name="calibration data")
                cals = fit_calibration(cal_res, cfg.calibration, k)
            factors = {q: float(c.sigma_factor) for q, c in cals.items()}
            results["calibration"] = {
                "data": cal_source,
                "n_structures": len(cal_items),
                "predictive": cfg.calibration.predictive,
                "finite_ensemble_correction": cfg.calibration.finite_ensemble_correction,
                "sigma_factor": factors,
                "energy": cals["energy"].to_dict(),
                "forces": cals["forces"].to_dict(),
                "dropped_zero_spread_force_components": cal_res.dropped_forces,
                "written_to_model": False,
            }
            if cal_res.dropped_forces:
                messages.append(
                    f"{cal_res.dropped_forces} force components with zero ensemble spread "
                    "(fixed by symmetry) were left out of the calibration"
                )
            # Where in-distribution structures sit: a starting point for monitor thresholds.
            cal_scores = frame_scores(
                pot, [s.atoms for s in cal_items], ensemble=ens, calibration=factors
            )
            results["calibration"]["spread_scores"] = _quantiles(cal_scores)
            if cfg.calibration.write_to_model:
                apply_calibration(pot, cals)
                pot.save(model_path)
                results["calibration"]["written_to_model"] = True
                messages.append(f"calibration written to {model_path}: {factors}")

        # --- metrics before/after -----------------------------------------------------------
        test_items, test_source = data_set(cfg.test_data, "test")
        in_sample = False
        if not test_items and cal_items:
            test_items, test_source, in_sample = cal_items, "the calibration data", True
            messages.append(
                "no test data (test_data, or a test split in the fit): metrics are computed on "
                "the calibration data itself (in-sample)"
            )
        test_res: Residuals | None = None
        test_ens: EnsembleSet | None = None
        if test_items and k >= 2:
            with _timed(timings, "metrics", pot):
                if in_sample and cal_res is not None:
                    test_res = cal_res
                else:
                    test_ens = ensemble_predictions(
                        pot,
                        [s.atoms for s in test_items],
                        on_batch=phases.callback("test: predict", len(test_items)),
                    )
                    test_res = residuals(test_ens, test_items, name="test data")
                metrics: dict[str, Any] = {
                    "data": test_source,
                    "in_sample": in_sample,
                    "n_structures": len(test_items),
                    "sigma_factor": factors,
                }
                units = {"energy": "eV/atom", "forces": "eV/Å"}
                for q in ("energy", "forces"):
                    r, s = getattr(test_res, q)
                    metrics[q] = _metrics_pair(r, s, factors[q], cfg)
                    metrics[q]["unit"] = units[q]
                    sig = {"raw": s, "calibrated": s * factors[q]}
                    artifacts[f"reliability_{q}"] = str(
                        P.plot_reliability(
                            out / f"reliability_{q}.png",
                            r,
                            sig,
                            n_quantiles=cfg.metrics.n_quantiles,
                            title=f"Reliability ({q}, {test_source})",
                        )
                    )
                    artifacts[f"rmse_vs_rmv_{q}"] = str(
                        P.plot_rmse_vs_rmv(
                            out / f"rmse_vs_rmv_{q}.png",
                            r,
                            sig,
                            n_bins=min(cfg.metrics.n_bins, r.size),
                            unit=units[q],
                            title=f"RMSE vs RMV ({q}, {test_source})",
                        )
                    )
                    if cfg.calibration.enabled:
                        before, after = metrics[q]["before"]["nll"], metrics[q]["after"]["nll"]
                        criteria.append(
                            Criterion.is_true(
                                f"calibration_improves_nll_{q}",
                                after <= before + 1e-12,
                                detail=f"NLL {before:.4g} → {after:.4g} on {test_source}",
                            )
                        )
            results["metrics"] = metrics
        elif test_items:
            messages.append("single model (K = 1): no spreads, so no calibration metrics")

        # --- domain of applicability ---------------------------------------------------------
        if cfg.domain.enabled:
            domain, dsum = _domain(cfg, pot, splits_info, out, resume, phases, timings, messages)
            artifacts["domain_model"] = str(out / DOMAIN_FILE)
            if cfg.domain.save_next_to_model:
                side = model_path.with_name(model_path.stem + ".domain.npz")
                save_domain(
                    domain,
                    side,
                    model_digest=params_digest(pot.params),
                    training_fingerprint=dsum["fingerprint"],
                )
                artifacts["domain_model_next_to_model"] = str(side)
            results["domain"] = {"training": dsum}
            dc = cfg.domain
            if test_items:
                with _timed(timings, "domain_test", pot):
                    atoms_list = [s.atoms for s in test_items]
                    if test_ens is None and k >= 2:
                        test_ens = ensemble_predictions(pot, atoms_list)
                    sc = frame_scores(
                        pot,
                        atoms_list,
                        domain,
                        alpha=dc.mahalanobis_alpha,
                        sidak=dc.sidak,
                        ensemble=test_ens,
                    )
                    results["domain"]["test"] = _domain_summary(sc, dc.gamma_threshold)
                    cols = {"structure": np.arange(len(test_items))}
                    if test_res is not None:
                        cols["force_rmse"] = test_res.structure_force_rmse
                    cols.update(sc)
                    artifacts["domain_test"] = str(_write_csv(out / "domain_test.csv", cols))
                    thr = cfg.metrics.auroc_force_rmse
                    if thr is not None and test_res is not None:
                        results["auroc"] = _auroc_table(
                            sc, test_res.structure_force_rmse, thr, messages
                        )
            if cal_items:
                # Held-out in-distribution structures: the false-alarm side of every check.
                with _timed(timings, "domain_calibration_data", pot):
                    sc = frame_scores(
                        pot,
                        [s.atoms for s in cal_items],
                        domain,
                        alpha=dc.mahalanobis_alpha,
                        sidak=dc.sidak,
                        ensemble=ens,
                        calibration=factors,
                    )
                    results["domain"]["calibration_data"] = {
                        **_domain_summary(sc, dc.gamma_threshold),
                        "scores": _quantiles(sc),
                    }
            if cfg.trajectory is not None:
                with _timed(timings, "domain_trajectory", pot):
                    frames = read_frames(str(cfg.trajectory), ":")
                    sc = frame_scores(
                        pot, frames, domain, alpha=dc.mahalanobis_alpha, sidak=dc.sidak
                    )
                    summary = _domain_summary(sc, dc.gamma_threshold)
                    results["domain"]["trajectory"] = {"path": str(cfg.trajectory), **summary}
                    cols = {"frame": np.arange(len(frames)), **sc}
                    artifacts["domain_trajectory"] = str(
                        _write_csv(out / "domain_trajectory.csv", cols)
                    )
                    if summary["first_exit_hull"] is not None:
                        messages.append(
                            f"trajectory leaves the training hull at frame "
                            f"{summary['first_exit_hull']} ({summary['n_outside_hull']} of "
                            f"{summary['n_frames']} frames outside)"
                        )
    timings["total"] = time.perf_counter() - t_total
    results["n_compiled_shapes"] = sum(len(f._cache) for f in _functions(pot).values())
    return Report(
        command="uncertainty",
        config=cfg.model_dump(mode="json"),
        environment=Environment.capture(),
        timings=timings,
        results=results,
        criteria=criteria,
        artifacts=artifacts,
        messages=messages,
    )


def _auroc_table(
    scores: dict[str, np.ndarray], rmse: np.ndarray, threshold: float, messages: list[str]
) -> dict[str, Any]:
    """AUROC of every score at detecting structures with force RMSE above ``threshold``."""
    label = rmse > threshold
    table: dict[str, Any] = {
        "force_rmse_threshold": threshold,
        "n_positive": int(label.sum()),
        "n_negative": int((~label).sum()),
    }
    if label.all() or not label.any():
        messages.append(
            f"AUROC not computed: all {label.size} test structures are on one side of the force "
            f"RMSE threshold {threshold} eV/Å"
        )
        return table
    for name, v in scores.items():
        if name == "hull_inside":
            v = (~v).astype(float)
        v = np.asarray(v, np.float64)
        if np.all(np.isfinite(v)):
            table[name] = M.auroc(v, label)
        else:
            # inf (untrained species) ranks above everything; NaN cannot be ranked
            finite_max = np.max(v[np.isfinite(v)], initial=0.0)
            v = np.where(np.isposinf(v), finite_max + 1.0, v)
            table[name] = M.auroc(v, label) if np.all(np.isfinite(v)) else math.nan
    return table


def _domain(
    cfg: Any,
    pot: Potential,
    splits_info: tuple[Any, str] | None,
    out: Path,
    resume: bool,
    phases: _Phases,
    timings: dict[str, float],
    messages: list[str],
) -> tuple[DomainModel, dict[str, Any]]:
    """Fit (or, on resume, reuse) the domain model on the training descriptors."""
    from mlipctl.data.dataset import fingerprint

    if cfg.training_data is not None:
        train = _read_labelled(Path(cfg.training_data), "training data")
        source = str(cfg.training_data)
    elif splits_info is not None:
        train, source = list(splits_info[0].train), f"train split of the fit ({splits_info[1]})"
    else:
        raise UserInputError(
            f"{cfg.model} records no training data (no fit_config in its metadata): give "
            "training_data, or set domain.enabled: false"
        )
    fp = fingerprint(train)
    digest = params_digest(pot.params)
    path = out / DOMAIN_FILE
    dc = cfg.domain
    summary: dict[str, Any] = {"data": source, "n_structures": len(train), "fingerprint": fp}
    if resume and path.is_file():
        tags = domain_tags(path)
        if tags[DIGEST_KEY] == digest and tags[TRAINING_KEY] == fp:
            domain = DomainModel.load(path)
            if domain.hull_dim == min(dc.hull_pca_dim, domain.dim):
                messages.append(f"resume: reused {path}")
                summary.update(_domain_fit_summary(domain), reused=True)
                return domain, summary
    with _timed(timings, "domain_fit", pot):
        atoms_list = [s.atoms for s in train]
        desc, species, _ = structure_descriptors(
            pot, atoms_list, on_batch=phases.callback("training descriptors", len(train))
        )
        try:
            domain = DomainModel.fit(
                desc,
                species,
                n_species=pot.spec.n_species,
                hull_dim=dc.hull_pca_dim,
                shrinkage=dc.shrinkage,
                gamma=dc.gamma,
                max_kernel_points=dc.max_kernel_points,
            )
        except UserInputError as exc:
            hint = " (or set domain.gamma: false)" if dc.gamma else ""
            raise UserInputError(f"domain model: {exc}{hint}") from exc
        save_domain(domain, path, model_digest=digest, training_fingerprint=fp)
    summary.update(_domain_fit_summary(domain), reused=False)
    missing = [pot.spec.species[s] for s in range(domain.n_species) if not domain.fitted[s]]
    if missing:
        messages.append(f"elements {missing} have no training atoms: always out of domain")
    no_facets = [
        pot.spec.species[s]
        for s in range(domain.n_species)
        if domain.fitted[s]
        and domain.hull_equation_offsets[s + 1] == domain.hull_equation_offsets[s]
    ]
    if no_facets:
        messages.append(
            f"no hull facets for {no_facets} (hull_pca_dim > 6 or degenerate data): the hull "
            "test uses LP here and the MD hull monitor is unavailable"
        )
    return domain, summary


def _domain_fit_summary(domain: DomainModel) -> dict[str, Any]:
    return {
        "n_atoms_per_species": domain.n_train.tolist(),
        "descriptor_dim": domain.dim,
        "hull_pca_dim": domain.hull_dim,
        "hull_facets_per_species": np.diff(domain.hull_equation_offsets).tolist(),
        "ledoit_wolf_shrinkage": domain.shrinkage.tolist(),
        "gamma_available": domain.gamma_available.tolist(),
        "gamma_train_max": [float(g) if np.isfinite(g) else None for g in domain.gamma_train_max],
    }
