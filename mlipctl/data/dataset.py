"""Deterministic splits, per-config_type weights and a stable dataset fingerprint.

The split order comes from SHA-256 of ``(seed, structure index)``, not from a random number
generator, so the same seed gives the same split on every platform and NumPy version.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mlipctl.data.io import Labelled, read_structures
from mlipctl.errors import UserInputError

if TYPE_CHECKING:
    from mlipctl.config.data import DataConfig


@dataclass(frozen=True)
class Split:
    """Indices (sorted, disjoint) of the train/valid/test parts of one list of structures."""

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray


@dataclass
class DatasetSplits:
    """Labelled structures per split, with per-config_type weights already applied."""

    train: list[Labelled]
    valid: list[Labelled] = field(default_factory=list)
    test: list[Labelled] = field(default_factory=list)

    def fingerprints(self) -> dict[str, str]:
        """SHA-256 fingerprint of each split (see :func:`fingerprint`)."""
        return {
            name: fingerprint(items)
            for name, items in (("train", self.train), ("valid", self.valid), ("test", self.test))
        }


def _order_key(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"mlipctl-split:{seed}:{index}".encode()).digest()


def _group_counts(n: int, fractions: tuple[float, float], ensure_each: bool) -> tuple[int, int]:
    """How many of ``n`` items go to valid and test."""
    counts = [int(round(n * f)) for f in fractions]
    if ensure_each:
        wanted = [f > 0 for f in fractions]
        # Every held-out split with a non-zero fraction gets one item, if training keeps one.
        if n >= 1 + sum(wanted):
            counts = [max(c, 1) if w else c for c, w in zip(counts, wanted, strict=True)]
    # Never take the last training structure of a group.
    while sum(counts) > max(n - 1, 0) and sum(counts) > 0:
        k = int(np.argmax(counts))
        counts[k] -= 1
    return counts[0], counts[1]


def split_indices(
    config_types: Sequence[str],
    *,
    valid_fraction: float,
    test_fraction: float = 0.0,
    seed: int = 0,
    stratify: bool = True,
) -> Split:
    """Deterministic train/valid/test split of ``len(config_types)`` structures.

    Args:
        config_types: group label of each structure (used when ``stratify``).
        valid_fraction, test_fraction: fractions in [0, 1) with sum < 1.
        seed: split seed; the same seed and labels always give the same split.
        stratify: split each config_type on its own, so every group with at least three
            members (or two, if only one held-out split is requested) appears in every split.

    Returns:
        :class:`Split` of sorted int64 index arrays covering ``range(n)`` exactly once.
    """
    for name, f in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"valid_fraction + test_fraction must be < 1, got {valid_fraction + test_fraction}"
        )
    n = len(config_types)
    groups: dict[str, list[int]] = {}
    if stratify:
        for i, ct in enumerate(config_types):
            groups.setdefault(str(ct), []).append(i)
    else:
        groups["all"] = list(range(n))

    train: list[int] = []
    valid: list[int] = []
    test: list[int] = []
    for name in sorted(groups):
        members = sorted(groups[name], key=lambda i: _order_key(seed, i))
        n_valid, n_test = _group_counts(len(members), (valid_fraction, test_fraction), stratify)
        valid += members[:n_valid]
        test += members[n_valid : n_valid + n_test]
        train += members[n_valid + n_test :]
    return Split(
        train=np.array(sorted(train), dtype=np.int64),
        valid=np.array(sorted(valid), dtype=np.int64),
        test=np.array(sorted(test), dtype=np.int64),
    )


def _check_weight_keys(structures: Sequence[Labelled], weights: Mapping[str, float]) -> None:
    present = {s.config_type for s in structures}
    unknown = sorted(set(weights) - present)
    if unknown:
        raise UserInputError(
            f"config_type_weights name config types not in the data: {unknown}; "
            f"present: {sorted(present)}"
        )


def _scale(structures: Sequence[Labelled], weights: Mapping[str, float]) -> list[Labelled]:
    return [
        dataclasses.replace(s, weight=s.weight * float(weights.get(s.config_type, 1.0)))
        for s in structures
    ]


def apply_config_type_weights(
    structures: Sequence[Labelled], weights: Mapping[str, float]
) -> list[Labelled]:
    """New list with each structure's weight multiplied by its config_type's weight
    (types not in ``weights``: 1.0).

    Raises:
        UserInputError: a weight names a config_type absent from the data (likely a typo).
    """
    _check_weight_keys(structures, weights)
    return _scale(structures, weights)


def _update_array(h: Any, tag: bytes, arr: np.ndarray | None, dtype: str) -> None:
    h.update(tag)
    if arr is None:
        h.update(b"none")
        return
    a = np.ascontiguousarray(arr, dtype=dtype)
    h.update(repr(a.shape).encode())
    h.update(a.tobytes())


def fingerprint(structures: Sequence[Labelled]) -> str:
    """Stable SHA-256 hex digest of an ordered list of labelled structures.

    Covers numbers, positions, cell, pbc, energy, forces, stress and config_type (explicit
    little-endian dtypes, so the digest is the same on every platform). Weights and any other
    ``info`` entries are not part of the data identity.
    """
    h = hashlib.sha256(b"mlipctl-dataset-v1")
    h.update(len(structures).to_bytes(8, "little"))
    for s in structures:
        a = s.atoms
        _update_array(h, b"Z", a.numbers, "<i8")
        _update_array(h, b"R", a.positions, "<f8")
        _update_array(h, b"C", a.cell[:], "<f8")
        _update_array(h, b"P", a.pbc, "|b1")
        _update_array(h, b"E", None if s.energy is None else np.array(s.energy), "<f8")
        _update_array(h, b"F", s.forces, "<f8")
        _update_array(h, b"S", s.stress, "<f8")
        h.update(b"T" + s.config_type.encode() + b"\0")
    return h.hexdigest()


def load_dataset(config: DataConfig) -> DatasetSplits:
    """Read the files of a :class:`~mlipctl.config.data.DataConfig`, apply weights and split.

    Separate ``valid_path``/``test_path`` files replace the corresponding fraction of the
    training file. Reference-energy offsets are *not* subtracted here (see ``offsets.py``).
    """
    keys = {
        "index": config.index,
        "energy_key": config.energy_key,
        "forces_key": config.forces_key,
        "stress_key": config.stress_key,
        "config_type_key": config.config_type_key,
        "weight_key": config.weight_key,
    }
    pool = read_structures(config.path, **keys)
    valid_fraction = 0.0 if config.valid_path is not None else config.valid_fraction
    test_fraction = 0.0 if config.test_path is not None else config.test_fraction
    split = split_indices(
        [s.config_type for s in pool],
        valid_fraction=valid_fraction,
        test_fraction=test_fraction,
        seed=config.seed,
        stratify=config.stratify,
    )
    train = [pool[i] for i in split.train]
    valid = [pool[i] for i in split.valid]
    test = [pool[i] for i in split.test]
    if config.valid_path is not None:
        valid = read_structures(config.valid_path, **keys)
    if config.test_path is not None:
        test = read_structures(config.test_path, **keys)
    if not train:
        raise UserInputError(f"no training structures left in {config.path} after the split")
    weights = config.config_type_weights
    if weights:
        # Checked over all splits together: a type may legitimately be absent from one split.
        _check_weight_keys(train + valid + test, weights)
        train, valid, test = _scale(train, weights), _scale(valid, weights), _scale(test, weights)
    return DatasetSplits(train=train, valid=valid, test=test)
