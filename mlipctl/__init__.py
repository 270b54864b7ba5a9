"""mlipctl: build, validate and use machine-learned interatomic potentials.

Heavy dependencies (jax, ase) are imported lazily so that ``mlipctl --help`` starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from mlipctl.model.potential import Potential


def load(path: str) -> Potential:
    """Load a potential from a ``.mlip`` model file (no training code is imported)."""
    from mlipctl.model.potential import load_potential

    return load_potential(path)


def __getattr__(name: str) -> Any:  # pragma: no cover - convenience only
    raise AttributeError(f"module 'mlipctl' has no attribute {name!r}")
