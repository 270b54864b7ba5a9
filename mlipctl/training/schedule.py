"""Optimiser transformations and learning-rate schedules, evaluated on the host.

The learning rate is a pure function of (step, schedule state) and is passed to the compiled step
as a traced scalar, so changing it (warm-up, plateau reductions) never recompiles, and a resumed
run computes exactly the same rates as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import optax


def gradient_transformation(optimizer: Any) -> optax.GradientTransformation:
    """The optimiser's update direction without the learning rate (applied as ``-lr * u``).

    Args:
        optimizer: an ``AdamConfig``, ``AdamWConfig`` or ``SGDConfig``.
    """
    kind = optimizer.kind
    if kind == "adam":
        return optax.scale_by_adam(b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps)
    if kind == "adamw":
        # Decoupled decay: added after the Adam scaling, so it is multiplied by lr only.
        return optax.chain(
            optax.scale_by_adam(b1=optimizer.b1, b2=optimizer.b2, eps=optimizer.eps),
            optax.add_decayed_weights(optimizer.weight_decay),
        )
    if kind == "sgd":
        if optimizer.momentum == 0:
            return optax.identity()
        return optax.trace(decay=optimizer.momentum, nesterov=optimizer.nesterov)
    raise ValueError(f"unknown optimizer kind {kind!r}")


@dataclass
class PlateauState:
    """State of ``reduce_on_plateau`` (also kept for other schedules, where it stays at 1)."""

    scale: float = 1.0
    best: float = math.inf
    bad: int = 0
    cooldown: int = 0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlateauState:
        return cls(
            scale=float(d["scale"]),
            best=float(d["best"]),
            bad=int(d["bad"]),
            cooldown=int(d["cooldown"]),
        )


def learning_rate(
    schedule: Any,
    peak: float,
    step: int,
    steps_per_epoch: int,
    total_steps: int,
    plateau: PlateauState | None = None,
) -> float:
    """Learning rate of optimiser step ``step`` (0-based).

    Args:
        schedule: one of the ``*Schedule`` configs.
        peak: the optimiser's ``learning_rate``.
        step: global step index.
        steps_per_epoch: optimiser steps per epoch (warm-up and decay are given in epochs).
        total_steps: planned number of steps (cosine decays to its end).
        plateau: reduce_on_plateau state (its ``scale`` multiplies the rate).
    """
    spe = max(steps_per_epoch, 1)
    warm = schedule.warmup_epochs * spe
    # (step + 1) so that the very first step already moves the parameters.
    warm_factor = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    kind = schedule.kind
    if kind == "constant":
        return peak * warm_factor
    if kind == "cosine":
        if step < warm:
            return peak * warm_factor
        span = max(total_steps - warm, 1.0)
        t = min(max((step - warm) / span, 0.0), 1.0)
        frac = schedule.final_fraction
        return peak * (frac + (1.0 - frac) * 0.5 * (1.0 + math.cos(math.pi * t)))
    if kind == "exponential":
        decayed = peak * schedule.decay_rate ** (max(step - warm, 0.0) / spe)
        return max(decayed, schedule.min_learning_rate) * warm_factor
    if kind == "reduce_on_plateau":
        scale = plateau.scale if plateau is not None else 1.0
        return max(peak * scale, schedule.min_learning_rate) * warm_factor
    raise ValueError(f"unknown schedule kind {kind!r}")


def plateau_update(
    state: PlateauState, value: float, schedule: Any, peak: float
) -> tuple[PlateauState, bool]:
    """Update ``reduce_on_plateau`` with a new validation value; returns (state, reduced?)."""
    if schedule.kind != "reduce_on_plateau" or not math.isfinite(value):
        return state, False
    new = PlateauState(**state.to_dict())
    if value < new.best * (1.0 - schedule.threshold):
        new.best, new.bad = value, 0
        new.cooldown = max(new.cooldown - 1, 0)
        return new, False
    if new.cooldown > 0:
        new.cooldown -= 1
        return new, False
    new.bad += 1
    if new.bad >= schedule.patience and peak * new.scale > schedule.min_learning_rate:
        new.scale *= schedule.factor
        new.bad, new.cooldown = 0, schedule.cooldown
        return new, True
    return new, False
