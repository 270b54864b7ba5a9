"""Typed reports: every command returns one, rendered as JSON, Markdown and rich at the edge.

A report records the config, the software environment, timings, results and (where acceptance
criteria apply) a list of criteria with an overall verdict. Files are written atomically.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Criterion(BaseModel):
    """One acceptance check: ``passed`` is ``value <= threshold`` unless stated otherwise."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Short identifier, e.g. 'vacancy_formation_abs_error'.")
    value: float | None = Field(description="Measured value (None if it could not be computed).")
    threshold: float | None = Field(description="Threshold the value is compared with.")
    passed: bool = Field(description="Whether the criterion is met.")
    unit: str = Field(default="", description="Unit of value and threshold.")
    detail: str = Field(default="", description="Human-readable explanation.")

    @classmethod
    def at_most(
        cls, name: str, value: float | None, threshold: float, unit: str = "", detail: str = ""
    ) -> Criterion:
        ok = value is not None and math.isfinite(value) and value <= threshold
        return cls(name=name, value=value, threshold=threshold, passed=ok, unit=unit, detail=detail)

    @classmethod
    def is_true(cls, name: str, ok: bool, detail: str = "") -> Criterion:
        return cls(name=name, value=float(ok), threshold=1.0, passed=bool(ok), detail=detail)


class Environment(BaseModel):
    """Software and hardware the command ran on."""

    model_config = ConfigDict(extra="forbid")

    mlipctl: str = Field(description="mlipctl version.")
    python: str = Field(description="Python version.")
    platform: str = Field(description="OS and machine.")
    packages: dict[str, str] = Field(description="Versions of key packages that were imported.")
    devices: list[str] = Field(default_factory=list, description="JAX devices, if JAX was used.")

    @classmethod
    def capture(cls) -> Environment:
        from mlipctl import __version__

        pkgs: dict[str, str] = {}
        for name in (
            "numpy",
            "scipy",
            "jax",
            "jaxlib",
            "flax",
            "optax",
            "ase",
            "matscipy",
            "vesin",
            "pydantic",
        ):
            mod = sys.modules.get(name)
            if mod is not None:
                pkgs[name] = str(getattr(mod, "__version__", "?"))
        devices: list[str] = []
        if "jax" in sys.modules:
            jax = sys.modules["jax"]
            devices = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
        return cls(
            mlipctl=__version__,
            python=platform.python_version(),
            platform=f"{platform.system()} {platform.machine()}",
            packages=pkgs,
            devices=devices,
        )


class Report(BaseModel):
    """Base of every command's report. Subclasses add typed ``results``."""

    model_config = ConfigDict(extra="forbid")

    command: str = Field(description="The mlipctl subcommand.")
    created: str = Field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"),
        description="UTC time the report was created.",
    )
    config: dict[str, Any] = Field(description="The validated config the command ran with.")
    environment: Environment | None = Field(default=None, description="Software environment.")
    timings: dict[str, float] = Field(default_factory=dict, description="Wall times in seconds.")
    results: dict[str, Any] = Field(default_factory=dict, description="Command-specific results.")
    criteria: list[Criterion] = Field(default_factory=list, description="Acceptance criteria.")
    artifacts: dict[str, str] = Field(default_factory=dict, description="Files written, by role.")
    messages: list[str] = Field(
        default_factory=list, description="Warnings and notes for the user."
    )

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.criteria)

    def to_json_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["passed"] = self.passed
        return _finite(data)

    def to_json(self) -> str:
        return json.dumps(self.to_json_dict(), indent=2, sort_keys=False)

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` atomically into ``out_dir``."""
        from mlipctl.reports.render import to_markdown

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        jpath, mpath = out / "report.json", out / "report.md"
        self.artifacts.setdefault("report_json", str(jpath))
        self.artifacts.setdefault("report_md", str(mpath))
        atomic_write_text(jpath, self.to_json() + "\n")
        atomic_write_text(mpath, to_markdown(self))
        return jpath, mpath


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: map them to None (strict JSON for pipelines)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to ``path`` via a temporary file in the same directory and ``os.replace``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def timed(timings: dict[str, float], key: str):
    """Accumulate the wall time of a block into ``timings[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0
