"""Label structures with a reference calculator: the one function every labelling command uses.

:func:`label_structures` runs serially, on a local process pool or on a dask.distributed
cluster. A structure whose calculation fails (exception, non-finite result, timeout, or a worker
process that dies under it) becomes a failed :class:`LabelResult` with the reason; the rest of
the batch carries on. Results arrive through ``on_result`` as they finish (in any order) and are
returned in input order.

Process pools use the ``spawn`` start method: the parent may have jax loaded, and jax is not
fork-safe. As with any spawn-based pool, a script calling this must guard its entry point with
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator, PropertyNotImplementedError
from ase.calculators.singlepoint import SinglePointCalculator
from ase.neighborlist import neighbor_list
from ase.stress import full_3x3_to_voigt_6_stress
from pydantic import ValidationError

from mlipctl.config.reference import SERIAL, ParallelConfig, ReferenceConfig
from mlipctl.errors import UserInputError
from mlipctl.reference.registry import as_reference, make_calculator, supported_elements

PROPERTIES: tuple[str, ...] = ("energy", "forces", "stress")
"""Properties :func:`label_structures` can compute (energy is always computed)."""

MIN_DISTANCE = 0.1
"""Å. Atoms closer than this are treated as overlapping: the structure fails before any call."""

WORKER_DIED = "worker died"
"""Start of the error of a structure whose worker process died while computing it."""

# After a soft timeout fails to stop a calculation (stuck in C code), the process pool kills the
# worker this long after the deadline.
_KILL_GRACE_MIN_S = 1.0
_KILL_GRACE_MAX_S = 60.0
_POLL_S = 0.2
# A pool that breaks again and again before running anything (e.g. workers cannot start) is
# given up after this many tries; the remaining structures fail with the reason.
_MAX_IDLE_BREAKS = 2
# dask: extra attempts for a task whose worker died (the scheduler's allowed-failures).
_DASK_ALLOWED_FAILURES = 1
_DASK_CONNECT_TIMEOUT = "10s"

_PENDING, _RUNNING, _DONE = 0, 1, 2


@dataclass
class LabelResult:
    """Outcome of labelling one structure.

    Attributes:
        index: Position of the structure in the input sequence.
        ok: True when energy (and the requested forces/stress) were computed and finite.
        atoms: Copy of the input (``info``, e.g. ``config_type``, preserved). When ``ok``, it carries
            the labels in a ``SinglePointCalculator``; otherwise it carries no calculator.
        energy: Potential energy, eV (None when failed).
        forces: (n_atoms, 3) forces, eV/Å, without constraints applied (None when failed or not
            requested).
        stress: (3, 3) stress, eV/Å³, ASE's sign (σ = (1/V) ∂E/∂ε; positive is tensile). None when
            not requested, failed, or not computable; ``stress_note`` then says why.
        stress_note: Why ``stress`` is None although it was requested (non-periodic structure,
            calculator without stress), else None.
        error: ``"ExceptionType: message"`` of the failure, None when ``ok``.
        wall_time_s: Wall time of this structure's calculation, s.
    """

    index: int
    ok: bool
    atoms: Atoms
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    stress_note: str | None = None
    error: str | None = None
    wall_time_s: float = 0.0


def label_structures(
    structures: Sequence[Atoms],
    reference: ReferenceConfig | dict[str, Any],
    parallel: ParallelConfig | dict[str, Any] = SERIAL,
    *,
    properties: Sequence[str] = PROPERTIES,
    on_result: Callable[[int, LabelResult], None] | None = None,
    progress: bool = False,
) -> list[LabelResult]:
    """Compute reference energies (and forces, stress) for every structure.

    Args:
        structures: Structures to label; they are not modified.
        reference: Reference calculator config (or its mapping, e.g. ``{"kind": "emt"}``).
        parallel: Backend, workers and per-calculation timeout.
        properties: Subset of ``("energy", "forces", "stress")``; energy is always computed.
            Stress is computed only for structures periodic in all three directions.
        on_result: Called in this process as ``on_result(index, result)`` when each result
            arrives (any order), e.g. to stream to disk. An exception it raises stops the run.
        progress: Show a rich progress bar.

    Returns:
        One :class:`LabelResult` per structure, in input order.

    Timeouts (``parallel.timeout_s``) interrupt a calculation between Python bytecodes (SIGALRM
    in a main thread, an asynchronous exception in other threads). The process pool also kills a
    worker whose calculation is stuck inside one C call past the deadline plus a grace period;
    serial and dask runs cannot preempt such a call and record the timeout once it returns.

    Raises:
        UserInputError: bad arguments, a reference that cannot be built here (missing package,
            bad import path, missing EAM file), dask missing or its scheduler unreachable.
    """
    reference = as_reference(reference)
    parallel = _as_parallel(parallel)
    props = _check_properties(properties)
    atoms_list = list(structures)
    for i, atoms in enumerate(atoms_list):
        if not isinstance(atoms, Atoms):
            raise UserInputError(f"structure {i} is a {type(atoms).__name__}, not an ase.Atoms")
    # Build once here so config problems surface as one clear error before any worker starts.
    make_calculator(reference)
    elements = supported_elements(reference)
    job = _Job(
        reference, props, parallel.timeout_s, None if elements is None else frozenset(elements)
    )

    with _progress_bar(len(atoms_list), progress) as advance:
        collector = _Collector(len(atoms_list), on_result, advance)
        todo = list(range(len(atoms_list)))
        if not todo:
            return []
        if parallel.backend == "serial":
            _run_serial(job, atoms_list, todo, collector)
        elif parallel.backend == "processes":
            _ProcessRunner(job, atoms_list, collector, parallel.workers).run(todo)
        else:
            _run_dask(job, atoms_list, todo, collector, parallel)
    return collector.ordered()


# --------------------------------------------------------------------------- one calculation


@dataclass(frozen=True)
class _Job:
    """What every worker needs besides the structure (picklable)."""

    reference: ReferenceConfig
    properties: frozenset[str]
    timeout_s: float | None
    elements: frozenset[str] | None


def _compute(calc: BaseCalculator, index: int, atoms: Atoms, job: _Job) -> LabelResult:
    """Label one structure with ``calc``; every failure becomes a failed result, never raises."""
    t0 = time.perf_counter()
    try:
        problem = _input_problem(atoms, job.elements, job.reference)
    except Exception as exc:  # e.g. a cell the neighbour list cannot handle
        problem = f"cannot check the structure: {type(exc).__name__}: {exc}"
    if problem is not None:
        return _failed(index, atoms, f"UserInputError: {problem}", time.perf_counter() - t0)
    work = atoms.copy()
    reset = getattr(calc, "reset", None)
    if callable(reset):
        reset()  # a reused calculator must not serve cached results of the previous structure
    work.calc = calc
    energy: float | None = None
    forces: np.ndarray | None = None
    stress: np.ndarray | None = None
    note: str | None = None
    try:
        with _deadline(job.timeout_s):
            energy = float(work.get_potential_energy())
            if "forces" in job.properties:
                forces = np.array(work.get_forces(apply_constraint=False), dtype=np.float64)
            if "stress" in job.properties:
                stress, note = _stress(work, calc)
    except _Timeout:
        return _failed(
            index,
            atoms,
            f"Timeout: calculation exceeded timeout_s={job.timeout_s:g} s",
            time.perf_counter() - t0,
        )
    except Exception as exc:
        return _failed(index, atoms, f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
    finally:
        work.calc = None
    wall = time.perf_counter() - t0
    bad = _non_finite(energy, forces, stress, len(atoms))
    if bad is not None:
        return _failed(index, atoms, f"NonFiniteResult: {bad}", wall)
    assert energy is not None
    labelled = atoms.copy()
    results: dict[str, Any] = {"energy": energy}
    free = getattr(calc, "results", {}).get("free_energy")
    if free is not None and np.isfinite(free):
        results["free_energy"] = float(free)
    if forces is not None:
        results["forces"] = forces
    if stress is not None:
        results["stress"] = full_3x3_to_voigt_6_stress(stress)
    labelled.calc = SinglePointCalculator(labelled, **results)
    return LabelResult(
        index=index,
        ok=True,
        atoms=labelled,
        energy=energy,
        forces=forces,
        stress=stress,
        stress_note=note,
        wall_time_s=wall,
    )


def _failed(index: int, atoms: Atoms, error: str, wall: float) -> LabelResult:
    return LabelResult(index=index, ok=False, atoms=atoms.copy(), error=error, wall_time_s=wall)


def _stress(atoms: Atoms, calc: BaseCalculator) -> tuple[np.ndarray | None, str | None]:
    """(3, 3) stress, or None and the reason it cannot be had."""
    if not atoms.pbc.all():
        return None, f"structure is not periodic in all directions (pbc={atoms.pbc.tolist()})"
    implemented = getattr(calc, "implemented_properties", None)
    if implemented and "stress" not in implemented:
        return None, f"{type(calc).__name__} does not compute stress"
    try:
        s = atoms.get_stress(voigt=False, apply_constraint=False)
    except PropertyNotImplementedError as exc:
        return None, f"{type(calc).__name__} cannot compute stress ({exc})"
    return np.array(s, dtype=np.float64), None


def _input_problem(
    atoms: Atoms, elements: frozenset[str] | None, reference: ReferenceConfig
) -> str | None:
    """Why this structure cannot be labelled at all, or None."""
    if len(atoms) == 0:
        return "structure has no atoms"
    if not np.isfinite(atoms.positions).all():
        return "structure has non-finite (NaN or inf) positions"
    if not np.isfinite(atoms.cell.array).all():
        return "structure has a non-finite (NaN or inf) cell"
    if elements is not None:
        unknown = sorted(set(atoms.get_chemical_symbols()) - set(elements))
        if unknown:
            return (
                f"element(s) {', '.join(unknown)} not supported by the {reference.kind!r} "
                f"reference (it supports {', '.join(sorted(elements))})"
            )
    if len(atoms) > 1:
        i, j, d = neighbor_list("ijd", atoms, MIN_DISTANCE)
        if len(d):
            k = int(np.argmin(d))
            return (
                f"atoms {int(i[k])} and {int(j[k])} are {float(d[k]):.3g} Å apart "
                f"(overlapping, closer than {MIN_DISTANCE} Å)"
            )
    return None


def _non_finite(
    energy: float | None, forces: np.ndarray | None, stress: np.ndarray | None, n_atoms: int
) -> str | None:
    if energy is None or not math.isfinite(energy):
        return f"the calculator returned a non-finite energy ({energy})"
    if forces is not None:
        if forces.shape != (n_atoms, 3):
            return f"forces have shape {forces.shape}, expected ({n_atoms}, 3)"
        bad = ~np.isfinite(forces).all(axis=1)
        if bad.any():
            return (
                f"non-finite forces on {int(bad.sum())} atom(s), first atom {int(np.argmax(bad))}"
            )
    if stress is not None and not np.isfinite(stress).all():
        return "the calculator returned a non-finite stress"
    return None


class _Timeout(BaseException):
    """Raised inside a calculation that passed its deadline.

    A BaseException, so a calculator's own ``except Exception`` cannot swallow it.
    """


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise :class:`_Timeout` in the current thread after ``seconds``.

    Main thread with no other interval timer: SIGALRM. Elsewhere (dask worker threads, or when
    someone else owns the timer): an asynchronous exception set from a timer thread. Both act
    between Python bytecodes, so a calculation stuck inside one C call is only stopped when it
    returns (the process pool backend then kills the worker).
    """
    if seconds is None:
        yield
        return
    use_signal = (
        hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0
    )
    if use_signal:

        def _on_alarm(signum: int, frame: Any) -> None:
            raise _Timeout

        previous = signal.signal(signal.SIGALRM, _on_alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            try:
                signal.setitimer(signal.ITIMER_REAL, 0.0)
            finally:  # restore even if the alarm fires right here
                signal.signal(signal.SIGALRM, previous)
        return

    thread_id = threading.get_ident()
    lock = threading.Lock()
    armed = [True]

    def _fire() -> None:
        with lock:
            if armed[0]:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(thread_id), ctypes.py_object(_Timeout)
                )

    timer = threading.Timer(seconds, _fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        with lock:
            armed[0] = False
            # Drop an exception that was set but not yet raised (NULL clears it).
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


# --------------------------------------------------------------------------- bookkeeping


class _Collector:
    """Stores results by index, forwards each to ``on_result`` once, advances the progress bar."""

    def __init__(
        self,
        n: int,
        on_result: Callable[[int, LabelResult], None] | None,
        advance: Callable[[LabelResult], None],
    ) -> None:
        self._results: list[LabelResult | None] = [None] * n
        self._on_result = on_result
        self._advance = advance

    def has(self, index: int) -> bool:
        return self._results[index] is not None

    def emit(self, result: LabelResult) -> None:
        if self._results[result.index] is not None:
            return  # a result can arrive twice only if a retry raced a late answer
        self._results[result.index] = result
        self._advance(result)
        if self._on_result is not None:
            self._on_result(result.index, result)

    def ordered(self) -> list[LabelResult]:
        missing = [i for i, r in enumerate(self._results) if r is None]
        if missing:  # every backend emits every index; this guards that invariant
            raise RuntimeError(f"labelling lost structures {missing[:10]}")
        return [r for r in self._results if r is not None]


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Callable[[LabelResult], None]]:
    if not enabled:
        yield lambda result: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    failed = [0]
    with Progress(
        TextColumn("[bold]labelling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task("labelling", total=total, failed=0)

        def advance(result: LabelResult) -> None:
            failed[0] += 0 if result.ok else 1
            bar.update(task, advance=1, failed=failed[0])

        yield advance


def _as_parallel(parallel: ParallelConfig | dict[str, Any]) -> ParallelConfig:
    if isinstance(parallel, ParallelConfig):
        return parallel
    try:
        return ParallelConfig.model_validate(parallel)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'parallel'}: {e['msg']}" for e in exc.errors()
        )
        raise UserInputError(f"invalid parallel config: {problems}") from None


def _check_properties(properties: Sequence[str]) -> frozenset[str]:
    if isinstance(properties, str):
        properties = (properties,)
    unknown = sorted(set(properties) - set(PROPERTIES))
    if unknown:
        raise UserInputError(
            f"unknown propert{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
            f"choose from {', '.join(PROPERTIES)}"
        )
    return frozenset(properties) | {"energy"}


# --------------------------------------------------------------------------- serial


def _run_serial(job: _Job, atoms_list: list[Atoms], todo: list[int], out: _Collector) -> None:
    calc = make_calculator(job.reference)
    for i in todo:
        out.emit(_compute(calc, i, atoms_list[i], job))


# --------------------------------------------------------------------------- process pool

# State of one pool worker process, set by _init_worker.
_WORKER: dict[str, Any] = {}


def _init_worker(job: _Job, status: Any, started: Any, pids: Any) -> None:
    _WORKER.clear()
    _WORKER.update(job=job, status=status, started=started, pids=pids)
    try:
        _WORKER["calc"] = make_calculator(job.reference)
    except Exception as exc:  # reported per structure; a raising initializer would break the pool
        _WORKER["calc_error"] = f"{type(exc).__name__}: {exc}"


def _worker_task(index: int, atoms: Atoms) -> LabelResult:
    w = _WORKER
    w["pids"][index] = os.getpid()
    w["started"][index] = time.time()
    w["status"][index] = _RUNNING
    if "calc_error" in w:
        result = _failed(index, atoms, f"calculator setup failed: {w['calc_error']}", 0.0)
    else:
        result = _compute(w["calc"], index, atoms, w["job"])
    w["status"][index] = _DONE
    return result


@dataclass
class _PoolOutcome:
    broken: bool
    in_flight: list[int]  # started (per the shared status) but no result when the pool broke
    killed: list[int]  # killed by us after their deadline


class _ProcessRunner:
    """A spawn-context process pool that survives worker deaths.

    Workers record in shared memory which structure they started, when, and in which process.
    When the pool breaks, every structure in flight is a suspect: suspects are rerun in a
    one-worker pool, where a death names its structure exactly ("worker died"); structures not
    yet started are resubmitted to a fresh pool. A calculation that outlives its timeout by the
    grace period is stopped by killing its worker.
    """

    def __init__(self, job: _Job, atoms_list: list[Atoms], out: _Collector, workers: int) -> None:
        self.job = job
        self.atoms = atoms_list
        self.out = out
        self.workers = workers
        self.ctx = multiprocessing.get_context("spawn")
        n = len(atoms_list)
        self.status = self.ctx.RawArray("b", n)
        self.started = self.ctx.RawArray("d", n)
        self.pids = self.ctx.RawArray("q", n)
        timeout = job.timeout_s
        self.kill_after = (
            None
            if timeout is None
            else timeout + min(max(_KILL_GRACE_MIN_S, 0.5 * timeout), _KILL_GRACE_MAX_S)
        )

    def run(self, todo: list[int]) -> None:
        pending = list(todo)
        suspects: list[int] = []
        idle_breaks = 0
        while pending or suspects:
            isolated = bool(suspects) or self.workers == 1
            batch = suspects if suspects else pending
            outcome = self._run_pool(batch, 1 if isolated else self.workers)
            pending = [i for i in pending if not self.out.has(i)]
            suspects = [i for i in suspects if not self.out.has(i)]
            if not outcome.broken:
                continue
            if not outcome.in_flight and not outcome.killed:
                idle_breaks += 1
                if idle_breaks > _MAX_IDLE_BREAKS:
                    for i in suspects + pending:
                        self.out.emit(
                            _failed(
                                i,
                                self.atoms[i],
                                f"{WORKER_DIED}: the process pool broke {idle_breaks} times "
                                "before running a structure (workers cannot start?)",
                                0.0,
                            )
                        )
                    return
                continue
            idle_breaks = 0
            if outcome.killed:
                continue  # we broke the pool ourselves; the others in flight are innocent
            if isolated:
                for i in outcome.in_flight:
                    self.out.emit(
                        _failed(
                            i,
                            self.atoms[i],
                            f"{WORKER_DIED}: the worker process exited abruptly while computing "
                            "this structure (crash, os._exit, out of memory or a signal)",
                            self.elapsed(i),
                        )
                    )
            else:
                moved = set(outcome.in_flight)
                suspects = [i for i in pending if i in moved]
                pending = [i for i in pending if i not in moved]

    def elapsed(self, index: int) -> float:
        return max(0.0, time.time() - self.started[index]) if self.started[index] else 0.0

    def _run_pool(self, batch: list[int], workers: int) -> _PoolOutcome:
        for i in batch:
            self.status[i] = _PENDING
            self.started[i] = 0.0
        executor = ProcessPoolExecutor(
            max_workers=min(workers, len(batch)),
            mp_context=self.ctx,
            initializer=_init_worker,
            initargs=(self.job, self.status, self.started, self.pids),
        )
        futures: dict[Future[LabelResult], int] = {}
        broken = False
        killed: list[int] = []
        clean_exit = False
        try:
            for i in batch:
                futures[executor.submit(_worker_task, i, self.atoms[i])] = i
            not_done: set[Future[LabelResult]] = set(futures)
            while not_done and not broken:
                done, not_done = wait(
                    not_done,
                    timeout=_POLL_S if self.kill_after is not None else None,
                    return_when=FIRST_COMPLETED,
                )
                for fut in done:
                    broken |= self._take(fut, futures[fut])
                if not broken and self.kill_after is not None:
                    killed += self._kill_overdue(futures)
            clean_exit = True
        finally:
            if clean_exit:
                executor.shutdown(wait=True, cancel_futures=True)
            else:  # interrupted (e.g. on_result raised, Ctrl-C): do not wait for running work
                _kill_workers(executor)
                executor.shutdown(wait=False, cancel_futures=True)
        in_flight: list[int] = []
        if broken:
            for fut, i in futures.items():
                if fut.done() and not fut.cancelled() and not self.out.has(i):
                    self._take(fut, i)  # finished before the break: still a good result
            in_flight = [
                i
                for i in batch
                if not self.out.has(i) and self.status[i] in (_RUNNING, _DONE) and i not in killed
            ]
        return _PoolOutcome(broken=broken, in_flight=in_flight, killed=killed)

    def _take(self, fut: Future[LabelResult], index: int) -> bool:
        """Emit the future's result; True when it failed because the pool broke."""
        exc = fut.exception()
        if exc is None:
            self.out.emit(fut.result())
            return False
        if isinstance(exc, BrokenProcessPool):
            return True
        # The task itself raised outside _compute, e.g. its result could not be pickled.
        self.out.emit(
            _failed(index, self.atoms[index], f"{type(exc).__name__}: {exc}", self.elapsed(index))
        )
        return False

    def _kill_overdue(self, futures: dict[Future[LabelResult], int]) -> list[int]:
        assert self.kill_after is not None
        now = time.time()
        killed = []
        for fut, i in futures.items():
            if fut.done() or self.status[i] != _RUNNING or self.out.has(i):
                continue
            if now - self.started[i] > self.kill_after:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(self.pids[i]), signal.SIGKILL)
                self.out.emit(
                    _failed(
                        i,
                        self.atoms[i],
                        f"Timeout: calculation exceeded timeout_s={self.job.timeout_s:g} s and "
                        "did not stop; its worker process was killed",
                        now - self.started[i],
                    )
                )
                killed.append(i)
        return killed


def _kill_workers(executor: ProcessPoolExecutor) -> None:
    kill = getattr(executor, "kill_workers", None)  # Python >= 3.14
    if callable(kill):
        kill()
        return
    for proc in list((getattr(executor, "_processes", None) or {}).values()):
        with contextlib.suppress(Exception):
            proc.kill()


# --------------------------------------------------------------------------- dask

# Per-thread calculator cache on dask workers: built once per worker thread and reference.
_DASK_LOCAL = threading.local()


def _dask_task(index: int, atoms: Atoms, job: _Job) -> LabelResult:
    cache: dict[str, BaseCalculator] = getattr(_DASK_LOCAL, "calcs", None) or {}
    _DASK_LOCAL.calcs = cache
    key = job.reference.model_dump_json()
    if key not in cache:
        try:
            cache[key] = make_calculator(job.reference)
        except Exception as exc:  # e.g. a package missing on a remote worker
            return _failed(index, atoms, f"calculator setup failed: {type(exc).__name__}: {exc}", 0)
    return _compute(cache[key], index, atoms, job)


def _run_dask(
    job: _Job,
    atoms_list: list[Atoms],
    todo: list[int],
    out: _Collector,
    parallel: ParallelConfig,
) -> None:
    try:
        import dask
        from distributed import Client, KilledWorker, LocalCluster, as_completed
    except ImportError as exc:
        raise UserInputError(
            f"backend 'dask' needs dask.distributed, which is not installed ({exc}); "
            "install it with: pip install mlipctl[dask]"
        ) from None
    import logging

    cluster = None
    if parallel.scheduler_address is not None:
        try:
            client = Client(parallel.scheduler_address, timeout=_DASK_CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            raise UserInputError(
                f"cannot connect to the dask scheduler at {parallel.scheduler_address}: "
                f"{type(exc).__name__}: {exc}"
            ) from None
    else:
        # One task per single-threaded worker at a time, so a dying worker names its task.
        with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
            cluster = LocalCluster(
                n_workers=parallel.workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                # Every failure becomes a result with its reason; the scheduler's log would repeat it.
                silence_logs=logging.CRITICAL,
                scheduler_kwargs={"allowed_failures": _DASK_ALLOWED_FAILURES},
            )
        client = Client(cluster)
    try:
        run = uuid.uuid4().hex[:12]
        futures = {
            client.submit(_dask_task, i, atoms_list[i], job, key=f"mlipctl-label-{run}-{i}"): i
            for i in todo
        }
        for fut in as_completed(list(futures)):
            i = futures[fut]
            try:
                # Blocks if the result was lost with a dying worker and is being recomputed.
                result = fut.result()
            except KilledWorker as exc:
                result = _failed(i, atoms_list[i], f"{WORKER_DIED}: {exc}", 0.0)
            except Exception as exc:  # the task itself never raises; this is dask's own error
                result = _failed(i, atoms_list[i], f"{type(exc).__name__}: {exc}", 0.0)
            out.emit(result)
            fut.release()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
