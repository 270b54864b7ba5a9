"""Loss of a batch (jittable) and exactly accumulated error metrics (host side).

Both count real entries only: structures with ``structure_mask`` and the relevant ``has_*`` flag,
atoms with ``atom_mask`` in such structures. Padding never enters a sum or a count, so errors are
not diluted by padding atoms (a padded zero-force atom would otherwise look perfectly predicted).

Units: energy errors are per atom; forces per Cartesian component; stress per tensor component.
Loss terms are in eV/atom, eV/Å and eV/Å³; reported metrics are in meV/atom, eV/Å and GPa.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mlipctl.data.graph import AtomsGraph, Targets

# Energies are summed and compared in float64 (a total energy of -14 000 eV in float32 has ~1 meV
# resolution); the model layer switches this on as well, this covers using the loss on its own.
jax.config.update("jax_enable_x64", True)

EV_PER_A3_TO_GPA = 160.21766208
"""1 eV/Å³ in GPa."""

QUANTITIES = ("energy", "forces", "stress")
UNITS = {"energy": "meV/atom", "forces": "eV/Å", "stress": "GPa"}
_TO_REPORTED = {"energy": 1000.0, "forces": 1.0, "stress": EV_PER_A3_TO_GPA}


@dataclass(frozen=True)
class LossSettings:
    """Static loss settings (hashable, so a jitted step can close over them)."""

    energy_weight: float = 1.0
    forces_weight: float = 1.0
    stress_weight: float = 0.0
    kind: str = "mse"  # "mse" or "huber"
    delta: float = 0.01

    @classmethod
    def from_config(cls, cfg: Any) -> LossSettings:
        """From a :class:`~mlipctl.config.training.MSELoss` or ``HuberLoss``."""
        return cls(
            energy_weight=float(cfg.energy_weight),
            forces_weight=float(cfg.forces_weight),
            stress_weight=float(cfg.stress_weight),
            kind=str(cfg.kind),
            delta=float(getattr(cfg, "delta", 0.01)),
        )

    def weights(self) -> np.ndarray:
        """(3,) energy, forces and stress weights, to pass a jitted step as data."""
        return np.array([self.energy_weight, self.forces_weight, self.stress_weight])


class LossParts(NamedTuple):
    """Per-member loss terms, each (K,): weighted total and the unweighted terms."""

    total: jax.Array
    energy: jax.Array
    forces: jax.Array
    stress: jax.Array


def _rho(x: jax.Array, kind: str, delta: float) -> jax.Array:
    if kind == "mse":
        return x * x
    if kind == "huber":
        ax = jnp.abs(x)
        # 2 * Huber so that both kinds agree (x^2) for small residuals.
        return jnp.where(ax <= delta, x * x, 2.0 * delta * ax - delta * delta)
    raise ValueError(f"unknown loss kind {kind!r}")


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    # A batch without any label of a kind contributes 0, not NaN.
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def structure_weights(graph: AtomsGraph, targets: Targets) -> tuple[jax.Array, ...]:
    """Weights of real labels: energy (B,), forces per atom (N,), stress (B,)."""
    smask = jnp.asarray(graph.structure_mask)
    w = jnp.asarray(targets.weight) * smask
    w_e = w * jnp.asarray(targets.has_energy)
    w_s = w * jnp.asarray(targets.has_stress)
    w_f = (w * jnp.asarray(targets.has_forces))[graph.structure] * jnp.asarray(graph.atom_mask)
    return w_e, w_f, w_s


def batch_loss(
    energy: jax.Array,
    forces: jax.Array,
    stress: jax.Array | None,
    graph: AtomsGraph,
    targets: Targets,
    settings: LossSettings,
    weights: jax.Array | None = None,
) -> LossParts:
    """Weighted loss of each ensemble member on one padded batch.

    Args:
        energy: (K, B) predicted total energies, eV.
        forces: (K, N, 3) predicted forces, eV/Å.
        stress: (K, B, 3, 3) predicted stress, eV/Å³ (ASE sign), or None if not computed.
        graph, targets: the batch.
        settings: weights and loss kind.
        weights: (3,) energy, forces and stress weights replacing ``settings``' (traced, so a
            change of weights during a fit does not recompile the step).

    Returns:
        :class:`LossParts`, each (K,). Members do not interact, so the gradient of
        ``total.sum()`` w.r.t. disjoint member parameters is each member's own gradient.
    """
    kind, delta = settings.kind, settings.delta
    w_e, w_f, w_s = structure_weights(graph, targets)
    # Weights multiply a label's term; the mean runs over the labels with non-zero weight. (A
    # weighted mean, sum(w x) / sum(w), would cancel the weights whenever a batch holds one
    # structure or one config type.)
    n_e, n_f, n_s = ((w > 0).astype(energy.dtype) for w in (w_e, w_f, w_s))
    n_at = jnp.maximum(jnp.asarray(graph.n_atoms), 1).astype(energy.dtype)
    e_err = (energy - jnp.asarray(targets.energy, energy.dtype)[None]) / n_at[None]
    l_e = _safe_div(jnp.sum(w_e[None] * _rho(e_err, kind, delta), axis=1), jnp.sum(n_e))

    f_err = forces - jnp.asarray(targets.forces, forces.dtype)[None]
    f_term = jnp.sum(_rho(f_err, kind, delta), axis=2)  # (K, N)
    l_f = _safe_div(jnp.sum(w_f[None] * f_term, axis=1), 3.0 * jnp.sum(n_f))

    if stress is None:
        l_s = jnp.zeros_like(l_e)
    else:
        s_err = stress - jnp.asarray(targets.stress, stress.dtype)[None]
        s_term = jnp.sum(_rho(s_err, kind, delta), axis=(2, 3))  # (K, B)
        l_s = _safe_div(jnp.sum(w_s[None] * s_term, axis=1), 9.0 * jnp.sum(n_s))

    w = settings.weights() if weights is None else weights
    total = w[0] * l_e + w[1] * l_f + w[2] * l_s
    return LossParts(total=total, energy=l_e, forces=l_f, stress=l_s)


# --- metrics --------------------------------------------------------------------------------


@dataclass
class _Sums:
    n: float = 0.0
    abs: float = 0.0
    sq: float = 0.0

    def add(self, err: np.ndarray) -> None:
        err = np.asarray(err, dtype=np.float64).ravel()
        self.n += err.size
        self.abs += float(np.abs(err).sum())
        self.sq += float(np.square(err).sum())


@dataclass
class MetricAccumulator:
    """Exact MAE/RMSE over many batches: sums of |err|, err² and counts, per group.

    Groups: ``overall``, ``config_type/<label>`` (energy, forces, stress of structures with that
    label) and ``element/<symbol>`` (force components on atoms of that element; energies and
    stresses belong to whole structures, which may mix elements, so they are not split by
    element). Errors use the ensemble-mean prediction; ``member_*`` keep each member's
    overall energy and force errors.
    """

    species: Sequence[str]
    sums: dict[str, dict[str, _Sums]] = field(default_factory=dict)
    members: dict[str, list[_Sums]] = field(default_factory=dict)

    def _get(self, group: str, quantity: str) -> _Sums:
        return self.sums.setdefault(group, {}).setdefault(quantity, _Sums())

    def update(
        self,
        pred_energy: np.ndarray,
        pred_forces: np.ndarray,
        pred_stress: np.ndarray | None,
        graph: AtomsGraph,
        targets: Targets,
        config_types: Sequence[str] | None = None,
    ) -> None:
        """Add one batch.

        Args:
            pred_energy: (K, B) total energies, eV.
            pred_forces: (K, N, 3) eV/Å.
            pred_stress: (K, B, 3, 3) eV/Å³ or None.
            graph, targets: the batch (numpy or jax arrays).
            config_types: label of each real structure slot, in slot order (len = number of
                real structures); None: no per-config_type groups.
        """
        e_k = np.asarray(pred_energy, dtype=np.float64)
        f_k = np.asarray(pred_forces, dtype=np.float64)
        smask = np.asarray(graph.structure_mask, dtype=bool)
        amask = np.asarray(graph.atom_mask, dtype=bool)
        structure = np.asarray(graph.structure)
        n_at = np.maximum(np.asarray(graph.n_atoms, dtype=np.float64), 1.0)
        species = np.asarray(graph.species)
        labels = np.full(smask.shape, "", dtype=object)
        if config_types is not None:
            slots = np.flatnonzero(smask)
            if len(config_types) != len(slots):
                raise ValueError(
                    f"{len(config_types)} config_type labels for {len(slots)} real structures"
                )
            labels[slots] = list(config_types)

        def groups_of(slot_mask: np.ndarray) -> list[tuple[str, np.ndarray]]:
            out = [("overall", slot_mask)]
            if config_types is not None:
                for lab in sorted(set(labels[slot_mask].tolist())):
                    out.append((f"config_type/{lab}", slot_mask & (labels == lab)))
            return out

        # energy per atom
        m_e = smask & np.asarray(targets.has_energy, dtype=bool)
        e_ref = np.asarray(targets.energy, dtype=np.float64)
        err_k = (e_k - e_ref[None]) / n_at[None]  # (K, B)
        err = err_k.mean(axis=0)
        for name, m in groups_of(m_e):
            self._get(name, "energy").add(err[m])
        self._add_members("energy", err_k[:, m_e])

        # forces per component, real atoms of structures with forces
        has_f = np.asarray(targets.has_forces, dtype=bool)
        m_f_atoms = amask & has_f[structure] & smask[structure]
        f_ref = np.asarray(targets.forces, dtype=np.float64)
        ferr_k = f_k - f_ref[None]
        ferr = ferr_k.mean(axis=0)
        for name, m in groups_of(smask & has_f):
            self._get(name, "forces").add(ferr[m_f_atoms & m[structure]])
        for s_idx in sorted(set(species[m_f_atoms].tolist())):
            sel = m_f_atoms & (species == s_idx)
            self._get(f"element/{self.species[s_idx]}", "forces").add(ferr[sel])
        self._add_members("forces", ferr_k[:, m_f_atoms])

        if pred_stress is not None:
            m_s = smask & np.asarray(targets.has_stress, dtype=bool)
            s_ref = np.asarray(targets.stress, dtype=np.float64)
            serr = (np.asarray(pred_stress, dtype=np.float64) - s_ref[None]).mean(axis=0)
            for name, m in groups_of(m_s):
                self._get(name, "stress").add(serr[m])

    def _add_members(self, quantity: str, err_k: np.ndarray) -> None:
        lst = self.members.setdefault(quantity, [_Sums() for _ in range(err_k.shape[0])])
        for k in range(err_k.shape[0]):
            lst[k].add(err_k[k])

    def result(self) -> dict[str, dict[str, float]]:
        """Metrics per group, e.g. ``{"overall": {"energy_mae": ..., "energy_rmse": ...,
        "energy_count": ..., "forces_mae": ...}}`` in meV/atom, eV/Å and GPa.

        Also ``loss_terms`` under ``overall``: ``energy_mse``/``forces_mse``/``stress_mse`` in
        training units ((eV/atom)², (eV/Å)², (eV/Å³)²) for the validation loss.
        """
        out: dict[str, dict[str, float]] = {}
        for group, by_q in self.sums.items():
            row: dict[str, float] = {}
            for q, s in by_q.items():
                if s.n == 0:
                    continue
                c = _TO_REPORTED[q]
                row[f"{q}_mae"] = c * s.abs / s.n
                row[f"{q}_rmse"] = c * float(np.sqrt(s.sq / s.n))
                row[f"{q}_count"] = float(s.n)
                if group == "overall":
                    row[f"{q}_mse_train_units"] = s.sq / s.n
            if row:
                out[group] = row
        for q, lst in self.members.items():
            if lst and lst[0].n > 0 and "overall" in out:
                c = _TO_REPORTED[q]
                for k, s in enumerate(lst):
                    out["overall"][f"member{k}_{q}_mae"] = c * s.abs / s.n
        return out


def validation_loss(overall: Mapping[str, float], settings: LossSettings) -> float:
    """Weighted MSE of the ensemble mean (training units) from an ``overall`` metrics row."""
    total = 0.0
    for q, w in (
        ("energy", settings.energy_weight),
        ("forces", settings.forces_weight),
        ("stress", settings.stress_weight),
    ):
        key = f"{q}_mse_train_units"
        if w > 0 and key in overall:
            total += w * overall[key]
    return total


def metric_value(metric: str, overall: Mapping[str, float], settings: LossSettings) -> float:
    """The value of a config ``metric`` name ('loss', 'energy_mae', ...) from ``overall``."""
    if metric == "loss":
        return validation_loss(overall, settings)
    if metric not in overall:
        raise ValueError(
            f"validation metric {metric!r} is not available (the validation data has no "
            f"{metric.split('_')[0]} labels)"
        )
    return float(overall[metric])
