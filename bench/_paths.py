"""Paths shared by the benchmark scripts (run from anywhere; they put bench/ on sys.path)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mlearn_dir() -> Path:
    """The mlearn DFT data: ``$MLIPCTL_MLEARN_DIR`` or ``../shared/data/mlearn`` beside the repo."""
    env = os.environ.get("MLIPCTL_MLEARN_DIR")
    return Path(env) if env else ROOT.parent / "shared/data/mlearn"
