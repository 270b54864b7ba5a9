"""Exact least-squares refit of the readout's last linear layer after training.

The per-atom energy is linear in the parameters theta of the readout's last layer (the output
layer of the per-element MLP, its bias and the linear readout on the descriptor), and so are
forces and stress, its derivatives. With the rest of the network fixed, predictions are exactly

    pred(theta0 + delta) = pred(theta0) + A delta,   A = d pred / d theta (rows: labels),

and the weighted MSE over a whole split, sum_rows w (r - A delta)^2 with residuals r = label -
pred(theta0), is a quadratic in delta. Its normal equations (A^T W A, A^T W r, r^T W r) are
accumulated batch by batch; A's columns come from forward-mode derivatives (``jax.jvp``) of the
model's own prediction, so forces and stress stay derivatives of one energy. The training split
gives delta = (G + lambda s I)^-1 b (ridge towards the trained values, s the mean diagonal of
G), and the validation split's quadratic picks lambda.

Row weights follow the training loss (:func:`~mlipctl.training.loss.batch_loss`) summed over the
split instead of per batch: the term weight over the number of labels of that kind, times each
label's structure weight (config_type weights included). Energies are per atom, forces and
stress per component.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from mlipctl.config.model import EnsembleConfig
from mlipctl.data.graph import AtomsGraph, Targets
from mlipctl.errors import UserInputError
from mlipctl.model.potential import ModelSpec, make_predict
from mlipctl.training.loss import structure_weights

RIDGE_GRID = (1e-10, 1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
"""Relative ridge values tried when none is configured."""

# At most this many forward-mode directions per compiled call: bounds memory.
CHUNK = 64

Batch = tuple[AtomsGraph, Targets]


@dataclass
class NormalEquations:
    """Weighted least-squares sums of one split: G = A^T W A (P, P), b = A^T W r (P,),
    c = r^T W r."""

    gram: np.ndarray
    rhs: np.ndarray
    const: float

    def loss(self, delta: np.ndarray) -> float:
        """Weighted squared error after moving theta by ``delta`` (P,)."""
        return float(delta @ self.gram @ delta - 2.0 * self.rhs @ delta + self.const)


@dataclass
class RefitResult:
    """One member's refit: chosen ridge (None: kept the trained values) and weighted losses."""

    ridge: float | None
    train_loss: tuple[float, float]
    valid_loss: tuple[float, float] | None
    n_parameters: int

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ridge": self.ridge,
            "n_parameters": self.n_parameters,
            "train_loss_before": self.train_loss[0],
            "train_loss_after": self.train_loss[1],
        }
        if self.valid_loss is not None:
            out["valid_loss_before"], out["valid_loss_after"] = self.valid_loss
        return out


def readout_names(params: Any) -> list[str]:
    """Names of the readout's last-layer leaves: output kernel, its bias and ``linear``."""
    readout = params["params"]["readout"]
    last = max(int(k.split("_")[1]) for k in readout if k.startswith("kernel_"))
    return [n for n in (f"kernel_{last}", f"bias_{last}", "linear") if n in readout]


def _with_readout(params: Any, leaves: dict[str, Any]) -> Any:
    readout = {**params["params"]["readout"], **leaves}
    return {**params, "params": {**params["params"], "readout": readout}}


def _label_rows(graph: AtomsGraph, targets: Targets, stress: bool) -> tuple[np.ndarray, ...]:
    """Per row (energy per atom (B,), force components (3N,), stress components (9B,)): label,
    structure weight and kind (0, 1, 2); rows without a label have weight 0."""
    w_e, w_f, w_s = (np.asarray(w, np.float64) for w in structure_weights(graph, targets))
    n_at = np.maximum(np.asarray(graph.n_atoms), 1)
    labels = [np.asarray(targets.energy) / n_at, np.asarray(targets.forces).reshape(-1)]
    weights = [w_e, np.repeat(w_f, 3)]
    if stress:
        labels.append(np.asarray(targets.stress).reshape(-1))
        weights.append(np.repeat(w_s, 9))
    kinds = np.concatenate([np.full(len(x), k) for k, x in enumerate(labels)])
    return np.concatenate(labels), np.concatenate(weights), kinds


def _row_fn(spec: ModelSpec, stress: bool) -> Callable[[Any, AtomsGraph], jax.Array]:
    """``rows(params, graph)``: (R,) predictions in the order of :func:`_label_rows`."""
    predict = make_predict(spec, stress=stress)

    def rows(params: Any, graph: AtomsGraph) -> jax.Array:
        p = predict(params, graph)
        n_at = jnp.maximum(jnp.asarray(graph.n_atoms), 1)
        out = [p.energy[0] / n_at, p.forces[0].reshape(-1)]
        if stress:
            out.append(p.stress[0].reshape(-1))
        return jnp.concatenate(out)

    return rows


class _Linearisation:
    """Rows and their Jacobian with respect to the readout's last layer.

    Parameters are arguments of the compiled functions, so one compilation per batch shape
    serves every member of a deep ensemble.
    """

    def __init__(self, spec: ModelSpec, template: Any, stress: bool) -> None:
        self.names = readout_names(template)
        theta, self.unravel = ravel_pytree(self._leaves(template))
        self.size = int(theta.size)
        # Unit directions in equal chunks of at most CHUNK (fixed shape: one compilation),
        # padded with as few zero directions as possible.
        n_chunks = -(-self.size // CHUNK)
        chunk = -(-self.size // n_chunks)
        eye = np.eye(n_chunks * chunk, self.size, dtype=theta.dtype)
        self.bases = [jnp.asarray(eye[i * chunk : (i + 1) * chunk]) for i in range(n_chunks)]
        rows = _row_fn(spec, stress)

        def at(params: Any, theta: jax.Array, graph: AtomsGraph) -> jax.Array:
            return rows(self.with_theta(params, theta), graph)

        self.rows = jax.jit(at)
        # (chunk, R): the rows' derivatives along each direction of the chunk.
        self.directions = jax.jit(
            lambda params, theta, graph, tangents: jax.vmap(
                lambda t: jax.jvp(lambda x: at(params, x, graph), (theta,), (t,))[1]
            )(tangents)
        )

    def _leaves(self, params: Any) -> dict[str, Any]:
        return {n: params["params"]["readout"][n] for n in self.names}

    def theta(self, params: Any) -> jax.Array:
        """(P,) the last layer of ``params``, flattened."""
        return ravel_pytree(self._leaves(params))[0]

    def with_theta(self, params: Any, theta: jax.Array) -> Any:
        return _with_readout(params, self.unravel(theta))

    def jacobian(
        self, params: Any, theta: jax.Array, graph: AtomsGraph
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predictions (R,) and d rows / d theta (R, P) at ``theta``."""
        cols = [
            np.asarray(self.directions(params, theta, graph, b), np.float64) for b in self.bases
        ]
        jac = np.concatenate(cols)[: self.size].T
        return np.asarray(self.rows(params, theta, graph), np.float64), jac


def normal_equations(
    lin: _Linearisation,
    params: Any,
    batches: Iterable[Batch],
    weights: np.ndarray,
    stress: bool,
) -> NormalEquations:
    """Accumulate one split's least-squares sums for ``params``; ``weights`` (3,) are the term
    weights."""
    p = lin.size
    theta = lin.theta(params)
    # Per kind of label, since the term weight is divided by the split's count of that kind.
    gram, rhs, const = np.zeros((3, p, p)), np.zeros((3, p)), np.zeros(3)
    counts = np.zeros(3)
    for graph, targets in batches:
        label, w, kind = _label_rows(graph, targets, stress)
        pred, jac = lin.jacobian(params, theta, jax.device_put(graph))
        resid = label - pred
        for k in range(3):
            rows = (kind == k) & (w > 0)
            if not rows.any():
                continue
            weighted = jac[rows] * w[rows, None]
            gram[k] += weighted.T @ jac[rows]
            rhs[k] += weighted.T @ resid[rows]
            const[k] += float(w[rows] @ (resid[rows] * resid[rows]))
            counts[k] += rows.sum()
    scale = np.divide(weights, counts, out=np.zeros(3), where=counts > 0)
    return NormalEquations(np.einsum("k,kpq->pq", scale, gram), scale @ rhs, float(scale @ const))


def _solve(train: NormalEquations, ridge: float) -> np.ndarray:
    p = len(train.rhs)
    scale = max(float(np.trace(train.gram)) / p, np.finfo(float).tiny)
    return np.linalg.solve(train.gram + ridge * scale * np.eye(p), train.rhs)


@dataclass(frozen=True)
class RefitData:
    """What a refit solves for.

    Attributes:
        train, valid: callables giving a split's padded batches (valid may be None if ``ridge``
            is set).
        weights: (3,) energy, forces and stress term weights.
        ridge: relative ridge, or None to choose it on ``valid`` from :data:`RIDGE_GRID`.
        stress: include stress rows (the data has stress labels).
    """

    train: Callable[[], Iterable[Batch]]
    valid: Callable[[], Iterable[Batch]] | None
    weights: np.ndarray
    ridge: float | None
    stress: bool


def _refit_member(lin: _Linearisation, params: Any, data: RefitData) -> tuple[Any, RefitResult]:
    """Refit one model's (one member's) last layer.

    Returns the new parameters and a summary. Raises UserInputError if a configured ridge leaves
    the normal matrix singular.
    """
    eq_train = normal_equations(lin, params, data.train(), data.weights, data.stress)
    eq_valid = None
    if data.valid is not None:
        eq_valid = normal_equations(lin, params, data.valid(), data.weights, data.stress)
    zero = np.zeros(lin.size)
    if data.ridge is not None:
        best_ridge: float | None = data.ridge
        try:
            delta = _solve(eq_train, data.ridge)
        except np.linalg.LinAlgError:
            raise UserInputError(
                f"training.refit: the least-squares problem is singular at ridge {data.ridge}; "
                "set a larger training.refit.ridge"
            ) from None
    else:
        assert eq_valid is not None
        best_ridge, delta, best = None, zero, eq_valid.loss(zero)
        for lam in RIDGE_GRID:
            try:
                d = _solve(eq_train, lam)
            except np.linalg.LinAlgError:  # singular at this ridge: a larger one follows
                continue
            value = eq_valid.loss(d)
            if np.isfinite(value) and value < best:
                best_ridge, delta, best = lam, d, value
    theta0 = lin.theta(params)
    theta = (np.asarray(theta0, np.float64) + delta).astype(theta0.dtype)
    new = lin.with_theta(params, jnp.asarray(theta))
    result = RefitResult(
        ridge=best_ridge,
        train_loss=(eq_train.loss(zero), eq_train.loss(delta)),
        valid_loss=None if eq_valid is None else (eq_valid.loss(zero), eq_valid.loss(delta)),
        n_parameters=lin.size,
    )
    return new, result


def refit_readout(spec: ModelSpec, params: Any, data: RefitData) -> tuple[Any, dict[str, Any]]:
    """:func:`_refit_member` for every member of a single model or deep ensemble.

    Returns the new parameters (same tree as ``params``) and a JSON-able summary.
    """
    t0 = time.perf_counter()
    kind = spec.config.ensemble.kind
    if kind == "shallow":
        raise ValueError("a shallow ensemble's heads cannot be refitted (they would become equal)")
    single = dataclasses.replace(
        spec, config=spec.config.model_copy(update={"ensemble": EnsembleConfig()})
    )
    if kind == "none":
        lin = _Linearisation(single, params, data.stress)
        new, result = _refit_member(lin, params, data)
        members = [result]
    else:
        member_params = [
            jax.tree_util.tree_map(lambda x, m=m: x[m], params) for m in range(spec.n_members)
        ]
        lin = _Linearisation(single, member_params[0], data.stress)
        outs = [_refit_member(lin, p, data) for p in member_params]
        new = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *(o[0] for o in outs))
        members = [o[1] for o in outs]
    summary = {
        "weights": {
            k: float(v) for k, v in zip(("energy", "forces", "stress"), data.weights, strict=True)
        },
        "members": [m.to_dict() for m in members],
        "seconds": time.perf_counter() - t0,
    }
    return new, summary
