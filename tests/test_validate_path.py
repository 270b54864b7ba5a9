"""Migration-path checks of `validate`: dense spline path, energy/force consistency, jumps,
profile comparison. Broken calculators (energy step, scaled forces, force kink) must fail."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT

from mlipctl.data.crystals import build_crystal, vacancy_hop
from mlipctl.engines.neb import make_band
from mlipctl.engines.relax import relax_atoms
from mlipctl.engines.validate_path import (
    dense_path,
    migration_path,
    path_smoothness,
    profile_rms,
    unwrapped_path,
)
from mlipctl.errors import UserInputError

A_EMT = 3.5898


@pytest.fixture(scope="module")
def hop_band():
    """A relaxed EMT Cu vacancy hop (107 atoms) and its IDPP band of 5 images."""
    perfect = build_crystal("Cu", "fcc", a=A_EMT, supercell=(3, 3, 3))
    initial, final, hop = vacancy_hop(perfect, 0)
    ends = [relax_atoms(s, EMT(), fmax=0.01).atoms for s in (initial, final)]
    return make_band(ends[0], ends[1], 5), hop


class _Wrapped(Calculator):
    """EMT with a deliberate defect (scaled forces everywhere, or an energy step or force kink
    switched on once the hopping atom is past the middle of its hop)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, hop_band, mode: str) -> None:
        super().__init__()
        band, self.hop = hop_band
        self.start = band[0].positions[self.hop]
        step = band[-1].positions[self.hop] - self.start
        self.length = float(np.linalg.norm(step))
        self.unit = step / self.length
        self.inner, self.mode = EMT(), mode

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        work = self.atoms.copy()
        work.calc = self.inner
        energy, forces = work.get_potential_energy(), work.get_forces()
        past = (self.atoms.positions[self.hop] - self.start) @ self.unit > 0.5 * self.length
        if self.mode == "scaled":
            forces = 1.3 * forces
        elif self.mode == "step" and past:
            energy += 0.1
        elif self.mode == "kink" and past:
            forces = forces.copy()
            forces[self.hop] += 0.3 * self.unit
        self.results = {"energy": energy, "forces": forces}


def test_dense_path_geometry(hop_band):
    band, _ = hop_band
    pos, tan, s, s_images, between = dense_path(band, dense_points=10)
    assert between >= 10
    assert len(pos) >= (len(band) - 1) * 11 + 1
    np.testing.assert_allclose(np.linalg.norm(tan.reshape(len(tan), -1), axis=1), 1.0)
    np.testing.assert_allclose(np.diff(s), s[1] - s[0])  # uniform in arc length
    np.testing.assert_allclose(pos[0], band[0].positions, atol=1e-9)
    np.testing.assert_allclose(pos[-1], band[-1].positions, atol=1e-9)
    assert s[-1] >= s_images[-1] - 1e-9
    # Arc length of the spline is at least the chord length through the images.
    flat = unwrapped_path(band).reshape(len(band), -1)
    chord = np.sum(np.linalg.norm(np.diff(flat, axis=0), axis=1))
    assert s[-1] >= chord - 1e-9 and s[-1] < 1.05 * chord


def test_unwrapping_makes_wrapped_images_continuous(hop_band):
    band, _ = hop_band
    wrapped = [im.copy() for im in band]
    for im in wrapped:
        im.positions += np.array([0.0, 0.0, 2.0])  # push some atoms across the cell face
        im.wrap()
    a, b = unwrapped_path(band), unwrapped_path(wrapped)
    # Same path up to a constant lattice translation of each atom.
    shift = b[0] - a[0]
    np.testing.assert_allclose(b - shift, a, atol=1e-9)


def test_smooth_emt_path_passes(hop_band):
    band, _ = hop_band
    sm = path_smoothness(EMT, band, dense_points=10)
    assert sm.points_between_images >= 10
    assert sm.consistency_rel < 0.01
    assert sm.energy_jump_ratio < 5.0 and sm.force_jump_ratio < 5.0
    # The energy profile rises to a maximum inside the path.
    assert 0 < np.argmax(sm.energy) < len(sm.energy) - 1


@pytest.mark.parametrize(
    ("mode", "consistency", "energy_jump", "force_jump"),
    [
        ("scaled", True, False, False),  # forces are not the gradient of the energy
        ("step", True, True, False),  # a discontinuous energy (e.g. a hard cutoff)
        ("kink", True, False, True),  # discontinuous forces
    ],
)
def test_broken_calculators_fail(hop_band, mode, consistency, energy_jump, force_jump):
    band, _ = hop_band
    sm = path_smoothness(_Wrapped(hop_band, mode), band, dense_points=10)
    assert (sm.consistency_rel > 0.05) == consistency
    assert (sm.energy_jump_ratio > 10.0) == energy_jump
    assert (sm.force_jump_ratio > 10.0) == force_jump


def _fake_neb(energy_fn) -> SimpleNamespace:
    x = np.linspace(0.0, 2.5, 101)  # Å, any length: the comparison normalises it
    e = energy_fn(x / x[-1])
    return SimpleNamespace(spline_coordinate=x, spline_energy=e, barrier_forward=e.max() - e[0])


def test_profile_rms_on_normalised_coordinate():
    a = _fake_neb(lambda s: 0.8 * np.sin(np.pi * s) ** 2)
    b = _fake_neb(lambda s: 0.9 * np.sin(np.pi * s) ** 2)
    b.spline_coordinate = b.spline_coordinate * 1.7  # a longer path, same shape
    cmp = profile_rms(a, b, n=2001)
    # RMS of 0.1 sin²(πs) over [0, 1] = 0.1 sqrt(3/8); the shapes are the same.
    assert cmp.rms == pytest.approx(0.1 * np.sqrt(3 / 8), rel=1e-3)
    assert cmp.shape_rms == pytest.approx(0.0, abs=1e-12)
    assert profile_rms(a, a).rms == 0.0
    assert cmp.energy_b.max() == pytest.approx(0.9, rel=1e-4)
    assert cmp.s[0] == 0 and cmp.s[-1] == 1


def test_profile_shape_sees_a_shoulder_not_the_height():
    a = _fake_neb(lambda s: np.sin(np.pi * s) ** 2)
    # A shoulder on the way up (it lifts the top by 12.5 % too; the shape divides that out).
    b = _fake_neb(lambda s: np.sin(np.pi * s) ** 2 + 0.5 * np.sin(2 * np.pi * s) ** 2 * (s < 0.5))
    assert profile_rms(a, b).shape_rms > 0.1
    flat = _fake_neb(lambda s: 0.0 * s)
    assert profile_rms(a, flat).shape_rms is None


def test_coincident_images_are_rejected(hop_band):
    band, _ = hop_band
    with pytest.raises(UserInputError, match="coincide"):
        dense_path([band[0], band[0].copy(), band[-1]])


def test_migration_path_matches_known_emt_barrier(hop_band):
    band, _ = hop_band
    res = migration_path(EMT, band[0], band[-1], n_images=3, fmax=0.01)
    assert res.converged
    # EMT Cu vacancy hop, 3x3x3 cell at the EMT lattice constant (docs/engines-relax-neb.md).
    assert res.barrier_forward == pytest.approx(0.7915, abs=0.01)
    assert abs(res.delta_e) < 1e-3
