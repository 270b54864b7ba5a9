"""ASE adapter and batched evaluation of a :class:`~mlipctl.model.potential.Potential`.

Results of :class:`MLIPCalculator` (ensembles: the mean over members is the main result):

* ``energy``, ``free_energy`` (same value), eV; ``energies`` (N,) per-atom energies, eV;
* ``forces`` (N, 3) eV/Å;
* ``stress`` (6,) Voigt (xx, yy, zz, yz, xz, xy), eV/Å³, ASE sign; fully periodic cells only;
* ensembles with K >= 2 also give spreads, i.e. sample standard deviations over members
  (ddof=1) times the calibration scale stored in the model file: ``energy_std`` (eV),
  ``energies_std`` (N,), ``forces_std`` (N, 3) per Cartesian component (eV/Å) and
  ``stress_std`` (6,); plus ``energy_members`` (K,).

Compiled functions are cached per padded shape. Capacities come from a geometric size ladder
(:func:`mlipctl.data.neighbors.bucket`), so structures of similar size and neighbour count (the
steps of a relaxation or MD run, a second cell of the same size) reuse one compilation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from mlipctl.data.graph import AtomsGraph
from mlipctl.data.neighbors import (
    bucket,
    build_graph,
    check_overlaps,
    max_neighbors,
    neighbor_pairs,
)
from mlipctl.data.neighbors import species_indices as _species_indices
from mlipctl.errors import UserInputError
from mlipctl.model.potential import Potential, Prediction, make_predict

_VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def _voigt(t: np.ndarray) -> np.ndarray:
    """(..., 3, 3) -> (..., 6) in ASE's order."""
    return np.stack([t[..., a, b] for a, b in _VOIGT], axis=-1)


class Evaluator:
    """Packs structures into bucketed padded graphs and runs the jitted predict function.

    Args:
        potential: the model.
        ladder: growth factor of the capacity ladder (larger: fewer compilations, more padding).
        min_distance: atoms closer than this (Å) are rejected as overlapping.
        max_batch_atoms: :meth:`evaluate` packs several structures per call up to this many atoms.
        member_forces: compute every member's forces and stress (for their spreads). False:
            forces/stress of the member mean from one reverse pass (a shallow ensemble then
            costs about as much as one model), with energy spreads only.
    """

    def __init__(
        self,
        potential: Potential,
        *,
        ladder: float = 1.25,
        min_distance: float = 0.5,
        max_batch_atoms: int = 4096,
        member_forces: bool = True,
    ) -> None:
        self.potential = potential
        self.spec = potential.spec
        self.ladder = float(ladder)
        self.min_distance = float(min_distance)
        self.max_batch_atoms = int(max_batch_atoms)
        self.member_forces = bool(member_forces)
        self._type_map = self.spec.type_map()

    @property
    def n_traces(self) -> int:
        """How often the potential's predict functions were traced (= compiled) so far."""
        return int(self.potential.compiled.get("n_traces", 0))

    def _function(self, stress: bool) -> Any:
        cache = self.potential.compiled
        key = ("predict", stress, self.member_forces)
        if key not in cache:
            inner = make_predict(self.spec, stress=stress, member_forces=self.member_forces)

            def traced(params: Any, graph: AtomsGraph) -> Prediction:
                # Runs only while jax traces, i.e. once per new padded shape.
                cache["n_traces"] = cache.get("n_traces", 0) + 1
                return inner(params, graph)

            cache[key] = jax.jit(traced)
        return cache[key]

    def check(self, atoms: Atoms, where: str = "") -> None:
        """Raise UserInputError for unknown elements or overlapping atoms."""
        _species_indices(atoms, self._type_map, where=where)
        try:
            check_overlaps(atoms, self.min_distance)
        except UserInputError as exc:
            raise UserInputError(f"{exc}{where}") from exc

    def graph(self, structures: Sequence[Atoms]) -> AtomsGraph:
        """Checked, padded graph of ``structures`` with bucketed capacities."""
        pairs = []
        for k, atoms in enumerate(structures):
            where = f" (structure {k})" if len(structures) > 1 else ""
            self.check(atoms, where)
            pairs.append(neighbor_pairs(atoms, self.spec.cutoff))
        n_atoms = sum(len(a) for a in structures)
        n_edges = sum(len(p[0]) for p in pairs)
        return build_graph(
            structures,
            self.spec.cutoff,
            self._type_map,
            n_atoms=bucket(n_atoms, self.ladder),
            n_edges=bucket(n_edges, self.ladder),
            n_neighbors=bucket(max_neighbors(pairs), self.ladder),
            # Always one padding slot, so padding atoms never join a real structure.
            n_structures=bucket(len(structures) + 1, self.ladder, multiple=2),
            pairs=pairs,
        )

    def _chunks(self, structures: Sequence[Atoms]) -> list[list[int]]:
        chunks: list[list[int]] = []
        count = 0
        for k, atoms in enumerate(structures):
            if not chunks or count + len(atoms) > self.max_batch_atoms:
                chunks.append([])
                count = 0
            chunks[-1].append(k)
            count += len(atoms)
        return chunks

    def evaluate(
        self, structures: Sequence[Atoms], *, members: bool = False, stress: bool = True
    ) -> list[dict[str, Any]]:
        """Results (see module docstring) for each structure, in order.

        Args:
            structures: ASE structures (any mix of periodic and non-periodic).
            members: also return ``forces_members`` (K, N, 3) and ``energies_members`` (K, N).
            stress: compute the stress of periodic structures.

        Raises:
            UserInputError: unknown element, overlapping atoms, NaN positions/cell.
            RuntimeError: the model returned non-finite values.
        """
        out: list[dict[str, Any]] = [{} for _ in structures]
        for chunk in self._chunks(structures):
            batch = [structures[k] for k in chunk]
            periodic = [bool(np.all(a.pbc)) for a in batch]
            graph = self.graph(batch)
            pred = self._function(stress and any(periodic))(self.potential.params, graph)
            pred = jax.tree_util.tree_map(np.asarray, pred)
            start = 0
            for slot, (k, atoms) in enumerate(zip(chunk, batch, strict=True)):
                stop = start + len(atoms)
                out[k] = self._results(pred, slot, start, stop, periodic[slot], members, k)
                start = stop
        return out

    def _results(
        self,
        pred: Prediction,
        slot: int,
        start: int,
        stop: int,
        periodic: bool,
        members: bool,
        index: int,
    ) -> dict[str, Any]:
        energy = pred.energy[:, slot]  # (K,)
        forces = pred.forces[:, start:stop]  # (K, n, 3), or (1, n, 3) for the member mean
        energies = pred.atom_energy[:, start:stop]  # (K, n)
        stress = _voigt(pred.stress[:, slot]) if periodic and pred.stress is not None else None
        arrays = [energy, forces, energies] + ([stress] if stress is not None else [])
        if not all(np.all(np.isfinite(a)) for a in arrays):
            raise RuntimeError(
                f"the model returned non-finite energy/forces/stress for structure {index} "
                "(parameters corrupted by a diverged training run, or a structure far outside "
                "the training data?)"
            )
        res: dict[str, Any] = {
            "energy": float(energy.mean()),
            "free_energy": float(energy.mean()),
            "forces": forces.mean(axis=0),
            "energies": energies.mean(axis=0),
        }
        if stress is not None:
            res["stress"] = stress.mean(axis=0)
        n_members = energy.shape[0]
        if n_members >= 2:
            cal = self.potential.calibration
            e_scale = float(cal.get("energy", 1.0))
            f_scale = float(cal.get("forces", 1.0))
            s_scale = float(cal.get("stress", 1.0))
            res["energy_std"] = float(energy.std(ddof=1)) * e_scale
            res["energies_std"] = energies.std(axis=0, ddof=1) * e_scale
            if forces.shape[0] >= 2:
                res["forces_std"] = forces.std(axis=0, ddof=1) * f_scale
            if stress is not None and stress.shape[0] >= 2:
                res["stress_std"] = stress.std(axis=0, ddof=1) * s_scale
        res["energy_members"] = energy.copy()
        if members:
            if forces.shape[0] == n_members:
                res["forces_members"] = forces.copy()
            res["energies_members"] = energies.copy()
        return res


class MLIPCalculator(Calculator):
    """ASE calculator of an mlipctl potential (see the module docstring for the results).

    Keyword arguments other than those of :class:`Evaluator` go to ASE's ``Calculator``.
    Stress is only available for fully periodic cells (otherwise ASE raises
    ``PropertyNotImplementedError`` when it is asked for). It is computed from the first call that
    asks for it on: the strain derivative costs ~25 % of an energy+forces call, which MD, NEB and
    fixed-cell relaxations driven by ASE never use, while a cell filter asks on every step.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(
        self,
        potential: Potential,
        *,
        ladder: float = 1.25,
        min_distance: float = 0.5,
        member_forces: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.potential = potential
        self._stress_wanted = False
        self.evaluator = Evaluator(
            potential, ladder=ladder, min_distance=min_distance, member_forces=member_forces
        )

    @property
    def n_traces(self) -> int:
        """How many times the model was traced/compiled for this calculator."""
        return self.evaluator.n_traces

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = tuple(all_changes),
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        self._stress_wanted |= "stress" in properties
        (self.results,) = self.evaluator.evaluate([self.atoms], stress=self._stress_wanted)
