"""NEB band force evaluation: batched jitted step vs ASE's NEB calling the model's calculator.

7 moving images of the Cu vacancy hop in a 4x4x4 fcc cell (255 atoms each). Both drivers use
the same model and the same band; both are warmed up (compiled) before timing, then timed side
by side in alternating rounds (the median per step is reported):

* batched: :class:`mlipctl.engines.neb.BatchedBand` -- one jitted call per NEB step evaluates all
  7 images, projects the NEB forces and takes the FIRE step; two image layouts: ``flat`` (one
  padded graph, B = 7, one model call) and ``map`` (7 stacked graphs, ``lax.map`` inside the
  call; the default on CPU);
* ase: ``ase.mep.NEB`` with one :class:`mlipctl.model.calculator.MLIPCalculator` per image and
  ASE's FIRE -- one model call per image per step (neighbour list rebuilt on every call).

Run: ``python bench/bench_neb.py [--model runs/fit/model.mlip] [--steps 10] [--rounds 3]``.
Without ``--model`` a freshly initialised model of the default architecture is used (speed does
not depend on the parameter values). Acceptance: batched >= 3x faster per band evaluation.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
import warnings

import numpy as np


def _potential(path: str | None):
    from mlipctl.config.model import ModelConfig
    from mlipctl.model.potential import ModelSpec, Potential, load_potential

    if path:
        return load_potential(path)
    spec = ModelSpec(config=ModelConfig(), species=("Cu",), offsets=(0.0,))
    return Potential.initialize(spec, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=".mlip model with Cu (default: fresh)")
    parser.add_argument("--images", type=int, default=7, help="moving images")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--skin", type=float, default=0.5, help="batched neighbour skin, Å")
    args = parser.parse_args()

    from ase.mep import NEB
    from ase.optimize import FIRE

    from mlipctl.data.crystals import build_crystal, vacancy_hop
    from mlipctl.engines.fire import JaxModel
    from mlipctl.engines.neb import BatchedBand, make_band

    pot = _potential(args.model)
    model = JaxModel.from_potential(pot)
    host = build_crystal("Cu", "fcc", a=3.61, supercell=(4, 4, 4))
    initial, final, _ = vacancy_hop(host)
    band = make_band(initial, final, args.images, "linear")
    n_atoms = len(initial)

    # Batched driver: warm-up compiles; then each timed call is one full NEB step.
    batched, warm = {}, {}
    for layout in ("flat", "map"):
        batched[layout] = BatchedBand(model, band, climb=True, layout=layout, skin=args.skin)
        t0 = time.perf_counter()
        batched[layout].run(fmax=0.0, max_steps=1)
        warm[layout] = time.perf_counter() - t0

    # ASE driver with one model calculator per image.
    images = [im.copy() for im in band]
    for im in images:
        im.calc = pot.calculator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        neb = NEB(images, k=0.1, climb=True, method="improvedtangent")
    opt = FIRE(neb, logfile=None)
    t0 = time.perf_counter()
    opt.run(fmax=0.0, steps=1)
    warm["ase"] = time.perf_counter() - t0

    per_step: dict[str, list[float]] = {"flat": [], "map": [], "ase": []}
    for _ in range(args.rounds):
        for layout, drv in batched.items():
            calls0 = drv.n_calls
            t0 = time.perf_counter()
            drv.run(fmax=0.0, max_steps=args.steps - 1)  # steps - 1 updates = steps calls
            per_step[layout].append((time.perf_counter() - t0) / (drv.n_calls - calls0))
        t0 = time.perf_counter()
        opt.run(fmax=0.0, steps=args.steps)
        per_step["ase"].append((time.perf_counter() - t0) / args.steps)

    t = {k: statistics.median(v) for k, v in per_step.items()}
    best = {k: min(v) for k, v in per_step.items()}
    print(
        f"NEB band: {args.images} moving images x {n_atoms} atoms, model cutoff "
        f"{pot.spec.cutoff} Å, {args.rounds} rounds x {args.steps} steps, median per step; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(
        f"{'driver':<44}{'median s/step':>14}{'best s/step':>12}{'ms/image':>10}{'warm-up s':>11}"
    )
    rows = [
        ("flat", "batched, flat graph (B=7, 1 model call)"),
        ("map", "batched, lax.map over 7 graphs (1 call)"),
        ("ase", "ASE NEB + MLIPCalculator per image"),
    ]
    for key, name in rows:
        ms = 1000 * t[key] / args.images
        print(f"{name:<44}{t[key]:>14.3f}{best[key]:>12.3f}{ms:>10.1f}{warm[key]:>11.1f}")
    for key in ("flat", "map"):
        ratio = t["ase"] / t[key]
        verdict = "PASS" if ratio >= 3 else "FAIL"
        print(f"speed-up {key} vs ASE: {ratio:.2f}x median (acceptance >= 3x: {verdict})")
    for key, drv in batched.items():
        print(f"{key}: compilations {drv.n_compiles}, neighbour rebuilds {drv.n_rebuilds}")
        np.testing.assert_equal(drv.n_compiles, 1)


if __name__ == "__main__":
    main()
