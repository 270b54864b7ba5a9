"""MD throughput: the jitted `md` loop vs ASE's VelocityVerlet through our calculator (and EMT).

Run: ``python bench/bench_md.py [--model runs/fit/model.mlip] [--sizes 500 4000 32000]
[--steps 20] [--ase-steps 5] [--ensemble nve|nose_hoover_chain] [--dt 1.0] [--no-ase-calc]
[--json bench_md.json]``.

For each size N (fcc Cu, n x n x n conventional cells, 300 K, NVE by default, dt 1 fs, skin 1 Å)
it reports:

* ``jax``: compile time (neighbour list, initial forces, chunk) and steady-state atom-steps/s of
  the jitted chunks (``chunk_steps = steps``), in-loop cell list included;
* ``ase_calc``: ASE's ``VelocityVerlet`` driving the same model through its ASE calculator
  (neighbour list on the host every step; first two steps, which compile, are not timed);
* ``ase_emt``: ASE's EMT with ``VelocityVerlet``, for orientation;
* peak resident memory of the process (each size runs in its own subprocess, so it is per size);
* throughput per CPU-second as well as per wall-second: on a machine shared with other jobs the
  CPU-time figures are the more stable comparison.

Acceptance: jax ≥ 3x ase_calc at N = 4000, and time per atom-step at 32000 within 1.3x of 4000.
Without ``--model`` an untrained model with the default architecture is used (speed does not
depend on training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# A deliberately cheap architecture (2- and 3-body moments, one small hidden layer): shows how much
# of the gap to the ASE path is host overhead once the model itself is cheap.
LIGHT = {"kind": "moment", "max_order": 1, "n_radial": 4, "n_basis": 6, "hidden": [16]}


def _potential(model: str | None, light: bool = False):
    from mlipctl.model.potential import ModelSpec, Potential, load_potential

    if model:
        return load_potential(model)
    from mlipctl.config.model import ModelConfig

    config = ModelConfig.model_validate({"architecture": LIGHT} if light else {})
    spec = ModelSpec(config=config, species=("Cu",), offsets=(0.0,))
    return Potential.initialize(spec, seed=0)


def _atoms(n_target: int):
    from mlipctl.data.crystals import build_crystal

    reps = max(1, round((n_target / 4) ** (1 / 3)))
    return build_crystal("Cu", "fcc", supercell=(reps, reps, reps))


def _velocities(atoms, seed: int = 0):
    from mlipctl.engines.integrators import maxwell_boltzmann

    return maxwell_boltzmann(atoms.get_masses(), 300.0, seed)


def _ensemble(kind: str):
    from ase import units

    from mlipctl.engines import integrators as integ

    if kind == "nve":
        return integ.Ensemble("nve")
    # As apax md's template: 300 K, chain of 3, 100 fs time constant.
    return integ.Ensemble(kind, temperature_k=300.0, tau=100.0 * units.fs, chain_length=3)


def bench_jax(pot, atoms, steps: int, ensemble: str = "nve", dt_fs: float = 1.0) -> dict:
    import numpy as np
    from ase import units

    from mlipctl.data.neighbors import species_indices
    from mlipctl.engines import integrators as integ
    from mlipctl.engines.md import JaxMD, LoopSettings
    from mlipctl.model.potential import make_energy

    n = len(atoms)
    settings = LoopSettings(
        ensemble=_ensemble(ensemble),
        dt=dt_fs * units.fs,
        n_dof=integ.degrees_of_freedom(n),
        cutoff=pot.spec.cutoff,
        skin=1.0,
        chunk_steps=steps,
    )
    t0 = time.perf_counter()
    md = JaxMD(
        make_energy(pot.spec),
        pot.params,
        atoms,
        species_indices(atoms, pot.spec.type_map()),
        pot.spec.cutoff,
        settings,
        velocities=_velocities(atoms),
    )
    md.compile()
    setup = time.perf_counter() - t0
    md.advance(steps)  # warm-up chunk (any first-call overhead)
    t0, c0, k0 = time.perf_counter(), time.process_time(), md.compile_seconds
    md.advance(3 * steps)
    # A buffer overflow in the window recompiles the loop: steady state excludes that compile
    # (the redone steps stay in).
    recompile = md.compile_seconds - k0
    elapsed = time.perf_counter() - t0 - recompile
    cpu = time.process_time() - c0 - recompile
    st = md.stats()
    return {
        "atom_steps_per_s": n * 2 * steps / elapsed,
        "atom_steps_per_cpu_s": n * 2 * steps / cpu,
        "s_per_step": elapsed / (2 * steps),
        "setup_s": setup,
        "compile_s": md.compile_seconds,
        "mode": st["neighbor_mode"],
        "edges_skin_list": st["edge_capacity"],
        "edges_model_graph": st["graph_capacity"],
        "rebuilds": st["neighbor_rebuilds"],
        "overflow_redos": st["overflow_redos"],
        "temperature_k": float(
            integ.temperature(md.carry.state.velocities, md.carry.state.masses, settings.n_dof)
        ),
        "finite": bool(np.isfinite(np.asarray(md.carry.state.energy))),
        "ensemble": ensemble,
        "dt_fs": dt_fs,
    }


def bench_ase(atoms, calc, steps: int, warmup: int = 2) -> dict:
    from ase import units
    from ase.md.verlet import VelocityVerlet

    a = atoms.copy()
    a.calc = calc
    a.set_velocities(_velocities(a))
    dyn = VelocityVerlet(a, timestep=1.0 * units.fs)
    t0 = time.perf_counter()
    dyn.run(warmup)
    warm = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    dyn.run(steps)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "atom_steps_per_s": len(a) * steps / elapsed,
        "atom_steps_per_cpu_s": len(a) * steps / cpu,
        "s_per_step": elapsed / steps,
        "warmup_s": warm,
    }


def run_size(args: argparse.Namespace, n_target: int) -> dict:
    from ase.calculators.emt import EMT

    pot = _potential(args.model, args.light)
    atoms = _atoms(n_target)
    out: dict = {"n_atoms": len(atoms)}
    out["jax"] = bench_jax(pot, atoms, args.steps, args.ensemble, args.dt)
    if not args.no_ase_calc:
        out["ase_calc"] = bench_ase(atoms, pot.calculator(), args.ase_steps)
    if not args.no_emt:
        out["ase_emt"] = bench_ase(atoms, EMT(), args.ase_steps)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=".mlip file (default: untrained model)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 4000, 32000])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed jax chunk")
    parser.add_argument("--ase-steps", type=int, default=5, help="timed ASE steps")
    parser.add_argument("--no-emt", action="store_true", help="skip the EMT reference")
    parser.add_argument(
        "--light", action="store_true", help="untrained model with a cheap architecture"
    )
    parser.add_argument("--ensemble", choices=["nve", "nose_hoover_chain"], default="nve")
    parser.add_argument("--dt", type=float, default=1.0, help="time step, fs")
    parser.add_argument(
        "--no-ase-calc", action="store_true", help="skip ASE's VelocityVerlet with our calculator"
    )
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.single is not None:
        print(json.dumps(run_size(args, args.single)))
        return

    results = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--single", str(n), "--steps", str(args.steps)]
        cmd += ["--ase-steps", str(args.ase_steps)]
        if args.model:
            cmd += ["--model", args.model]
        if args.no_emt:
            cmd.append("--no-emt")
        if args.light:
            cmd.append("--light")
        cmd += ["--ensemble", args.ensemble, "--dt", str(args.dt)]
        if args.no_ase_calc:
            cmd.append("--no-ase-calc")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"size {n} failed")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(res)
        j = res["jax"]
        line = (
            f"N={res['n_atoms']:6d}  jax {j['atom_steps_per_s']:10.0f} atom-steps/s "
            f"(compile {j['compile_s']:.1f} s, {j['mode']}, {j['ensemble']})"
        )
        if "ase_calc" in res:
            a = res["ase_calc"]
            line += (
                f"  ase+calc {a['atom_steps_per_s']:10.0f}  speed-up "
                f"{j['atom_steps_per_s'] / a['atom_steps_per_s']:5.2f}x"
            )
        emt = res.get("ase_emt", {}).get("atom_steps_per_s", math.nan)
        line += f"  ase+EMT {emt:10.0f}  peak RSS {res['peak_rss_mb']:.0f} MB"
        if "ase_calc" in res:
            line += (
                f"  | per CPU-second: jax {j['atom_steps_per_cpu_s']:.0f}, ase+calc "
                f"{a['atom_steps_per_cpu_s']:.0f} "
                f"({j['atom_steps_per_cpu_s'] / a['atom_steps_per_cpu_s']:.2f}x)"
            )
        print(line, flush=True)

    by_n = {r["n_atoms"]: r for r in results}
    summary: dict = {"results": results, "machine": platform.platform(), "cpus": os.cpu_count()}
    if 4000 in by_n and "ase_calc" in by_n[4000]:
        r = by_n[4000]
        summary["speedup_4000"] = r["jax"]["atom_steps_per_s"] / r["ase_calc"]["atom_steps_per_s"]
        summary["speedup_4000_cpu_time"] = (
            r["jax"]["atom_steps_per_cpu_s"] / r["ase_calc"]["atom_steps_per_cpu_s"]
        )
        summary["speedup_ok"] = summary["speedup_4000"] >= 3.0
    if 4000 in by_n and 32000 in by_n:
        ratio = by_n[4000]["jax"]["atom_steps_per_s"] / by_n[32000]["jax"]["atom_steps_per_s"]
        summary["time_per_atom_step_32000_over_4000"] = ratio
        summary["cpu_time_per_atom_step_32000_over_4000"] = (
            by_n[4000]["jax"]["atom_steps_per_cpu_s"] / by_n[32000]["jax"]["atom_steps_per_cpu_s"]
        )
        summary["scaling_ok"] = ratio <= 1.3
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
