"""Cost of the uncertainty monitors inside the jitted MD loop, measured side by side.

Run: ``python bench/bench_monitor.py [--model runs/fit/model.mlip] [--sizes 500 4000]
[--steps 50] [--repeats 5] [--interval 10] [--json bench_monitor.json]``.

For each size N (fcc Cu, 300 K NVE, dt 1 fs) one process builds several :class:`JaxMD` drivers
on the same structure, potential and settings that differ only in their monitors:

* ``none``: no monitor (the reference MD step);
* ``mahalanobis``: the Mahalanobis monitor every ``--interval`` steps (the acceptance case);
* ``mahalanobis_every_step``: the same every step (what one evaluation costs);
* ``gamma``, ``hull``: the other descriptor monitors every ``--interval`` steps;
* ``ensemble_std_forces``: the calibrated force-spread monitor (ensembles only).

The drivers are timed in interleaved rounds (``--repeats`` chunks of ``--steps`` steps each, in
turn), so load from other jobs on a shared machine hits all of them alike; the median time per
step is reported, with the CPU time per step (less sensitive to sharing). Monitor thresholds are
set out of reach so that no trigger interrupts a chunk: the work done is the same.

The domain model is fitted on the descriptors of a few rattled copies of the cell. Without
``--model`` an untrained model with the default architecture is used (speed does not depend on
training). Acceptance: overhead of ``mahalanobis`` <= 5 % of the MD step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _potential(model: str | None):
    from mlipctl.model.potential import ModelSpec, Potential, load_potential

    if model:
        return load_potential(model)
    from mlipctl.config.model import ModelConfig

    spec = ModelSpec(config=ModelConfig(), species=("Cu",), offsets=(0.0,))
    return Potential.initialize(spec, seed=0)


def _atoms(n_target: int):
    from mlipctl.data.crystals import build_crystal

    reps = max(1, round((n_target / 4) ** (1 / 3)))
    return build_crystal("Cu", "fcc", a=3.61, supercell=(reps, reps, reps))


def _domain(pot, atoms, path: Path) -> tuple[Path, bool]:
    """Domain model of rattled, strained copies of the cell; γ too if the descriptors of those
    frames have full rank (returns whether it does)."""
    from mlipctl.engines.uncertainty import params_digest, save_domain, structure_descriptors
    from mlipctl.errors import UserInputError
    from mlipctl.uncertainty.domain import DomainModel

    frames = []
    for seed in range(8):
        a = atoms.copy()
        a.set_cell(a.cell[:] * (1.0 + 0.01 * (seed % 3 - 1)), scale_atoms=True)
        a.rattle(0.1, seed=seed)
        frames.append(a)
    desc, species, _ = structure_descriptors(pot, frames)
    kw = {"n_species": pot.spec.n_species, "max_kernel_points": 1000}
    try:
        dm, gamma = DomainModel.fit(desc, species, **kw), True
    except UserInputError:  # rank-deficient descriptors: no γ
        dm, gamma = DomainModel.fit(desc, species, gamma=False, **kw), False
    return save_domain(dm, path, model_digest=params_digest(pot.params)), gamma


def _unreachable(monitor):
    """The same monitor with a threshold it never reaches (so no chunk is interrupted)."""
    import dataclasses

    import jax.numpy as jnp

    params = dict(monitor.params)
    params["threshold"] = jnp.asarray(1e300)
    return dataclasses.replace(monitor, params=params, threshold=1e300)


def run_size(n_target: int, model: str | None, steps: int, repeats: int, interval: int) -> dict:
    import tempfile

    import numpy as np
    from ase import units

    from mlipctl.config.md import (
        EnsembleStdMonitor,
        GammaMonitor,
        HullMonitor,
        MahalanobisMonitor,
    )
    from mlipctl.data.neighbors import species_indices
    from mlipctl.engines import integrators as integ
    from mlipctl.engines.md import JaxMD, LoopSettings, _monitor_context
    from mlipctl.engines.monitors import build_monitors
    from mlipctl.model.potential import make_energy

    pot = _potential(model)
    atoms = _atoms(n_target)
    n = len(atoms)
    tmp = Path(tempfile.mkdtemp(prefix="bench_monitor_"))
    domain, has_gamma = _domain(pot, atoms, tmp / "domain.npz")
    ctx = _monitor_context(n, pot)
    cases: dict[str, tuple[list, int]] = {"none": ([], interval)}
    build = {
        "mahalanobis": MahalanobisMonitor(domain_model=domain),
        "hull": HullMonitor(domain_model=domain),
    }
    if has_gamma:
        build["gamma"] = GammaMonitor(domain_model=domain)
    for name, cfg in build.items():
        cases[name] = ([_unreachable(m) for m in build_monitors([cfg], ctx)], interval)
    cases["mahalanobis_every_step"] = (cases["mahalanobis"][0], 1)
    if pot.spec.n_members >= 2:
        cfg = EnsembleStdMonitor(threshold=1.0)
        cases["ensemble_std_forces"] = (
            [_unreachable(m) for m in build_monitors([cfg], ctx)],
            interval,
        )

    velocities = integ.maxwell_boltzmann(atoms.get_masses(), 300.0, 0)
    species = species_indices(atoms, pot.spec.type_map())
    drivers = {}
    for name, (monitors, every) in cases.items():
        settings = LoopSettings(
            ensemble=integ.Ensemble("nve"),
            dt=1.0 * units.fs,
            n_dof=integ.degrees_of_freedom(n),
            cutoff=pot.spec.cutoff,
            skin=1.0,
            chunk_steps=steps,
            monitor_interval=every,
        )
        md = JaxMD(
            make_energy(pot.spec),
            pot.params,
            atoms,
            species,
            pot.spec.cutoff,
            settings,
            monitors,
            velocities=velocities,
        )
        md.compile()
        md.advance(steps)  # warm-up chunk
        drivers[name] = md

    wall: dict[str, list[float]] = {k: [] for k in drivers}
    cpu: dict[str, list[float]] = {k: [] for k in drivers}
    for _ in range(repeats):
        for name, md in drivers.items():
            target = md.step + steps
            t0, c0 = time.perf_counter(), time.process_time()
            while md.step < target:
                _, event = md.advance(target)
                if event is not None and event.kind == "blow_up":
                    raise SystemExit(f"{name}: MD blew up ({event.reason}); use --model")
            wall[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)

    out: dict = {"n_atoms": n, "ensemble_size": pot.spec.n_members, "interval": interval}
    base_w = statistics.median(wall["none"])
    base_c = statistics.median(cpu["none"])
    for name in drivers:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        out[name] = {
            "s_per_step": w,
            "cpu_s_per_step": c,
            "overhead": w / base_w - 1.0,
            "overhead_cpu": c / base_c - 1.0,
            "compile_s": drivers[name].compile_seconds,
            "finite": bool(np.isfinite(np.asarray(drivers[name].carry.state.energy))),
        }
    per_eval = out["mahalanobis_every_step"]["s_per_step"] - base_w
    out["mahalanobis_eval_s"] = per_eval
    out["mahalanobis_eval_vs_step"] = per_eval / base_w
    out["accept_overhead_le_5pct"] = out["mahalanobis"]["overhead"] <= 0.05
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=".mlip file (default: untrained model)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 4000])
    parser.add_argument("--steps", type=int, default=50, help="steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--interval", type=int, default=10, help="monitor interval, steps")
    parser.add_argument("--json", default=None, help="write results here")
    args = parser.parse_args()

    results = []
    for n in args.sizes:
        res = run_size(n, args.model, args.steps, args.repeats, args.interval)
        results.append(res)
        print(f"N={res['n_atoms']} (monitors every {args.interval} steps)")
        for name, v in res.items():
            if isinstance(v, dict):
                print(
                    f"  {name:24s} {1e3 * v['s_per_step']:9.3f} ms/step  "
                    f"overhead {100 * v['overhead']:+6.1f} % (cpu {100 * v['overhead_cpu']:+6.1f} %)"
                    f"  compile {v['compile_s']:.1f} s"
                )
        print(
            f"  one Mahalanobis evaluation = {100 * res['mahalanobis_eval_vs_step']:.1f} % of a "
            f"step; overhead at interval {args.interval} <= 5 %: {res['accept_overhead_le_5pct']}"
        )
    if args.json:
        from mlipctl.reports.base import atomic_write_text

        meta = {"python": platform.python_version(), "machine": platform.machine()}
        atomic_write_text(args.json, json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
