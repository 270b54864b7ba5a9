"""Calculators that misbehave on purpose, for the labelling failure tests.

Imported by path (``_failing_calc:FailingEMT``) through the ``import`` reference kind, in the test
process and in worker processes, so it lives in a plain module on ``sys.path`` (tests/ is not a
package). What each structure does is chosen by ``atoms.info["fail"]``:

- ``"raise"``: raise RuntimeError("injected failure")
- ``"nan"``:   return NaN energy and forces
- ``"exit"``:  kill the whole process with ``os._exit(1)`` (a dying worker)
- ``"sleep"``: sleep 30 s in 0.05 s steps (Python-level work: a soft timeout interrupts it)
- ``"hang"``:  sleep 30 s with SIGALRM blocked (only killing the process stops it)
- anything else / absent: plain EMT
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
from ase.calculators.emt import EMT


class FailingEMT(EMT):
    """EMT that fails in the way ``atoms.info["fail"]`` asks."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        mode = atoms.info.get("fail") if atoms is not None else None
        if mode == "raise":
            raise RuntimeError("injected failure")
        if mode == "exit":
            os._exit(1)
        if mode == "sleep":
            for _ in range(600):
                time.sleep(0.05)
        if mode == "hang":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
            try:
                time.sleep(30)
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
        if system_changes is None:
            super().calculate(atoms, properties)
        else:
            super().calculate(atoms, properties, system_changes)
        if mode == "nan":
            self.results["energy"] = float("nan")
            self.results["free_energy"] = float("nan")
            self.results["forces"] = np.full((len(atoms), 3), np.nan)


class NotACalculator:
    """A class that is not an ASE calculator."""


def emt_factory(asap_cutoff: bool = False) -> EMT:
    """A factory function returning a calculator (the import kind accepts these too)."""
    return EMT(asap_cutoff=asap_cutoff)


def not_a_calculator_factory() -> object:
    """A factory function returning something that is not a calculator."""
    return object()


class StrictEMT(EMT):
    """EMT whose constructor validates its argument (for the constructor-error tests)."""

    def __init__(self, cutoff: float, **kwargs):
        if cutoff <= 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        super().__init__(**kwargs)
        self.cutoff = cutoff
