"""Potentials as pure functions of ``(params, AtomsGraph)``: energies, forces, stress, descriptors.

Forces and stress come only from ``jax.grad`` of the energy:

* forces F = -dE/dx (x: the graph's float64 positions);
* stress sigma = (1/V) dE/d(eps) at eps = 0, where a symmetric strain eps deforms positions and
  cell together, x' = x (I + eps), cell' = cell (I + eps) (rows are vectors), so every edge
  vector becomes r' = r (I + eps). This is ASE's sign convention (positive = tensile).

Edge vectors are formed in float64 and cast to the model dtype; per-atom energies are cast back to
float64 before the shift, the per-species offsets and the per-structure sum.

Ensembles (K members, leading axis of every output):

* ``none``: K = 1.
* ``deep``: every parameter leaf has a leading axis K; members are evaluated with ``jax.vmap``.
* ``shallow``: one descriptor and hidden layers, K output heads; forces of all heads come from
  one forward pass and K vector-Jacobian products (vmapped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_numbers

from mlipctl.config.model import ModelConfig
from mlipctl.data.graph import AtomsGraph
from mlipctl.errors import UserInputError
from mlipctl.model.moment import MomentModel

if TYPE_CHECKING:  # pragma: no cover
    from ase import Atoms
    from ase.calculators.calculator import Calculator

Array = jax.Array
PyTree = Any


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the parameters that defines a potential (hashable, JSON-able).

    Attributes:
        config: architecture, ensemble and dtype.
        species: element symbols; ``AtomsGraph.species`` indexes this tuple.
        offsets: per-species reference energy in eV, added in float64 to every atom.
        energy_shift: per-atom shift in eV of the learned part (``scale * out + shift``).
        energy_scale: per-atom scale in eV of the learned part.
    """

    config: ModelConfig
    species: tuple[str, ...]
    offsets: tuple[float, ...]
    energy_shift: float = 0.0
    energy_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.species:
            raise UserInputError("a model needs at least one species")
        unknown = [s for s in self.species if s not in atomic_numbers or s == "X"]
        if unknown:
            raise UserInputError(f"unknown element symbol(s) in model species: {unknown}")
        if len(set(self.species)) != len(self.species):
            raise UserInputError(f"duplicate species in {list(self.species)}")
        if len(self.offsets) != len(self.species):
            raise UserInputError(
                f"{len(self.offsets)} energy offsets for {len(self.species)} species"
            )
        values = [*self.offsets, self.energy_shift, self.energy_scale]
        if not all(math.isfinite(float(v)) for v in values):
            raise UserInputError(f"non-finite energy offset/shift/scale: {values}")
        if not self.energy_scale > 0:
            raise UserInputError(f"energy_scale must be > 0, got {self.energy_scale}")
        # Normalise types so equal specs hash equal whatever sequence types were passed in.
        object.__setattr__(self, "species", tuple(str(s) for s in self.species))
        object.__setattr__(self, "offsets", tuple(float(o) for o in self.offsets))
        object.__setattr__(self, "energy_shift", float(self.energy_shift))
        object.__setattr__(self, "energy_scale", float(self.energy_scale))

    @property
    def cutoff(self) -> float:
        """Neighbour cutoff in Å."""
        return float(self.config.architecture.cutoff)

    @property
    def n_members(self) -> int:
        """Ensemble size K (1 for ``none``)."""
        return int(self.config.ensemble.size)

    @property
    def n_species(self) -> int:
        return len(self.species)

    def type_map(self) -> dict[int, int]:
        """Atomic number -> species index."""
        return {atomic_numbers[s]: i for i, s in enumerate(self.species)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (inverse of :meth:`from_dict`)."""
        return {
            "config": self.config.model_dump(mode="json"),
            "species": list(self.species),
            "offsets": list(self.offsets),
            "energy_shift": self.energy_shift,
            "energy_scale": self.energy_scale,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Inverse of :meth:`to_dict`; raises pydantic ``ValidationError`` on a bad config."""
        config = dict(data["config"])
        arch = config.get("architecture")
        if isinstance(arch, Mapping) and arch.get("kind") == "moment":
            # Files written before the linear readout existed have no such parameters.
            config["architecture"] = {"linear_readout": False, **arch}
        return cls(
            config=ModelConfig.model_validate(config),
            species=tuple(data["species"]),
            offsets=tuple(float(x) for x in data["offsets"]),
            energy_shift=float(data.get("energy_shift", 0.0)),
            energy_scale=float(data.get("energy_scale", 1.0)),
        )


class Prediction(NamedTuple):
    """Outputs of :func:`make_predict` (K members, B structure slots, N atom slots).

    Attributes:
        energy: (K, B) float64 total energy per structure in eV (padding slots 0).
        forces: (K, N, 3) float64 -dE/dx in eV/Å (padding atoms 0).
        stress: (K, B, 3, 3) float64 (1/V) dE/d(eps) in eV/Å³ (ASE sign), or None if not
            requested. 0 for slots whose cell has zero volume (non-periodic, padding).
        atom_energy: (K, N) float64 per-atom energies incl. offsets (padding atoms 0).
    """

    energy: Array
    forces: Array
    stress: Array | None
    atom_energy: Array


# --- architecture dispatch -------------------------------------------------------------------


def _dtype(spec: ModelSpec) -> Any:
    return jnp.float64 if spec.config.dtype == "float64" else jnp.float32


def _heads(spec: ModelSpec) -> int:
    """Outputs per atom of one parameter set: K for shallow ensembles, else 1."""
    return spec.n_members if spec.config.ensemble.kind == "shallow" else 1


def _module(spec: ModelSpec) -> MomentModel:
    arch = spec.config.architecture
    if arch.kind == "moment":
        return MomentModel(
            config=arch, n_species=spec.n_species, n_out=_heads(spec), dtype=_dtype(spec)
        )
    raise UserInputError(f"unknown architecture kind {arch.kind!r}")  # pragma: no cover


def _dummy_inputs(spec: ModelSpec) -> tuple[Array, ...]:
    vectors = jnp.array([[1.0, 0.5, 0.25]], dtype=_dtype(spec))
    species = jnp.zeros(2, jnp.int32)
    neighbors = jnp.array([[0], [1]], jnp.int32)  # atom 0 sends edge 0; atom 1 none (1 = E)
    receivers = jnp.ones(1, jnp.int32)
    return vectors, species, neighbors, receivers, jnp.ones(1, bool), jnp.ones(2, bool)


def _init_single(spec: ModelSpec, key: Array) -> PyTree:
    return _module(spec).init(key, *_dummy_inputs(spec))


def init_params(spec: ModelSpec, seed: int) -> PyTree:
    """Random parameters (a nested dict of arrays in the model dtype).

    Member k of a deep ensemble is initialised from ``fold_in(PRNGKey(seed), k)`` and stacked on
    a leading axis K; ``none`` and ``shallow`` use member 0's key, so a single model with seed s
    equals member 0 of a deep ensemble with seed s.
    """
    base = jax.random.PRNGKey(int(seed))
    if spec.config.ensemble.kind != "deep":
        return _init_single(spec, jax.random.fold_in(base, 0))
    members = [_init_single(spec, jax.random.fold_in(base, k)) for k in range(spec.n_members)]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *members)


def param_shapes(spec: ModelSpec) -> PyTree:
    """``jax.ShapeDtypeStruct`` tree of :func:`init_params` (no arrays are allocated)."""
    return jax.eval_shape(lambda: init_params(spec, 0))


# --- pure functions of (params, graph) --------------------------------------------------------


def _edge_vectors(graph: AtomsGraph, positions: Array, strain: Array | None) -> Array:
    """(E, 3) float64 r_ij = x_j - x_i + S @ cell, strained by (I + eps) if given."""
    senders = jnp.asarray(graph.senders)
    cell = jnp.asarray(graph.cell, jnp.float64)[jnp.asarray(graph.structure)[senders]]
    shifts = jnp.asarray(graph.shifts, jnp.float64)
    vec = positions[jnp.asarray(graph.receivers)] - positions[senders]
    vec = vec + jnp.einsum("ea,eab->eb", shifts, cell)
    if strain is not None:
        sym = 0.5 * (strain + jnp.swapaxes(strain, -1, -2))
        deform = jnp.eye(3, dtype=jnp.float64) + sym[jnp.asarray(graph.structure)[senders]]
        vec = jnp.einsum("ea,eab->eb", vec, deform)
    return vec


def _apply(
    spec: ModelSpec, params: PyTree, graph: AtomsGraph, vectors: Array, method: Any = None
) -> Array:
    """The flax module (or one of its methods) on a graph's (E, 3) edge vectors."""
    return _module(spec).apply(
        params,
        vectors.astype(_dtype(spec)),
        jnp.asarray(graph.species),
        jnp.asarray(graph.neighbors),
        jnp.asarray(graph.receivers),
        jnp.asarray(graph.edge_mask),
        jnp.asarray(graph.atom_mask),
        method=method,
    )


def _atom_energies(spec: ModelSpec, params: PyTree, graph: AtomsGraph, vectors: Array) -> Array:
    """(k, N) float64 per-atom energies of one parameter set (k = heads), padding atoms 0."""
    species = jnp.asarray(graph.species)
    atom_mask = jnp.asarray(graph.atom_mask)
    out = _apply(spec, params, graph, vectors)  # (N, k)
    offsets = jnp.asarray(spec.offsets, jnp.float64)[species]
    energy = out.T.astype(jnp.float64) * spec.energy_scale + spec.energy_shift + offsets
    return jnp.where(atom_mask[None, :], energy, 0.0)


def _structure_sum(atom_energy: Array, graph: AtomsGraph) -> Array:
    """(k, N) -> (k, B) float64 sums over the atoms of each structure slot."""
    n_slots = graph.cell.shape[0]
    summed = jax.ops.segment_sum(atom_energy.T, jnp.asarray(graph.structure), n_slots)
    return summed.T


def _single_energy(spec: ModelSpec) -> Callable[[PyTree, AtomsGraph], Array]:
    def energy(params: PyTree, graph: AtomsGraph) -> Array:
        positions = jnp.asarray(graph.positions, jnp.float64)
        vectors = _edge_vectors(graph, positions, None)
        return _structure_sum(_atom_energies(spec, params, graph, vectors), graph)

    return energy


def _member_atom_energies(
    spec: ModelSpec, params: PyTree, graph: AtomsGraph, vectors: Array
) -> Array:
    """(K, N) float64 per-atom energies of all members."""
    if spec.config.ensemble.kind == "deep":
        return jax.vmap(lambda p: _atom_energies(spec, p, graph, vectors)[0])(params)
    return _atom_energies(spec, params, graph, vectors)


def _inverse_volume(graph: AtomsGraph) -> Array:
    """(B,) 1/V, or 0 for slots whose cell has no volume (non-periodic, padding)."""
    volume = jnp.abs(jnp.linalg.det(jnp.asarray(graph.cell, jnp.float64)))
    has_volume = volume > 1e-9
    return jnp.where(has_volume, 1.0 / jnp.where(has_volume, volume, 1.0), 0.0)


def _predict_fn(
    spec: ModelSpec, stress: bool, member_forces: bool
) -> Callable[[PyTree, AtomsGraph], Prediction]:
    """Predict for a parameter set whose outputs have ``heads`` members (not vmapped)."""
    heads = spec.n_members if not member_forces else _heads(spec)
    energies = _member_atom_energies if not member_forces else _atom_energies

    def predict(params: PyTree, graph: AtomsGraph) -> Prediction:
        positions = jnp.asarray(graph.positions, jnp.float64)
        strain = jnp.zeros((graph.cell.shape[0], 3, 3), jnp.float64)

        def total(pos: Array, eps: Array | None) -> tuple[Array, tuple[Array, Array]]:
            atom_energy = energies(spec, params, graph, _edge_vectors(graph, pos, eps))
            energy = _structure_sum(atom_energy, graph)
            # Structures are independent, so d(sum_b E_b)/dx gives every structure's forces.
            return energy.sum(axis=1), (energy, atom_energy)

        if member_forces:
            cotangents = [jnp.eye(heads, dtype=jnp.float64)[k] for k in range(heads)]
        else:  # one reverse pass for the derivatives of the member mean
            cotangents = [jnp.full((heads,), 1.0 / heads, jnp.float64)]
        primals = (positions, strain) if stress else (positions,)
        fn = total if stress else (lambda pos: total(pos, None))
        _, vjp, (energy, atom_energy) = jax.vjp(fn, *primals, has_aux=True)
        # One plain VJP per head, stacked: vmapping the VJP over heads batches the gathers and
        # scatters of the backward pass, which XLA runs far slower on CPU.
        grads = [vjp(ct) for ct in cotangents]
        grad_pos = jnp.stack([g[0] for g in grads])
        sigma = None
        if stress:
            grad_eps = jnp.stack([g[1] for g in grads])
            sigma = grad_eps * _inverse_volume(graph)[None, :, None, None]
        return Prediction(energy=energy, forces=-grad_pos, stress=sigma, atom_energy=atom_energy)

    return predict


def make_energy(spec: ModelSpec) -> Callable[[PyTree, AtomsGraph], Array]:
    """Pure, jittable ``energy(params, graph) -> (K, B)`` float64 total energies in eV."""
    single = _single_energy(spec)
    if spec.config.ensemble.kind != "deep":
        return single

    def energy(params: PyTree, graph: AtomsGraph) -> Array:
        return jax.vmap(single, in_axes=(0, None))(params, graph)[:, 0]

    return energy


def make_predict(
    spec: ModelSpec, *, stress: bool, member_forces: bool = True
) -> Callable[[PyTree, AtomsGraph], Prediction]:
    """Pure, jittable ``predict(params, graph) -> Prediction`` with all K members.

    Differentiable with respect to ``params`` (for force/stress losses), so a training step can
    wrap it in ``jax.value_and_grad`` directly; the ensemble axis is handled here.

    With ``member_forces=False``, energies and per-atom energies are still per member (K, ...),
    but ``forces`` (1, N, 3) and ``stress`` (1, B, 3, 3) are those of the member mean: one
    reverse pass instead of K, so a shallow ensemble costs about as much as a single model
    (energy spreads only, no force spreads).
    """
    if not member_forces or spec.config.ensemble.kind != "deep":
        return _predict_fn(spec, stress, member_forces)
    single = _predict_fn(spec, stress, True)

    def predict(params: PyTree, graph: AtomsGraph) -> Prediction:
        out = jax.vmap(single, in_axes=(0, None))(params, graph)
        # Each member has one head: drop that axis, keeping the member axis in front.
        return Prediction(
            energy=out.energy[:, 0],
            forces=out.forces[:, 0],
            stress=None if out.stress is None else out.stress[:, 0],
            atom_energy=out.atom_energy[:, 0],
        )

    return predict


def make_descriptors(spec: ModelSpec) -> Callable[[PyTree, AtomsGraph], Array]:
    """Pure, jittable ``descriptors(params, graph) -> (N, D)`` invariant per-atom descriptors.

    These are the inputs of the readout MLP (learned radial functions, so they depend on the
    parameters). For deep ensembles they are member 0's; shallow heads share one descriptor.
    Rows of padding atoms are 0.
    """
    deep = spec.config.ensemble.kind == "deep"

    def descriptors(params: PyTree, graph: AtomsGraph) -> Array:
        if deep:
            params = jax.tree_util.tree_map(lambda x: x[0], params)
        vectors = _edge_vectors(graph, jnp.asarray(graph.positions, jnp.float64), None)
        return _apply(spec, params, graph, vectors, MomentModel.descriptor)

    return descriptors


def fit_feature_scaling(
    spec: ModelSpec, params: PyTree, graphs: Iterable[AtomsGraph], *, rel_floor: float = 1e-2
) -> PyTree:
    """Parameters whose feature standardisation is set from data (call once before training).

    For every element z and invariant f: ``shift = mean``, ``scale = 1 / max(std, rel_floor *
    rms, 1e-10)`` of the raw invariant over the real atoms of element z in ``graphs``
    (per member for deep ensembles). The floor keeps features that (nearly) never vary in the
    data from being blown up. Elements absent from the data keep shift 0, scale 1.

    Args:
        spec: the model.
        params: parameters from :func:`init_params` (or later; only shift/scale change).
        graphs: padded batches, e.g. the training set (all atoms are used, padding ignored).

    Returns:
        A new parameter tree (the input is not modified). Keep ``feature_shift`` and
        ``feature_scale`` frozen during training: they are in raw units, where an optimiser's
        step is far larger than a feature's spread.
    """
    deep = spec.config.ensemble.kind == "deep"

    def raw(p: PyTree, graph: AtomsGraph) -> Array:
        vectors = _edge_vectors(graph, jnp.asarray(graph.positions, jnp.float64), None)
        return _apply(spec, p, graph, vectors, MomentModel.raw_descriptor)

    fn = jax.jit(jax.vmap(raw, in_axes=(0, None)) if deep else (lambda p, g: raw(p, g)[None]))
    n_sets = spec.n_members if deep else 1
    n_feat = int(params["params"]["feature_shift"].shape[-1])
    count = np.zeros(spec.n_species)
    s1 = np.zeros((n_sets, spec.n_species, n_feat))
    s2 = np.zeros((n_sets, spec.n_species, n_feat))
    for graph in graphs:
        feats = np.asarray(fn(params, graph), dtype=np.float64)  # (n_sets, N, F)
        mask = np.asarray(graph.atom_mask, bool)
        species = np.asarray(graph.species)
        for z in range(spec.n_species):
            sel = mask & (species == z)
            count[z] += sel.sum()
            s1[:, z] += feats[:, sel].sum(axis=1)
            s2[:, z] += (feats[:, sel] ** 2).sum(axis=1)
    seen = count > 0
    n = np.where(seen, count, 1.0)[None, :, None]
    mean = s1 / n
    rms = np.sqrt(s2 / n)
    std = np.sqrt(np.clip(s2 / n - mean**2, 0.0, None))
    scale = 1.0 / np.maximum(np.maximum(std, rel_floor * rms), 1e-10)
    mean = np.where(seen[None, :, None], mean, 0.0)
    scale = np.where(seen[None, :, None], scale, 1.0)
    if not deep:
        mean, scale = mean[0], scale[0]
    dtype = params["params"]["feature_shift"].dtype
    inner = dict(params["params"])
    inner["feature_shift"] = jnp.asarray(mean, dtype)
    inner["feature_scale"] = jnp.asarray(scale, dtype)
    return {**params, "params": inner}


# --- user-facing object ------------------------------------------------------------------------


def _default_calibration() -> dict[str, float]:
    return {"energy": 1.0, "forces": 1.0}


@dataclass
class Potential:
    """A trained (or freshly initialised) potential with its metadata.

    Attributes:
        spec: architecture, species, offsets and energy normalisation.
        params: parameter tree (see :func:`init_params`).
        calibration: multipliers of the ensemble spreads, e.g. ``{"energy": 1.3, "forces": 0.9}``.
        fingerprint: identifier of the training data (e.g. a hash), or None.
        metadata: free-form JSON-able information (training metrics, notes, ...).
        versions: package versions at save time (filled by :meth:`save` when empty).
        created: ISO time stamp of the file (filled by :meth:`save` when empty).
    """

    spec: ModelSpec
    params: PyTree
    calibration: dict[str, float] = field(default_factory=_default_calibration)
    fingerprint: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created: str | None = None
    # Jitted functions shared by every calculator/evaluator of this potential (parameters are
    # arguments, so replacing ``params`` needs no recompilation).
    compiled: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def initialize(cls, spec: ModelSpec, seed: int = 0) -> Potential:
        """A potential with random parameters (for tests and as the start of training)."""
        return cls(spec=spec, params=init_params(spec, seed))

    def calculator(self, **kwargs: Any) -> Calculator:
        """An ASE calculator (see :class:`mlipctl.model.calculator.MLIPCalculator` for options)."""
        from mlipctl.model.calculator import MLIPCalculator

        return MLIPCalculator(self, **kwargs)

    def predict(self, atoms_list: Sequence[Atoms], **kwargs: Any) -> list[dict[str, Any]]:
        """Energies, forces, stress (fully periodic cells only), per-atom energies and ensemble
        spreads for each structure, as a list of dicts (keys as the calculator's results, plus
        ``energy_members`` (K,) and ``forces_members`` (K, N, 3))."""
        from mlipctl.model.calculator import Evaluator

        return Evaluator(self, **kwargs).evaluate(list(atoms_list), members=True)

    def save(self, path: str | Path) -> Path:
        """Write the self-describing ``.mlip`` file atomically; returns the path."""
        from mlipctl.model.io import save_potential

        return save_potential(self, path)


def load_potential(path: str | Path) -> Potential:
    """Read a ``.mlip`` model file (see :mod:`mlipctl.model.io`); bad files -> UserInputError."""
    from mlipctl.model.io import read_potential

    return read_potential(path)
