"""Training checkpoints: msgpack (never pickle), integrity-checked, written atomically.

File layout: ``MAGIC`` (10 bytes) + SHA-256 of the body (32 bytes) + body, where the body is
``flax.serialization.msgpack_serialize`` of a plain dict of arrays, numbers and strings. The hash
turns a truncated or damaged file into a clear error instead of a confusing restore failure or,
worse, silently wrong parameters. Files are replaced with ``os.replace`` so a kill -9 during a
write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from flax import serialization

from mlipctl.errors import UserInputError

MAGIC = b"MLIPCKPT1\n"
FORMAT_VERSION = 1
_DIGEST = 32


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Serialise ``payload`` (nested dicts of arrays/scalars/strings) to ``path`` atomically.

    Pytrees such as optax states should be converted first with
    ``flax.serialization.to_state_dict``.
    """
    path = Path(path)
    body = serialization.msgpack_serialize({"format": FORMAT_VERSION, **payload})
    data = MAGIC + hashlib.sha256(body).digest() + body
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
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Raises:
        UserInputError: missing, truncated, damaged or foreign file, or an unknown format
            version; the message names the file and says how to recover.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"no checkpoint to resume from: {path} does not exist")
    data = path.read_bytes()
    hint = "delete it (and metrics.csv) and start the fit without --resume"
    if not data.startswith(MAGIC):
        raise UserInputError(f"{path} is not an mlipctl checkpoint (bad header); {hint}")
    digest, body = data[len(MAGIC) : len(MAGIC) + _DIGEST], data[len(MAGIC) + _DIGEST :]
    if len(digest) != _DIGEST or hashlib.sha256(body).digest() != digest:
        raise UserInputError(
            f"checkpoint {path} is corrupted (checksum mismatch: truncated or damaged file); {hint}"
        )
    try:
        payload = serialization.msgpack_restore(body)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types on bad input
        raise UserInputError(f"checkpoint {path} cannot be decoded ({exc}); {hint}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
        raise UserInputError(
            f"checkpoint {path} has format {payload.get('format') if isinstance(payload, dict) else '?'}"
            f", this mlipctl reads format {FORMAT_VERSION}; {hint}"
        )
    return payload


def restore_tree(template: Any, state: Any, what: str, path: str | os.PathLike[str]) -> Any:
    """``flax.serialization.from_state_dict`` with a clear error if the structure differs."""
    try:
        return serialization.from_state_dict(template, state)
    except (ValueError, KeyError, TypeError) as exc:
        raise UserInputError(
            f"checkpoint {path}: the saved {what} does not match this model/optimiser ({exc}); "
            "was it written by a different config?"
        ) from None
