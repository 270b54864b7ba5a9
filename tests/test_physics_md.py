"""Physics of the md engine: NVE energy conservation, thermostat temperatures and fluctuations,
conserved extended energies, Berendsen pressure control, and agreement with ASE's integrator
through the model's ASE calculator.

The potential is a Morse pair potential for Cu (Girifalco & Weizer) with a C2 switch-off between
4 and 5 Å (see ``test_engine_md_potential.py``) on a 108-atom fcc cell. Long versions are marked
``slow``; the short ones keep the same bounds where the statistics allow.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from test_engine_md_potential import RC, TYPE_MAP, morse_energy, morse_params

from mlipctl.config.md import MDConfig
from mlipctl.engines.md import (
    THERMO,
    TRAJECTORY,
    drift_mev_per_atom_ps,
    read_thermo_log,
    run_md_with_calculator,
    run_md_with_potential,
)

N_ATOMS = 108
# |drift| of E_tot in NVE at 300 K, dt = 1 fs, Morse Cu, float64 (measured: 5e-5 meV/atom/ps over
# 5 ps, 1.3e-3 over 0.5 ps where the linear fit still sees the VV oscillation of E_tot).
NVE_DRIFT_BOUND = 0.01  # meV/atom/ps
NVE_FLUCTUATION_BOUND = 0.1  # meV/atom, max |E_tot(t) - E_tot(0)|


def _cfg(tmp_path: Path, name: str, **kw) -> MDConfig:
    data = {
        "calculator": {"kind": "emt"},
        "structure": {"kind": "crystal", "element": "Cu", "supercell": [3, 3, 3]},
        "steps": 500,
        "skin": 0.5,
        "chunk_steps": 100,
        "trajectory_interval": kw.get("steps", 500),
        "log_interval": 5,
        "checkpoint_interval": 100000,
        "output": str(tmp_path / name),
    }
    data.update(kw)
    return MDConfig.model_validate(data)


def _run(cfg: MDConfig):
    report = run_md_with_potential(
        cfg, morse_energy, morse_params(), cutoff=RC, type_map=TYPE_MAP, progress=False
    )
    return report, read_thermo_log(Path(cfg.output) / THERMO)


def _nve(tmp_path: Path, steps: int) -> None:
    cfg = _cfg(tmp_path, "nve", steps=steps, ensemble={"kind": "nve"}, initial_temperature_k=600.0)
    report, log = _run(cfg)
    assert report.passed
    e_tot = log["e_tot_eV"]
    drift = drift_mev_per_atom_ps(log["time_fs"], e_tot, N_ATOMS)
    dev = float(np.max(np.abs(e_tot - e_tot[0]))) * 1000.0 / N_ATOMS
    t_mean = float(np.mean(log["temperature_K"][len(e_tot) // 5 :]))
    print(
        f"\nNVE Cu {N_ATOMS} atoms, {steps} steps of 1 fs, <T> = {t_mean:.0f} K: drift "
        f"{drift:+.2e} meV/atom/ps, max |dE| {dev:.2e} meV/atom, "
        f"{report.results['neighbor_rebuilds']} neighbour-list rebuilds"
    )
    # Started at 600 K on lattice sites, equipartition brings it to ~300 K.
    assert 250.0 < t_mean < 350.0
    assert report.results["neighbor_rebuilds"] >= 1
    assert abs(drift) < NVE_DRIFT_BOUND
    assert dev < NVE_FLUCTUATION_BOUND
    # The report computes the same drift from the same log.
    assert report.results["conserved_drift_mev_per_atom_ps"] == pytest.approx(drift)


def test_nve_energy_drift_short(tmp_path):
    _nve(tmp_path, 500)


@pytest.mark.slow
def test_nve_energy_drift_5ps(tmp_path):
    _nve(tmp_path, 5000)


THERMOSTATS = {
    "langevin": {"kind": "langevin", "temperature_k": 300.0, "friction_per_ps": 10.0},
    "bussi": {"kind": "bussi", "temperature_k": 300.0, "taut_fs": 50.0},
    "nose_hoover_chain": {"kind": "nose_hoover_chain", "temperature_k": 300.0, "tdamp_fs": 50.0},
}


def _thermostat(tmp_path: Path, name: str, steps: int, equilibrate: int):
    cfg = _cfg(
        tmp_path,
        name,
        steps=steps,
        ensemble=THERMOSTATS[name],
        initial_temperature_k=300.0,
        seed=3,
    )
    report, log = _run(cfg)
    assert report.passed
    keep = log["step"] >= equilibrate
    temps = log["temperature_K"][keep]
    conserved = log["conserved_eV"]
    dev = float(np.max(np.abs(conserved - conserved[0]))) * 1000.0 / N_ATOMS
    return temps, dev, drift_mev_per_atom_ps(log["time_fs"], conserved, N_ATOMS)


@pytest.mark.parametrize("name", list(THERMOSTATS))
def test_thermostat_short_sanity_and_conserved_quantity(tmp_path, name):
    temps, dev, drift = _thermostat(tmp_path, name, 2000, 500)
    print(f"\n{name}: <T> = {temps.mean():.1f} K over 1.5 ps, conserved max dev {dev:.2e} meV/atom")
    assert temps.mean() == pytest.approx(300.0, rel=0.10)
    # Extended energy (NHC) or E_tot + heat given to the bath (Langevin, Bussi) is conserved to
    # integration accuracy; thermostat work itself is ~ kT per atom per ps here, i.e. ~25 meV/atom.
    assert dev < 0.1
    assert abs(drift) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", list(THERMOSTATS))
def test_thermostat_mean_temperature_and_fluctuations_long(tmp_path, name):
    temps, dev, _ = _thermostat(tmp_path, name, 30000, 2000)
    n_dof = 3 * N_ATOMS - 3
    rel_std = temps.std() / temps.mean()
    canonical = math.sqrt(2.0 / n_dof)
    print(
        f"\n{name}: <T> = {temps.mean():.1f} K over 28 ps (target 300 K), "
        f"std(T)/<T> = {rel_std:.4f} (canonical {canonical:.4f}), conserved dev {dev:.2e} meV/atom"
    )
    assert temps.mean() == pytest.approx(300.0, rel=0.03)
    # Canonical kinetic-energy fluctuations: sqrt(2 / n_dof) (Berendsen would give far less).
    assert rel_std == pytest.approx(canonical, rel=0.15)


def test_berendsen_npt_relaxes_pressure(tmp_path):
    # Morse Cu at a = 3.61 Å is under ~ -6 GPa; the barostat must bring it near 0 GPa.
    cfg = _cfg(
        tmp_path,
        "npt",
        steps=3000,
        ensemble={
            "kind": "npt_berendsen",
            "temperature_k": 300.0,
            "pressure_gpa": 0.0,
            "taut_fs": 100.0,
            "taup_fs": 200.0,
            "compressibility_per_gpa": 0.007,
        },
    )
    report, log = _run(cfg)
    assert report.passed
    p0 = log["pressure_GPa"][0]
    tail = log["step"] >= 2000
    p_end = float(np.mean(log["pressure_GPa"][tail]))
    t_end = float(np.mean(log["temperature_K"][tail]))
    print(f"\nBerendsen NPT: P {p0:.2f} -> {p_end:.3f} GPa, V {log['volume_A3'][0]:.1f} -> "
          f"{log['volume_A3'][-1]:.1f} Å^3, <T> {t_end:.0f} K")  # fmt: skip
    assert p0 < -3.0
    assert abs(p_end) < 0.3
    assert t_end == pytest.approx(300.0, rel=0.1)
    assert log["volume_A3"][-1] < log["volume_A3"][0]
    assert not np.isfinite(log["conserved_eV"]).any()


def test_model_file_md_matches_ase_velocity_verlet(tmp_path):
    """The jitted loop and ASE's VelocityVerlet through the model's calculator agree step for
    step (same initial velocities, float64 model): units, integrator and forces are consistent;
    and NVE with the model conserves energy."""
    from mlipctl.config.model import ModelConfig
    from mlipctl.engines.md import run_md
    from mlipctl.model.potential import ModelSpec, Potential

    config = ModelConfig.model_validate(
        {
            "dtype": "float64",
            "architecture": {"kind": "moment", "hidden": [16], "n_radial": 4, "max_order": 2},
        }
    )
    # An untrained model with its energy scaled up so forces are ~0.5 eV/Å at 300 K.
    spec = ModelSpec(config=config, species=("Cu",), offsets=(0.0,), energy_scale=30.0)
    pot = Potential.initialize(spec, seed=0)
    path = pot.save(tmp_path / "m.mlip")
    common = {
        "steps": 200,
        "trajectory_interval": 50,
        "log_interval": 5,
        "ensemble": {"kind": "nve"},
        "structure": {"kind": "crystal", "element": "Cu", "supercell": [2, 2, 2]},
    }
    jax_cfg = _cfg(tmp_path, "jax", calculator={"kind": "mlip", "path": str(path)}, **common)
    ase_cfg = _cfg(tmp_path, "ase", **common)
    jax_report = run_md(jax_cfg, progress=False)
    run_md_with_calculator(ase_cfg, pot.calculator(), progress=False)
    assert jax_report.results["driver"] == "jax"
    a = read_thermo_log(Path(jax_cfg.output) / THERMO)
    b = read_thermo_log(Path(ase_cfg.output) / THERMO)
    assert np.ptp(a["max_force_eV_A"]) > 0.05  # forces do something
    np.testing.assert_allclose(a["e_pot_eV"], b["e_pot_eV"], rtol=0, atol=1e-7)
    np.testing.assert_allclose(a["temperature_K"], b["temperature_K"], rtol=1e-6)
    np.testing.assert_allclose(a["pressure_GPa"], b["pressure_GPa"], rtol=0, atol=1e-5)
    import ase.io

    fa = ase.io.read(Path(jax_cfg.output) / TRAJECTORY, index=":")
    fb = ase.io.read(Path(ase_cfg.output) / TRAJECTORY, index=":")
    assert len(fa) == len(fb) == 5
    for x, y in zip(fa, fb, strict=True):
        np.testing.assert_allclose(x.positions, y.positions, atol=1e-7)
        np.testing.assert_allclose(x.get_velocities(), y.get_velocities(), atol=1e-7)
    # NVE with the float64 model itself: same drift bound as the Morse runs.
    drift = drift_mev_per_atom_ps(a["time_fs"], a["e_tot_eV"], 32)
    dev = float(np.max(np.abs(a["e_tot_eV"] - a["e_tot_eV"][0]))) * 1000.0 / 32
    print(
        f"\nmodel (float64) NVE 0.2 ps: drift {drift:+.2e} meV/atom/ps, max |dE| {dev:.2e} meV/atom"
    )
    assert abs(drift) < NVE_DRIFT_BOUND and dev < NVE_FLUCTUATION_BOUND
