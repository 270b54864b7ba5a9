"""The fit engine: one compiled train step for a whole ensemble, EMA, early stopping, resume.

Determinism: the initial parameters depend on ``training.seed``; the order of the training data in
epoch ``e`` is ``numpy.random.default_rng([seed, e])`` (see ``BatchLoader.order``); learning rates
are a pure function of the step and of the saved plateau state. A checkpoint stores everything
else that changes (parameters, EMA, optimiser state, step, position inside the epoch, early-
stopping and plateau state, history), so a resumed fit repeats exactly the computation an
uninterrupted one would have done.

Ensembles: ``make_predict`` evaluates all K members at once (parameters with a leading K axis for
deep ensembles, K heads for shallow ones). The loss is the *sum* of the members' losses, so each
deep member receives exactly its own gradient; gradient clipping is applied per member for deep
ensembles so that members stay independent. All members see the same batches in the same order;
they differ by their random initialisation only.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_numbers, chemical_symbols
from flax import serialization

from mlipctl.config.fit import FitConfig
from mlipctl.data.batching import BatchLoader
from mlipctl.data.dataset import DatasetSplits, load_dataset
from mlipctl.data.io import Labelled
from mlipctl.data.offsets import offset_energy, reference_energies
from mlipctl.errors import UserInputError
from mlipctl.model.potential import (
    ModelSpec,
    Potential,
    fit_feature_scaling,
    init_params,
    make_predict,
)
from mlipctl.reports.base import atomic_write_text
from mlipctl.training.checkpoint import load_checkpoint, restore_tree, save_checkpoint
from mlipctl.training.loss import (
    EV_PER_A3_TO_GPA,
    LossSettings,
    MetricAccumulator,
    batch_loss,
    metric_value,
)
from mlipctl.training.outputs import MetricsCSV, learning_curve, parity_plots
from mlipctl.training.refit import RefitData, refit_readout
from mlipctl.training.schedule import (
    PlateauState,
    gradient_transformation,
    learning_rate,
    plateau_update,
)

CHECKPOINT_NAME = "checkpoint.msgpack"
MODEL_NAME = "model.mlip"
# Config keys that may change between an interrupted fit and its resume (they do not change the
# computation); everything else must be identical.
# The refit runs after the last epoch, so a finished fit can be resumed to refit it differently.
_RESUMABLE_CHANGES = ("output", "training.checkpoint", "training.refit")


@dataclass
class FitResult:
    """What a fit produced.

    Attributes:
        model_path: the saved ``model.mlip``.
        output_dir: folder with the model, ``metrics.csv``, plots, ``results.json``, checkpoint.
        metrics: ``{split: {group: {metric: value}}}`` for splits train/valid/test (those that
            exist), groups ``overall``, ``config_type/<label>``, ``element/<symbol>``; keys
            ``energy_mae``/``energy_rmse`` in meV/atom, ``forces_*`` in eV/Å (per component),
            ``stress_*`` in GPa (per component), ``*_count`` = number of values averaged.
        timings: seconds: ``total``, ``data``, ``compile_train_step``, ``compile_eval``,
            ``train`` (steps only), ``validation``, ``final_evaluation``, ``step_time_median``
            (steady state), and ``structures_per_s`` (training throughput, compile excluded).
        history: one dict per epoch (the rows of ``metrics.csv``).
        artifacts: files written, by role.
        best_epoch: epoch whose parameters were saved (None: the last one).
        epochs_completed, steps: training progress at the end.
        stopped_early: early stopping ended the fit.
        n_parameters: trainable parameters (all members).
        normalisation: per-element offsets (eV/atom), energy_shift (eV/atom), energy_scale.
        messages: notes for the user.
        refit: summary of the readout refit (``training.refit``), or None.
    """

    model_path: Path
    output_dir: Path
    metrics: dict[str, dict[str, dict[str, float]]]
    timings: dict[str, float]
    history: list[dict[str, Any]]
    artifacts: dict[str, str]
    best_epoch: int | None
    epochs_completed: int
    steps: int
    stopped_early: bool
    n_parameters: int
    normalisation: dict[str, Any]
    messages: list[str] = field(default_factory=list)
    refit: dict[str, Any] | None = None


class TrainState(NamedTuple):
    """Device state updated by the compiled step (PyTrees with a leading member axis)."""

    params: Any
    ema: Any
    opt_state: Any


# --- set-up helpers ---------------------------------------------------------------------------


def _config_json(cfg: FitConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    a, b = _flatten(saved), _flatten(now)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == p or key.startswith(p + ".") for p in _RESUMABLE_CHANGES):
            continue
        if a.get(key, "<unset>") != b.get(key, "<unset>"):
            diffs.append(f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}")
    return diffs


def _elements(structures: Sequence[Labelled]) -> list[str]:
    zs: set[int] = set()
    for s in structures:
        zs.update(np.unique(s.atoms.numbers).tolist())
    return [chemical_symbols[z] for z in sorted(zs)]


def _check_labels(data: DatasetSplits, cfg: FitConfig) -> list[str]:
    """Clear errors for a loss term without labels; notes for partially labelled data."""
    loss = cfg.training.loss
    notes = []
    for name, weight, attr in (
        ("energy", loss.energy_weight, "energy"),
        ("forces", loss.forces_weight, "forces"),
        ("stress", loss.stress_weight, "stress"),
    ):
        n_have = sum(getattr(s, attr) is not None for s in data.train)
        if weight > 0 and n_have == 0:
            key = getattr(cfg.data, f"{name}_key")
            raise UserInputError(
                f"training.loss.{name}_weight is {weight} but no training structure in "
                f"{cfg.data.path} has {name} labels (looked for key {key!r}); set the weight to 0 "
                f"or point data.{name}_key at the right key"
            )
        if weight > 0 and n_have < len(data.train):
            notes.append(
                f"{len(data.train) - n_have} of {len(data.train)} training structures have no "
                f"{name} label; they are left out of that loss term"
            )
    if cfg.training.metric != "loss" and data.valid:
        q = cfg.training.metric.split("_")[0]
        if not any(getattr(s, q) is not None for s in data.valid):
            raise UserInputError(
                f"training.metric is {cfg.training.metric!r} but no validation structure has "
                f"{q} labels"
            )
    return notes


def energy_normalisation(
    train: Sequence[Labelled], offsets: dict[str, float]
) -> tuple[float, float]:
    """``(shift, scale)``: mean residual energy per atom (eV/atom) after the offsets, and the RMS
    force component (eV/Å; the std of the residual per-atom energy if there are no forces)."""
    resid = np.array(
        [
            (s.energy - offset_energy(s.atoms.numbers, offsets)) / len(s.atoms)
            for s in train
            if s.energy is not None
        ],
        dtype=np.float64,
    )
    shift = float(resid.mean()) if resid.size else 0.0
    forces = [np.asarray(s.forces).ravel() for s in train if s.forces is not None]
    if forces:
        scale = float(np.sqrt(np.mean(np.square(np.concatenate(forces)))))
    else:
        scale = float(resid.std()) if resid.size > 1 else 1.0
    if not (math.isfinite(scale) and scale > 1e-6):
        scale = 1.0
    return shift, scale


def _clip(grads: Any, max_norm: float | None, per_member: bool) -> Any:
    """Clip to ``max_norm`` (global L2 norm); per ensemble member when ``per_member``."""
    if max_norm is None:
        return grads
    leaves = jax.tree_util.tree_leaves(grads)
    if per_member:
        sq = sum(jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1) for g in leaves)
        factor = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(sq), 1e-12))  # (K,)
        return jax.tree_util.tree_map(
            lambda g: g * factor.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype), grads
        )
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in leaves))
    factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
    return jax.tree_util.tree_map(lambda g: g * factor.astype(g.dtype), grads)


FROZEN_LEAVES = ("feature_shift", "feature_scale")
"""Parameter names of the model's descriptor standardisation: statistics, frozen by default."""


def _zero_frozen(tree: Any) -> Any:
    """Zeros for the leaves under a key in :data:`FROZEN_LEAVES`, the rest unchanged."""

    def f(path: tuple[Any, ...], x: Any) -> Any:
        names = {getattr(k, "key", None) for k in path}
        return jnp.zeros_like(x) if names & set(FROZEN_LEAVES) else x

    return jax.tree_util.tree_map_with_path(f, tree)


def _to_host(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, tree)


def _shape_key(graph: Any) -> tuple[int, ...]:
    """(N, E, B, K) of a padded batch: one compiled step per distinct key."""
    return (
        graph.positions.shape[0],
        graph.senders.shape[0],
        graph.cell.shape[0],
        graph.neighbors.shape[1],
    )


def _n_params(params: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))


def _tie_decay(updates: Any, params: Any, rate: float) -> Any:
    """Add decoupled decay ``rate * d`` to the update of the per-order radial deviations d."""
    inner = dict(updates["params"])
    inner["radial_delta"] = inner["radial_delta"] + rate * params["params"]["radial_delta"]
    return {**updates, "params": inner}


def make_train_step(
    spec: ModelSpec, tcfg: Any
) -> tuple[Any, Callable[[TrainState, Any, Any, Any, Any, Any], tuple[TrainState, jax.Array]]]:
    """The optimiser and the (not yet jitted) train step of a :class:`TrainingConfig`.

    ``step(state, graph, targets, lr, step_index, weights) -> (state, parts)`` with ``weights``
    (3,) the energy, forces and stress loss weights and ``parts`` (4, K): the total, energy,
    forces and stress loss terms of each member before the update.
    """
    settings = LossSettings.from_config(tcfg.loss)
    predict_train = make_predict(spec, stress=settings.stress_weight > 0)
    # Deep members own disjoint parameters (leading K axis); shallow heads share a trunk.
    per_member = spec.config.ensemble.kind == "deep" and spec.n_members > 1
    tx = gradient_transformation(tcfg.optimizer)
    ema_decay = float(tcfg.ema_decay)
    clip = tcfg.clip_grad_norm

    freeze = bool(getattr(tcfg, "freeze_feature_scaling", True))
    arch = spec.config.architecture
    tie = float(getattr(arch, "radial_tie_decay", 0.0))

    def step_fn(
        st: TrainState,
        graph: Any,
        targets: Any,
        lr: jax.Array,
        step: jax.Array,
        weights: jax.Array,
    ) -> tuple[TrainState, jax.Array]:
        def loss_fn(p: Any) -> tuple[jax.Array, Any]:
            pred = predict_train(p, graph)
            parts = batch_loss(
                pred.energy, pred.forces, pred.stress, graph, targets, settings, weights
            )
            # Sum over members: each deep member's gradient is its own loss's gradient.
            return jnp.sum(parts.total), parts

        grads, parts = jax.grad(loss_fn, has_aux=True)(st.params)
        if freeze:
            # Before clipping, so frozen leaves do not count in the norm.
            grads = _zero_frozen(grads)
        grads = _clip(grads, clip, per_member)
        updates, opt_state = tx.update(grads, st.opt_state, st.params)
        if freeze:
            updates = _zero_frozen(updates)  # also no weight decay on them
        if tie > 0:
            updates = _tie_decay(updates, st.params, tie)
        params = jax.tree_util.tree_map(
            lambda p, u: p - (lr * u).astype(p.dtype), st.params, updates
        )
        if ema_decay > 0:
            # Warm-up of the decay so that early EMA is not dominated by the random init.
            d = jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))
            ema = jax.tree_util.tree_map(
                lambda e, p: (d * e + (1.0 - d) * p).astype(p.dtype), st.ema, params
            )
        else:
            ema = params
        return TrainState(params, ema, opt_state), jnp.stack(list(parts))

    return tx, step_fn


class _Progress:
    """A rich progress bar on stderr with live validation metrics; a no-op when disabled."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.bar: Any = None
        if not (enabled and sys.stderr.isatty()):
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn("[bold]fit[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.bar.add_task("", total=total, completed=done, metrics="")
        self.bar.start()

    def update(self, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.update(self.task, **kw)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- the engine -------------------------------------------------------------------------------


def run_fit(
    cfg: FitConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> FitResult:
    """Fit a potential (or ensemble) as configured and write it to ``<output>/model.mlip``.

    Args:
        cfg: validated fit config.
        resume: continue from ``<output>/checkpoint.msgpack`` (same config required, except
            ``output`` and ``training.checkpoint``).
        progress: show a progress bar (only on a terminal).
        on_epoch_end: called with each epoch's history row after the epoch (and its checkpoint,
            if one was due); an exception raised there stops the fit like an interruption.

    Returns:
        :class:`FitResult`.

    Raises:
        UserInputError: bad data or config for this data, an existing fit in ``output`` without
            ``resume``, nothing to resume, a damaged checkpoint or a changed config on resume.
    """
    t_total = time.perf_counter()
    tcfg = cfg.training
    timings: dict[str, float] = dict.fromkeys(
        ("data", "compile_train_step", "compile_eval", "train", "validation"), 0.0
    )
    out = Path(cfg.output)
    ckpt_path = out / CHECKPOINT_NAME
    cfg_json = _config_json(cfg)

    ckpt: dict[str, Any] | None = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        diffs = _config_differences(json.loads(ckpt["config"]), cfg_json)
        if diffs:
            raise UserInputError(
                f"cannot resume {ckpt_path}: the config differs from the interrupted fit's "
                f"({'; '.join(diffs)}); resume with the same config or use a new output folder"
            )
    elif ckpt_path.exists():
        raise UserInputError(
            f"{out} already holds a fit ({ckpt_path.name}); continue it with resume (--resume) "
            "or choose another output folder"
        )

    # --- data and normalisation -----------------------------------------------------------------
    t0 = time.perf_counter()
    data = load_dataset(cfg.data)
    messages = _check_labels(data, cfg)
    species = _elements(data.train)
    for split_name, items in (("valid", data.valid), ("test", data.test)):
        extra = sorted(set(_elements(items)) - set(species), key=lambda e: atomic_numbers[e])
        if extra:
            raise UserInputError(
                f"the {split_name} structures contain {extra}, which never occur in the training "
                f"structures ({species}); the model cannot learn them"
            )
    fingerprints = data.fingerprints()
    if ckpt is not None and json.loads(ckpt["fingerprints"]) != fingerprints:
        raise UserInputError(
            f"cannot resume {ckpt_path}: the data files changed since the fit started "
            "(dataset fingerprints differ); start a new fit"
        )
    offsets = reference_energies(cfg.data.reference_energies, data.train, species)
    shift, scale = energy_normalisation(data.train, offsets)
    spec = ModelSpec(
        config=cfg.model,
        species=tuple(species),
        offsets=tuple(float(offsets[e]) for e in species),
        energy_shift=shift,
        energy_scale=scale,
    )
    type_map = spec.type_map()
    train_loader = BatchLoader(
        data.train, spec.cutoff, type_map, batch_size=tcfg.batch_size, shuffle=True, seed=tcfg.seed
    )
    # Evaluation of the training split reuses the training loader's neighbour lists.
    eval_train = copy.copy(train_loader)
    eval_train.shuffle = False
    eval_loaders = {"train": eval_train}
    for name, items in (("valid", data.valid), ("test", data.test)):
        if items:
            eval_loaders[name] = BatchLoader(
                items, spec.cutoff, type_map, batch_size=tcfg.batch_size, shuffle=False
            )
    # One edges-per-atom ratio for all loaders, so that equal atom capacities give equal shapes
    # and the evaluation function compiles once for all splits (a larger ratio never overflows).
    ratio = max(loader.max_edges_per_atom for loader in (train_loader, *eval_loaders.values()))
    for loader in (train_loader, *eval_loaders.values()):
        loader.max_edges_per_atom = ratio
    timings["data"] = time.perf_counter() - t0

    # --- model, optimiser, compiled functions ---------------------------------------------------
    settings = LossSettings.from_config(tcfg.loss)
    two_epoch = tcfg.stage_two_epoch()
    settings_two = settings
    if tcfg.stage_two is not None:
        two = tcfg.stage_two
        settings_two = replace(
            settings,
            energy_weight=two.energy_weight,
            forces_weight=two.forces_weight,
            stress_weight=two.stress_weight,
        )
    any_stress = any(s.stress is not None for s in data.train + data.valid + data.test)
    predict_eval = make_predict(spec, stress=any_stress)
    params = init_params(spec, tcfg.seed)
    if ckpt is None and tcfg.standardize_features:
        # Per-element standardisation of the descriptors from the training data (deterministic;
        # on resume the trained values come from the checkpoint instead).
        tf = time.perf_counter()
        params = fit_feature_scaling(
            spec, params, (train_loader.make_batch(i)[0] for i in train_loader.index_batches(0))
        )
        timings["feature_scaling"] = time.perf_counter() - tf
    tx, step_fn = make_train_step(spec, tcfg)
    state = TrainState(params=params, ema=params, opt_state=tx.init(params))

    step_jit = jax.jit(step_fn)
    eval_jit = jax.jit(lambda p, g: predict_eval(p, g))
    compiled_steps: dict[tuple[int, ...], Any] = {}
    compiled_evals: dict[tuple[int, ...], Any] = {}

    def step_for(st: TrainState, graph: Any, targets: Any) -> Any:
        """The compiled step for this batch shape (compiled on first use, timed apart)."""
        shape = _shape_key(graph)
        fn = compiled_steps.get(shape)
        if fn is None:
            tc = time.perf_counter()
            fn = step_jit.lower(
                st, graph, targets, np.float64(0.0), np.int64(0), settings.weights()
            ).compile()
            timings["compile_train_step"] += time.perf_counter() - tc
            compiled_steps[shape] = fn
        return fn

    def predict(p: Any, graph: Any) -> Any:
        shape = _shape_key(graph)
        fn = compiled_evals.get(shape)
        if fn is None:
            tc = time.perf_counter()
            fn = eval_jit.lower(p, graph).compile()
            timings["compile_eval"] += time.perf_counter() - tc
            compiled_evals[shape] = fn
        return fn(p, graph)

    def evaluate(
        p: Any, split: str, parity: dict[str, Any] | None = None
    ) -> dict[str, dict[str, float]]:
        loader = eval_loaders[split]
        acc = MetricAccumulator(species=species)
        for idx in loader.index_batches(0):
            graph, targets = loader.make_batch(idx)
            pred = predict(p, graph)
            e, f = np.asarray(pred.energy), np.asarray(pred.forces)
            s = None if pred.stress is None else np.asarray(pred.stress)
            labels = [loader.structures[i].config_type for i in idx]
            acc.update(e, f, s, graph, targets, config_types=labels)
            if parity is not None:
                _collect_parity(parity, e, f, s, graph, targets)
        return acc.result()

    # --- state: fresh or from the checkpoint ----------------------------------------------------
    steps_per_epoch = len(train_loader)
    total_steps = tcfg.max_epochs * steps_per_epoch
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    epoch, step, batch_in_epoch = 0, 0, 0
    partial = np.zeros(4)  # running sums of the mean-over-members loss terms in this epoch
    partial_n = 0
    plateau = PlateauState()
    best_value, best_epoch, bad = math.inf, None, 0
    best_params: Any = None
    best_stage = 1  # the loss stage best_value was measured in
    history: list[dict[str, Any]] = []
    finished, stopped_early = False, False
    wall_before = 0.0
    if ckpt is not None:
        tree = restore_tree(
            {"params": state.params, "ema": state.ema, "opt_state": state.opt_state},
            ckpt["state"],
            "parameters/optimiser state",
            ckpt_path,
        )
        state = TrainState(
            jax.device_put(tree["params"]),
            jax.device_put(tree["ema"]),
            jax.device_put(tree["opt_state"]),
        )
        if "best_params" in ckpt:
            best_params = restore_tree(params, ckpt["best_params"], "best parameters", ckpt_path)
        t = ckpt["trainer"]
        epoch, step, batch_in_epoch = int(t["epoch"]), int(t["step"]), int(t["batch_in_epoch"])
        partial, partial_n = np.array(t["partial"], dtype=np.float64), int(t["partial_n"])
        plateau = PlateauState.from_dict(t["plateau"])
        best_value = float(t["best_value"])
        best_epoch = None if int(t["best_epoch"]) < 0 else int(t["best_epoch"])
        bad = int(t["bad"])
        best_stage = int(t.get("best_stage", 1))
        finished, stopped_early = bool(t["finished"]), bool(t["stopped_early"])
        wall_before = float(t["wall_s"])
        history = json.loads(ckpt["history"])
        messages.append(
            f"resumed from {ckpt_path} at epoch {epoch}, step {step} (batch {batch_in_epoch} of "
            "that epoch)"
        )
    out.mkdir(parents=True, exist_ok=True)
    csv_log = MetricsCSV(out / "metrics.csv", history)
    t_session = time.perf_counter()

    def checkpoint(finished_now: bool = False) -> None:
        payload: dict[str, Any] = {
            "config": json.dumps(cfg_json, sort_keys=True),
            "fingerprints": json.dumps(fingerprints, sort_keys=True),
            "splits": {
                name: np.array([s.index for s in items], dtype=np.int64)
                for name, items in (
                    ("train", data.train),
                    ("valid", data.valid),
                    ("test", data.test),
                )
            },
            "state": serialization.to_state_dict(
                {"params": state.params, "ema": state.ema, "opt_state": state.opt_state}
            ),
            "history": json.dumps(history),
            "trainer": {
                "epoch": epoch,
                "step": step,
                "batch_in_epoch": batch_in_epoch,
                "partial": np.asarray(partial, dtype=np.float64),
                "partial_n": partial_n,
                "plateau": plateau.to_dict(),
                "best_value": best_value,
                "best_epoch": -1 if best_epoch is None else best_epoch,
                "bad": bad,
                "best_stage": best_stage,
                "finished": finished_now,
                "stopped_early": stopped_early,
                "wall_s": wall_before + time.perf_counter() - t_session,
            },
        }
        if best_params is not None:
            payload["best_params"] = serialization.to_state_dict(best_params)
        save_checkpoint(ckpt_path, payload)

    # --- the loop -------------------------------------------------------------------------------
    step_times: list[float] = []
    n_trained = 0
    last_ckpt = time.perf_counter()
    eval_params = state.ema
    bar = _Progress(progress and not finished, total_steps, step)
    has_valid = "valid" in eval_loaders
    try:
        while not finished:
            batches = train_loader.index_batches(epoch)
            stage = 2 if two_epoch is not None and epoch >= two_epoch else 1
            loss_now = settings_two if stage == 2 else settings
            weights = loss_now.weights()
            lr = 0.0
            for b in range(batch_in_epoch, len(batches)):
                if step >= total_steps:
                    break
                graph, targets = train_loader.make_batch(batches[b])
                lr = learning_rate(
                    tcfg.schedule,
                    tcfg.optimizer.learning_rate,
                    step,
                    steps_per_epoch,
                    total_steps,
                    plateau,
                )
                fn = step_for(state, graph, targets)
                ts = time.perf_counter()
                state, parts = fn(state, graph, targets, np.float64(lr), np.int64(step), weights)
                parts = np.asarray(parts)  # blocks: the step time is real
                step_times.append(time.perf_counter() - ts)
                if not np.all(np.isfinite(parts)):
                    raise UserInputError(
                        f"the training loss became {parts[0]} at step {step} (epoch {epoch + 1}); "
                        "lower optimizer.learning_rate or set training.clip_grad_norm"
                    )
                partial = partial + parts.mean(axis=1)
                partial_n += 1
                step += 1
                batch_in_epoch = b + 1
                n_trained += int(len(batches[b]))
                bar.update(completed=step, description=f"epoch {epoch + 1}/{tcfg.max_epochs}")
                secs = tcfg.checkpoint.every_seconds
                if secs is not None and time.perf_counter() - last_ckpt >= secs:
                    checkpoint()
                    last_ckpt = time.perf_counter()
            epoch_done = batch_in_epoch >= len(batches)
            out_of_steps = step >= total_steps
            if epoch_done:
                epoch += 1
                batch_in_epoch = 0
            row: dict[str, Any] = {
                # Fractional when max_steps ends the fit inside an epoch.
                "epoch": epoch
                if epoch_done or not batches
                else round(epoch + batch_in_epoch / len(batches), 4),
                "step": step,
                "wall_s": wall_before + time.perf_counter() - t_session,
                "learning_rate": lr,
                "loss_stage": stage,
            }
            if partial_n:
                means = partial / partial_n
                row.update(
                    train_loss=float(means[0]),
                    train_energy_loss=float(means[1]),
                    train_forces_loss=float(means[2]),
                    train_stress_loss=float(means[3]) if settings.stress_weight > 0 else None,
                )
            partial, partial_n = np.zeros(4), 0
            last = epoch >= tcfg.max_epochs or out_of_steps
            eval_params = state.ema
            if has_valid and (epoch % tcfg.validation_interval == 0 or last):
                tv, cv = time.perf_counter(), timings["compile_eval"]
                vm = evaluate(eval_params, "valid")["overall"]
                if stage != best_stage:
                    # A loss with other weights is another scale: choose the best model, and
                    # count patience, among the new stage's epochs only.
                    best_value, bad, best_stage = math.inf, 0, stage
                    plateau = replace(plateau, best=math.inf, bad=0)
                # Compilation is reported on its own, not as validation time.
                timings["validation"] += time.perf_counter() - tv - (timings["compile_eval"] - cv)
                value = metric_value(tcfg.metric, vm, loss_now)
                row.update(valid_loss=metric_value("loss", vm, loss_now))
                for key in (
                    "energy_mae",
                    "energy_rmse",
                    "forces_mae",
                    "forces_rmse",
                    "stress_mae",
                    "stress_rmse",
                ):
                    if key in vm:
                        row[f"valid_{key}"] = vm[key]
                if value < best_value - tcfg.early_stopping.min_delta:
                    best_value, best_epoch, bad = value, epoch, 0
                    if tcfg.keep_best:
                        best_params = _to_host(eval_params)
                else:
                    bad += 1
                plateau, _ = plateau_update(
                    plateau, value, tcfg.schedule, tcfg.optimizer.learning_rate
                )
                es = tcfg.early_stopping
                if es.enabled and bad >= es.patience and epoch >= es.min_epochs:
                    stopped_early = True
                    messages.append(
                        f"early stopping after epoch {epoch}: validation {tcfg.metric} did not "
                        f"improve for {bad} validations (best {best_value:.6g} at epoch "
                        f"{best_epoch})"
                    )
                bar.update(
                    metrics=f"valid E {vm.get('energy_mae', float('nan')):.3g} meV/atom  "
                    f"F {vm.get('forces_mae', float('nan')):.3g} eV/Å"
                )
            history.append(row)
            finished = last or stopped_early
            if finished:
                checkpoint(finished_now=True)
                last_ckpt = time.perf_counter()
            elif (
                tcfg.checkpoint.every_epochs is not None
                and (epoch % tcfg.checkpoint.every_epochs == 0)
                or (
                    tcfg.checkpoint.every_seconds is not None
                    and time.perf_counter() - last_ckpt >= tcfg.checkpoint.every_seconds
                )
            ):
                checkpoint()
                last_ckpt = time.perf_counter()
            csv_log.append(row)
            if on_epoch_end is not None:
                on_epoch_end(dict(row))
    finally:
        bar.close()
    timings["train"] = float(sum(step_times))

    # --- final model and evaluation -------------------------------------------------------------
    use_best = tcfg.keep_best and best_params is not None
    final_params = best_params if use_best else _to_host(state.ema)
    refit = None
    if tcfg.refit is not None:
        final_params, refit = _refit(spec, final_params, tcfg.refit, eval_loaders, any_stress)
        timings["refit"] = refit["seconds"]
        messages.append(_refit_message(refit))
    metadata = {
        "name": cfg.name,
        "fit_config": cfg_json,
        "dataset_fingerprints": fingerprints,
        "epochs": epoch,
        "steps": step,
        "best_epoch": best_epoch if use_best else None,
    }
    if refit is not None:
        metadata["refit"] = refit
    model_path = out / MODEL_NAME
    potential = Potential(
        spec=spec, params=final_params, fingerprint=fingerprints["train"], metadata=metadata
    )
    potential.save(model_path)

    tf, cf = time.perf_counter(), timings["compile_eval"]
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    parity: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    final_device = jax.device_put(final_params)
    for split in eval_loaders:
        buf: dict[str, list[Any]] = {}
        metrics[split] = evaluate(final_device, split, parity=buf)
        parity[split] = {
            q: (np.concatenate(buf[q + "_ref"]), np.concatenate(buf[q + "_pred"]))
            for q in ("energy", "forces", "stress")
            if buf.get(q + "_ref")
        }
    timings["final_evaluation"] = time.perf_counter() - tf - (timings["compile_eval"] - cf)
    artifacts = {"model": str(model_path), "metrics_csv": str(out / "metrics.csv")}
    if ckpt_path.exists():
        artifacts["checkpoint"] = str(ckpt_path)
    if tcfg.plots:
        artifacts.update(parity_plots(parity, metrics, out))
        artifacts.update(learning_curve(history, out))

    timings["step_time_median"] = float(np.median(step_times)) if step_times else 0.0
    timings["structures_per_s"] = n_trained / timings["train"] if timings["train"] > 0 else 0.0
    timings["total"] = time.perf_counter() - t_total
    normalisation = {
        "offsets_ev_per_atom": dict(zip(species, spec.offsets, strict=True)),
        "energy_shift_ev_per_atom": shift,
        "energy_scale": scale,
    }
    result = FitResult(
        model_path=model_path,
        output_dir=out,
        metrics=metrics,
        timings=timings,
        history=history,
        artifacts=artifacts,
        best_epoch=best_epoch if use_best else None,
        epochs_completed=epoch,
        steps=step,
        stopped_early=stopped_early,
        n_parameters=_n_params(final_params),
        normalisation=normalisation,
        messages=messages,
        refit=refit,
    )
    results_path = out / "results.json"
    atomic_write_text(results_path, json.dumps(result_summary(result), indent=2) + "\n")
    result.artifacts["results_json"] = str(results_path)
    return result


def _refit(
    spec: ModelSpec,
    params: Any,
    rcfg: Any,
    loaders: dict[str, BatchLoader],
    any_stress: bool,
) -> tuple[Any, dict[str, Any]]:
    """``training.refit`` on the final parameters (training split; ridge chosen on validation)."""

    def batches(loader: BatchLoader) -> Callable[[], Any]:
        return lambda: (loader.make_batch(idx) for idx in loader.index_batches(0))

    data = RefitData(
        train=batches(loaders["train"]),
        valid=batches(loaders["valid"]) if "valid" in loaders else None,
        weights=np.array([rcfg.energy_weight, rcfg.forces_weight, rcfg.stress_weight]),
        ridge=rcfg.ridge,
        stress=any_stress and rcfg.stress_weight > 0,
    )
    params, summary = refit_readout(spec, jax.device_put(params), data)
    return _to_host(params), summary


def _refit_message(summary: dict[str, Any]) -> str:
    parts = []
    for m in summary["members"]:
        if m["ridge"] is None:
            parts.append("kept the trained values (no ridge lowered the validation loss)")
            continue
        text = f"ridge {m['ridge']:g}: training loss {m['train_loss_before']:.4g} -> "
        text += f"{m['train_loss_after']:.4g}"
        if "valid_loss_before" in m:
            text += f", validation {m['valid_loss_before']:.4g} -> {m['valid_loss_after']:.4g}"
        parts.append(text)
    n = summary["members"][0]["n_parameters"]
    return f"readout refit ({n} parameters per member, {summary['seconds']:.0f} s): " + "; ".join(
        parts
    )


def _collect_parity(
    buf: dict[str, list[Any]],
    e: np.ndarray,
    f: np.ndarray,
    s: np.ndarray | None,
    graph: Any,
    targets: Any,
) -> None:
    """Append reference/predicted values of real, labelled entries (ensemble mean): energy in
    eV/atom, force components in eV/Å, stress components in GPa."""
    smask = np.asarray(graph.structure_mask, dtype=bool)
    n_at = np.maximum(np.asarray(graph.n_atoms, dtype=np.float64), 1.0)
    m_e = smask & np.asarray(targets.has_energy, dtype=bool)
    buf.setdefault("energy_ref", []).append((np.asarray(targets.energy) / n_at)[m_e])
    buf.setdefault("energy_pred", []).append((e.mean(axis=0) / n_at)[m_e])
    structure = np.asarray(graph.structure)
    m_f = (
        np.asarray(graph.atom_mask, dtype=bool)
        & np.asarray(targets.has_forces, dtype=bool)[structure]
        & smask[structure]
    )
    buf.setdefault("forces_ref", []).append(np.asarray(targets.forces)[m_f].ravel())
    buf.setdefault("forces_pred", []).append(f.mean(axis=0)[m_f].ravel())
    if s is not None:
        m_s = smask & np.asarray(targets.has_stress, dtype=bool)
        buf.setdefault("stress_ref", []).append(
            EV_PER_A3_TO_GPA * np.asarray(targets.stress)[m_s].ravel()
        )
        buf.setdefault("stress_pred", []).append(EV_PER_A3_TO_GPA * s.mean(axis=0)[m_s].ravel())


def result_summary(result: FitResult) -> dict[str, Any]:
    """JSON-ready summary of a :class:`FitResult` (what ``results.json`` and the report hold)."""

    def finite(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, list):
            return [finite(v) for v in x]
        return x

    return finite(
        {
            "model": str(result.model_path),
            "units": {
                "energy": "meV/atom",
                "forces": "eV/Å per component",
                "stress": "GPa per component",
            },
            "metrics": result.metrics,
            "best_epoch": result.best_epoch,
            "epochs_completed": result.epochs_completed,
            "steps": result.steps,
            "stopped_early": result.stopped_early,
            "n_parameters": result.n_parameters,
            "normalisation": result.normalisation,
            "refit": result.refit,
            "timings_s": result.timings,
            "messages": result.messages,
        }
    )
