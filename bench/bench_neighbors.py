"""Neighbour-list timing: mlipctl (vesin) vs ASE vs matscipy on 4000-atom rattled fcc Cu.

Run: ``python bench/bench_neighbors.py [--repeats 7] [--cutoff 5.0]``. Prints one table; the
ratio column is time / mlipctl time (mlipctl = 1.0). All three must find the same pairs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

from ase.build import bulk
from ase.neighborlist import neighbor_list
from matscipy.neighbours import neighbour_list

from mlipctl.data.neighbors import neighbor_pairs


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up (imports, allocations), not timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (median reported)")
    parser.add_argument("--cutoff", type=float, default=5.0, help="cutoff in Å")
    args = parser.parse_args()

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((10, 10, 10))  # 4000 atoms
    atoms.rattle(stdev=0.05, seed=0)
    rc = args.cutoff

    candidates: dict[str, Callable[[], object]] = {
        "mlipctl neighbor_pairs (vesin)": lambda: neighbor_pairs(atoms, rc),
        "ase.neighborlist.neighbor_list": lambda: neighbor_list("ijS", atoms, rc),
        "matscipy neighbour_list": lambda: neighbour_list("ijS", atoms, rc),
    }
    results = {}
    for name, fn in candidates.items():
        t, out = _time(fn, args.repeats)
        results[name] = (t, len(out[0]))

    counts = {n for _, n in results.values()}
    if len(counts) != 1:
        raise SystemExit(f"pair counts differ between implementations: {results}")
    ours = results["mlipctl neighbor_pairs (vesin)"][0]
    print(
        f"{len(atoms)} atoms, cutoff {rc} Å, {counts.pop()} directed pairs, median of "
        f"{args.repeats}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"{'implementation':34s} {'median ms':>10s} {'ratio':>7s}")
    for name, (t, _) in results.items():
        print(f"{name:34s} {t * 1e3:10.1f} {t / ours:7.2f}")


if __name__ == "__main__":
    main()
