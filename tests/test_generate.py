"""`mlipctl generate`: counts, config types, determinism, geometry and physics of each generator."""

from __future__ import annotations

import json
from pathlib import Path

import ase.io
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.neighborlist import neighbor_list
from pydantic import ValidationError

from mlipctl.config.generate import GenerateConfig
from mlipctl.data.generate import (
    build_slab,
    generate_structures,
    largest_void,
    resolve_system,
    run_generate,
)
from mlipctl.errors import UserInputError

CU = {"kind": "crystal", "element": "Cu"}

# Every generator on, small counts and short MD: about 5 s with EMT.
TINY = {
    "systems": [CU],
    "seed": 7,
    "strain": {"n_volumes": 3, "n_shears": 2},
    "rattle": {"amplitudes": [0.05, 0.1], "n_per_amplitude": 2},
    "vacancy": {"min_atoms": 32, "n_rattled": 1, "n_hops": 1, "hop_images": 3},
    "interstitial": {"min_atoms": 32, "sites": ["octahedral", "dumbbell_100"], "n_per_site": 2},
    "surface": {"millers": [[1, 1, 1]], "n_per_surface": 2},
    "md": {
        "min_atoms": 32,
        "temperatures_k": [300.0, 900.0],
        "equilibration_steps": 20,
        "n_snapshots": 2,
        "interval_steps": 10,
    },
    "amorphous": {
        "n_atoms": 30,
        "melt_steps": 40,
        "quench_steps": 40,
        "n_melt_snapshots": 1,
        "n_quench_snapshots": 2,
    },
}
TINY_COUNTS = {
    "bulk_eos": 3,
    "bulk_strain": 2,
    "bulk_rattle": 4,
    "vacancy": 2,  # one rattled, one relaxed NEB end point
    "vacancy_hop": 15,  # 3 images, each with 4 rattled copies
    "interstitial": 4,
    "surface": 2,
    "md": 4,
    "liquid": 1,
    "amorphous": 2,
}


def _cfg(**over) -> GenerateConfig:
    data = json.loads(json.dumps(TINY))
    data.update(over)
    return GenerateConfig.model_validate(data)


def _only(name: str, block: dict | None = None, **over) -> GenerateConfig:
    """A config with just one generator switched on."""
    data: dict = {"systems": [CU], "seed": 3, **over}
    for g in ("strain", "rattle", "vacancy", "interstitial", "surface", "md", "amorphous"):
        data[g] = {"enabled": g == name, **(block or {} if g == name else {})}
    return GenerateConfig.model_validate(data)


def _prov(atoms: Atoms) -> dict:
    return json.loads(atoms.info["provenance"])


@pytest.fixture(scope="module")
def tiny_set() -> list[Atoms]:
    return generate_structures(_cfg())


def test_tiny_config_counts_types_and_tags(tiny_set):
    counts: dict[str, int] = {}
    for a in tiny_set:
        counts[a.info["config_type"]] = counts.get(a.info["config_type"], 0) + 1
    assert counts == TINY_COUNTS
    for a in tiny_set:
        p = _prov(a)
        assert p["system"] == "Cu-fcc" and p["seed"] == 7 and p["generator"]
        assert a.calc is None  # unlabelled: MD snapshots keep nothing of the reference
        assert not {"energy", "forces", "stress", "momenta"} & (set(a.info) | set(a.arrays))
        assert a.pbc.all() and set(a.get_chemical_symbols()) == {"Cu"}
        assert np.isfinite(a.positions).all()
    sizes = {a.info["config_type"]: len(a) for a in tiny_set}
    assert sizes["bulk_rattle"] == 32 and sizes["vacancy"] == 31 and sizes["interstitial"] == 33
    assert sizes["md"] == 32 and sizes["amorphous"] == 30


def test_default_config_counts_and_sizes():
    # Defaults, with MD shortened: snapshot counts do not depend on the number of steps.
    cfg = GenerateConfig.model_validate(
        {
            "systems": [CU],
            "md": {"equilibration_steps": 2, "interval_steps": 1},
            "amorphous": {"melt_steps": 6, "quench_steps": 5},
            "interstitial": {"relax_steps": 2},
        }
    )
    got: dict[str, list[int]] = {}
    for a in generate_structures(cfg):
        got.setdefault(a.info["config_type"], []).append(len(a))
    counts = {k: len(v) for k, v in got.items()}
    assert counts == {
        "bulk_eos": 9,
        "bulk_strain": 16,
        "bulk_rattle": 32,
        "vacancy": 11,  # 8 rattled + 3 relaxed hop starts
        "vacancy_hop": 75,  # 3 hops × 5 images × (1 + 4 rattled copies)
        "interstitial": 12,
        "surface": 9,
        "md": 40,
        "liquid": 3,
        "amorphous": 5,
    }
    assert sum(counts.values()) == 212
    assert all(31 <= n <= 109 for v in got.values() for n in v)
    assert set(got["md"]) == {108} and set(got["vacancy_hop"]) == {31}


def test_same_seed_same_set_other_seed_differs(tiny_set):
    again = generate_structures(_cfg())
    assert len(again) == len(tiny_set)
    for a, b in zip(tiny_set, again, strict=True):
        assert a.info == b.info
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell[:], b.cell[:])
    other = generate_structures(_cfg(seed=8))
    moved = [
        not np.allclose(a.positions, b.positions)
        for a, b in zip(tiny_set, other, strict=True)
        if a.info["config_type"] != "bulk_eos"  # the EOS scan has no randomness
    ]
    assert all(moved)


def test_switching_a_generator_off_leaves_the_others_unchanged(tiny_set):
    data = json.loads(json.dumps(TINY))
    data["strain"]["enabled"] = False
    data["md"]["enabled"] = False
    fewer = generate_structures(GenerateConfig.model_validate(data))
    keep = [a for a in tiny_set if _prov(a)["generator"] not in ("strain", "md")]
    assert len(fewer) == len(keep)
    for a, b in zip(keep, fewer, strict=True):
        np.testing.assert_array_equal(a.positions, b.positions)


def test_lattice_fit_puts_the_crystal_at_zero_pressure_for_the_reference():
    cfg = _only("strain", {"n_volumes": 3, "n_shears": 0})
    system = resolve_system(cfg.systems[0], make_calc=EMT)
    assert system.lattice["source"] == "fitted"
    a = system.unit.copy()
    a.calc = EMT()
    pressure_gpa = -np.trace(a.get_stress(voigt=False)) / 3 * 160.21766
    assert abs(pressure_gpa) < 0.05
    # EMT's Cu lattice constant is ~0.6 % below ASE's tabulated 3.61 Å.
    assert 3.57 < system.lattice["a"] < 3.60
    fixed = resolve_system(cfg.systems[0])  # no calculator: ASE's tabulated lattice constant
    assert fixed.lattice["source"] == "tabulated" and fixed.lattice["a"] == pytest.approx(3.61)


def test_eos_volumes_and_shear_strains_match_provenance():
    cfg = _only("strain", {"n_volumes": 5, "volume_range": 0.06, "n_shears": 4, "max_strain": 0.02})
    frames = generate_structures(cfg)
    eos = [a for a in frames if a.info["config_type"] == "bulk_eos"]
    v0 = eos[2].get_volume()
    ratios = [a.get_volume() / v0 for a in eos]
    np.testing.assert_allclose(ratios, [0.94 / 1.0, 0.97, 1.0, 1.03, 1.06], rtol=1e-9)
    # EMT energy of the scan is convex with its minimum at the middle (the fitted volume).
    e = []
    for a in eos:
        a = a.copy()
        a.calc = EMT()
        e.append(a.get_potential_energy())
    assert int(np.argmin(e)) == 2 and np.all(np.diff(e, 2) > 0)
    ref = eos[2].cell[:]
    for a in (f for f in frames if f.info["config_type"] == "bulk_strain"):
        eps = np.linalg.solve(ref, a.cell[:]) - np.eye(3)
        v = _prov(a)["strain_voigt"]
        np.testing.assert_allclose(eps, eps.T, atol=1e-12)
        np.testing.assert_allclose(
            [eps[0, 0], eps[1, 1], eps[2, 2], eps[1, 2], eps[0, 2], eps[0, 1]], v, atol=1e-6
        )
        assert np.abs(eps).max() <= 0.02 + 1e-9


def test_rattle_amplitudes_are_as_configured():
    cfg = _only(
        "rattle",
        {"amplitudes": [0.02, 0.1], "n_per_amplitude": 3, "volume_jitter": 0.0, "min_atoms": 108},
    )
    frames = generate_structures(cfg)
    system = resolve_system(cfg.systems[0], make_calc=EMT)
    ideal = system.unit.repeat((3, 3, 3)).positions
    for a in frames:
        std = np.std(a.positions - ideal)
        amp = _prov(a)["rattle"]
        assert abs(std - amp) < 0.15 * amp  # 324 samples: the std is within ~8 %


def test_vacancy_hop_images_lie_on_the_straight_path():
    cfg = _only(
        "vacancy",
        {
            "min_atoms": 32,
            "n_rattled": 0,
            "n_hops": 1,
            "hop_images": 3,
            "rattle": 0,
            "hop_path": "linear",
        },
    )
    frames = generate_structures(cfg)
    assert [a.info["config_type"] for a in frames] == ["vacancy_hop"] * 3
    fractions = [_prov(a)["fraction"] for a in frames]
    np.testing.assert_allclose(fractions, [0.25, 0.5, 0.75])
    hop = _prov(frames[0])["hop_atom"]
    moved = frames[2].positions - frames[0].positions
    others = np.delete(moved, hop, axis=0)
    assert np.abs(others).max() < 1e-12  # only the hopping atom moves
    # The hop covers one nearest-neighbour distance (a/√2): 0.5 of it between t=0.25 and 0.75.
    nn = frames[0].cell[0, 0] / 2 / np.sqrt(2)  # 2×2×2 cubic cells: cell = 2a
    assert abs(np.linalg.norm(moved[hop]) - 0.5 * nn) < 1e-9


def test_vacancy_hops_cycle_over_host_sizes():
    cfg = _only(
        "vacancy",
        {
            "n_rattled": 0,
            "n_hops": 3,
            "hop_images": 1,
            "hop_path": "linear",
            "hop_min_atoms": [32, 108],
        },
    )
    frames = generate_structures(cfg)
    assert [len(a) for a in frames] == [31, 107, 31]
    assert [_prov(a)["reps"] for a in frames] == [[2, 2, 2], [3, 3, 3], [2, 2, 2]]


def test_vacancy_hop_band_is_the_reference_minimum_energy_path():
    """hop_path neb: relaxed end point plus converged CI-NEB images of the reference (EMT)."""
    from ase.calculators.emt import EMT

    cfg = _only(
        "vacancy", {"min_atoms": 32, "n_rattled": 0, "n_hops": 1, "hop_images": 5, "hop_rattled": 0}
    )
    frames = generate_structures(cfg)
    types = [a.info["config_type"] for a in frames]
    assert types == ["vacancy"] + ["vacancy_hop"] * 5
    assert _prov(frames[0])["relaxed"] and _prov(frames[0])["neb_steps"] > 0
    energies, fmax = [], []
    for a in frames:
        a.calc = EMT()
        energies.append(a.get_potential_energy())
        fmax.append(np.linalg.norm(a.get_forces(), axis=1).max())
    assert fmax[0] < 0.05  # the end point is relaxed
    barrier = max(energies) - energies[0]
    # EMT's Cu barrier is 0.79 eV in large cells; a 31-atom cell and fmax 0.05 shift it a little.
    assert 0.6 < barrier < 0.9
    assert int(np.argmax(energies)) == 3  # the climbing image sits in the middle of 5


def test_hop_images_come_with_rattled_copies():
    cfg = _only(
        "vacancy",
        {"n_rattled": 0, "n_hops": 1, "hop_images": 3, "hop_rattled": 2, "rattle": 0.04},
    )
    frames = generate_structures(cfg)
    hops = [a for a in frames if a.info["config_type"] == "vacancy_hop"]
    assert [_prov(a)["neb_image"] for a in hops] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    for k in range(3):
        image, copies = hops[3 * k], hops[3 * k + 1 : 3 * k + 3]
        assert "rattle" not in _prov(image)
        for c in copies:
            d = c.positions - image.positions
            assert _prov(c)["rattle"] == 0.04 and abs(d.std() - 0.04) < 0.012
        assert np.abs(copies[0].positions - copies[1].positions).max() > 0.01


def test_interstitial_sites_have_the_right_geometry():
    cfg = _only(
        "interstitial",
        {
            "min_atoms": 32,
            "sites": ["octahedral", "tetrahedral", "dumbbell_100"],
            "n_per_site": 1,
            "include_unrelaxed": True,
            "rattle": 0.0,
        },
    )
    frames = generate_structures(cfg)
    a = resolve_system(cfg.systems[0], make_calc=EMT).lattice["a"]
    by_site = {_prov(f)["site"]: f for f in frames}
    assert all(len(f) == 33 for f in frames)

    def neighbour_distances(atoms, k, n):
        d = np.sort(atoms.get_distances(k, list(range(len(atoms) - 1)), mic=True))
        return d[:n], d[n]

    d, nxt = neighbour_distances(by_site["octahedral"], 32, 6)
    np.testing.assert_allclose(d, a / 2, rtol=1e-5)
    assert nxt > a / 2 * 1.3
    d, nxt = neighbour_distances(by_site["tetrahedral"], 32, 4)
    np.testing.assert_allclose(d, a * np.sqrt(3) / 4, rtol=1e-5)
    assert nxt > a * np.sqrt(3) / 4 * 1.3
    db = by_site["dumbbell_100"]
    pair = db.positions[-2:]
    vec = pair[1] - pair[0]
    np.testing.assert_allclose(np.abs(vec) / np.linalg.norm(vec), [1, 0, 0], atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(vec), 0.8 * a / np.sqrt(2), rtol=1e-5)


def test_interstitial_relaxation_lowers_the_reference_energy():
    cfg = _only(
        "interstitial",
        {
            "min_atoms": 32,
            "sites": ["tetrahedral"],
            "n_per_site": 3,
            "include_unrelaxed": True,
            "relax_steps": 20,
            "rattle": 0.0,
        },
    )
    frames = generate_structures(cfg)
    steps = [_prov(f)["relax_step"] for f in frames]
    assert steps == [0, 10, 20]
    energies = []
    for f in frames:
        f = f.copy()
        f.calc = EMT()
        energies.append(f.get_potential_energy())
    assert energies[0] - energies[1] > 1.0 and energies[1] > energies[2]


@pytest.mark.parametrize(
    ("miller", "spacing_over_a"),
    [((1, 0, 0), 0.5), ((1, 1, 0), 0.5 / np.sqrt(2)), ((1, 1, 1), 1 / np.sqrt(3))],
)
def test_surface_slabs_have_vacuum_planes_and_thickness(miller, spacing_over_a):
    cfg = _only(
        "surface",
        {"millers": [list(miller)], "n_per_surface": 1, "rattle": 0.0, "vacuum": 6.0},
    )
    (slab,) = generate_structures(cfg)
    a = resolve_system(cfg.systems[0], make_calc=EMT).lattice["a"]
    z = slab.positions[:, 2]
    assert np.ptp(z) >= 7.0 and len(slab) >= 32
    assert slab.cell[2, 2] - np.ptp(z) == pytest.approx(12.0, abs=1e-6)  # 6 Å on each side
    planes = np.unique(np.round(z, 7))
    np.testing.assert_allclose(np.diff(planes), spacing_over_a * a, rtol=1e-5)
    assert np.allclose(slab.cell[:2, 2], 0)  # in-plane vectors ⟂ z: the slab normal is z


def test_md_snapshots_are_thermalised_by_the_reference():
    cfg = _only(
        "md",
        {
            "min_atoms": 32,
            "temperatures_k": [200.0, 1200.0],
            "equilibration_steps": 60,
            "n_snapshots": 6,
            "interval_steps": 15,
        },
    )
    frames = generate_structures(cfg)
    system = resolve_system(cfg.systems[0], make_calc=EMT)
    ideal = system.unit.repeat((2, 2, 2)).positions
    by_t: dict[float, list[Atoms]] = {}
    for f in frames:
        by_t.setdefault(_prov(f)["temperature_k"], []).append(f)
    for t, snaps in by_t.items():
        inst = [_prov(s)["instant_temperature_k"] for s in snaps]
        assert abs(np.mean(inst) / t - 1) < 0.4, (t, inst)
    # Mean-square displacement from the lattice sites grows with temperature (≈ ∝ T).
    msd = {}
    for t, snaps in by_t.items():
        disp = [s.positions - ideal - (s.positions - ideal).mean(0) for s in snaps]
        msd[t] = np.mean([np.mean(np.sum(d**2, axis=1)) for d in disp])
    assert 3.0 < msd[1200.0] / msd[200.0] < 12.0


def test_melt_quench_gives_disordered_cells():
    cfg = _only(
        "amorphous",
        {
            "n_atoms": 100,
            "melt_steps": 300,
            "quench_steps": 150,
            "n_melt_snapshots": 1,
            "n_quench_snapshots": 1,
        },
    )
    liquid, glass = generate_structures(cfg)
    assert liquid.info["config_type"] == "liquid" and glass.info["config_type"] == "amorphous"
    assert len(glass) == 100
    system = resolve_system(cfg.systems[0], make_calc=EMT)
    v_atom = system.unit.get_volume() / len(system.unit)
    assert glass.get_volume() / 100 == pytest.approx(1.05 * v_atom, rel=1e-9)
    crystal = system.unit.repeat(3)
    cut = 0.5 * (system.nn_distance + system.nn_distance * np.sqrt(2))  # between 1st and 2nd shell
    for atoms in (liquid, glass):
        cn = np.bincount(neighbor_list("i", atoms, cut), minlength=len(atoms))
        assert np.mean(cn == 12) < 0.5  # a crystal has 100 % twelve-fold sites
    cn = np.bincount(neighbor_list("i", crystal, cut))
    assert np.all(cn == 12)


def test_file_system_with_two_elements_uses_void_sites(tmp_path):
    cu3au = bulk("Cu", "fcc", a=3.75, cubic=True)
    cu3au.symbols[0] = "Au"
    path = tmp_path / "cu3au.extxyz"
    ase.io.write(path, cu3au)
    cfg = GenerateConfig.model_validate(
        {
            "systems": [{"kind": "file", "path": str(path), "melting_point_k": 1200.0}],
            "strain": {"n_volumes": 2, "n_shears": 1},
            "rattle": {"amplitudes": [0.05], "n_per_amplitude": 1},
            "vacancy": {"min_atoms": 32, "n_rattled": 1, "n_hops": 1, "hop_images": 1},
            "interstitial": {"min_atoms": 32, "n_per_site": 1, "relax_steps": 3},
            "surface": {"n_per_surface": 1},
            "md": {"enabled": False},
            "amorphous": {"enabled": False},
        }
    )
    frames = generate_structures(cfg)
    assert {_prov(f)["system"] for f in frames} == {"cu3au"}
    (inter,) = [f for f in frames if f.info["config_type"] == "interstitial"]
    assert _prov(inter)["site"] == "void" and len(inter) == 33
    assert all(set(f.get_chemical_symbols()) == {"Cu", "Au"} for f in frames)


def test_largest_void_of_fcc_is_the_octahedral_site():
    unit = bulk("Cu", "fcc", a=3.6, cubic=True)
    frac = largest_void(unit, spacing=0.15)
    big = unit.repeat(2)
    big += Atoms("Cu", positions=[(frac / 2) @ big.cell[:]])
    dist = np.sort(big.get_distances(32, list(range(32)), mic=True))
    np.testing.assert_allclose(dist[:6], 1.8, atol=1e-9)  # six neighbours at a/2: octahedral
    assert dist[6] > 3.0


def test_run_generate_writes_file_report_and_resumes_parts(tmp_path):
    cfg = _cfg(output=str(tmp_path / "gen"))
    report = run_generate(cfg, progress=False)
    path = Path(report.artifacts["structures"])
    frames = ase.io.read(path, ":")
    assert report.results["n_structures"] == len(frames) == sum(TINY_COUNTS.values())
    assert report.results["by_config_type"] == dict(sorted(TINY_COUNTS.items()))
    assert report.passed and report.results["too_close"] == []
    assert report.command == "generate" and report.config["seed"] == 7
    assert not (tmp_path / "gen" / ".generate-parts").exists()
    # Simulate an interrupted run: the parts of a previous run are on disk, the set is not.
    parts = tmp_path / "gen" / ".generate-parts"
    generate_structures(cfg, parts_dir=parts)
    n_parts = len(list(parts.glob("*.extxyz")))
    assert n_parts == 7
    path.unlink()
    again = run_generate(cfg, resume=True, progress=False)
    assert again.results["reused_parts"] == 7
    frames2 = ase.io.read(path, ":")
    for a, b in zip(frames, frames2, strict=True):
        assert a.info["provenance"] == b.info["provenance"]
        np.testing.assert_allclose(a.positions, b.positions, atol=1e-7)


def test_reference_that_cannot_treat_the_element_is_a_clear_error():
    cfg = GenerateConfig.model_validate({"systems": [{"kind": "crystal", "element": "Ge"}]})
    with pytest.raises(UserInputError, match=r"reference 'emt' cannot treat Ge"):
        generate_structures(cfg)
    # Nothing needs the reference: any element works.
    off = {g: {"enabled": False} for g in ("md", "amorphous", "interstitial")}
    cfg = GenerateConfig.model_validate(
        {
            "systems": [{"kind": "crystal", "element": "Ge"}],
            "fit_lattice": False,
            "strain": {"n_volumes": 1, "n_shears": 0},
            "rattle": {"amplitudes": [0.05], "n_per_amplitude": 1},
            "vacancy": {"n_rattled": 1, "n_hops": 0},
            "surface": {"n_per_surface": 1, "millers": [[1, 1, 1]]},
            **off,
        }
    )
    frames = generate_structures(cfg)
    assert len(frames) == 4 and len(frames[0]) == 64  # diamond: 8 atoms per cubic cell


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(UserInputError, match="not available for fcc"):
        generate_structures(_only("interstitial", {"sites": ["hexagonal"]}))
    with pytest.raises(ValidationError, match="c_over_a applies to structure 'hcp' only"):
        GenerateConfig.model_validate(
            {"systems": [{"kind": "crystal", "element": "Cu", "c_over_a": 1.6}]}
        )
    with pytest.raises(ValidationError, match="systems listed twice"):
        GenerateConfig.model_validate({"systems": [CU, CU]})
    with pytest.raises(ValidationError, match="not a chemical element"):
        GenerateConfig.model_validate({"systems": [{"kind": "crystal", "element": "Xx"}]})
    with pytest.raises(ValidationError, match="quench_homologous must be below"):
        GenerateConfig.model_validate(
            {"systems": [CU], "amorphous": {"melt_homologous": 1.5, "quench_homologous": 1.6}}
        )
    molecule = Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.5]])
    path = tmp_path / "dimer.extxyz"
    ase.io.write(path, molecule)
    cfg = GenerateConfig.model_validate({"systems": [{"kind": "file", "path": str(path)}]})
    with pytest.raises(UserInputError, match="must be periodic in 3D"):
        generate_structures(cfg)
    cu3au = bulk("Cu", "fcc", a=3.75, cubic=True)
    cu3au.symbols[0] = "Au"
    ase.io.write(tmp_path / "cu3au.extxyz", cu3au)
    for name in ("md", "amorphous"):  # two elements: no tabulated melting point
        cfg = _only(name, systems=[{"kind": "file", "path": str(tmp_path / "cu3au.extxyz")}])
        with pytest.raises(UserInputError, match="no melting point known"):
            generate_structures(cfg)


def test_shipped_config_validates():
    from mlipctl.config.loader import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(GenerateConfig, root / "configs" / "generate-emt-cu.yaml")
    assert [s.label() for s in cfg.systems] == ["Cu-fcc"] and cfg.reference.kind == "emt"


@pytest.mark.slow
def test_shipped_default_cu_set_within_two_minutes(tmp_path):
    from mlipctl.config.loader import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(
        GenerateConfig,
        root / "configs" / "generate-emt-cu.yaml",
        {"output": str(tmp_path / "gen")},
    )
    report = run_generate(cfg, progress=False)
    assert report.passed and report.results["n_structures"] == 140
    assert report.timings["total"] < 120


@pytest.mark.parametrize("miller", [(1, 0, 0), (1, 1, 0), (1, 1, 1)])
@pytest.mark.parametrize("thickness", [8.0, 10.0, 12.0])
@pytest.mark.parametrize("a", [3.58983191957594, 3.61])  # the first: EMT Cu's, which hit it
def test_slab_planes_are_whole(miller, thickness, a):
    # Every atomic plane holds the same number of atoms: no atom of the bottom plane may end up
    # one period above the slab (ase 3.29 leaves some at fractional height 1.0).
    unit = bulk("Cu", "fcc", a=a, cubic=True)
    slab, _, _ = build_slab(unit, miller, thickness, 10.0, 1)
    _, counts = np.unique(np.round(slab.positions[:, 2], 3), return_counts=True)
    assert len(set(counts)) == 1, counts
    assert np.ptp(slab.positions[:, 2]) >= thickness
