"""Training throughput on mlearn Cu: compile time of the train step and steady-state structures/s.

Run: ``python bench/bench_training.py [--config configs/fit-mlearn-Cu.yaml] [--epochs 2]
[--set training.batch_size=8 ...] [--json out.json]``. The data is expected at ``../shared/data/mlearn`` (or
``$MLIPCTL_MLEARN_DIR``). Uses the same compiled step as ``mlipctl fit``: every batch shape of one
epoch is compiled first (timed on its own), then ``--epochs`` epochs are timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import numpy as np
from _paths import ROOT, mlearn_dir

from mlipctl.config.fit import FitConfig
from mlipctl.config.loader import load_config, parse_override
from mlipctl.data.batching import BatchLoader
from mlipctl.data.dataset import load_dataset
from mlipctl.data.offsets import reference_energies
from mlipctl.model.potential import ModelSpec, init_params
from mlipctl.training.loss import LossSettings
from mlipctl.training.trainer import TrainState, energy_normalisation, make_train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/fit-mlearn-Cu.yaml"))
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs")
    parser.add_argument("--set", action="append", default=[], help="override KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()

    data_dir = mlearn_dir() / "Cu"
    overrides = dict(parse_override(s) for s in args.set)
    overrides.setdefault("data.path", str(data_dir / "training.extxyz"))
    overrides.setdefault("data.test_path", str(data_dir / "test.extxyz"))
    cfg = load_config(FitConfig, args.config, overrides)
    tcfg = cfg.training

    t0 = time.perf_counter()
    data = load_dataset(cfg.data)
    species = sorted({s for it in data.train for s in it.atoms.get_chemical_symbols()})
    offsets = reference_energies(cfg.data.reference_energies, data.train, species)
    shift, scale = energy_normalisation(data.train, offsets)
    spec = ModelSpec(
        config=cfg.model,
        species=tuple(species),
        offsets=tuple(offsets[e] for e in species),
        energy_shift=shift,
        energy_scale=scale,
    )
    loader = BatchLoader(
        data.train, spec.cutoff, spec.type_map(), batch_size=tcfg.batch_size, seed=tcfg.seed
    )
    t_data = time.perf_counter() - t0

    params = init_params(spec, tcfg.seed)
    tx, step_fn = make_train_step(spec, tcfg)
    state = TrainState(params, params, tx.init(params))
    step_jit = jax.jit(step_fn)
    weights = LossSettings.from_config(tcfg.loss).weights()
    compiled = {}
    t_compile = 0.0
    for idx in loader.index_batches(0):
        shape = loader.shape_for(idx)
        if shape in compiled:
            continue
        g, t = loader.make_batch(idx)
        tc = time.perf_counter()
        compiled[shape] = step_jit.lower(
            state, g, t, np.float64(1e-3), np.int64(0), weights
        ).compile()
        t_compile += time.perf_counter() - tc
    for e in range(args.epochs):  # later epochs may hit a shape epoch 0 did not
        for idx in loader.index_batches(e):
            shape = loader.shape_for(idx)
            if shape not in compiled:
                g, t = loader.make_batch(idx)
                tc = time.perf_counter()
                compiled[shape] = step_jit.lower(
                    state, g, t, np.float64(1e-3), np.int64(0), weights
                ).compile()
                t_compile += time.perf_counter() - tc

    step_times, batch_times, n_struct, n_atoms = [], [], 0, 0
    t_run = time.perf_counter()
    step = 0
    for e in range(args.epochs):
        for idx in loader.index_batches(e):
            tb = time.perf_counter()
            g, t = loader.make_batch(idx)
            batch_times.append(time.perf_counter() - tb)
            ts = time.perf_counter()
            state, parts = compiled[loader.shape_for(idx)](
                state, g, t, np.float64(1e-3), np.int64(step), weights
            )
            np.asarray(parts)
            step_times.append(time.perf_counter() - ts)
            n_struct += len(idx)
            n_atoms += int(g.atom_mask.sum())
            step += 1
    wall = time.perf_counter() - t_run

    arch = cfg.model.architecture
    print(
        f"mlearn Cu: {len(data.train)} training structures, model {arch.kind} (cutoff "
        f"{arch.cutoff} Å, n_radial {arch.n_radial}, max_order {arch.max_order}, hidden "
        f"{list(arch.hidden)}), ensemble {cfg.model.ensemble.kind} x{spec.n_members}, "
        f"{cfg.model.dtype}, batch {tcfg.batch_size}; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    print(f"data + neighbour lists      {t_data:8.2f} s")
    print(f"compile train step          {t_compile:8.2f} s  ({len(compiled)} shapes)")
    print(f"steady-state step (median)  {statistics.median(step_times) * 1000:8.1f} ms")
    print(f"batch assembly (median)     {statistics.median(batch_times) * 1000:8.1f} ms")
    print(f"throughput                  {n_struct / wall:8.2f} structures/s")
    print(f"                            {n_atoms / wall:8.0f} atoms/s")
    print(f"epoch time                  {wall / args.epochs:8.2f} s")
    if args.json:
        result = {
            "config": args.config,
            "overrides": args.set,
            "n_train": len(data.train),
            "batch_size": tcfg.batch_size,
            "compile_s": t_compile,
            "shapes": len(compiled),
            "step_median_s": statistics.median(step_times),
            "structures_per_s": n_struct / wall,
            "atoms_per_s": n_atoms / wall,
            "epoch_s": wall / args.epochs,
            "load_average": os.getloadavg(),
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
