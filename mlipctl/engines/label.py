"""`mlipctl label`: label a structure file with a reference calculator, resumably.

Files in ``cfg.output``:

- ``<filename>`` (``labelled.extxyz``): complete extxyz frames appended (write, flush, fsync) as
  results arrive, each with ``info["label_index"]`` = its index in the input selection. When every
  structure has been tried, the file is replaced atomically by a copy sorted into input order.
- ``label-manifest.json``: fingerprint of the input selection, the reference and the properties.
  A run whose manifest matches resumes: frames already in the output are kept (a truncated last
  frame, left by a crash mid-write, is cut off) and only missing indices are labelled. A run whose
  manifest differs is refused unless ``overwrite: true``.
- ``failed.json``: structures whose calculation failed, with the reason (rewritten atomically on
  every failure; removed when a later run leaves no failures). Failed structures are retried by
  the next run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms

from mlipctl.config.label import LabelConfig
from mlipctl.errors import UserInputError
from mlipctl.reports.base import Criterion, Environment, Report, atomic_write_text

MANIFEST = "label-manifest.json"
FAILED = "failed.json"
_LOCK = ".label.lock"
_SHOW_FAILURES = 20  # failures spelled out in the report messages (all are in failed.json)
# Keys the extxyz writer takes from the new calculator; stale copies in info/arrays would clash.
_LABEL_KEYS = ("energy", "free_energy", "forces", "stress")


@dataclass
class LabelOutcome:
    """What :func:`label_file` did.

    Attributes:
        path: the labelled extxyz file.
        n_input: structures in the input selection.
        resumed: indices already labelled in the output before this run.
        new: indices labelled by this run.
        failures: index -> {'error', 'wall_time_s', 'n_atoms', 'config_type'} of this run.
        stress_notes: reason -> count of structures without stress although requested.
        wall_times: calculation seconds of each structure labelled by this run.
        energies_per_atom: index -> E/N (eV) of every labelled structure.
        cut_bytes: bytes of a truncated last frame removed from the output.
        sorted_written: whether the final input-ordered copy was written.
        timings: wall seconds by phase.
        messages: notes for the report.
    """

    path: Path
    n_input: int
    resumed: list[int] = field(default_factory=list)
    new: list[int] = field(default_factory=list)
    failures: dict[int, dict[str, Any]] = field(default_factory=dict)
    stress_notes: Counter[str] = field(default_factory=Counter)
    wall_times: list[float] = field(default_factory=list)
    energies_per_atom: dict[int, float] = field(default_factory=dict)
    cut_bytes: int = 0
    sorted_written: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- file helpers


def fingerprint(structures: Sequence[Atoms]) -> str:
    """SHA-256 of the selection's atomic numbers, positions, cells and pbc (not info)."""
    h = hashlib.sha256()
    h.update(str(len(structures)).encode())
    for atoms in structures:
        h.update(np.ascontiguousarray(atoms.numbers, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(atoms.positions, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(atoms.cell[:], dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(atoms.pbc, dtype=np.int8).tobytes())
    return h.hexdigest()


def complete_prefix(data: bytes) -> tuple[int, int]:
    """(number of frames, byte length) of the longest prefix of whole extxyz frames.

    A frame is a line holding the atom count, a comment line and that many atom lines, each
    ending in a newline. Anything after the last whole frame (a crash mid-write) is not counted.
    """
    pos = n_frames = 0
    size = len(data)
    while pos < size:
        end = data.find(b"\n", pos)
        if end < 0:
            break
        try:
            n_atoms = int(data[pos:end].strip())
        except ValueError:
            break
        cursor = end + 1
        for _ in range(n_atoms + 1):
            end = data.find(b"\n", cursor)
            if end < 0:
                return n_frames, pos
            cursor = end + 1
        pos = cursor
        n_frames += 1
    return n_frames, pos


def frame_text(atoms: Atoms) -> str:
    """One extxyz frame (with the calculator's labels) as text."""
    import ase.io

    buf = io.StringIO()
    ase.io.write(buf, atoms, format="extxyz")
    return buf.getvalue()


def _for_output(atoms: Atoms, index: int) -> Atoms:
    """The labelled atoms with ``label_index`` set and stale label copies removed."""
    out = atoms.copy()
    out.calc = atoms.calc
    for key in _LABEL_KEYS:
        out.info.pop(key, None)
        if key in out.arrays and key not in ("numbers", "positions"):
            del out.arrays[key]
    out.info["label_index"] = int(index)
    return out


class _Appender:
    """Append whole frames to a file: one write per frame, then flush and fsync."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


@contextlib.contextmanager
def _exclusive(out_dir: Path) -> Iterator[None]:
    """Refuse a second concurrent run on the same output (both would append to one file)."""
    fd = os.open(out_dir / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserInputError(
                f"another `mlipctl label` is writing to {out_dir}; wait for it or use another "
                "output"
            ) from None
        yield
    finally:
        os.close(fd)


def _manifest(cfg: LabelConfig, fp: str, n: int) -> dict[str, Any]:
    return {
        "input": str(cfg.input),
        "index": cfg.index,
        "n_structures": n,
        "fingerprint": fp,
        "reference": cfg.reference.model_dump(mode="json"),
        "properties": sorted(set(cfg.properties) | {"energy"}),
    }


def _check_manifest(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    diffs = []
    if old.get("fingerprint") != new["fingerprint"]:
        diffs.append(
            f"its input was {old.get('input')!r} (index {old.get('index')!r}, "
            f"{old.get('n_structures')} structures), not the same structures as "
            f"{new['input']!r} (index {new['index']!r}, {new['n_structures']} structures)"
        )
    if old.get("reference") != new["reference"]:
        diffs.append(f"its reference was {old.get('reference')}, not {new['reference']}")
    if old.get("properties") != new["properties"]:
        diffs.append(f"its properties were {old.get('properties')}, not {new['properties']}")
    if diffs:
        raise UserInputError(
            f"{out} already holds labels that do not belong to this run: "
            + "; ".join(diffs)
            + ". Set overwrite: true to discard them, or choose another output"
        )


def _read_existing(path: Path, inputs: Sequence[Atoms], outcome: LabelOutcome) -> dict[int, Atoms]:
    """Frames already in the output, by label_index; cuts a truncated last frame."""
    import ase.io

    data = path.read_bytes()
    n_frames, good = complete_prefix(data)
    if good < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(good)
            fh.flush()
            os.fsync(fh.fileno())
        outcome.cut_bytes = len(data) - good
        outcome.messages.append(
            f"cut a truncated last frame ({len(data) - good} bytes) from {path}: an earlier run "
            "stopped while writing it; that structure is labelled again"
        )
    if n_frames == 0:
        return {}
    try:
        frames = ase.io.read(io.StringIO(data[:good].decode("utf-8")), index=":", format="extxyz")
    except Exception as exc:  # noqa: BLE001 - ASE raises many types for bad text
        raise UserInputError(
            f"cannot read the existing output {path} to resume ({type(exc).__name__}: {exc}); "
            "set overwrite: true to start again"
        ) from None
    done: dict[int, Atoms] = {}
    for k, atoms in enumerate(frames):
        idx = atoms.info.get("label_index")
        if idx is None or not 0 <= int(idx) < len(inputs):
            raise UserInputError(
                f"frame {k} of {path} has no valid label_index ({idx!r}); it was not written by "
                "`mlipctl label` for this input. Set overwrite: true to start again"
            )
        idx = int(idx)
        ref = inputs[idx]
        if len(ref) != len(atoms) or not (
            np.array_equal(ref.numbers, atoms.numbers)
            and np.allclose(ref.positions, atoms.positions, atol=1e-6)
        ):
            raise UserInputError(
                f"frame {k} of {path} (label_index {idx}) differs from input structure {idx}; "
                "the output belongs to another input. Set overwrite: true to start again"
            )
        if idx in done:
            outcome.messages.append(f"label_index {idx} appears twice in {path}; kept the first")
            continue
        done[idx] = atoms
    return done


def _config_type(atoms: Atoms) -> str:
    return str(atoms.info.get("config_type", "default"))


# --------------------------------------------------------------------------- engine


def label_file(
    cfg: LabelConfig,
    *,
    progress: bool = True,
    on_result: Callable[[int, Any], None] | None = None,
) -> LabelOutcome:
    """Label ``cfg.input`` into ``cfg.output/cfg.filename``, resuming an earlier run.

    Args:
        cfg: the label config.
        progress: show the labelling progress bar.
        on_result: also called as ``on_result(input_index, LabelResult)`` after each result is
            on disk (an exception it raises stops the run; what is on disk stays).

    Raises:
        UserInputError: unreadable input, an output made for another input/reference, a
            concurrent run on the same output, a reference that cannot be built.
    """
    from mlipctl.data.sources import read_frames
    from mlipctl.reference.labelling import label_structures

    t_start = time.perf_counter()
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / cfg.filename
    manifest_path = out_dir / MANIFEST
    failed_path = out_dir / FAILED

    t0 = time.perf_counter()
    inputs = read_frames(str(cfg.input), cfg.index, cfg.format)
    manifest = _manifest(cfg, fingerprint(inputs), len(inputs))
    outcome = LabelOutcome(path=path, n_input=len(inputs))

    with _exclusive(out_dir):
        if cfg.overwrite:
            for p in (path, manifest_path, failed_path):
                p.unlink(missing_ok=True)
        if path.exists() and path.stat().st_size > 0:
            if not manifest_path.exists():
                raise UserInputError(
                    f"{path} exists but {manifest_path.name} does not, so it cannot be checked "
                    "against this input; set overwrite: true or choose another output"
                )
            try:
                old = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise UserInputError(
                    f"cannot read {manifest_path} ({exc}); set overwrite: true"
                ) from None
            _check_manifest(old, manifest, path)
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
        done = _read_existing(path, inputs, outcome) if path.exists() else {}
        outcome.resumed = sorted(done)
        for i, atoms in done.items():
            outcome.energies_per_atom[i] = float(atoms.get_potential_energy()) / len(atoms)
        todo = [i for i in range(len(inputs)) if i not in done]
        outcome.timings["read"] = time.perf_counter() - t0

        def write_failures() -> None:
            payload = {
                "input": str(cfg.input),
                "reference": manifest["reference"],
                "failures": [{"index": i, **outcome.failures[i]} for i in sorted(outcome.failures)],
            }
            atomic_write_text(failed_path, json.dumps(payload, indent=1) + "\n")

        t0 = time.perf_counter()
        appender = _Appender(path)
        try:

            def stream(local: int, result: Any) -> None:
                i = todo[local]
                if result.ok:
                    atoms = _for_output(result.atoms, i)
                    appender.write(frame_text(atoms))
                    done[i] = atoms
                    outcome.new.append(i)
                    outcome.wall_times.append(result.wall_time_s)
                    outcome.energies_per_atom[i] = result.energy / len(atoms)
                    if result.stress_note and "stress" in cfg.properties:
                        outcome.stress_notes[result.stress_note] += 1
                else:
                    outcome.failures[i] = {
                        "error": result.error,
                        "wall_time_s": result.wall_time_s,
                        "n_atoms": len(inputs[i]),
                        "config_type": _config_type(inputs[i]),
                    }
                    write_failures()
                if on_result is not None:
                    on_result(i, result)

            if todo:
                label_structures(
                    [inputs[i] for i in todo],
                    cfg.reference,
                    cfg.parallel,
                    properties=cfg.properties,
                    on_result=stream,
                    progress=progress,
                )
        finally:
            appender.close()
            outcome.timings["label"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        if outcome.failures:
            write_failures()
        else:
            failed_path.unlink(missing_ok=True)
        if done:
            # Every index was tried: replace the stream by an input-ordered copy, atomically.
            text = "".join(frame_text(done[i]) for i in sorted(done))
            atomic_write_text(path, text)
            outcome.sorted_written = True
        else:
            path.unlink(missing_ok=True)  # nothing labelled: no empty file pretending otherwise
        outcome.timings["write_sorted"] = time.perf_counter() - t0
    outcome.timings["total"] = time.perf_counter() - t_start
    return outcome


def run_label(cfg: LabelConfig, *, resume: bool = False, progress: bool = True) -> Report:
    """`mlipctl label`. Resuming is automatic (``resume`` changes nothing; kept for the CLI)."""
    outcome = label_file(cfg, progress=progress)
    n_done = len(outcome.resumed) + len(outcome.new)
    n_failed = len(outcome.failures)
    e = np.array(list(outcome.energies_per_atom.values()))
    walls = np.array(outcome.wall_times)
    results: dict[str, Any] = {
        "n_input": outcome.n_input,
        "n_labelled": n_done,
        "n_labelled_this_run": len(outcome.new),
        "n_resumed": len(outcome.resumed),
        "n_failed": n_failed,
        "failures": [
            {"index": i, "error": f["error"], "config_type": f["config_type"]}
            for i, f in sorted(outcome.failures.items())
        ],
        "failures_by_reason": dict(
            Counter(str(f["error"]).split(":")[0] for f in outcome.failures.values())
        ),
        "stress_missing": dict(outcome.stress_notes),
        "energy_per_atom_min_ev": float(e.min()) if e.size else None,
        "energy_per_atom_max_ev": float(e.max()) if e.size else None,
        "calc_time_mean_s": float(walls.mean()) if walls.size else None,
        "calc_time_total_s": float(walls.sum()) if walls.size else 0.0,
        "truncated_bytes_cut": outcome.cut_bytes,
    }
    messages = list(outcome.messages)
    if outcome.resumed:
        messages.append(
            f"resumed: {len(outcome.resumed)} structure(s) were already labelled in "
            f"{outcome.path}; labelled {len(outcome.new)} more"
        )
    if n_failed:
        messages.append(
            f"{n_failed} structure(s) failed (reasons in {Path(cfg.output) / FAILED}); they are "
            "not in the output and are retried when you run this command again"
        )
        shown = sorted(outcome.failures.items())[:_SHOW_FAILURES]
        messages += [f"failed: structure {i} ({f['config_type']}): {f['error']}" for i, f in shown]
        if n_failed > _SHOW_FAILURES:
            messages.append(f"... and {n_failed - _SHOW_FAILURES} more failures in {FAILED}")
    for note, count in outcome.stress_notes.items():
        messages.append(f"no stress for {count} structure(s): {note}")
    artifacts = {"manifest": str(Path(cfg.output) / MANIFEST)}
    if outcome.sorted_written:
        artifacts["labelled"] = str(outcome.path)
    if n_failed:
        artifacts["failed"] = str(Path(cfg.output) / FAILED)
    frac = n_failed / outcome.n_input if outcome.n_input else 0.0
    return Report(
        command="label",
        config=cfg.model_dump(mode="json"),
        environment=Environment.capture(),
        timings=outcome.timings,
        results=results,
        criteria=[
            Criterion.at_most(
                "failed_fraction",
                frac,
                cfg.max_failed_fraction,
                detail=f"{n_failed} of {outcome.n_input} structures failed",
            ),
        ],
        artifacts=artifacts,
        messages=messages,
    )
