"""apax (GMNN) side of the mlipctl-vs-apax benchmarks (issues 3 and 4), run with the apax venv.

Run from the repository root with the apax venv's python (setup: bench/apax/README.md):

  python bench/apax/bench_apax.py config --out runs/apax.yaml [--data-dir D] [--epochs N]
      write a copy of bench/apax/config_cu.yaml with the data path / epochs / output substituted
  python bench/apax/bench_apax.py infer runs/apax/mlearn-Cu [--repeats 7] [--json out.json]
      energy + forces of a 4000-atom fcc Cu box (a = 3.61 A, 10x10x10 cubic cells, rattled 0.02 A)
      through apax's jitted predictor (the jitted step of apax's ASECalculator, compiled ahead of
      time so compile time is apart), through the jitted model alone (fixed neighbour list), and
      through the ASE calculator; median of --repeats calls after a warm-up
  python bench/apax/bench_apax.py predict runs/apax/mlearn-Cu --data test.extxyz --out p.npz
      energies and forces of every structure in an extxyz file, written to an .npz (arrays only:
      energy (S,), n_atoms (S,), forces (sum N, 3)); bench/bench_vs_apax.py scores them against
      the reference with the same code as mlipctl's predictions
  python bench/apax/bench_apax.py train-log runs/apax/mlearn-Cu
      training throughput (structures/s) from the epoch times in apax's log.csv
  python bench/apax/bench_apax.py md runs/apax/mlearn-Cu [--atoms 500 4000] [--steps 100 400]
      `apax md` throughput (atom-steps/s) through apax.md.run_md: runs of `short`, `long`, `short`
      steps per size; steady state = wall-time difference of the last two / step difference
      (compile and setup cancel; the first run's extra time is mostly compilation)

Each subcommand prints JSON (versions, machine load, timings). Timings on a shared machine are
upper bounds: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE_CONFIG = Path(__file__).resolve().parent / "config_cu.yaml"
LATTICE = 3.61


def _mlearn_dir() -> Path:
    env = os.environ.get("MLIPCTL_MLEARN_DIR")
    return Path(env) if env else ROOT.parent / "shared/data/mlearn"


def _versions() -> dict:
    out = {}
    for pkg in ("apax", "jax", "jaxlib", "flax", "numpy", "ase"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _machine() -> dict:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def _fcc_cu(repeat: tuple[int, int, int], rattle: float = 0.02) -> Any:
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=LATTICE, cubic=True).repeat(tuple(repeat))
    if rattle:
        atoms.rattle(rattle, seed=0)
    return atoms


def _median_time(fn: Any, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of each call (CPU time is less sensitive to other jobs)."""
    import jax

    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def _flops(compiled: Any) -> float:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # cost analysis is best effort
        return float("nan")
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _row(name: str, n_atoms: int, times: tuple[list[float], list[float]], **extra: Any) -> dict:
    wall, cpu = times
    t = statistics.median(wall)
    return {
        "path": name,
        "atoms": n_atoms,
        "time_s": t,
        "time_min_s": min(wall),
        "cpu_s": statistics.median(cpu),
        "atom_evals_per_s": n_atoms / t,
        **extra,
    }


# --- config -------------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> dict:
    cfg = yaml.safe_load(Path(args.base).read_text())
    data_dir = Path(args.data_dir) if args.data_dir else None
    if data_dir is not None:
        cfg["data"]["data_path"] = str(data_dir / args.element / "training.extxyz")
        cfg["data"]["test_data_path"] = str(data_dir / args.element / "test.extxyz")
    if args.epochs is not None:
        cfg["n_epochs"] = args.epochs
    if args.directory is not None:
        cfg["data"]["directory"] = args.directory
    if args.experiment is not None:
        cfg["data"]["experiment"] = args.experiment
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return {"config": str(out), "data": cfg["data"], "n_epochs": cfg["n_epochs"]}


# --- inference ----------------------------------------------------------------------------------


def cmd_infer(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from apax.md import ASECalculator
    from apax.utils.jax_md_reduced import space

    atoms = _fcc_cu(args.repeat)
    n = len(atoms)
    calc = ASECalculator(Path(args.model_dir))

    t0 = time.perf_counter()
    calc.initialize(atoms)  # builds the model and allocates apax's (JAX, all-pairs) neighbour list
    t_init = time.perf_counter() - t0
    if not calc.neigbor_from_jax:
        raise SystemExit("box too small for apax's JAX neighbour list; use a larger --repeat")

    positions = jnp.asarray(atoms.positions, dtype=jnp.float64)
    box = jnp.asarray(atoms.cell.array, dtype=jnp.float64)
    neighbors = calc.neighbors
    idx = np.asarray(neighbors.idx)
    edges = int((idx[0] < n).sum())
    rows = []

    # (1) apax's jitted predictor: the step function of its ASE calculator (neighbour-list update
    # check + model), called on device arrays, compiled ahead of time.
    t0 = time.perf_counter()
    step = calc.step.lower(positions, neighbors, box).compile()
    t_compile = time.perf_counter() - t0
    res, _ = step(positions, neighbors, box)
    jax.block_until_ready(res)
    energy = float(res["energy"])
    forces = np.asarray(res["forces"])
    times = _median_time(lambda: step(positions, neighbors, box)[0], args.repeats)
    rows.append(
        _row(
            "jitted step (ASECalculator.step)",
            n,
            times,
            compile_s=t_compile,
            gflop_per_call=_flops(step) / 1e9,
        )
    )

    # (2) the jitted energy+forces model alone, on the same fixed neighbour list (what the step
    # calls after its neighbour-list check), in apax's fractional coordinates.
    box_t = box.T
    frac = space.transform(jnp.linalg.inv(box_t), positions)
    z = jnp.asarray(atoms.numbers)
    offsets = jnp.full([idx.shape[1], 3], 0)
    model = jax.jit(calc.model)
    t0 = time.perf_counter()
    model_c = model.lower(frac, z, neighbors.idx, box_t, offsets).compile()
    t_compile_m = time.perf_counter() - t0
    jax.block_until_ready(model_c(frac, z, neighbors.idx, box_t, offsets))
    times = _median_time(lambda: model_c(frac, z, neighbors.idx, box_t, offsets), args.repeats)
    rows.append(
        _row(
            "jitted model, fixed neighbour list",
            n,
            times,
            compile_s=t_compile_m,
            gflop_per_call=_flops(model_c) / 1e9,
        )
    )

    # (3) the ASE calculator as a user calls it (positions move by 1e-4 A between calls so ASE
    # does not return cached results; far below the 0.5 A skin, so no neighbour-list rebuild).
    ase_row = None
    if not args.no_ase:
        atoms.calc = calc
        t0 = time.perf_counter()
        e_ase = atoms.get_potential_energy()  # first call re-initialises and compiles
        t_first = time.perf_counter() - t0
        moves = iter([1e-4, -1e-4] * args.repeats)

        def ase_call() -> Any:
            atoms.positions[0, 0] += next(moves)
            return atoms.get_forces()

        times = _median_time(ase_call, args.repeats)
        ase_row = _row(
            "ASECalculator.get_forces",
            n,
            times,
            first_call_s=t_first,
            energy_matches_step=bool(abs(e_ase - energy) < 1e-6 * n),
        )
        rows.append(ase_row)

    return {
        "benchmark": "apax inference, energy+forces, fcc Cu",
        "model_dir": str(args.model_dir),
        "r_max": calc.model_config.model.basis.r_max,
        "dtypes": {
            "positions": "float64 (apax enables jax_enable_x64)",
            "descriptor": calc.model_config.model.descriptor_dtype,
            "readout": calc.model_config.model.readout_dtype,
        },
        "atoms": n,
        "edges": edges,
        "neighbour_capacity": int(idx.shape[1]),
        "init_and_neighbour_alloc_s": t_init,
        "energy_per_atom_eV": energy / n,
        "max_abs_force_eV_per_A": float(np.abs(forces).max()),
        "results": rows,
        "versions": _versions(),
        "machine": _machine(),
    }


# --- predictions for accuracy ------------------------------------------------------------------


def cmd_predict(args: argparse.Namespace) -> dict:
    import numpy as np
    from apax.md import ASECalculator
    from ase.io import read

    structures = read(args.data, index=":")
    calc = ASECalculator(Path(args.model_dir))
    energies, forces = [], []
    t0 = time.perf_counter()
    for atoms in structures:
        atoms = atoms.copy()  # drop the file's single-point results
        atoms.calc = calc
        energies.append(atoms.get_potential_energy())
        forces.append(np.asarray(atoms.get_forces(), dtype=np.float64))
    elapsed = time.perf_counter() - t0
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez(
        tmp,
        energy=np.asarray(energies, dtype=np.float64),
        n_atoms=np.asarray([len(a) for a in structures]),
        forces=np.concatenate(forces),
    )
    tmp.replace(out)
    return {
        "model_dir": str(args.model_dir),
        "data": str(args.data),
        "structures": len(structures),
        "seconds": elapsed,
        "out": str(out),
        "versions": _versions(),
    }


# --- training throughput from apax's log ---------------------------------------------------------


def cmd_train_log(args: argparse.Namespace) -> dict:
    model_dir = Path(args.model_dir)
    cfg = yaml.safe_load((model_dir / "config.yaml").read_text())
    n_train, n_valid = cfg["data"]["n_train"], cfg["data"]["n_valid"]
    with open(model_dir / "log.csv") as fh:
        rows = list(csv.DictReader(fh))
    times = [float(r["epoch_time"]) for r in rows]
    steady = times[args.skip :]
    out: dict[str, Any] = {
        "benchmark": "apax training throughput from log.csv (epoch_time includes validation)",
        "model_dir": str(model_dir),
        "n_train": n_train,
        "n_valid": n_valid,
        "batch_size": cfg["data"]["batch_size"],
        "epochs_logged": len(times),
        "first_epoch_s": times[0] if times else None,
        "epoch_times_s": times,
        "versions": _versions(),
        "machine": _machine(),
    }
    if steady:
        t = statistics.median(steady)
        out.update(
            steady_epoch_s=t,
            train_structures_per_s=n_train / t,
            train_plus_valid_structures_per_s=(n_train + n_valid) / t,
        )
    last = rows[-1] if rows else {}
    out["last_epoch_metrics"] = {k: float(v) for k, v in last.items() if k != "epoch" and v}
    return out


# --- MD throughput --------------------------------------------------------------------------------


def _nl_bytes_estimate(n: int) -> float:
    """Peak bytes of apax's neighbour-list build: its reduced jax-md has no cell list, so every
    (re)build materialises all N^2 candidate pairs (two int32 index arrays, two gathered float64
    position arrays, float64 distances, int32 cumsum and the scatter outputs): ~80 B per pair."""
    return 80.0 * n * n


def _mem_available() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


def _run_md_once(
    model_config: dict, atoms: Any, steps: int, args: argparse.Namespace, work: Path, tag: str
) -> tuple[float, float]:
    from apax.md import run_md
    from ase.io import write

    sim_dir = work / tag
    sim_dir.mkdir(parents=True)
    structure = work / f"{tag}.extxyz"
    write(structure, atoms)
    md_config = {
        "ensemble": {
            "name": "nvt",
            "dt": args.dt,
            "temperature_schedule": {"name": "constant", "T0": args.temperature},
        },
        "duration": steps * args.dt,
        "n_inner": args.n_inner,
        "sampling_rate": args.sampling_rate,
        "dr_threshold": 0.5,
        "sim_dir": str(sim_dir),
        "initial_structure": str(structure),
        "restart": False,
        "disable_pbar": True,
    }
    c0, t0 = time.process_time(), time.perf_counter()
    run_md(model_config, md_config, log_level="error")
    return time.perf_counter() - t0, time.process_time() - c0


def cmd_md(args: argparse.Namespace) -> dict:
    import math

    model_dir = Path(args.model_dir).resolve()
    model_config = yaml.safe_load((model_dir / "config.yaml").read_text())
    model_config["data"]["directory"] = str(model_dir.parent)
    model_config["data"]["experiment"] = model_dir.name
    short, long = sorted(args.steps)
    if short % args.n_inner or long % args.n_inner or short == long:
        raise SystemExit("--steps must be two different multiples of --n-inner")

    rows = []
    with tempfile.TemporaryDirectory(prefix="apax-md-") as tmp:
        work = Path(tmp)
        for n_req in args.atoms:
            k = max(1, round((n_req / 4) ** (1 / 3)))
            atoms = _fcc_cu((k, k, k), rattle=0.0)
            n = len(atoms)
            need, avail = _nl_bytes_estimate(n), _mem_available()
            if need > 0.5 * avail and not args.force:
                rows.append(
                    {
                        "atoms": n,
                        "skipped": (
                            f"apax's neighbour list is all-pairs (no cell list in its reduced jax-md): "
                            f"~{need / 2**30:.0f} GiB per build vs {avail / 2**30:.0f} GiB available; "
                            "--force to try anyway"
                        ),
                    }
                )
                continue
            # run order short, long, short: the first run pays compilation (and, for the first
            # size, one-time imports); jax's in-process cache serves the same computation to
            # the later two, so their difference is the steady-state cost of (long - short) steps.
            # (If the cache missed, both later runs would compile and the difference still holds.)
            t1, c1 = _run_md_once(model_config, atoms, short, args, work, f"n{n}_a")
            t_long, c_long = _run_md_once(model_config, atoms, long, args, work, f"n{n}_b")
            t_short, c_short = _run_md_once(model_config, atoms, short, args, work, f"n{n}_c")
            dt_step = (t_long - t_short) / (long - short)
            rows.append(
                {
                    "atoms": n,
                    "steps": [short, long, short],
                    "wall_s": [t1, t_long, t_short],
                    "cpu_s": [c1, c_long, c_short],
                    "steady_s_per_step": dt_step,
                    "steady_cpu_s_per_step": (c_long - c_short) / (long - short),
                    "atom_steps_per_s": n / dt_step if dt_step > 0 else math.nan,
                    "setup_s": t_short - short * dt_step,
                    "first_run_extra_s": t1 - t_short,
                }
            )
    return {
        "benchmark": "apax md (apax.md.run_md, NVT NHC), fcc Cu, a = 3.61 A",
        "model_dir": str(model_dir),
        "dt_fs": args.dt,
        "temperature_K": args.temperature,
        "n_inner": args.n_inner,
        "sampling_rate": args.sampling_rate,
        "results": rows,
        "versions": _versions(),
        "machine": _machine(),
    }


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("config", help="write config_cu.yaml with substitutions")
    p.add_argument("--base", default=str(BASE_CONFIG))
    p.add_argument(
        "--data-dir",
        default=None,
        help=f"mlearn directory (default: as in the base config; {_mlearn_dir()})",
    )
    p.add_argument("--element", default="Cu")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--directory", default=None, help="apax output directory")
    p.add_argument("--experiment", default=None)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_config)

    p = sub.add_parser("infer", help="inference speed on a 4000-atom fcc Cu box")
    p.add_argument("model_dir", help="trained apax model: <directory>/<experiment>")
    p.add_argument("--repeat", type=int, nargs=3, default=(10, 10, 10), help="fcc cells")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per path")
    p.add_argument("--no-ase", action="store_true", help="skip the ASE calculator path")
    p.set_defaults(fn=cmd_infer)

    p = sub.add_parser("predict", help="energies and forces of an extxyz file, to .npz")
    p.add_argument("model_dir")
    p.add_argument("--data", required=True, help="extxyz file")
    p.add_argument("--out", required=True, help=".npz to write")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("train-log", help="training structures/s from apax's log.csv")
    p.add_argument("model_dir")
    p.add_argument("--skip", type=int, default=1, help="leading epochs left out (compile, cache)")
    p.set_defaults(fn=cmd_train_log)

    p = sub.add_parser("md", help="apax md throughput on fcc Cu")
    p.add_argument("model_dir")
    p.add_argument("--atoms", type=int, nargs="+", default=[500, 4000, 32000])
    p.add_argument("--steps", type=int, nargs=2, default=[100, 400])
    p.add_argument("--n-inner", type=int, default=50)
    p.add_argument("--sampling-rate", type=int, default=10)
    p.add_argument("--dt", type=float, default=0.5, help="fs, apax template value")
    p.add_argument("--temperature", type=float, default=300.0)
    p.add_argument("--force", action="store_true", help="run sizes over the memory estimate")
    p.set_defaults(fn=cmd_md)

    for p in sub.choices.values():
        p.add_argument("--json", type=Path, default=None, help="also write the JSON here")

    args = parser.parse_args()
    out = args.fn(args)
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
