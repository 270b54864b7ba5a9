"""Wall time of a full `mlipctl validate --defect vacancy` (model and EMT reference).

Runs :func:`mlipctl.engines.validate.run_validate` twice in one process on the same config
(defaults: Cu, fcc 4x4x4 = 256 atoms, relaxations to 0.01 eV/Å, 7-image CI-NEB to 0.01 eV/Å,
dense smoothness path, transferability map on the generated structures). The first run includes
JAX compilation; the second gets the *same* loaded Potential (its jitted functions and their
compilations are kept per Potential object), so it measures the steady state the acceptance
criterion (< 2 minutes once compiled) refers to. A CLI call is a fresh process and pays the
compilation every time (the first run's number). Per-step timings of both runs are printed, and
the EMT-only reference numbers (vacancy formation and migration energy) with them.

Run: ``python bench/bench_validate.py --model quickstart/fit/model.mlip [--checks vacancy]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="quickstart/fit/model.mlip", help=".mlip model (one element)"
    )
    parser.add_argument("--checks", default="vacancy", help="comma-separated checks")
    parser.add_argument("--min-atoms", type=int, default=250, help="defect supercell size")
    parser.add_argument("--runs", type=int, default=2, help="runs in this process (1st compiles)")
    args = parser.parse_args()
    if not Path(args.model).is_file():
        sys.exit(f"model file {args.model} not found: fit one (mlipctl quickstart) or pass --model")

    from mlipctl.config.loader import validate_config
    from mlipctl.config.validate import ValidateConfig
    from mlipctl.engines import validate as validate_mod
    from mlipctl.engines.validate import run_validate

    loaded = validate_mod.load_model(args.model)
    validate_mod.load_model = lambda path: loaded  # keep one Potential: compiled once

    print(f"host: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    walls = []
    for run in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = validate_config(
                ValidateConfig,
                {
                    "model": args.model,
                    "checks": args.checks.split(","),
                    "crystal": {"min_atoms": args.min_atoms},
                    "output": tmp,
                },
            )
            t0 = time.perf_counter()
            report = run_validate(cfg, progress=False)
            walls.append(time.perf_counter() - t0)
        print(f"\nrun {run + 1}: {walls[-1]:.1f} s (verdict {'PASS' if report.passed else 'FAIL'})")
        for key, value in report.timings.items():
            print(f"  {key:40s} {value:8.2f} s")
        if run == 0:
            for c in report.criteria:
                print(f"  {c.name:36s} {c.value!s:>22} <= {c.threshold!s:<6} {c.passed}")
    vac = report.results.get("vacancy")
    if vac is not None:
        ef, em = vac["formation_energy_ev"], vac["migration_barrier_ev"]
        n = report.results["setup"]["defect_supercell_atoms"]
        print(
            f"\nvacancy ({n}-atom cell): E_f model {ef['model']:.4f}, reference "
            f"{ef['reference']:.4f} eV; E_m model {em['model']:.4f}, reference "
            f"{em['reference']:.4f} eV"
        )
    steady = walls[-1]
    print(
        f"\nsteady-state wall time {steady:.1f} s: {'PASS' if steady < 120 else 'FAIL'} (< 120 s)"
    )


if __name__ == "__main__":
    main()
