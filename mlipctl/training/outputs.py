"""Files a fit writes besides the model: ``metrics.csv``, parity plots and a learning curve."""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlipctl.reports.base import atomic_write_bytes, atomic_write_text

CSV_COLUMNS = (
    "epoch",
    "step",
    "wall_s",
    "learning_rate",
    "loss_stage",
    "train_loss",
    "train_energy_loss",
    "train_forces_loss",
    "train_stress_loss",
    "valid_loss",
    "valid_energy_mae",
    "valid_energy_rmse",
    "valid_forces_mae",
    "valid_forces_rmse",
    "valid_stress_mae",
    "valid_stress_rmse",
)
"""Energies in meV/atom, forces in eV/Å, stress in GPa; losses in training units (see loss.py).
``loss_stage`` is 2 for epochs trained with ``training.stage_two``'s weights."""


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.8g}"
    return str(v)


class MetricsCSV:
    """``metrics.csv``: one row per epoch, appended and flushed so it can be watched live."""

    def __init__(self, path: str | os.PathLike[str], history: Sequence[Mapping[str, Any]]):
        """Rewrite the file from ``history`` (the checkpoint is the truth after a resume, so rows
        written after the last checkpoint of an interrupted run are dropped)."""
        self.path = Path(path)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(CSV_COLUMNS)
        for row in history:
            writer.writerow([_fmt(row.get(c)) for c in CSV_COLUMNS])
        atomic_write_text(self.path, buf.getvalue())

    def append(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow([_fmt(row.get(c)) for c in CSV_COLUMNS])
            fh.flush()
            os.fsync(fh.fileno())


def _save_figure(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def parity_plots(
    parity: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
    metrics: Mapping[str, Mapping[str, Mapping[str, float]]],
    out_dir: str | os.PathLike[str],
) -> dict[str, str]:
    """One PNG per quantity (energy, forces, stress) with one panel per split.

    Args:
        parity: ``{split: {quantity: (reference, predicted)}}``, flat arrays in reported units
            (meV/atom for energy is awkward on an axis, so energies are plotted in eV/atom).
        metrics: ``{split: {"overall": {...}}}`` as returned by the metric accumulator.
        out_dir: folder for ``parity_<quantity>.png``.

    Returns:
        ``{"parity_<quantity>": path}`` of the files written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = {
        "energy": ("energy per atom (eV/atom)", "energy", 1000.0, "meV/atom"),
        "forces": ("force component (eV/Å)", "forces", 1.0, "eV/Å"),
        "stress": ("stress component (GPa)", "stress", 1.0, "GPa"),
    }
    written: dict[str, str] = {}
    for q, (axis_label, key, _, unit) in labels.items():
        splits = [s for s in parity if q in parity[s] and len(parity[s][q][0])]
        if not splits:
            continue
        fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 4.0), squeeze=False)
        for ax, split in zip(axes[0], splits, strict=True):
            ref, pred = (np.asarray(a, dtype=np.float64) for a in parity[split][q])
            ax.scatter(ref, pred, s=4, alpha=0.5, linewidths=0)
            lo = float(min(ref.min(), pred.min()))
            hi = float(max(ref.max(), pred.max()))
            pad = 0.02 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_ylim(lo - pad, hi + pad)
            m = metrics.get(split, {}).get("overall", {})
            mae, rmse = m.get(f"{key}_mae"), m.get(f"{key}_rmse")
            title = split
            if mae is not None and rmse is not None:
                title += f": MAE {mae:.3g}, RMSE {rmse:.3g} {unit}"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel(f"reference {axis_label}")
            ax.set_ylabel(f"model {axis_label}")
            ax.set_aspect("equal")
        fig.tight_layout()
        path = Path(out_dir) / f"parity_{q}.png"
        _save_figure(fig, path)
        plt.close(fig)
        written[f"parity_{q}"] = str(path)
    return written


def learning_curve(
    history: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str]
) -> dict[str, str]:
    """``learning_curve.png``: training and validation loss, validation MAEs, learning rate."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    if not history:
        return {}

    def series(key: str) -> tuple[np.ndarray, np.ndarray]:
        pts = [
            (r["epoch"], r[key])
            for r in history
            if r.get(key) is not None and math.isfinite(r[key]) and r[key] > 0
        ]
        if not pts:
            return np.zeros(0), np.zeros(0)
        a = np.asarray(pts, dtype=np.float64)
        return a[:, 0], a[:, 1]

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for key, label in (("train_loss", "train"), ("valid_loss", "valid")):
        x, y = series(key)
        if len(x):
            axes[0].plot(x, y, label=label)
    axes[0].set_ylabel("loss (training units)")
    axes[0].legend()
    ax_e = axes[1]
    x, y = series("valid_energy_mae")
    if len(x):
        ax_e.plot(x, y, color="C0", label="energy MAE (meV/atom)")
    ax_e.set_ylabel("valid energy MAE (meV/atom)", color="C0")
    ax_f = ax_e.twinx()
    x, y = series("valid_forces_mae")
    if len(x):
        ax_f.plot(x, y, color="C1", label="force MAE (eV/Å)")
    ax_f.set_ylabel("valid force MAE (eV/Å)", color="C1")
    ax_f.set_yscale("log")
    x, y = series("learning_rate")
    if len(x):
        axes[2].plot(x, y)
    axes[2].set_ylabel("learning rate")
    for ax in (axes[0], ax_e, axes[2]):
        ax.set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    path = Path(out_dir) / "learning_curve.png"
    _save_figure(fig, path)
    plt.close(fig)
    return {"learning_curve": str(path)}
