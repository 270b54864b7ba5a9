"""`mlipctl fit` as a command: run the fit engine and describe the result as a :class:`Report`."""

from __future__ import annotations

from typing import Any

from mlipctl.config.fit import FitConfig
from mlipctl.reports.base import Environment, Report
from mlipctl.training.trainer import result_summary, run_fit


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """Overall E/F/S MAE and RMSE per split (the table a user reads first)."""
    out: dict[str, Any] = {}
    for split, groups in metrics.items():
        overall = groups.get("overall", {})
        out[split] = {
            k: v
            for k, v in overall.items()
            if k.endswith(("_mae", "_rmse")) and not k.startswith("member")
        }
    return out


def run_fit_report(cfg: FitConfig, *, resume: bool = False, progress: bool = True) -> Report:
    """Run :func:`~mlipctl.training.trainer.run_fit` and wrap its result in a report.

    ``results`` holds ``errors`` (overall MAE/RMSE per split: energy meV/atom, forces eV/Å per
    component, stress GPa per component), the full ``metrics`` per config_type and element,
    ``best_epoch``, ``epochs_completed``, ``stopped_early``, ``n_parameters`` and the energy
    ``normalisation``. A fit has no acceptance criteria; use `mlipctl validate` for those.
    """
    result = run_fit(cfg, resume=resume, progress=progress)
    summary = result_summary(result)
    timings = {k: float(v) for k, v in summary.pop("timings_s").items() if v is not None}
    messages = list(summary.pop("messages"))
    summary.pop("model")
    # Report timings are seconds; the throughput goes with the results.
    throughput = timings.pop("structures_per_s", None)
    results = {
        "errors": _headline(result.metrics),
        "training_structures_per_s": throughput,
        **summary,
    }
    return Report(
        command="fit",
        config=cfg.model_dump(mode="json"),
        environment=Environment.capture(),
        timings=timings,
        results=results,
        artifacts=dict(result.artifacts),
        messages=messages,
    )
