"""The ``.mlip`` model file: one self-describing, checksummed file per potential.

Layout (all integers little-endian)::

    offset  size  content
    0       8     magic b"MLIPCTL\\x00"
    8       4     uint32 format version (this module writes and reads version 1)
    12      8     uint64 H, length of the header
    20      H     header: UTF-8 JSON (spec, calibration, fingerprint, versions, created, metadata)
    20+H    8     uint64 P, length of the parameters
    28+H    P     parameters: msgpack (flax.serialization) of a nested dict of numpy arrays
    28+H+P  32    SHA-256 of all preceding bytes

Parameters are raw little-endian array bytes, so a save/load round trip is bit-exact. Nothing is
ever unpickled. Reading needs only the model layer (no training code).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
import tempfile
from importlib import metadata as _metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from pydantic import ValidationError

from mlipctl.errors import UserInputError

if TYPE_CHECKING:  # pragma: no cover
    from mlipctl.model.potential import Potential

MAGIC = b"MLIPCTL\x00"
FORMAT_VERSION = 1
_DIGEST = 32
_MIN_SIZE = len(MAGIC) + 4 + 8 + 8 + _DIGEST


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("mlipctl", "jax", "jaxlib", "flax", "numpy", "ase"):
        try:
            out[pkg] = _metadata.version(pkg)
        except _metadata.PackageNotFoundError:
            continue
    return out


def _to_numpy_tree(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.asarray(x), serialization.to_state_dict(params))


def encode(header: dict[str, Any], params: Any) -> bytes:
    """Bytes of a model file from a JSON-able header and a parameter tree."""
    head = json.dumps(header, sort_keys=True, allow_nan=False).encode("utf-8")
    body = serialization.msgpack_serialize(_to_numpy_tree(params))
    blob = b"".join(
        [
            MAGIC,
            struct.pack("<I", FORMAT_VERSION),
            struct.pack("<Q", len(head)),
            head,
            struct.pack("<Q", len(body)),
            body,
        ]
    )
    return blob + hashlib.sha256(blob).digest()


def decode(data: bytes, name: str = "<bytes>") -> tuple[dict[str, Any], Any]:
    """(header, params as nested dict of numpy arrays) from model file bytes.

    Raises:
        UserInputError: wrong magic, future version, truncated, checksum mismatch or unreadable
            header/parameters; the message names ``name`` and the problem.
    """
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise UserInputError(
            f"{name}: not an mlipctl model file (wrong magic bytes; expected a .mlip file "
            "written by `mlipctl fit` or Potential.save)"
        )
    if len(data) < len(MAGIC) + 4:
        raise UserInputError(f"{name}: model file is truncated ({len(data)} bytes)")
    (version,) = struct.unpack_from("<I", data, len(MAGIC))
    if version > FORMAT_VERSION:
        raise UserInputError(
            f"{name}: model file format version {version} is newer than this mlipctl supports "
            f"(<= {FORMAT_VERSION}); upgrade mlipctl to read it"
        )
    if version < 1:
        raise UserInputError(f"{name}: invalid model file format version {version}")
    if len(data) < _MIN_SIZE:
        raise UserInputError(f"{name}: model file is truncated ({len(data)} bytes)")
    pos = len(MAGIC) + 4
    (n_head,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    if pos + n_head + 8 + _DIGEST > len(data):
        raise UserInputError(
            f"{name}: model file is truncated (header of {n_head} bytes does not fit in "
            f"{len(data)} bytes)"
        )
    head = data[pos : pos + n_head]
    pos += n_head
    (n_body,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    if pos + n_body + _DIGEST != len(data):
        problem = "truncated" if pos + n_body + _DIGEST > len(data) else "has trailing bytes"
        raise UserInputError(
            f"{name}: model file is {problem} (expected {pos + n_body + _DIGEST} bytes, "
            f"found {len(data)})"
        )
    body = data[pos : pos + n_body]
    if hashlib.sha256(data[: pos + n_body]).digest() != data[pos + n_body :]:
        raise UserInputError(f"{name}: model file is corrupt (SHA-256 checksum mismatch)")
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserInputError(f"{name}: model file header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise UserInputError(f"{name}: model file header is not a JSON object")
    try:
        params = serialization.msgpack_restore(body)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise UserInputError(f"{name}: model parameters cannot be decoded: {exc}") from exc
    return header, params


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_potential(potential: Potential, path: str | Path) -> Path:
    """Write ``potential`` to ``path`` atomically (temp file + os.replace)."""
    path = Path(path)
    if not potential.versions:
        potential.versions = _versions()
    if potential.created is None:
        potential.created = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    header = {
        "format_version": FORMAT_VERSION,
        "spec": potential.spec.to_dict(),
        "calibration": {k: float(v) for k, v in potential.calibration.items()},
        "fingerprint": potential.fingerprint,
        "versions": dict(potential.versions),
        "created": potential.created,
        "metadata": potential.metadata,
    }
    try:
        data = encode(header, potential.params)
    except (TypeError, ValueError) as exc:
        raise UserInputError(
            f"cannot write {path}: metadata must be JSON-serialisable with finite numbers ({exc})"
        ) from exc
    _atomic_write(path, data)
    return path


def _check_tree(name: str, params: Any, expected: Any) -> Any:
    """Convert restored numpy params to jax arrays, checking structure, shapes and dtypes."""
    flat_expected, treedef = jax.tree_util.tree_flatten(expected)
    try:
        flat = treedef.flatten_up_to(params)
    except (ValueError, TypeError) as exc:
        raise UserInputError(
            f"{name}: parameters do not match the architecture in the header ({exc})"
        ) from exc
    for leaf, ref in zip(flat, flat_expected, strict=True):
        if not isinstance(leaf, np.ndarray) or leaf.shape != ref.shape or leaf.dtype != ref.dtype:
            got = (
                f"{leaf.shape} {leaf.dtype}"
                if isinstance(leaf, np.ndarray)
                else type(leaf).__name__
            )
            raise UserInputError(
                f"{name}: parameter shapes do not match the architecture in the header "
                f"(expected {ref.shape} {ref.dtype}, found {got})"
            )
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x) for x in flat])


def read_potential(path: str | Path) -> Potential:
    """Load a ``.mlip`` file written by :func:`save_potential`.

    Raises:
        UserInputError: missing/unreadable file, or any problem listed in :func:`decode`, an
            unknown architecture kind or parameters that do not fit the architecture.
    """
    from mlipctl.model.potential import ModelSpec, Potential, param_shapes

    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise UserInputError(f"model file not found: {name}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserInputError(f"cannot read model file {name}: {exc}") from exc
    header, raw = decode(data, name)
    try:
        spec = ModelSpec.from_dict(header["spec"])
    except ValidationError as exc:
        kind = header.get("spec", {}).get("config", {}).get("architecture", {}).get("kind")
        raise UserInputError(
            f"{name}: incompatible model (architecture kind {kind!r} or its settings are not "
            f"supported by this mlipctl): {exc.errors()[0]['msg']}"
        ) from exc
    except UserInputError as exc:
        raise UserInputError(f"{name}: {exc}") from exc
    except (KeyError, TypeError, AttributeError) as exc:
        raise UserInputError(f"{name}: model header lacks a valid 'spec' entry ({exc})") from exc
    params = _check_tree(name, raw, param_shapes(spec))
    calibration = header.get("calibration") or {"energy": 1.0, "forces": 1.0}
    return Potential(
        spec=spec,
        params=params,
        calibration={str(k): float(v) for k, v in calibration.items()},
        fingerprint=header.get("fingerprint"),
        metadata=dict(header.get("metadata") or {}),
        versions=dict(header.get("versions") or {}),
        created=header.get("created"),
    )
