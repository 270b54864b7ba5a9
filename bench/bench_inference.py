"""Inference speed of the default moment-tensor potential: energy + forces of an fcc Cu box.

Reports, for a single model and ensembles of 4 (shallow with per-member forces, shallow with
forces of the member mean only ("mean-F", energy spreads only), deep):
  * compile time (lower + XLA compile) and steady-state time per call (median of repeats),
  * atom-evaluations per second and the ensemble/single time ratio,
  * FLOPs per call from XLA's cost analysis and the achieved rate as a fraction of a nominal
    fp32 peak (default 166 GFLOP/s),
and ASE's EMT on the same box for orientation. The model runs with random parameters (speed does
not depend on their values); ``--model`` times a trained model file as it is (its own
architecture and ensemble) instead of the four variants. The machine's load average is printed:
timings on a shared machine are upper bounds.

Usage: python bench/bench_inference.py [--model M.mlip] [--repeat 3 8 8] [--repeats 5]
[--no-emt] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT

from mlipctl.config.model import EnsembleConfig, ModelConfig
from mlipctl.data.neighbors import build_graph
from mlipctl.model.potential import ModelSpec, init_params, load_potential, make_predict


def _time(fn: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def bench_model(
    atoms: Any,
    spec: ModelSpec,
    params: Any,
    repeats: int,
    peak: float,
    member_forces: bool = True,
) -> dict:
    ensemble = spec.config.ensemble
    t0 = time.perf_counter()
    graph = jax.device_put(build_graph([atoms], spec.cutoff, spec.type_map()))
    t_graph = time.perf_counter() - t0
    predict = make_predict(spec, stress=False, member_forces=member_forces)
    t0 = time.perf_counter()
    lowered = jax.jit(predict).lower(params, graph)
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, graph))  # warm-up
    times = _time(lambda: compiled(params, graph), repeats)
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returns one dict per computation
        cost = cost[0]
    flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
    t = statistics.median(times)
    return {
        "ensemble": f"{ensemble.kind}"
        + (f" x{ensemble.size}" if ensemble.size > 1 else "")
        + ("" if member_forces else " mean-F"),
        "members": spec.n_members,
        "atoms": len(atoms),
        "edges": int(np.asarray(graph.edge_mask).sum()),
        "neighbour_list_s": t_graph,
        "compile_s": t_compile,
        "time_s": t,
        "time_min_s": min(times),
        "atom_evals_per_s": len(atoms) / t,
        "gflop_per_call": flops / 1e9,
        "gflop_per_s": flops / t / 1e9,
        "fraction_of_peak": flops / t / 1e9 / peak,
    }


def bench_emt(atoms: Any, repeats: int) -> dict:
    def run() -> np.ndarray:
        a = atoms.copy()
        a.calc = EMT()
        return a.get_forces()

    times = _time(run, repeats)
    return {"time_s": statistics.median(times), "atom_evals_per_s": len(atoms) / min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, nargs=3, default=(10, 10, 10), help="fcc cells")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant")
    parser.add_argument("--peak", type=float, default=166.0, help="nominal fp32 GFLOP/s")
    parser.add_argument("--model", type=Path, default=None, help="time this trained .mlip file")
    parser.add_argument("--no-emt", action="store_true", help="skip the EMT reference")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(tuple(args.repeat))
    atoms.rattle(0.02, seed=0)
    load = os.getloadavg()
    print(
        f"{len(atoms)} Cu atoms; jax {jax.__version__} on {jax.default_backend()}; "
        f"{os.cpu_count()} CPUs; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    if args.model is not None:
        pot = load_potential(args.model)
        rows = [bench_model(atoms, pot.spec, pot.params, args.repeats, args.peak)]
        rows[0]["model"] = str(args.model)
    else:
        rows = []
        for ens, member_forces in (
            (EnsembleConfig(), True),
            (EnsembleConfig(kind="shallow", size=4), True),
            (EnsembleConfig(kind="shallow", size=4), False),
            (EnsembleConfig(kind="deep", size=4), True),
        ):
            spec = ModelSpec(ModelConfig(ensemble=ens), species=("Cu",), offsets=(0.0,))
            rows.append(
                bench_model(
                    atoms, spec, init_params(spec, 0), args.repeats, args.peak, member_forces
                )
            )
    single = rows[0]["time_s"]
    header = (
        f"{'model':20s} {'compile s':>9s} {'ms/call':>9s} {'atoms/s':>10s} "
        f"{'ratio':>6s} {'GFLOP':>7s} {'GFLOP/s':>8s} {'peak %':>7s}"
    )
    print(header)
    for r in rows:
        r["ratio_to_single"] = r["time_s"] / single
        print(
            f"{r['ensemble']:20s} {r['compile_s']:9.1f} {r['time_s'] * 1e3:9.1f} "
            f"{r['atom_evals_per_s']:10.0f} {r['ratio_to_single']:6.2f} "
            f"{r['gflop_per_call']:7.2f} {r['gflop_per_s']:8.2f} {100 * r['fraction_of_peak']:6.1f}%"
        )
    emt = None
    if not args.no_emt:
        emt = bench_emt(atoms, max(2, args.repeats // 2))
        print(f"{'ASE EMT':20s} {'':9s} {emt['time_s'] * 1e3:9.1f} {emt['atom_evals_per_s']:10.0f}")
    print(
        f"neighbour list (vesin, build_graph): {rows[0]['neighbour_list_s'] * 1e3:.0f} ms, "
        f"{rows[0]['edges']} directed edges"
    )
    if args.json:
        args.json.write_text(json.dumps({"load": load, "models": rows, "emt": emt}, indent=2))


if __name__ == "__main__":
    main()
