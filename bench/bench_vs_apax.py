"""mlipctl against apax 0.14 side by side in one run: test accuracy, inference speed, MD throughput.

Run with mlipctl's python from the repository root; apax runs in its own venv (bench/apax/README.md)
through ``bench/apax/bench_apax.py``, one subprocess per measurement, so neither code shares a
process (apax turns on float64 globally) and both are timed in the same minutes::

    python bench/bench_vs_apax.py --model runs/fit-mlearn-Cu/model.mlip \\
        --apax-model runs/apax/mlearn-Cu [--apax-python /work/apax-venv/bin/python] \\
        [--test ../shared/data/mlearn/Cu/test.extxyz] [--rounds 2] [--md-sizes 500 4000] \\
        [--no-md] [--json bench_vs_apax.json]

1. Accuracy on the test set: both models predict every structure (mlipctl in this process,
   apax via ``bench_apax.py predict``), and one function scores both: energy MAE per atom
   (meV/atom) and force MAE per Cartesian component (eV/Å), as ``mlipctl fit`` reports them.
   The speed comparison is at equal or better accuracy only if mlipctl's errors are not larger.
2. Inference, 4000-atom fcc Cu (energy + forces, model on a fixed neighbour list on both sides:
   ``bench_inference.py --model`` against apax's jitted model), in ``--rounds`` rounds whose
   order alternates, so a drift in machine load hits both sides alike.
3. MD throughput at each ``--md-sizes`` N, in the same alternating rounds: mlipctl's jitted loop
   (``bench_md.py``, NVT Nosé–Hoover chain, dt 0.5 fs, in-loop cell list) against ``apax md``
   (``apax.md.run_md``, NVT Nosé–Hoover chain, dt 0.5 fs, as apax's template).
4. Training throughput on mlearn Cu (``--train-epochs`` > 0): ``bench_training.py`` (the fit
   config's compiled step, training only) against a short ``apax train`` of
   ``bench/apax/config_cu.yaml`` (first epoch left out; apax's epoch time includes its
   validation pass, so its structures/s is given both over the training structures and over
   training + validation structures; the ratio uses the latter, apax's more favourable figure).

Ratios are apax time / mlipctl time (> 1: mlipctl faster), per round and their median. The load
average is recorded with every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from _paths import ROOT, mlearn_dir

BENCH = ROOT / "bench"


def _run_json(cmd: list[str], out: Path) -> dict:
    """Run ``cmd`` (which writes JSON to ``out``) and return that JSON; stderr on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}")
    result = json.loads(out.read_text())
    result["load_after"] = os.getloadavg()
    return result


# --- accuracy ------------------------------------------------------------------------------------


def _reference(structures: list[Any]) -> dict[str, np.ndarray]:
    return {
        "energy": np.array([a.get_potential_energy() for a in structures], dtype=np.float64),
        "n_atoms": np.array([len(a) for a in structures]),
        "forces": np.concatenate([a.get_forces() for a in structures]).astype(np.float64),
    }


def score(pred: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Energy errors per atom (meV/atom) and force errors per component (eV/Å).

    Args:
        pred, ref: ``energy`` (S,) eV, ``n_atoms`` (S,), ``forces`` (sum N, 3) eV/Å.
    """
    if not np.array_equal(pred["n_atoms"], ref["n_atoms"]):
        raise SystemExit("predictions and reference differ in structures or atom counts")
    e = 1e3 * (pred["energy"] - ref["energy"]) / ref["n_atoms"]
    f = (pred["forces"] - ref["forces"]).ravel()
    return {
        "energy_mae_mev_per_atom": float(np.mean(np.abs(e))),
        "energy_rmse_mev_per_atom": float(np.sqrt(np.mean(e**2))),
        "forces_mae_ev_per_a": float(np.mean(np.abs(f))),
        "forces_rmse_ev_per_a": float(np.sqrt(np.mean(f**2))),
        "structures": int(len(e)),
    }


def _mlipctl_predictions(model: Path, structures: list[Any]) -> dict[str, np.ndarray]:
    from mlipctl.model.calculator import Evaluator
    from mlipctl.model.potential import load_potential

    clean = [a.copy() for a in structures]  # no stored single-point results
    results = Evaluator(load_potential(model), member_forces=False).evaluate(clean, stress=False)
    return {
        "energy": np.array([r["energy"] for r in results], dtype=np.float64),
        "n_atoms": np.array([len(a) for a in clean]),
        "forces": np.concatenate([r["forces"] for r in results]).astype(np.float64),
    }


def accuracy(args: argparse.Namespace, tmp: Path) -> dict:
    from ase.io import read

    structures = read(args.test, index=":")
    ref = _reference(structures)
    ours = score(_mlipctl_predictions(args.model, structures), ref)
    npz = tmp / "apax_pred.npz"
    meta = _run_json(
        [
            args.apax_python,
            str(BENCH / "apax/bench_apax.py"),
            "predict",
            str(args.apax_model),
            "--data",
            str(args.test),
            "--out",
            str(npz),
            "--json",
            str(tmp / "apax_predict.json"),
        ],
        tmp / "apax_predict.json",
    )
    with np.load(npz, allow_pickle=False) as data:
        theirs = score({k: data[k] for k in ("energy", "n_atoms", "forces")}, ref)
    return {
        "test": str(args.test),
        "mlipctl": ours,
        "apax": theirs,
        "apax_versions": meta.get("versions"),
        "mlipctl_equal_or_better": bool(
            ours["energy_mae_mev_per_atom"] <= theirs["energy_mae_mev_per_atom"]
            and ours["forces_mae_ev_per_a"] <= theirs["forces_mae_ev_per_a"]
        ),
    }


# --- speed -----------------------------------------------------------------------------------------


def _infer_ours(args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / "ours_infer.json"
    cmd = [sys.executable, str(BENCH / "bench_inference.py"), "--model", str(args.model)]
    res = _run_json([*cmd, "--no-emt", "--repeats", str(args.repeats), "--json", str(out)], out)
    row = res["models"][0]
    return {"time_s": row["time_s"], "compile_s": row["compile_s"], "load": res["load_after"]}


def _infer_apax(args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / "apax_infer.json"
    cmd = [args.apax_python, str(BENCH / "apax/bench_apax.py"), "infer", str(args.apax_model)]
    res = _run_json([*cmd, "--no-ase", "--repeats", str(args.repeats), "--json", str(out)], out)
    rows = {r["path"].split(" (")[0].split(",")[0]: r for r in res["results"]}
    model = rows["jitted model"]
    return {
        "time_s": model["time_s"],
        "compile_s": model["compile_s"],
        "step_time_s": rows["jitted step"]["time_s"],
        "load": res["load_after"],
    }


def _md_ours(args: argparse.Namespace, n: int, tmp: Path) -> dict:
    out = tmp / f"ours_md_{n}.json"
    cmd = [
        sys.executable,
        str(BENCH / "bench_md.py"),
        "--sizes",
        str(n),
        "--model",
        str(args.model),
    ]
    cmd += ["--ensemble", "nose_hoover_chain", "--dt", "0.5", "--no-ase-calc", "--no-emt"]
    res = _run_json([*cmd, "--json", str(out)], out)
    r = res["results"][0]
    return {
        "atoms": r["n_atoms"],
        "atom_steps_per_s": r["jax"]["atom_steps_per_s"],
        "compile_s": r["jax"]["compile_s"],
        "peak_rss_mb": r["peak_rss_mb"],
        "load": res["load_after"],
    }


def _md_apax(args: argparse.Namespace, n: int, tmp: Path) -> dict:
    out = tmp / f"apax_md_{n}.json"
    steps, inner = (["100", "400"], "50") if n <= 1000 else (["20", "60"], "20")
    cmd = [args.apax_python, str(BENCH / "apax/bench_apax.py"), "md", str(args.apax_model)]
    cmd += ["--atoms", str(n), "--steps", *steps, "--n-inner", inner]
    res = _run_json([*cmd, "--json", str(out)], out)
    r = res["results"][0]
    if "skipped" in r:
        return {"atoms": r["atoms"], "skipped": r["skipped"], "load": res["load_after"]}
    return {
        "atoms": r["atoms"],
        "atom_steps_per_s": r["atom_steps_per_s"],
        "first_run_extra_s": r["first_run_extra_s"],
        "load": res["load_after"],
    }


def _train_ours(args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / "ours_train.json"
    cmd = [sys.executable, str(BENCH / "bench_training.py"), "--config", str(args.fit_config)]
    res = _run_json([*cmd, "--epochs", "2", "--json", str(out)], out)
    return {
        "structures_per_s": res["structures_per_s"],
        "batch_size": res["batch_size"],
        "load": res["load_after"],
    }


def _train_apax(args: argparse.Namespace, tmp: Path) -> dict:
    directory = Path(tempfile.mkdtemp(prefix="apax_train_", dir=tmp))  # a fresh fit per round
    cfg = tmp / "apax_train.yaml"
    bench_apax = str(BENCH / "apax/bench_apax.py")
    written = _run_json(
        [args.apax_python, bench_apax, "config", "--epochs", str(args.train_epochs)]
        + ["--directory", str(directory), "--out", str(cfg), "--json", str(tmp / "cfg.json")],
        tmp / "cfg.json",
    )
    apax = str(Path(args.apax_python).parent / "apax")
    proc = subprocess.run([apax, "train", str(cfg)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit("apax train failed")
    out = tmp / "apax_trainlog.json"
    experiment = written["data"]["experiment"]
    res = _run_json(
        [
            args.apax_python,
            bench_apax,
            "train-log",
            str(directory / experiment),
            "--json",
            str(out),
        ],
        out,
    )
    return {
        "train_structures_per_s": res["train_structures_per_s"],
        "structures_per_s": res["train_plus_valid_structures_per_s"],
        "batch_size": res["batch_size"],
        "load": res["load_after"],
    }


def speed(args: argparse.Namespace, tmp: Path) -> dict:
    rounds: list[dict] = []
    for k in range(args.rounds):
        apax_first = k % 2 == 1
        row: dict[str, Any] = {"round": k, "apax_first": apax_first}
        pair = [("mlipctl", _infer_ours), ("apax", _infer_apax)]
        for name, fn in reversed(pair) if apax_first else pair:
            row[f"infer_{name}"] = fn(args, tmp)
        row["infer_ratio"] = row["infer_apax"]["time_s"] / row["infer_mlipctl"]["time_s"]
        print(
            f"round {k}: inference 4000 atoms  mlipctl {1e3 * row['infer_mlipctl']['time_s']:.1f} ms"
            f"  apax {1e3 * row['infer_apax']['time_s']:.1f} ms  ratio {row['infer_ratio']:.2f}x",
            flush=True,
        )
        for n in [] if args.no_md else args.md_sizes:
            md: dict[str, Any] = {}
            pair_md = [("mlipctl", _md_ours), ("apax", _md_apax)]
            for name, fn in reversed(pair_md) if apax_first else pair_md:
                md[name] = fn(args, n, tmp)
            if "atom_steps_per_s" in md["apax"]:
                md["ratio"] = md["mlipctl"]["atom_steps_per_s"] / md["apax"]["atom_steps_per_s"]
                note = f"apax {md['apax']['atom_steps_per_s']:.0f}  ratio {md['ratio']:.2f}x"
            else:
                note = f"apax skipped: {md['apax']['skipped']}"
            print(
                f"round {k}: md N={md['mlipctl']['atoms']}  mlipctl "
                f"{md['mlipctl']['atom_steps_per_s']:.0f} atom-steps/s  {note}",
                flush=True,
            )
            row[f"md_{n}"] = md
        if args.train_epochs > 0:
            pair_t = [("mlipctl", _train_ours), ("apax", _train_apax)]
            for name, fn in reversed(pair_t) if apax_first else pair_t:
                row[f"train_{name}"] = fn(args, tmp)
            ours, theirs = row["train_mlipctl"], row["train_apax"]
            row["train_ratio"] = ours["structures_per_s"] / theirs["structures_per_s"]
            print(
                f"round {k}: training mlipctl {ours['structures_per_s']:.1f} structures/s (batch "
                f"{ours['batch_size']})  apax {theirs['structures_per_s']:.1f} (batch "
                f"{theirs['batch_size']}, with validation)  ratio {row['train_ratio']:.2f}x",
                flush=True,
            )
        rounds.append(row)
    summary: dict[str, Any] = {
        "infer_ratio_median": statistics.median(r["infer_ratio"] for r in rounds)
    }
    for n in [] if args.no_md else args.md_sizes:
        ratios = [r[f"md_{n}"]["ratio"] for r in rounds if "ratio" in r[f"md_{n}"]]
        summary[f"md_{n}_ratio_median"] = statistics.median(ratios) if ratios else None
    if args.train_epochs > 0:
        summary["train_ratio_median"] = statistics.median(r["train_ratio"] for r in rounds)
    return {"rounds": rounds, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="mlipctl .mlip model file")
    parser.add_argument("--apax-model", type=Path, required=True, help="<directory>/<experiment>")
    parser.add_argument("--apax-python", default="/work/apax-venv/bin/python")
    parser.add_argument("--test", type=Path, default=mlearn_dir() / "Cu/test.extxyz")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7, help="timed inference calls per side")
    parser.add_argument("--md-sizes", type=int, nargs="+", default=[500, 4000])
    parser.add_argument("--no-md", action="store_true")
    parser.add_argument(
        "--train-epochs", type=int, default=0, help="apax epochs per training round (0: skip)"
    )
    parser.add_argument("--fit-config", type=Path, default=ROOT / "configs/fit-mlearn-Cu.yaml")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    for path in (args.model, args.apax_model):
        if not path.exists():
            raise SystemExit(f"not found: {path}")

    out: dict[str, Any] = {"load_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="vs-apax-") as name:
        tmp = Path(name)
        if not args.no_accuracy:
            acc = accuracy(args, tmp)
            out["accuracy"] = acc
            for side in ("mlipctl", "apax"):
                m = acc[side]
                print(
                    f"test accuracy {side:8s} E {m['energy_mae_mev_per_atom']:.2f} meV/atom  "
                    f"F {m['forces_mae_ev_per_a']:.4f} eV/A",
                    flush=True,
                )
            print(f"mlipctl equal or better: {acc['mlipctl_equal_or_better']}", flush=True)
        out["speed"] = speed(args, tmp)
    print(json.dumps(out["speed"]["summary"], indent=2))
    if args.json:
        tmp_json = args.json.with_name(args.json.name + ".tmp")
        tmp_json.write_text(json.dumps(out, indent=2) + "\n")
        tmp_json.replace(args.json)


if __name__ == "__main__":
    main()
