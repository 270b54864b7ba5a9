"""On-the-fly MD monitors: ``f(state, graph, prediction) -> (value, triggered)`` evaluated every
``monitoring.interval`` steps inside the compiled MD loop (and on the host for ASE drivers).

A :class:`Monitor` bundles the hook with its threshold and, optionally, its own arrays
(``params``: e.g. a descriptor mean and inverse covariance for a Mahalanobis monitor, or hull
facets). Those arrays are passed to the hook as a leading argument so they are traced inputs of
the compiled loop, not constants baked into it: the hook is called as
``monitor.fn(monitor.params, state, graph, prediction)``.

Registry: :func:`register_monitor` maps a config ``kind`` to a factory
``factory(cfg, ctx: MonitorContext) -> Monitor``. The uncertainty work plugs in ensemble-σ,
Mahalanobis, γ and hull monitors the same way: the context carries the loaded potential (for
descriptors and ensemble members), and a monitor that needs per-member forces sets
``needs_members`` so the engine evaluates the full ensemble prediction on monitor steps.

Flagging policy (:func:`update_flags`): a monitor *triggers* whenever its hook says so. A frame
is *flagged* (written to ``flagged.extxyz``) when some armed monitor triggers and no frame was
flagged within the last ``cooldown_steps`` steps. A monitor that flagged is disarmed and re-arms
only once its value drops below ``hysteresis × threshold``, so one long excursion yields one
flagged frame rather than one per interval.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ase import units

jax.config.update("jax_enable_x64", True)

Array = Any


class Prediction(NamedTuple):
    """What monitors see of the potential at the current step (same fields as the model's
    ``Prediction``, so a model prediction can be passed as is).

    Attributes (shapes):
        energy: (K, B) energies of the K ensemble members, eV.
        forces: (K, N, 3) per-member forces when a monitor ``needs_members``; otherwise (1, N, 3)
            holding the ensemble-mean force that drives the dynamics, eV/Å.
        stress: (K or 1, B, 3, 3) eV/Å³, or None.
        atom_energy: (K, N) per-atom energies, or None when the engine has none.
    """

    energy: Array
    forces: Array
    stress: Array | None
    atom_energy: Array | None


MonitorFn = Callable[[Any, Any, Any, Prediction], tuple[Array, Array]]
"""``fn(params, state, graph, prediction) -> (value (), triggered ())``."""


@dataclass(frozen=True)
class Monitor:
    """One monitor.

    Attributes:
        name: label used in reports and in ``atoms.info`` of flagged frames (``monitor_<name>``).
        fn: the hook, ``fn(params, state, graph, prediction) -> (value, triggered)``; must be
            jit-compatible (jax.numpy) and also accept numpy inputs for host evaluation.
        threshold: value scale used for hysteresis re-arming.
        params: pytree of the monitor's own arrays (or None).
        unit: unit of ``value``.
        needs_members: evaluate with per-member ensemble forces (an extra backward pass on
            monitor steps only).
        needs_graph: the hook reads ``graph`` (host drivers then build one for it).
    """

    name: str
    fn: MonitorFn
    threshold: float
    params: Any = None
    unit: str = ""
    needs_members: bool = False
    needs_graph: bool = False


@dataclass(frozen=True)
class MonitorContext:
    """What a factory may need to build a monitor.

    Attributes:
        n_atoms: atoms in the simulated structure.
        n_dof: kinetic degrees of freedom (temperature).
        potential: the loaded ``Potential`` when running a model, else None.
        extra: free-form settings for future monitors.
    """

    n_atoms: int
    n_dof: int
    potential: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, Callable[[Any, MonitorContext], Monitor]] = {}


def register_monitor(kind: str) -> Callable:
    """Decorator: ``@register_monitor("mahalanobis") def make(cfg, ctx) -> Monitor``."""

    def deco(factory: Callable[[Any, MonitorContext], Monitor]) -> Callable:
        if kind in _REGISTRY:
            raise ValueError(f"monitor kind {kind!r} is already registered")
        _REGISTRY[kind] = factory
        return factory

    return deco


def registered_kinds() -> list[str]:
    return sorted(_REGISTRY)


def build_monitors(configs: Sequence[Any], ctx: MonitorContext) -> list[Monitor]:
    """Monitors for a list of monitor configs (each with a ``kind``); names are made unique."""
    from mlipctl.errors import UserInputError

    out: list[Monitor] = []
    seen: dict[str, int] = {}
    for cfg in configs:
        try:
            factory = _REGISTRY[cfg.kind]
        except KeyError:
            raise UserInputError(
                f"unknown monitor kind {cfg.kind!r}; known: {', '.join(registered_kinds())}"
            ) from None
        mon = factory(cfg, ctx)
        count = seen.get(mon.name, 0)
        seen[mon.name] = count + 1
        if count:
            mon = Monitor(**{**mon.__dict__, "name": f"{mon.name}_{count + 1}"})
        out.append(mon)
    return out


def _max_force(params: Any, state: Any, graph: Any, prediction: Prediction):
    f = jnp.asarray(prediction.forces)
    value = jnp.sqrt(jnp.max(jnp.sum(f * f, axis=-1)))
    return value, value > params["threshold"]


def _temperature(params: Any, state: Any, graph: Any, prediction: Prediction):
    v = jnp.asarray(state.velocities)
    m = jnp.asarray(state.masses)
    value = jnp.sum(m[:, None] * v * v) / (params["n_dof"] * units.kB)
    return value, value > params["threshold"]


def max_force_monitor(threshold: float) -> Monitor:
    """Largest atomic force magnitude (over ensemble members when they are given), eV/Å."""
    return Monitor(
        name="max_force",
        fn=_max_force,
        threshold=float(threshold),
        params={"threshold": jnp.asarray(float(threshold))},
        unit="eV/Å",
    )


def temperature_monitor(threshold_k: float, n_dof: int) -> Monitor:
    """Instantaneous kinetic temperature, K."""
    return Monitor(
        name="temperature",
        fn=_temperature,
        threshold=float(threshold_k),
        params={"threshold": jnp.asarray(float(threshold_k)), "n_dof": jnp.asarray(float(n_dof))},
        unit="K",
    )


@register_monitor("max_force")
def _make_max_force(cfg: Any, ctx: MonitorContext) -> Monitor:
    return max_force_monitor(cfg.threshold)


@register_monitor("temperature")
def _make_temperature(cfg: Any, ctx: MonitorContext) -> Monitor:
    return temperature_monitor(cfg.threshold_k, ctx.n_dof)


class FlagState(NamedTuple):
    """Trigger bookkeeping carried through the MD loop (M monitors).

    Attributes (shapes):
        armed: (M,) bool, may flag a frame.
        last_flag_step: () int64 step of the last flagged frame (-1: none yet).
        first_trigger_step: (M,) int64 first step the monitor triggered (-1: never).
        n_triggered: (M,) int64 evaluations that triggered.
        n_flagged: (M,) int64 flagged frames this monitor took part in.
        n_frames: () int64 flagged frames.
        max_value: (M,) float64 largest value seen (-inf: none).
    """

    armed: Array
    last_flag_step: Array
    first_trigger_step: Array
    n_triggered: Array
    n_flagged: Array
    n_frames: Array
    max_value: Array


def initial_flags(n_monitors: int) -> FlagState:
    return FlagState(
        armed=np.ones(n_monitors, bool),
        last_flag_step=np.asarray(-1, np.int64),
        first_trigger_step=np.full(n_monitors, -1, np.int64),
        n_triggered=np.zeros(n_monitors, np.int64),
        n_flagged=np.zeros(n_monitors, np.int64),
        n_frames=np.asarray(0, np.int64),
        max_value=np.full(n_monitors, -np.inf),
    )


def update_flags(
    flags: FlagState,
    step: Array,
    values: Array,
    triggered: Array,
    thresholds: Array,
    *,
    hysteresis: float,
    cooldown_steps: int,
    xp: Any = jnp,
) -> tuple[FlagState, Array, Array]:
    """Apply one monitor evaluation at ``step``.

    Args:
        flags: bookkeeping before the evaluation.
        step: () current step.
        values: (M,) monitor values.
        triggered: (M,) bool hook verdicts.
        thresholds: (M,) thresholds (re-arm below ``hysteresis × threshold``).
        hysteresis: in (0, 1].
        cooldown_steps: no frame is flagged within this many steps after a flagged frame.
        xp: ``jax.numpy`` (in the compiled loop) or ``numpy`` (host drivers).

    Returns:
        ``(new_flags, frame_flagged (), flagged_by (M,) bool)``.
    """
    step = xp.asarray(step, dtype=xp.int64)
    triggered = xp.asarray(triggered, dtype=bool)
    values = xp.asarray(values, dtype=xp.float64)
    cooled = (flags.last_flag_step < 0) | (step - flags.last_flag_step > cooldown_steps)
    flagged_by = triggered & flags.armed & cooled
    frame = xp.any(flagged_by)
    armed = (flags.armed & ~flagged_by) | (values < hysteresis * xp.asarray(thresholds))
    new = FlagState(
        armed=armed,
        last_flag_step=xp.where(frame, step, flags.last_flag_step),
        first_trigger_step=xp.where(
            (flags.first_trigger_step < 0) & triggered, step, flags.first_trigger_step
        ),
        n_triggered=flags.n_triggered + triggered.astype(xp.int64),
        n_flagged=flags.n_flagged + flagged_by.astype(xp.int64),
        n_frames=flags.n_frames + frame.astype(xp.int64),
        max_value=xp.where(values > flags.max_value, values, flags.max_value),
    )
    return new, frame, flagged_by


def evaluate_monitors(
    monitors: Sequence[Monitor],
    params: Sequence[Any],
    state: Any,
    graph: Any,
    prediction: Prediction,
    members: Prediction | None = None,
) -> tuple[Array, Array]:
    """Values (M,) and verdicts (M,) of all monitors (jax.numpy; works in and out of jit)."""
    if not monitors:
        return jnp.zeros(0, jnp.float64), jnp.zeros(0, bool)
    vals, trig = [], []
    for mon, p in zip(monitors, params, strict=True):
        pred = members if (mon.needs_members and members is not None) else prediction
        v, t = mon.fn(p, state, graph, pred)
        vals.append(jnp.asarray(v, jnp.float64).reshape(()))
        trig.append(jnp.asarray(t, bool).reshape(()))
    return jnp.stack(vals), jnp.stack(trig)


# --------------------------------------------------------------------------------------------
# Uncertainty monitors: calibrated ensemble spread and domain of applicability
# --------------------------------------------------------------------------------------------
# Each hook reads the model's own parameters from its ``params`` (traced, never baked in) and
# computes what it needs from ``graph``: per-member forces, or the model's descriptors. The
# hooks are built once per ModelSpec (``functools.lru_cache``) so that the MD engine's cache of
# compiled loops, keyed by the hook functions, is reused across runs of the same model.
# Definitions match :func:`mlipctl.engines.uncertainty.frame_scores` on the host.


def _require_model(kind: str, ctx: MonitorContext) -> Any:
    from mlipctl.errors import UserInputError

    if ctx.potential is None:
        raise UserInputError(
            f"monitor {kind!r} needs an mlipctl model (calculator kind: mlip); reference "
            "calculators have no ensemble or descriptors"
        )
    return ctx.potential


def _real_max(values: Array, graph: Any) -> Array:
    """Largest per-atom value over the real atoms of the graph."""
    mask = jnp.asarray(graph.atom_mask)
    return jnp.max(jnp.where(mask, values, -jnp.inf))


@functools.lru_cache(maxsize=16)
def _ensemble_force_std_fn(spec: Any) -> MonitorFn:
    from mlipctl.model.potential import make_predict

    members = make_predict(spec, stress=False)

    def fn(params: Any, state: Any, graph: Any, prediction: Prediction):
        f = members(params["model"], graph).forces  # (K, N, 3)
        sd = jnp.std(f, axis=0, ddof=1)
        value = params["scale"] * _real_max(jnp.sqrt(jnp.sum(sd * sd, axis=-1)), graph)
        return value, value > params["threshold"]

    return fn


def _ensemble_energy_std(params: Any, state: Any, graph: Any, prediction: Prediction):
    e = jnp.asarray(prediction.energy)[:, 0]  # (K,) members' energies of the one structure
    value = params["scale"] * jnp.std(e, ddof=1) / params["n_atoms"]
    return value, value > params["threshold"]


@functools.lru_cache(maxsize=48)
def _domain_fn(spec: Any, kind: str) -> MonitorFn:
    from mlipctl.model.potential import make_descriptors
    from mlipctl.uncertainty.domain import jax_gamma, jax_hull_excess, jax_mahalanobis

    descriptors = make_descriptors(spec)
    score = {"mahalanobis": jax_mahalanobis, "gamma": jax_gamma, "hull": jax_hull_excess}[kind]

    def fn(params: Any, state: Any, graph: Any, prediction: Prediction):
        desc = descriptors(params["model"], graph)
        species = jnp.asarray(graph.species)
        v = score(params["domain"], desc, species)
        if kind == "mahalanobis":  # d² over the per-species threshold: > 1 is an alarm
            v = v / params["d2_threshold"][species]
        value = _real_max(v, graph)
        return value, value > params["threshold"]

    return fn


def _domain_params(kind: str, cfg: Any, ctx: MonitorContext) -> tuple[Any, Any]:
    """(potential, domain model) for a domain monitor, checked against each other."""
    from mlipctl.engines.uncertainty import load_domain
    from mlipctl.errors import UserInputError

    pot = _require_model(kind, ctx)
    domain = load_domain(cfg.domain_model, pot)
    if kind == "hull":
        counts = np.diff(domain.hull_equation_offsets)
        bad = [
            pot.spec.species[s]
            for s in range(domain.n_species)
            if domain.fitted[s] and not counts[s]
        ]
        if bad:
            raise UserInputError(
                f"domain model {cfg.domain_model} has no hull facets for {bad} (hull_pca_dim "
                "> 6 or degenerate training data); refit with a smaller domain.hull_pca_dim"
            )
    if kind == "gamma" and not bool(np.all(domain.gamma_available[domain.fitted])):
        raise UserInputError(
            f"domain model {cfg.domain_model} has no γ active set; refit with domain.gamma: true"
        )
    return pot, domain


def _in_model_dtype(pot: Any, arrays: dict[str, np.ndarray]) -> dict[str, Array]:
    """Float arrays in the model's dtype: the (N, D) x (D, D) products of the Mahalanobis and γ
    monitors then run in float32 for float32 models, half the cost of float64 on CPU (for the
    default architecture, D = 593, they dominate an evaluation) at ~1e-7 relative error."""
    dtype = jnp.float32 if pot.spec.config.dtype == "float32" else jnp.float64
    return {
        k: jnp.asarray(v, dtype) if np.issubdtype(v.dtype, np.floating) else jnp.asarray(v)
        for k, v in arrays.items()
    }


@register_monitor("ensemble_std")
def _make_ensemble_std(cfg: Any, ctx: MonitorContext) -> Monitor:
    from mlipctl.errors import UserInputError

    pot = _require_model("ensemble_std", ctx)
    if pot.spec.n_members < 2:
        raise UserInputError(
            "monitor 'ensemble_std' needs an ensemble (model.ensemble kind deep or shallow with "
            "size >= 2); this model is a single potential"
        )
    scale = float(pot.calibration.get(cfg.quantity, 1.0))
    base = {"scale": jnp.asarray(scale), "threshold": jnp.asarray(float(cfg.threshold))}
    if cfg.quantity == "forces":
        return Monitor(
            name="ensemble_std_forces",
            fn=_ensemble_force_std_fn(pot.spec),
            threshold=float(cfg.threshold),
            params={**base, "model": pot.params},
            unit="eV/Å",
            needs_graph=True,
        )
    return Monitor(
        name="ensemble_std_energy",
        fn=_ensemble_energy_std,
        threshold=float(cfg.threshold),
        params={**base, "n_atoms": jnp.asarray(float(ctx.n_atoms))},
        unit="eV/atom",
    )


@register_monitor("mahalanobis")
def _make_mahalanobis(cfg: Any, ctx: MonitorContext) -> Monitor:
    pot, domain = _domain_params("mahalanobis", cfg, ctx)
    jp = domain.jax_params()
    thr = domain.mahalanobis_thresholds(cfg.alpha, n_atoms=max(1, ctx.n_atoms), sidak=cfg.sidak)
    # Untrained species have d² = inf: give them threshold 1 so inf/1 alarms (not inf/0 = NaN).
    thr = np.where(domain.fitted, thr, 1.0)
    keys = ("fitted", "mean", "std", "whiten")
    return Monitor(
        name="mahalanobis",
        fn=_domain_fn(pot.spec, "mahalanobis"),
        threshold=1.0,
        params={
            "model": pot.params,
            "domain": _in_model_dtype(pot, {k: jp[k] for k in keys}),
            "d2_threshold": jnp.asarray(thr),
            "threshold": jnp.asarray(1.0),
        },
        unit="d²/threshold",
        needs_graph=True,
    )


@register_monitor("gamma")
def _make_gamma(cfg: Any, ctx: MonitorContext) -> Monitor:
    pot, domain = _domain_params("gamma", cfg, ctx)
    jp = domain.jax_params()
    return Monitor(
        name="gamma",
        fn=_domain_fn(pot.spec, "gamma"),
        threshold=float(cfg.threshold),
        params={
            "model": pot.params,
            "domain": _in_model_dtype(pot, {k: jp[k] for k in ("gamma_inv", "gamma_available")}),
            "threshold": jnp.asarray(float(cfg.threshold)),
        },
        unit="",
        needs_graph=True,
    )


@register_monitor("hull")
def _make_hull(cfg: Any, ctx: MonitorContext) -> Monitor:
    from mlipctl.uncertainty.domain import HULL_TOL

    pot, domain = _domain_params("hull", cfg, ctx)
    jp = domain.jax_params()
    keys = ("fitted", "mean", "std", "hull_components", "hull_equations", "hull_available")
    # The same round-off allowance as DomainModel.hull_inside, so both agree on "inside".
    threshold = float(cfg.tolerance) + HULL_TOL
    return Monitor(
        name="hull",
        fn=_domain_fn(pot.spec, "hull"),
        threshold=threshold,
        params={
            "model": pot.params,
            "domain": {k: jnp.asarray(jp[k]) for k in keys},
            "threshold": jnp.asarray(threshold),
        },
        unit="PCA units",
        needs_graph=True,
    )
