"""Unit and integration tests of the md engine: cell list, rebuild criterion, velocities, monitor
bookkeeping, overflow redo, resume, blow-up, monitors in the loop, outputs and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import ase.io
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from test_engine_md_potential import TYPE_MAP, make_morse, morse_params

from mlipctl.config.md import MDConfig
from mlipctl.data.neighbors import build_graph, neighbor_pairs
from mlipctl.engines import integrators as integ
from mlipctl.engines.cell_list import (
    build_cell_list,
    count_bin_occupancy,
    needs_rebuild,
    overflowed,
    plan_bins,
)
from mlipctl.engines.md import (
    CHECKPOINT,
    FLAGGED,
    LAST_GOOD,
    THERMO,
    TRAJECTORY,
    JaxMD,
    LoopSettings,
    make_force_fn,
    read_thermo_log,
    run_md_with_calculator,
    run_md_with_potential,
)
from mlipctl.engines.monitors import (
    Monitor,
    MonitorContext,
    initial_flags,
    register_monitor,
    registered_kinds,
    update_flags,
)
from mlipctl.errors import UserInputError

# Nearest-neighbour Morse (cutoff 3 Å): a 108-atom Cu cell then has 3 bins per axis with a small
# skin, so the in-loop cell list is exercised on small, fast systems.
RC_SHORT = 3.0
SHORT = make_morse(RC_SHORT, 2.6)
PARAMS = morse_params()
LANGEVIN_300 = {"kind": "langevin", "temperature_k": 300.0}


def _cu(reps=(3, 3, 3)) -> Atoms:
    return bulk("Cu", "fcc", a=3.61, cubic=True).repeat(reps)


def _cfg(tmp_path: Path, name: str = "run", **kw) -> MDConfig:
    data = {
        "calculator": {"kind": "emt"},
        "structure": {"kind": "crystal", "element": "Cu", "supercell": [3, 3, 3]},
        "steps": 200,
        "skin": 0.3,
        "chunk_steps": 40,
        "trajectory_interval": 50,
        "log_interval": 10,
        "checkpoint_interval": 100,
        "output": str(tmp_path / name),
    }
    data.update(kw)
    return MDConfig.model_validate(data)


def _run_short(cfg: MDConfig, **kw):
    return run_md_with_potential(
        cfg, SHORT, PARAMS, cutoff=RC_SHORT, type_map=TYPE_MAP, progress=False, **kw
    )


def _edge_set(senders, receivers, shifts, mask) -> set:
    m = np.asarray(mask)
    s = np.rint(np.asarray(shifts)[m]).astype(int)
    return set(
        zip(
            np.asarray(senders)[m].tolist(),
            np.asarray(receivers)[m].tolist(),
            map(tuple, s.tolist()),
            strict=True,
        )
    )


# ---------------------------------------------------------------------------------------------
# cell list
# ---------------------------------------------------------------------------------------------


def _triclinic_unwrapped() -> Atoms:
    atoms = _cu((4, 4, 4))
    atoms.set_cell(
        atoms.cell[:] @ np.array([[1.0, 0.12, 0.0], [0.0, 1.0, 0.07], [0.05, 0.0, 1.0]]),
        scale_atoms=True,
    )
    atoms.rattle(0.2, seed=1)
    # Atoms far outside the cell: shifts must refer to the positions as given.
    atoms.positions[:7] += atoms.cell[0] * 2 - atoms.cell[2]
    atoms.positions[7:11] -= atoms.cell[1] * 3
    return atoms


@pytest.mark.parametrize("case", ["cubic", "triclinic_unwrapped", "hcp"])
def test_cell_list_gives_the_host_edge_set(case):
    if case == "cubic":
        atoms = _cu((4, 4, 4))
        atoms.rattle(0.1, seed=0)
        r = 4.0
    elif case == "triclinic_unwrapped":
        atoms = _triclinic_unwrapped()
        r = 4.2
    else:
        atoms = bulk("Mg", "hcp", a=3.2, c=5.2).repeat((5, 5, 3))
        atoms.rattle(0.05, seed=2)
        r = 4.5
    dims = plan_bins(atoms.cell[:], atoms.pbc, r)
    assert dims is not None and min(dims) >= 3
    occ = count_bin_occupancy(atoms.positions, atoms.cell[:], dims)
    i, j, s = neighbor_pairs(atoms, r)
    cap = len(i) + 100
    k = int(np.bincount(i).max())
    nl, stats = jax.jit(build_cell_list, static_argnums=(2, 3, 4, 5, 6))(
        atoms.positions, atoms.cell[:], r, dims, occ, cap, k + 3
    )
    assert not bool(overflowed(stats, occ, cap, k + 3))
    assert int(stats.n_edges) == len(i)
    assert int(stats.max_neighbors) == k
    got = _edge_set(nl.senders, nl.receivers, nl.shifts, nl.mask)
    want = _edge_set(i, j, s, np.ones(len(i), bool))
    assert got == want
    # The table lists every real edge once, in the row of its sender.
    table = np.asarray(nl.table)
    listed = table[table < cap]
    assert sorted(listed.tolist()) == np.flatnonzero(np.asarray(nl.mask)).tolist()
    np.testing.assert_array_equal(np.asarray(nl.senders)[listed], np.nonzero(table < cap)[0])
    # Padding edges point 0 -> 0 with zero shift.
    pad = ~np.asarray(nl.mask)
    assert pad.sum() == 100
    assert not np.asarray(nl.senders)[pad].any() and not np.asarray(nl.shifts)[pad].any()


def test_cell_list_overflow_reports_what_it_needs():
    atoms = _cu((4, 4, 4))
    atoms.rattle(0.1, seed=5)
    r = 4.0
    dims = plan_bins(atoms.cell[:], atoms.pbc, r)
    occ = count_bin_occupancy(atoms.positions, atoms.cell[:], dims)
    n_pairs = len(neighbor_pairs(atoms, r)[0])
    k = int(np.bincount(neighbor_pairs(atoms, r)[0]).max())
    # Too few edge slots: flagged, the needed count is exact.
    _, stats = build_cell_list(atoms.positions, atoms.cell[:], r, dims, occ, 64, k)
    assert bool(overflowed(stats, occ, 64, k))
    assert int(stats.n_edges) == n_pairs
    # Too few bin slots: flagged, the needed occupancy is reported.
    _, stats = build_cell_list(atoms.positions, atoms.cell[:], r, dims, occ - 1, n_pairs, k)
    assert bool(overflowed(stats, occ - 1, n_pairs, k))
    assert int(stats.max_bin) == occ
    # Too few per-atom slots: flagged, the needed count is exact.
    _, stats = build_cell_list(atoms.positions, atoms.cell[:], r, dims, occ, n_pairs, k - 1)
    assert bool(overflowed(stats, occ, n_pairs, k - 1))
    assert int(stats.max_neighbors) == k
    # A cell shrunk below the grid's bin width: grid no longer valid.
    small = atoms.cell[:] * 0.8  # bins 4.81 Å -> 3.85 Å < r
    _, stats = build_cell_list(atoms.positions * 0.8, small, r, dims, occ, 4 * n_pairs, 4 * k)
    assert not bool(stats.bins_ok)


def test_plan_bins_falls_back_for_small_or_open_cells():
    assert plan_bins(_cu((1, 1, 1)).cell[:], (True, True, True), 5.0) is None
    assert plan_bins(_cu((5, 5, 5)).cell[:], (True, True, False), 5.0) is None
    assert plan_bins(_cu((5, 5, 5)).cell[:], (True, True, True), 5.0) == (3, 3, 3)
    # 18.05 Å / (6 Å · 1.03) < 3 bins: margin for NPT shrinkage.
    assert plan_bins(_cu((5, 5, 5)).cell[:], (True, True, True), 6.0, margin=0.03) is None


def test_needs_rebuild_at_half_skin_and_under_compression():
    atoms = _cu((3, 3, 3))
    cutoff, skin = 3.0, 0.4
    nl, _ = build_cell_list(atoms.positions, atoms.cell[:], cutoff + skin, (3, 3, 3), 20, 4000, 64)
    pos = np.array(atoms.positions)
    cell = np.array(atoms.cell[:])
    for d, expect in [(0.19, False), (0.21, True)]:
        moved = pos.copy()
        moved[4, 1] += d
        assert bool(needs_rebuild(nl, moved, cell, cutoff, skin)) is expect
    # Uniform compression by mu moves no atom relative to the mapped reference but shrinks
    # distances: rebuild once mu (cutoff + skin) < cutoff.
    for mu, expect in [(0.95, False), (0.87, True)]:
        assert bool(needs_rebuild(nl, pos * mu, cell * mu, cutoff, skin)) is expect


# ---------------------------------------------------------------------------------------------
# velocities and monitor bookkeeping
# ---------------------------------------------------------------------------------------------


def test_maxwell_boltzmann_is_exact_and_seeded():
    masses = _cu().get_masses()
    v = integ.maxwell_boltzmann(masses, 450.0, seed=7)
    assert np.allclose((masses[:, None] * v).sum(axis=0), 0.0, atol=1e-12)
    t = float(integ.temperature(jnp.asarray(v), jnp.asarray(masses), 3 * len(masses) - 3))
    assert t == pytest.approx(450.0, rel=1e-12)
    assert np.array_equal(v, integ.maxwell_boltzmann(masses, 450.0, seed=7))
    assert not np.allclose(v, integ.maxwell_boltzmann(masses, 450.0, seed=8))
    assert not integ.maxwell_boltzmann(masses, 0.0, seed=1).any()


def _reference_flags(steps, values, threshold, hysteresis, cooldown):
    """Plain-python statement of the flagging rule."""
    armed, last, flagged = True, None, []
    for s, v in zip(steps, values, strict=True):
        if v > threshold and armed and (last is None or s - last > cooldown):
            flagged.append(s)
            armed, last = False, s
        elif v < hysteresis * threshold:
            armed = True
    return flagged


def test_update_flags_cooldown_and_hysteresis():
    thr, hyst, cool = 1.0, 0.8, 20
    steps = np.arange(10, 400, 10)
    # Excursion above 1 (one flag), dip to 0.9 (not below 0.8: stays disarmed), back above,
    # drop below 0.8 (re-arm), rise again inside the cool-down (no flag), then after it (flag).
    values = np.array(
        [0.5, 1.2, 1.3, 0.9, 1.1, 0.7, 1.05, 1.2, 1.2, 0.5, 0.5, 1.4, 0.2, 1.5, 1.6] + [0.5] * 24
    )
    flags = initial_flags(1)
    got = []
    for s, v in zip(steps, values, strict=True):
        flags, frame, by = update_flags(
            flags, s, np.array([v]), np.array([v > thr]), np.array([thr]),
            hysteresis=hyst, cooldown_steps=cool, xp=np,
        )  # fmt: skip
        if frame:
            got.append(int(s))
    expected = _reference_flags(steps, values, thr, hyst, cool)
    assert got == expected == [20, 70, 120, 150]
    assert int(flags.first_trigger_step[0]) == 20
    assert int(flags.n_flagged[0]) == 4 and int(flags.n_frames) == 4
    assert int(flags.n_triggered[0]) == int((values > thr).sum())
    # The jax.numpy path gives the same verdicts.
    jflags = jax.tree.map(jnp.asarray, initial_flags(1))
    jgot = []
    for s, v in zip(steps, values, strict=True):
        jflags, frame, _ = update_flags(
            jflags, s, jnp.array([v]), jnp.array([v > thr]), jnp.array([thr]),
            hysteresis=hyst, cooldown_steps=cool,
        )  # fmt: skip
        if bool(frame):
            jgot.append(int(s))
    assert jgot == got


def test_monitor_registry_rejects_duplicates_and_unknown_kinds():
    assert {"max_force", "temperature"} <= set(registered_kinds())
    with pytest.raises(ValueError, match="already registered"):
        register_monitor("max_force")(lambda cfg, ctx: None)
    from mlipctl.engines.monitors import build_monitors

    class Cfg:
        kind = "no_such_monitor"

    with pytest.raises(UserInputError, match="unknown monitor kind"):
        build_monitors([Cfg()], MonitorContext(n_atoms=4, n_dof=9))


# ---------------------------------------------------------------------------------------------
# the jitted driver
# ---------------------------------------------------------------------------------------------


def _settings(n: int, kind: str = "nve", skin: float = 0.3, chunk: int = 40, **kw) -> LoopSettings:
    ens = integ.Ensemble(
        kind, temperature_k=kw.pop("temperature_k", 0.0), friction=kw.pop("friction", 0.0)
    )
    return LoopSettings(
        ensemble=ens,
        dt=1.0 * units.fs,
        n_dof=integ.degrees_of_freedom(n),
        cutoff=RC_SHORT,
        skin=skin,
        chunk_steps=chunk,
        **kw,
    )


def _fresh_forces(atoms_positions, cell, numbers, params=PARAMS):
    atoms = Atoms(numbers=numbers, positions=atoms_positions, cell=cell, pbc=True)
    graph = jax.tree.map(jnp.asarray, build_graph([atoms], RC_SHORT, TYPE_MAP))
    return np.asarray(make_force_fn(SHORT)(params, graph)[1])


@pytest.mark.parametrize("reps", [(3, 3, 3), (2, 2, 2)], ids=["cell_list", "host_fallback"])
def test_forces_after_rebuilds_equal_a_fresh_neighbour_list(reps):
    atoms = _cu(reps)
    n = len(atoms)
    md = JaxMD(
        SHORT,
        PARAMS,
        atoms,
        np.zeros(n, int),
        RC_SHORT,
        _settings(n, skin=0.1),
        velocities=integ.maxwell_boltzmann(atoms.get_masses(), 900.0, 3),
    )
    assert md.mode == ("cells" if reps == (3, 3, 3) else "host")
    md.advance(150)
    st = md.carry.state
    assert int(st.n_rebuilds) >= 3  # small skin at 900 K: several rebuilds happened
    if md.mode == "host":
        assert md.host_rebuilds == int(st.n_rebuilds)
    fresh = _fresh_forces(np.asarray(st.positions), np.asarray(st.cell), atoms.numbers)
    np.testing.assert_allclose(np.asarray(st.forces), fresh, atol=1e-10)


def test_overflow_redoes_the_chunk_and_matches_ample_capacity():
    atoms = _cu((3, 3, 3))
    n = len(atoms)
    r_list = RC_SHORT + 0.1
    v = integ.maxwell_boltzmann(atoms.get_masses(), 900.0, 11)
    kw = {"velocities": v}
    s = _settings(n, skin=0.1, chunk=50)
    exact_edges = len(neighbor_pairs(atoms, r_list)[0])
    exact_graph = len(neighbor_pairs(atoms, RC_SHORT)[0])
    exact_k = int(np.bincount(neighbor_pairs(atoms, r_list)[0]).max())
    exact_graph_k = int(np.bincount(neighbor_pairs(atoms, RC_SHORT)[0]).max())
    dims = plan_bins(atoms.cell[:], atoms.pbc, r_list)
    occ = count_bin_occupancy(atoms.positions, atoms.cell[:], dims)
    # Buffers exactly as large as the perfect lattice needs: thermal motion overflows them
    # at some in-loop rebuild, which must halt, grow and redo the chunk.
    tight = JaxMD(
        SHORT, PARAMS, atoms, np.zeros(n, int), RC_SHORT, s,
        edge_capacity=exact_edges, cell_capacity=occ, graph_capacity=exact_graph,
        neighbor_capacity=exact_k, graph_neighbor_capacity=exact_graph_k, **kw,
    )  # fmt: skip
    rec_t, ev_t = tight.advance(200)
    # The reference run starts with the buffers the tight run ended with (large enough for the
    # whole run, and the compiled loop is reused).
    ample = JaxMD(
        SHORT, PARAMS, atoms, np.zeros(n, int), RC_SHORT, s,
        edge_capacity=tight.edge_capacity, cell_capacity=tight.cell_capacity,
        graph_capacity=tight.graph_capacity, neighbor_capacity=tight.neighbor_capacity,
        graph_neighbor_capacity=tight.graph_neighbor_capacity, **kw,
    )  # fmt: skip
    rec_a, ev_a = ample.advance(200)
    assert ev_t is None and ev_a is None
    assert tight.overflow_redos >= 1 and ample.overflow_redos == 0
    grown = (
        tight.edge_capacity,
        tight.graph_capacity,
        tight.cell_capacity,
        tight.neighbor_capacity,
    )
    assert grown != (exact_edges, exact_graph, occ, exact_k)
    np.testing.assert_array_equal(rec_t["step"], np.arange(1, 201))
    st_t, st_a = tight.carry.state, ample.carry.state
    np.testing.assert_allclose(np.asarray(st_t.positions), np.asarray(st_a.positions), atol=1e-9)
    np.testing.assert_allclose(np.asarray(st_t.velocities), np.asarray(st_a.velocities), atol=1e-9)
    np.testing.assert_allclose(rec_t["e_pot"], rec_a["e_pot"], atol=1e-9)


def test_tiny_initial_capacities_grow_before_the_first_step():
    atoms = _cu((3, 3, 3))
    n = len(atoms)
    md = JaxMD(
        SHORT, PARAMS, atoms, np.zeros(n, int), RC_SHORT, _settings(n),
        edge_capacity=8, cell_capacity=1, graph_capacity=8, neighbor_capacity=1,
        graph_neighbor_capacity=1,
    )  # fmt: skip
    assert md.edge_capacity >= len(neighbor_pairs(atoms, RC_SHORT + 0.3)[0])
    assert md.neighbor_capacity >= np.bincount(neighbor_pairs(atoms, RC_SHORT + 0.3)[0]).max()
    assert md.graph_neighbor_capacity >= np.bincount(neighbor_pairs(atoms, RC_SHORT)[0]).max()
    assert md.graph_capacity >= len(neighbor_pairs(atoms, RC_SHORT)[0])
    fresh = _fresh_forces(atoms.positions, atoms.cell[:], atoms.numbers)
    np.testing.assert_allclose(np.asarray(md.carry.state.forces), fresh, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# runner: outputs, resume, blow-up, monitors, bad input
# ---------------------------------------------------------------------------------------------


def _frames(path: Path) -> list[Atoms]:
    return ase.io.read(path, index=":") if path.stat().st_size else []


def test_run_writes_outputs_and_report(tmp_path):
    cfg = _cfg(tmp_path, ensemble=LANGEVIN_300)
    report = _run_short(cfg)
    out = Path(cfg.output)
    assert report.passed, report.criteria
    frames = _frames(out / TRAJECTORY)
    assert [f.info["step"] for f in frames] == [0, 50, 100, 150, 200]
    last = frames[-1]
    assert last.get_velocities().std() > 0 and np.abs(last.get_forces()).max() > 0
    log = read_thermo_log(out / THERMO)
    np.testing.assert_array_equal(log["step"], np.arange(0, 201, 10))
    np.testing.assert_allclose(log["time_fs"], log["step"] * 1.0)
    np.testing.assert_allclose(log["e_tot_eV"], log["e_pot_eV"] + log["e_kin_eV"], atol=1e-9)
    assert log["temperature_K"][0] == pytest.approx(300.0, rel=1e-6)
    assert np.isfinite(log["conserved_eV"]).all() and np.isfinite(log["pressure_GPa"]).all()
    assert (out / CHECKPOINT).is_file() and (out / FLAGGED).is_file()
    r = report.results
    assert r["steps_completed"] == 200 and r["n_atoms"] == 108
    assert r["neighbor_mode"] == "cell_list" and r["throughput_atom_steps_per_s"] > 0
    assert r["conserved_max_deviation_mev_per_atom"] < 1.0
    assert report.timings["compile"] > 0 and report.timings["md"] > 0
    assert report.config["ensemble"]["kind"] == "langevin"
    assert set(report.artifacts) >= {"trajectory", "thermo_log", "checkpoint"}


class _Interrupt(RuntimeError):
    pass


def _interrupt_at(monkeypatch, step: int) -> None:
    """Make the run die (like a killed job) when it is about to write the frame of ``step``."""
    from mlipctl.engines import md as md_mod

    original = md_mod._Outputs.frame

    def frame(self, atoms):
        if atoms.info.get("step") == step:
            raise _Interrupt(f"killed at step {step}")
        original(self, atoms)

    monkeypatch.setattr(md_mod._Outputs, "frame", frame)


def test_resume_continues_bit_for_bit(tmp_path, monkeypatch):
    ensemble = {"kind": "langevin", "temperature_k": 500.0}
    monitoring = {"interval": 5, "monitors": [{"kind": "max_force", "threshold": 2.6}],
                  "cooldown_steps": 30, "hysteresis": 0.8}  # fmt: skip
    common = {"ensemble": ensemble, "monitoring": monitoring, "steps": 300}
    whole = _cfg(tmp_path, "whole", **common)
    _run_short(whole)
    broken = _cfg(tmp_path, "broken", **common)
    with monkeypatch.context() as m:
        _interrupt_at(m, 250)
        with pytest.raises(_Interrupt):
            _run_short(broken)
    out = Path(broken.output)
    assert read_thermo_log(out / THERMO)["step"][-1] == 250  # files ran past the checkpoint
    report = _run_short(broken, resume=True)
    assert report.results["resumed_from_step"] == 200
    for name in (TRAJECTORY, THERMO, FLAGGED):
        a = (Path(whole.output) / name).read_bytes()
        b = (out / name).read_bytes()
        assert a == b, f"{name} differs after resume"
    assert len(_frames(out / FLAGGED)) >= 2  # monitor state survived the restart too


def test_resume_with_ase_driver_is_bit_for_bit(tmp_path, monkeypatch):
    common = {
        "ensemble": {"kind": "langevin", "temperature_k": 400.0, "friction_per_ps": 5.0},
        "structure": {"kind": "crystal", "element": "Cu", "supercell": [2, 2, 2]},
        "steps": 60,
        "trajectory_interval": 10,
        "checkpoint_interval": 20,
        "log_interval": 5,
    }
    whole = _cfg(tmp_path, "whole", **common)
    run_md_with_calculator(whole, _emt(), progress=False)
    broken = _cfg(tmp_path, "broken", **common)
    with monkeypatch.context() as m:
        _interrupt_at(m, 50)
        with pytest.raises(_Interrupt):
            run_md_with_calculator(broken, _emt(), progress=False)
    run_md_with_calculator(broken, _emt(), resume=True, progress=False)
    for name in (TRAJECTORY, THERMO):
        assert (Path(whole.output) / name).read_bytes() == (Path(broken.output) / name).read_bytes()


def _emt():
    from ase.calculators.emt import EMT

    return EMT()


def test_resume_can_extend_a_finished_run(tmp_path):
    cfg = _cfg(tmp_path, "ext", steps=100, ensemble=LANGEVIN_300)
    _run_short(cfg)
    longer = _cfg(tmp_path, "ext", steps=200, ensemble=LANGEVIN_300)
    report = _run_short(longer, resume=True)
    assert report.results["steps_completed"] == 200
    steps = [f.info["step"] for f in _frames(Path(cfg.output) / TRAJECTORY)]
    assert steps == [0, 50, 100, 150, 200]


def test_restore_names_what_an_older_checkpoint_lacks():
    atoms = _cu((3, 3, 3))
    md = JaxMD(SHORT, PARAMS, atoms, np.zeros(len(atoms), int), RC_SHORT, _settings(len(atoms)))
    meta = md.checkpoint_meta()
    del meta["neighbor_capacity"], meta["graph_neighbor_capacity"]
    with pytest.raises(UserInputError, match="missing graph_neighbor_capacity, neighbor_capacity"):
        md.restore(md.checkpoint_arrays(), meta)


def test_resume_refuses_missing_checkpoint_or_changed_config(tmp_path):
    cfg = _cfg(tmp_path, "r", steps=100, ensemble=LANGEVIN_300)
    with pytest.raises(UserInputError, match="no checkpoint"):
        _run_short(cfg, resume=True)
    _run_short(cfg)
    changed = _cfg(tmp_path, "r", steps=100, ensemble=LANGEVIN_300, timestep_fs=2.0)
    with pytest.raises(UserInputError, match="timestep_fs"):
        _run_short(changed, resume=True)


@pytest.mark.parametrize("driver", ["jax", "ase"])
def test_blow_up_stops_keeps_last_good_frame_and_fails(tmp_path, driver):
    # Heating towards 2000 K with a 700 K limit: the run must stop at the first step above it.
    cfg = _cfg(
        tmp_path,
        driver,
        ensemble={"kind": "langevin", "temperature_k": 2000.0, "friction_per_ps": 50.0},
        blow_up={"max_temperature_k": 700.0},
        structure={"kind": "crystal", "element": "Cu", "supercell": [2, 2, 2]},
        log_interval=1,
    )
    report = (
        _run_short(cfg) if driver == "jax" else run_md_with_calculator(cfg, _emt(), progress=False)
    )
    assert not report.passed
    crit = {c.name: c for c in report.criteria}
    assert not crit["stable"].passed and not crit["completed"].passed
    blow = report.results["blow_up"]
    assert blow["reason"] == "temperature" and blow["values"]["temperature"] > 700.0
    out = Path(cfg.output)
    good = ase.io.read(out / LAST_GOOD)
    assert good.info["step"] == blow["step"] - 1 == report.results["steps_completed"]
    n_dof = 3 * len(good) - 3
    t_good = 2 * good.get_kinetic_energy() / (n_dof * units.kB)
    assert t_good <= 700.0
    log = read_thermo_log(out / THERMO)
    assert log["step"][-1] == blow["step"] - 1 and (log["temperature_K"] <= 700.0).all()
    assert _frames(out / TRAJECTORY)[-1].info["step"] == blow["step"] - 1
    assert "last_good_frame" in report.artifacts


# Thresholds sit in the upper part of each potential's max|F| distribution at 300 K (Morse
# 1.4-3.1 eV/Å, EMT 1.1-1.6 eV/Å), so the value crosses them and the re-arm level repeatedly.
@pytest.mark.parametrize(("driver", "thr", "hyst"), [("jax", 2.3, 0.8), ("ase", 1.3, 0.9)])
def test_max_force_monitor_flags_with_cooldown_and_hysteresis(tmp_path, driver, thr, hyst):
    cool = 25
    cfg = _cfg(
        tmp_path,
        driver,
        steps=300,
        log_interval=1,
        ensemble={"kind": "langevin", "temperature_k": 300.0, "friction_per_ps": 5.0},
        structure={"kind": "crystal", "element": "Cu", "supercell": [2, 2, 2]},
        monitoring={
            "interval": 1,
            "monitors": [{"kind": "max_force", "threshold": thr}],
            "cooldown_steps": cool,
            "hysteresis": hyst,
        },
    )
    if driver == "jax":
        report = _run_short(cfg)
    else:
        report = run_md_with_calculator(cfg, _emt(), progress=False)
    out = Path(cfg.output)
    log = read_thermo_log(out / THERMO)
    steps, fmax = log["step"][1:].astype(int), log["max_force_eV_A"][1:]
    # The log keeps 9 digits: the reference is only well defined away from the thresholds.
    assert np.min(np.abs(fmax - thr)) > 1e-6 and np.min(np.abs(fmax - hyst * thr)) > 1e-6
    expected = _reference_flags(steps, fmax, thr, hyst, cool)
    assert len(expected) >= 2 and (fmax > thr).sum() > len(expected)  # some hits were held back
    flagged = _frames(out / FLAGGED)
    assert [f.info["step"] for f in flagged] == expected
    for f in flagged:
        value = f.info["monitor_max_force"]
        assert value > thr and f.info["flagged_by"] == "max_force"
        assert value == pytest.approx(np.sqrt((f.get_forces() ** 2).sum(1)).max(), rel=1e-7)
    mon = report.results["monitors"]["max_force"]
    assert mon["n_flagged"] == len(expected) == report.results["flagged_frames"]
    assert mon["first_trigger_step"] == report.results["first_trigger_step"]
    assert mon["first_trigger_step"] == int(steps[np.argmax(fmax > thr)])
    assert report.passed  # policy 'continue': flags do not fail the run


def test_monitor_stop_policy_ends_the_run(tmp_path):
    cfg = _cfg(
        tmp_path,
        ensemble={"kind": "langevin", "temperature_k": 300.0},
        monitoring={
            "interval": 2,
            "monitors": [{"kind": "temperature", "threshold_k": 310.0}],
            "on_trigger": "stop",
        },
        steps=2000,
        trajectory_interval=1000,
        checkpoint_interval=1000,
        initial_temperature_k=600.0,
    )
    report = _run_short(cfg)
    crit = {c.name: c for c in report.criteria}
    assert not crit["monitors_quiet"].passed and not crit["completed"].passed
    assert crit["stable"].passed
    step = report.results["first_trigger_step"]
    assert step == 2 and report.results["steps_completed"] == step
    flagged = _frames(Path(cfg.output) / FLAGGED)
    assert len(flagged) == 1 and flagged[0].info["monitor_temperature"] > 310.0


def test_custom_member_monitor_plugs_into_the_loop(tmp_path):
    """A monitor with its own arrays that needs per-member forces (as ensemble-σ will)."""

    def two_member_energy(params, graph):
        e = SHORT(PARAMS, graph)
        return jnp.concatenate([e, params["scale"] * e], axis=0)  # (2, B)

    def spread(p, state, graph, prediction):
        f = prediction.forces  # (K, N, 3) per member
        value = jnp.max(jnp.linalg.norm(f[1] - f[0], axis=-1)) * p["weights"].sum()
        return value, value > p["threshold"]

    mon = Monitor(
        name="spread",
        fn=spread,
        threshold=0.05,
        params={"weights": jnp.ones(3) / 3, "threshold": jnp.asarray(0.05)},
        needs_members=True,
    )
    atoms = _cu((3, 3, 3))
    n = len(atoms)
    md = JaxMD(
        two_member_energy, {"scale": jnp.asarray(1.2)}, atoms, np.zeros(n, int), RC_SHORT,
        _settings(n, monitor_interval=5, cooldown_steps=0, hysteresis=1.0), [mon],
        velocities=integ.maxwell_boltzmann(atoms.get_masses(), 300.0, 0),
    )  # fmt: skip
    rec, event = md.advance(40)
    assert event is not None and event.kind == "flagged" and event.flagged_by == ["spread"]
    # Member 1 is 1.2 x member 0, so the spread is 0.2 max|F_mean| / 1.1.
    st = md.carry.state
    fmax = np.sqrt((np.asarray(st.forces) ** 2).sum(1)).max()
    assert event.values["spread"] == pytest.approx(0.2 * fmax / 1.1, rel=1e-9)
    assert event.step % 5 == 0 and rec["step"][-1] == event.step


def test_bad_input_is_reported_clearly(tmp_path):
    cfg = _cfg(tmp_path)
    atoms = _cu((2, 2, 2))
    atoms.positions[1] = atoms.positions[0] + [0.1, 0.0, 0.0]
    with pytest.raises(UserInputError, match="overlapping atoms"):
        _run_short(cfg, atoms=atoms)
    with pytest.raises(UserInputError, match="not in the species table"):
        run_md_with_potential(cfg, SHORT, PARAMS, cutoff=RC_SHORT, type_map={28: 0}, progress=False)

    def nan_energy(params, graph):
        return SHORT(params, graph) * jnp.nan

    with pytest.raises(UserInputError, match="non-finite"):
        run_md_with_potential(
            cfg, nan_energy, PARAMS, cutoff=RC_SHORT, type_map=TYPE_MAP, progress=False
        )
    bussi = _cfg(
        tmp_path, ensemble={"kind": "bussi", "temperature_k": 300}, initial_temperature_k=0
    )
    with pytest.raises(UserInputError, match="zero velocities"):
        _run_short(bussi)


@pytest.mark.parametrize(
    "ens",
    [
        {"kind": "nve"},
        {"kind": "langevin", "temperature_k": 300.0},
        {"kind": "nose_hoover_chain", "temperature_k": 300.0},
        {"kind": "bussi", "temperature_k": 300.0},
        {"kind": "npt_berendsen", "temperature_k": 300.0, "pressure_gpa": 0.0},
    ],
    ids=lambda e: e["kind"],
)
def test_every_ensemble_runs_through_ase_drivers(tmp_path, ens):
    cfg = _cfg(
        tmp_path,
        ens["kind"],
        ensemble=ens,
        steps=40,
        trajectory_interval=20,
        log_interval=5,
        structure={"kind": "crystal", "element": "Cu", "supercell": [2, 2, 2]},
    )
    report = run_md_with_calculator(cfg, _emt(), progress=False)
    assert report.passed, report.criteria
    log = read_thermo_log(Path(cfg.output) / THERMO)
    assert np.isfinite(log["temperature_K"]).all() and len(log["step"]) == 9
    conserved = log["conserved_eV"]
    if ens["kind"] in ("langevin", "npt_berendsen"):
        assert not np.isfinite(conserved[1:]).any() and report.messages
    else:
        assert np.max(np.abs(conserved - conserved[0])) / 32 < 1e-3  # eV/atom
    if ens["kind"] == "npt_berendsen":
        assert not math.isclose(log["volume_A3"][-1], log["volume_A3"][0])


def test_berendsen_npt_in_loop_grid_follows_a_shrinking_cell(tmp_path):
    """A stretched cell shrinks under NPT until the bin grid no longer fits: the loop must
    re-plan (or fall back to the host builder) and keep forces exact."""
    # Morse r0 = 2.3 Å puts the equilibrium near a = 3.25 Å, so a = 3.61 Å is under tension.
    params = {**PARAMS, "r0": jnp.asarray(2.3)}
    atoms = _cu((3, 3, 3))
    n = len(atoms)
    ens = integ.Ensemble(
        "npt_berendsen",
        temperature_k=300.0,
        tau=100 * units.fs,
        taup=100 * units.fs,
        pressure=0.0,
        compressibility=0.02 / units.GPa,
    )
    settings = LoopSettings(
        ensemble=ens, dt=units.fs, n_dof=integ.degrees_of_freedom(n), cutoff=RC_SHORT,
        skin=0.3, chunk_steps=50,
    )  # fmt: skip
    md = JaxMD(
        SHORT, params, atoms, np.zeros(n, int), RC_SHORT, settings,
        velocities=integ.maxwell_boltzmann(atoms.get_masses(), 300.0, 0),
    )  # fmt: skip
    assert md.mode == "cells"
    rec, event = md.advance(600)
    assert event is None
    v = rec["volume"]
    assert v[-1] < 0.85 * atoms.get_volume()
    assert md.overflow_redos >= 1 and md.mode == "host"  # 3 bins of 3.3 Å no longer fit
    st = md.carry.state
    fresh = _fresh_forces(np.asarray(st.positions), np.asarray(st.cell), atoms.numbers, params)
    np.testing.assert_allclose(np.asarray(st.forces), fresh, atol=1e-10)


def test_shipped_config_runs(tmp_path):
    from mlipctl.config.loader import load_config
    from mlipctl.engines.md import run_md

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(
        MDConfig,
        root / "configs/md.yaml",
        {"output": str(tmp_path / "md"), "steps": 60, "trajectory_interval": 30},
    )
    report = run_md(cfg, progress=False)
    assert report.passed
    assert report.results["driver"] == "ase" and report.results["steps_completed"] == 60
    assert (tmp_path / "md" / TRAJECTORY).is_file()


def test_non_periodic_cluster_runs_with_host_lists(tmp_path):
    from ase.cluster import Icosahedron

    atoms = Icosahedron("Cu", noshells=3)  # 55 atoms, no cell
    atoms.center(vacuum=0.0)
    cfg = _cfg(
        tmp_path, "cluster", steps=300, log_interval=10, skin=0.2, initial_temperature_k=600.0
    )
    report = _run_short(cfg, atoms=atoms)
    assert report.passed
    assert report.results["neighbor_mode"] == "host" and report.results["neighbor_rebuilds"] >= 2
    log = read_thermo_log(Path(cfg.output) / THERMO)
    assert np.isnan(log["pressure_GPa"]).all() and np.isnan(log["volume_A3"]).all()
    e = log["e_tot_eV"]
    assert np.max(np.abs(e - e[0])) / len(atoms) < 1e-3  # eV/atom over 0.3 ps
    last = _frames(Path(cfg.output) / TRAJECTORY)[-1]
    assert not last.pbc.any()
    fresh = np.asarray(
        make_force_fn(SHORT)(
            PARAMS, jax.tree.map(jnp.asarray, build_graph([last], RC_SHORT, TYPE_MAP))
        )[1]
    )
    np.testing.assert_allclose(last.get_forces(), fresh, atol=1e-6)  # extxyz keeps 8 decimals
    npt = _cfg(tmp_path, "npt", ensemble={"kind": "npt_berendsen", "temperature_k": 300.0})
    with pytest.raises(UserInputError, match="periodic cell"):
        _run_short(npt, atoms=atoms)
