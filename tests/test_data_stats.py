"""Dataset statistics on a tiny dataset whose numbers are known by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from mlipctl.data.io import Labelled, read_structures
from mlipctl.data.stats import dataset_stats


def _tiny() -> list[Labelled]:
    dimer = Labelled(
        atoms=Atoms("Cu2", positions=[[0, 0, 0], [2.0, 0, 0]]),
        energy=-1.0,
        forces=np.array([[1.0, 0, 0], [-1.0, 0, 0]]),
        config_type="dimer",
        index=0,
    )
    # one atom in a 3 Å simple-cubic cell: 6 images at 3.0 Å
    sc = Labelled(
        atoms=Atoms("Ni", cell=np.eye(3) * 3.0, pbc=True),
        energy=-3.5,
        stress=np.diag([0.1, 0.2, 0.3]),
        config_type="bulk",
        index=1,
    )
    return [dimer, sc]


def test_stats_known_numbers() -> None:
    st = dataset_stats(_tiny(), cutoff=3.1, offsets={"Cu": -0.25, "Ni": -3.0})
    assert st.n_structures == 2 and st.n_atoms == 3
    assert st.element_counts == {"Cu": 2, "Ni": 1}
    assert st.config_type_counts == {"bulk": 1, "dimer": 1}
    assert (st.n_with_energy, st.n_with_forces, st.n_with_stress) == (2, 1, 1)
    assert st.energy_per_atom == pytest.approx({"mean": -2.0, "std": 1.5, "min": -3.5, "max": -0.5})
    assert st.energy_per_atom_minus_offsets == pytest.approx(
        {"mean": -0.375, "std": 0.125, "min": -0.5, "max": -0.25}
    )
    assert st.force_component_std == pytest.approx(np.sqrt(2 / 6))
    assert st.force_max_norm == pytest.approx(1.0)
    assert st.stress_component_std == pytest.approx(np.std([0.1, 0, 0, 0, 0.2, 0, 0, 0, 0.3]))
    assert st.neighbors_per_atom == pytest.approx(
        {"mean": 8 / 3, "std": np.std([1, 1, 6]), "min": 1.0, "max": 6.0}
    )
    assert st.min_distance == pytest.approx(2.0) and st.min_distance_structure == 0
    assert json.loads(json.dumps(st.to_dict())) == st.to_dict()


def test_stats_without_labels_or_cutoff() -> None:
    st = dataset_stats([Labelled(atoms=Atoms("Cu"))])
    assert st.energy_per_atom is None and st.force_component_std is None
    assert st.neighbors_per_atom is None and st.cutoff is None
    assert st.min_distance is None  # an isolated atom has no neighbour
    json.dumps(st.to_dict())


@pytest.mark.mlearn
def test_stats_mlearn_cu(mlearn_dir: Path) -> None:
    data = read_structures(mlearn_dir / "Cu" / "test.extxyz")
    st = dataset_stats(data, cutoff=5.0)
    assert st.n_structures == 31 and st.n_atoms == 3178
    assert st.element_counts == {"Cu": 3178}
    assert 1.5 < st.min_distance < 2.6  # no overlapping atoms; fcc Cu NN is 2.55 Å
    assert 35 < st.neighbors_per_atom["mean"] < 50  # ideal fcc at 5 Å: 12 + 6 + 24 = 42
