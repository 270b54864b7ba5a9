"""Training settings of `mlipctl fit`: optimiser, schedule, loss, stopping and checkpoints.

Units: energies in eV (loss on the energy *per atom*), forces in eV/Å, stress in eV/Å³.
Intervals counted in "validations" are multiples of ``validation_interval`` epochs.
The float precision of training is the model's (``model.dtype``); it is not repeated here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from mlipctl.config.base import StrictModel

# --- optimisers -----------------------------------------------------------------------------


class AdamConfig(StrictModel):
    """Adam (Kingma & Ba) with the learning rate given by ``schedule``."""

    kind: Literal["adam"] = Field(default="adam", description="Adam.")
    learning_rate: float = Field(
        default=1e-3, gt=0, description="Peak learning rate (the schedule scales it)."
    )
    b1: float = Field(default=0.9, ge=0, lt=1, description="Decay of the first-moment average.")
    b2: float = Field(default=0.999, ge=0, lt=1, description="Decay of the second-moment average.")
    eps: float = Field(default=1e-8, gt=0, description="Added to the root second moment.")


class AdamWConfig(AdamConfig):
    """Adam with decoupled weight decay (Loshchilov & Hutter); decay is scaled by the schedule."""

    kind: Literal["adamw"] = Field(default="adamw", description="AdamW.")  # type: ignore[assignment]
    weight_decay: float = Field(
        default=1e-4, ge=0, description="Decoupled weight decay per unit learning rate."
    )


class SGDConfig(StrictModel):
    """Stochastic gradient descent with (optionally Nesterov) momentum."""

    kind: Literal["sgd"] = Field(default="sgd", description="SGD with momentum.")
    learning_rate: float = Field(
        default=1e-2, gt=0, description="Peak learning rate (the schedule scales it)."
    )
    momentum: float = Field(default=0.9, ge=0, lt=1, description="Momentum (0: plain SGD).")
    nesterov: bool = Field(default=False, description="Use Nesterov momentum.")


OptimizerConfig = Annotated[AdamConfig | AdamWConfig | SGDConfig, Field(discriminator="kind")]

# --- learning-rate schedules ------------------------------------------------------------------


class ConstantSchedule(StrictModel):
    """The optimiser's learning rate throughout (after an optional linear warm-up)."""

    kind: Literal["constant"] = Field(default="constant", description="Constant learning rate.")
    warmup_epochs: float = Field(
        default=0.0, ge=0, description="Linear warm-up from 0 over this many epochs."
    )


class CosineSchedule(StrictModel):
    """Linear warm-up, then cosine decay to ``final_fraction`` of the peak at the last step."""

    kind: Literal["cosine"] = Field(default="cosine", description="Warm-up + cosine decay.")
    warmup_epochs: float = Field(
        default=1.0, ge=0, description="Linear warm-up from 0 over this many epochs."
    )
    final_fraction: float = Field(
        default=0.01, ge=0, le=1, description="Learning rate at the end / peak learning rate."
    )


class ExponentialSchedule(StrictModel):
    """Smooth exponential decay: lr = peak * decay_rate ** (epochs elapsed), floored."""

    kind: Literal["exponential"] = Field(default="exponential", description="Exponential decay.")
    decay_rate: float = Field(
        default=0.98, gt=0, le=1, description="Factor applied per epoch (continuously per step)."
    )
    warmup_epochs: float = Field(
        default=0.0, ge=0, description="Linear warm-up from 0 over this many epochs."
    )
    min_learning_rate: float = Field(
        default=1e-6, ge=0, description="The learning rate never goes below this."
    )


class ReduceOnPlateauSchedule(StrictModel):
    """Multiply the learning rate by ``factor`` when the validation metric stops improving."""

    kind: Literal["reduce_on_plateau"] = Field(
        default="reduce_on_plateau", description="Reduce on plateau of the validation metric."
    )
    factor: float = Field(default=0.5, gt=0, lt=1, description="Multiplier on each reduction.")
    patience: int = Field(
        default=10, ge=1, description="Validations without improvement before a reduction."
    )
    threshold: float = Field(
        default=1e-3,
        ge=0,
        description="Relative improvement needed to count as better (0.001 = 0.1 %).",
    )
    cooldown: int = Field(
        default=0, ge=0, description="Validations to wait after a reduction before counting."
    )
    min_learning_rate: float = Field(
        default=1e-6, ge=0, description="The learning rate never goes below this."
    )
    warmup_epochs: float = Field(
        default=0.0, ge=0, description="Linear warm-up from 0 over this many epochs."
    )


ScheduleConfig = Annotated[
    ConstantSchedule | CosineSchedule | ExponentialSchedule | ReduceOnPlateauSchedule,
    Field(discriminator="kind"),
]

# --- loss -----------------------------------------------------------------------------------


class _LossWeights(StrictModel):
    energy_weight: float = Field(
        default=1.0, ge=0, description="Weight of the energy-per-atom term ((eV/atom)^2 for MSE)."
    )
    forces_weight: float = Field(
        default=1.0, ge=0, description="Weight of the force-component term ((eV/Å)^2 for MSE)."
    )
    stress_weight: float = Field(
        default=0.0,
        ge=0,
        description="Weight of the stress-component term ((eV/Å³)^2 for MSE); > 0 needs stress "
        "labels in the training data (checked when the data is read).",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> _LossWeights:
        if self.energy_weight == 0 and self.forces_weight == 0 and self.stress_weight == 0:
            raise ValueError("all loss weights are 0: nothing would be fitted")
        return self


class MSELoss(_LossWeights):
    """Mean squared error of each target."""

    kind: Literal["mse"] = Field(default="mse", description="Mean squared error.")


class HuberLoss(_LossWeights):
    """Huber loss: quadratic below ``delta``, linear above (robust to a few bad labels)."""

    kind: Literal["huber"] = Field(default="huber", description="Huber loss.")
    delta: float = Field(
        default=0.01,
        gt=0,
        description="Transition point, in each target's unit (eV/atom, eV/Å, eV/Å³).",
    )


LossConfig = Annotated[MSELoss | HuberLoss, Field(discriminator="kind")]


class StageTwoConfig(_LossWeights):
    """The last part of the fit with other loss weights (MACE calls it stage two).

    While the learning rate is high the energy term dominates; as the fit converges the energy
    loss falls by orders of magnitude more than the force loss, so with fixed weights the forces
    end up deciding the last, low-learning-rate epochs, the ones that set meV/atom energy
    differences such as a vacancy formation energy. Raising the energy weight for those epochs
    restores the balance. The validation loss switches to these weights as well, and the best
    model is chosen among stage-two epochs.
    """

    start_fraction: float = Field(
        default=0.75,
        gt=0,
        lt=1,
        description="Fraction of max_epochs after which these weights apply (rounded to an "
        "epoch, at least 1).",
    )


class ReadoutRefitConfig(_LossWeights):
    """After training, solve the readout's last linear layer exactly by least squares.

    The per-atom energy is linear in the output layer of the per-element MLP (weights and bias)
    and in the linear readout on the descriptor, so energies, forces and stress are linear in
    them too. With the rest of the network fixed, the weighted MSE over the whole training
    split (these weights, per-config_type weights as in training) has one minimum, which the
    refit finds exactly, where stochastic training only gets near it. Training with a low
    energy weight learns features that fit the forces; a refit with a high energy weight then
    recovers the energies (docs/training.md). Not for shallow ensembles: their heads share the
    features, so an exact refit would make them equal.
    """

    ridge: float | None = Field(
        default=None,
        ge=0,
        description="Ridge penalty towards the trained values, relative to the mean diagonal "
        "of the normal matrix (None: the value from 1e-10 ... 1e-2 with the lowest validation "
        "loss, and no refit at all if none lowers it).",
    )


# --- stopping and checkpoints ---------------------------------------------------------------

Metric = Literal[
    "loss",
    "energy_mae",
    "energy_rmse",
    "forces_mae",
    "forces_rmse",
    "stress_mae",
    "stress_rmse",
]


class EarlyStoppingConfig(StrictModel):
    """Stop when the validation metric has not improved for ``patience`` validations."""

    enabled: bool = Field(default=True, description="Stop early (needs a validation split).")
    patience: int = Field(
        default=50, ge=1, description="Validations without improvement before stopping."
    )
    min_delta: float = Field(
        default=0.0, ge=0, description="Absolute decrease of the metric needed to count."
    )
    min_epochs: int = Field(
        default=0,
        ge=0,
        description="Never stop before this epoch. Under a decaying learning-rate schedule the "
        "validation error keeps falling with the rate, and at a high rate a noisy validation "
        "can dip once and then look converged for `patience` validations.",
    )


class CheckpointConfig(StrictModel):
    """When to write ``checkpoint.msgpack`` (whichever comes first); resume loses at most that."""

    every_epochs: int | None = Field(
        default=1, ge=1, description="Write after every n-th epoch (None: not by epochs)."
    )
    every_seconds: float | None = Field(
        default=300.0,
        gt=0,
        description="Write when this much wall time passed since the last one, also in the "
        "middle of an epoch (None: not by time).",
    )

    @model_validator(mode="after")
    def _one_interval(self) -> CheckpointConfig:
        if self.every_epochs is None and self.every_seconds is None:
            raise ValueError(
                "set checkpoint.every_epochs and/or checkpoint.every_seconds; without them "
                "an interrupted fit could not be resumed"
            )
        return self


class TrainingConfig(StrictModel):
    """How the parameters are fitted (the data and the model are configured separately)."""

    optimizer: OptimizerConfig = Field(default_factory=AdamConfig, description="Optimiser.")
    schedule: ScheduleConfig = Field(
        default_factory=CosineSchedule, description="Learning-rate schedule."
    )
    loss: LossConfig = Field(default_factory=MSELoss, description="Loss function and weights.")
    stage_two: StageTwoConfig | None = Field(
        default=None,
        description="Loss weights for the last epochs (None: the same weights throughout).",
    )
    refit: ReadoutRefitConfig | None = Field(
        default=None,
        description="Least-squares refit of the readout's last linear layer after training, "
        "with its own loss weights (None: off).",
    )
    max_epochs: int = Field(
        default=100, ge=1, description="Passes over the training split (fewer if stopped early)."
    )
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimiser steps (None: no limit)."
    )
    batch_size: int = Field(default=4, ge=1, description="Structures per optimiser step.")
    clip_grad_norm: float | None = Field(
        default=10.0,
        gt=0,
        description="Clip the gradient to this global norm, per ensemble member (None: off).",
    )
    ema_decay: float = Field(
        default=0.99,
        ge=0,
        lt=1,
        description="Decay of the exponential moving average of the parameters, used for "
        "validation and the saved model (0: off).",
    )
    validation_interval: int = Field(
        default=1, ge=1, description="Evaluate the validation split every n-th epoch."
    )
    metric: Metric = Field(
        default="loss",
        description="Validation metric for early stopping, reduce_on_plateau and the best model "
        "('loss' is the weighted MSE of the ensemble mean).",
    )
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig, description="Early stopping."
    )
    keep_best: bool = Field(
        default=True,
        description="Save the parameters of the best validation (True) or of the last epoch.",
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpoint intervals."
    )
    standardize_features: bool = Field(
        default=True,
        description="Before training, set the model's per-element descriptor shift/scale to the "
        "training data's mean and 1/std (raw moment invariants of near-crystalline data are "
        "~1e-5 and nearly constant, which makes the start of training very slow).",
    )
    freeze_feature_scaling: bool = Field(
        default=True,
        description="Keep the descriptor shift/scale fixed while training. They are in raw "
        "descriptor units, where Adam's step of ~learning_rate per update is a huge change "
        "(on mlearn Cu training them made the loss diverge).",
    )
    seed: int = Field(
        default=0, ge=0, description="Seed of the initial parameters and of the data order."
    )
    plots: bool = Field(default=True, description="Write parity plots and a learning curve.")

    @model_validator(mode="after")
    def _check(self) -> TrainingConfig:
        sched = self.schedule
        if isinstance(sched, ExponentialSchedule | ReduceOnPlateauSchedule) and (
            sched.min_learning_rate > self.optimizer.learning_rate
        ):
            raise ValueError(
                f"schedule.min_learning_rate ({sched.min_learning_rate}) is larger than "
                f"optimizer.learning_rate ({self.optimizer.learning_rate})"
            )
        start = self.stage_two_epoch()
        if start is not None and start >= self.max_epochs:
            raise ValueError(
                f"stage_two would start at epoch {start + 1} of {self.max_epochs} (start_fraction "
                f"{self.stage_two.start_fraction}), so it would never run: lower "
                "stage_two.start_fraction or raise max_epochs"
            )
        if sched.warmup_epochs >= self.max_epochs:
            raise ValueError(
                f"schedule.warmup_epochs ({sched.warmup_epochs}) must be smaller than max_epochs "
                f"({self.max_epochs})"
            )
        two = self.stage_two
        if two is not None and two.stress_weight > 0 and self.loss.stress_weight == 0:
            raise ValueError(
                "stage_two.stress_weight > 0 needs loss.stress_weight > 0 (stress labels are "
                "checked, and stress computed, for the whole fit)"
            )
        if self.refit is not None and self.refit.stress_weight > 0 and self.loss.stress_weight == 0:
            raise ValueError(
                "refit.stress_weight > 0 needs loss.stress_weight > 0 (stress labels are checked "
                "against the training loss)"
            )
        if self.metric.startswith("stress") and self.loss.stress_weight == 0:
            raise ValueError(
                f"metric {self.metric!r} needs stress in the loss (loss.stress_weight > 0)"
            )
        return self

    def stage_two_epoch(self) -> int | None:
        """The first epoch (0-based) trained with ``stage_two``'s weights, or None."""
        if self.stage_two is None:
            return None
        return max(1, round(self.stage_two.start_fraction * self.max_epochs))
