"""Pure-JAX MD integrators: velocity Verlet with Langevin (BAOAB), Nosé–Hoover chain, Bussi and
isotropic Berendsen NPT, plus initial velocities and conserved quantities.

Units are ASE's: Å, eV, amu, and ASE's time unit (``ase.units.fs`` per fs), so velocities can be
handed to ``Atoms.set_velocities`` unchanged. Everything here is float64.

The integrators do not know about neighbour lists or potentials: one step calls
``evaluate(state) -> (state, aux)`` once, after the positions (and cell) have moved, and expects
``forces``, ``energy`` and ``stress`` of the returned state to belong to the new positions.

Degrees of freedom: initial velocities have zero total momentum and every ensemble keeps it zero
(the Langevin noise is projected onto the zero-momentum subspace), so the temperature is
``2 E_kin / (n_dof k_B)`` with ``n_dof = 3N - 3`` (3 for a single atom).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ase import units

from mlipctl.engines.cell_list import NeighborList

jax.config.update("jax_enable_x64", True)

Array = jax.Array

KINDS = ("nve", "langevin", "nose_hoover_chain", "bussi", "npt_berendsen")

# Fourth-order Suzuki–Yoshida weights for the Nosé–Hoover chain propagator.
_W1 = 1.0 / (2.0 - 2.0 ** (1.0 / 3.0))
_SY_WEIGHTS = (_W1, 1.0 - 2.0 * _W1, _W1)


@dataclass(frozen=True)
class Ensemble:
    """Static (hashable) description of the ensemble, in ASE internal units.

    Attributes:
        kind: one of ``KINDS``.
        temperature_k: target temperature (thermostatted kinds), K.
        friction: Langevin friction, 1 / ASE time.
        tau: thermostat time constant (NHC tdamp, Bussi/Berendsen taut), ASE time.
        chain_length: number of Nosé–Hoover thermostats.
        taup: Berendsen barostat time constant, ASE time.
        pressure: target pressure, eV/Å³.
        compressibility: isothermal compressibility, 1 / (eV/Å³).
    """

    kind: str = "nve"
    temperature_k: float = 0.0
    friction: float = 0.0
    tau: float = 1.0
    chain_length: int = 1
    taup: float = 1.0
    pressure: float = 0.0
    compressibility: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown ensemble {self.kind!r}; expected one of {KINDS}")

    @property
    def kt(self) -> float:
        return units.kB * self.temperature_k

    @property
    def variable_cell(self) -> bool:
        return self.kind == "npt_berendsen"

    @classmethod
    def from_config(cls, cfg: Any) -> Ensemble:
        """From an ``mlipctl.config.md`` ensemble config (fs, ps⁻¹, GPa units)."""
        fs = units.fs
        if cfg.kind == "nve":
            return cls("nve")
        if cfg.kind == "langevin":
            return cls(
                "langevin",
                temperature_k=cfg.temperature_k,
                friction=cfg.friction_per_ps / (1000.0 * fs),
            )
        if cfg.kind == "nose_hoover_chain":
            return cls(
                "nose_hoover_chain",
                temperature_k=cfg.temperature_k,
                tau=cfg.tdamp_fs * fs,
                chain_length=cfg.chain_length,
            )
        if cfg.kind == "bussi":
            return cls("bussi", temperature_k=cfg.temperature_k, tau=cfg.taut_fs * fs)
        if cfg.kind == "npt_berendsen":
            return cls(
                "npt_berendsen",
                temperature_k=cfg.temperature_k,
                tau=cfg.taut_fs * fs,
                taup=cfg.taup_fs * fs,
                pressure=cfg.pressure_gpa * units.GPa,
                compressibility=cfg.compressibility_per_gpa / units.GPa,
            )
        raise ValueError(f"unknown ensemble kind {cfg.kind!r}")


class ThermostatState(NamedTuple):
    """Extended variables.

    Attributes (shapes):
        eta: (M,) Nosé–Hoover chain positions (zeros for other kinds; M >= 1).
        v_eta: (M,) Nosé–Hoover chain velocities, 1 / ASE time.
        heat: () energy the bath has removed from the system so far, eV (Langevin, Bussi,
            Berendsen); ``E_tot + heat`` is conserved up to integration error.
    """

    eta: Array
    v_eta: Array
    heat: Array


class MDState(NamedTuple):
    """Everything that determines the future of a run (a checkpoint stores exactly this).

    Attributes (shapes):
        step: () int64 steps done.
        positions: (N, 3) Å, never wrapped (continuous trajectories).
        velocities: (N, 3) Å / ASE time.
        cell: (3, 3) lattice vectors as rows, Å.
        masses: (N,) amu.
        forces: (N, 3) eV/Å at ``positions`` (ensemble mean for ensembles).
        energy: () potential energy, eV (ensemble mean).
        stress: (3, 3) potential (virial) stress, eV/Å³, ASE sign (positive = tensile).
        thermostat: extended variables.
        key: (2,) uint32 JAX PRNG key.
        nbr: neighbour list in use.
        n_rebuilds: () int64 neighbour-list rebuilds so far.
    """

    step: Array
    positions: Array
    velocities: Array
    cell: Array
    masses: Array
    forces: Array
    energy: Array
    stress: Array
    thermostat: ThermostatState
    key: Array
    nbr: NeighborList
    n_rebuilds: Array


def degrees_of_freedom(n_atoms: int) -> int:
    """3N - 3 (total momentum is removed and conserved); 3 for a single atom."""
    return 3 * n_atoms - 3 if n_atoms > 1 else 3


def kinetic_energy(velocities: Array, masses: Array) -> Array:
    """0.5 Σ m v², eV."""
    return 0.5 * jnp.sum(masses[:, None] * velocities * velocities)


def temperature(velocities: Array, masses: Array, n_dof: int) -> Array:
    """Instantaneous kinetic temperature, K."""
    return 2.0 * kinetic_energy(velocities, masses) / (n_dof * units.kB)


def pressure(state: MDState) -> Array:
    """Instantaneous pressure incl. the kinetic term, eV/Å³ (positive = compressed)."""
    volume = jnp.abs(jnp.linalg.det(state.cell))
    ke = kinetic_energy(state.velocities, state.masses)
    # Kinetic (ideal-gas) part as ASE's include_ideal_gas: trace(Σ m v⊗v) / (3V).
    p = 2.0 * ke / (3.0 * jnp.where(volume > 1e-9, volume, 1.0)) - jnp.trace(state.stress) / 3.0
    return jnp.where(volume > 1e-9, p, jnp.nan)  # no pressure without a volume


def _remove_com(velocities: Array, masses: Array) -> Array:
    if velocities.shape[0] < 2:
        return velocities
    p = jnp.sum(masses[:, None] * velocities, axis=0)
    return velocities - p / jnp.sum(masses)


def maxwell_boltzmann(masses: np.ndarray, temperature_k: float, seed: int) -> np.ndarray:
    """Initial velocities (N, 3) in Å / ASE time, numpy.

    Drawn from Maxwell–Boltzmann at ``temperature_k`` with ``numpy.random.default_rng(seed)``,
    total momentum removed, then rescaled so that the kinetic temperature with
    ``n_dof = 3N - 3`` is exactly ``temperature_k`` (a run starts at the requested T rather than
    at a random value within ~sqrt(2/n_dof) of it).
    """
    masses = np.asarray(masses, dtype=np.float64)
    n = len(masses)
    if temperature_k <= 0.0:
        return np.zeros((n, 3))
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((n, 3)) * np.sqrt(units.kB * temperature_k / masses)[:, None]
    if n > 1:
        v -= (masses[:, None] * v).sum(axis=0) / masses.sum()
    n_dof = degrees_of_freedom(n)
    t_now = (masses[:, None] * v * v).sum() / (n_dof * units.kB)
    return v * math.sqrt(temperature_k / t_now)


def nhc_masses(ens: Ensemble, n_dof: int) -> np.ndarray:
    """Thermostat masses Q (M,): Q_1 = n_dof kT tau², Q_k = kT tau² (Martyna et al. 1992)."""
    q = np.full(ens.chain_length, ens.kt * ens.tau**2)
    q[0] *= n_dof
    return q


def initial_thermostat(ens: Ensemble) -> ThermostatState:
    """Zero extended variables (numpy; the engine moves them to the device)."""
    m = max(1, ens.chain_length)
    return ThermostatState(eta=np.zeros(m), v_eta=np.zeros(m), heat=np.zeros(()))


def _nhc_half_step(
    velocities: Array, masses: Array, th: ThermostatState, ens: Ensemble, n_dof: int, delta: float
) -> tuple[Array, ThermostatState]:
    """Propagate the chain and scale velocities over ``delta`` (half a time step), MTK scheme
    with fourth-order Suzuki–Yoshida splitting."""
    q = jnp.asarray(nhc_masses(ens, n_dof))
    kt = ens.kt
    m_len = ens.chain_length
    ke2 = 2.0 * kinetic_energy(velocities, masses)
    eta = [th.eta[k] for k in range(m_len)]
    v = [th.v_eta[k] for k in range(m_len)]
    scale = jnp.ones((), jnp.float64)

    def force(k: int, ke2_now: Array) -> Array:
        if k == 0:
            return (ke2_now - n_dof * kt) / q[0]
        return (q[k - 1] * v[k - 1] ** 2 - kt) / q[k]

    for w in _SY_WEIGHTS:
        d = w * delta
        v[m_len - 1] = v[m_len - 1] + 0.5 * d * force(m_len - 1, ke2 * scale**2)
        for k in range(m_len - 2, -1, -1):
            a = jnp.exp(-0.25 * d * v[k + 1])
            v[k] = a * (a * v[k] + 0.5 * d * force(k, ke2 * scale**2))
        scale = scale * jnp.exp(-d * v[0])
        for k in range(m_len):
            eta[k] = eta[k] + d * v[k]
        for k in range(m_len - 1):
            a = jnp.exp(-0.25 * d * v[k + 1])
            v[k] = a * (a * v[k] + 0.5 * d * force(k, ke2 * scale**2))
        v[m_len - 1] = v[m_len - 1] + 0.5 * d * force(m_len - 1, ke2 * scale**2)

    return velocities * scale, th._replace(eta=jnp.stack(eta), v_eta=jnp.stack(v))


def _langevin_o(
    velocities: Array, masses: Array, key: Array, ens: Ensemble, dt: float
) -> tuple[Array, Array]:
    """Exact Ornstein–Uhlenbeck update over dt, noise projected to zero total momentum.

    Returns:
        (new velocities, heat taken out by the bath over the update, eV).
    """
    c1 = math.exp(-ens.friction * dt)
    c2 = math.sqrt(1.0 - c1 * c1)
    noise = jax.random.normal(key, velocities.shape, jnp.float64)
    sigma = jnp.sqrt(ens.kt / masses)[:, None]
    new = _remove_com(c1 * velocities + c2 * sigma * noise, masses)
    return new, kinetic_energy(velocities, masses) - kinetic_energy(new, masses)


def _bussi_rescale(
    velocities: Array, masses: Array, key: Array, ens: Ensemble, n_dof: int, dt: float
) -> tuple[Array, Array]:
    """Stochastic velocity rescaling over dt (Bussi, Donadio, Parrinello 2007, eq. A7)."""
    ke = kinetic_energy(velocities, masses)
    ke_safe = jnp.maximum(ke, 1e-300)
    target = 0.5 * n_dof * ens.kt
    c = math.exp(-dt / ens.tau)
    k1, k2 = jax.random.split(key)
    r1 = jax.random.normal(k1, (), jnp.float64)
    if n_dof > 1:
        rest = 2.0 * jax.random.gamma(k2, 0.5 * (n_dof - 1), dtype=jnp.float64)
    else:
        rest = jnp.zeros((), jnp.float64)
    f = (1.0 - c) * target / (n_dof * ke_safe)
    alpha2 = c + f * (rest + r1 * r1) + 2.0 * r1 * jnp.sqrt(c * f)
    sign = jnp.sign(r1 + jnp.sqrt(c / f))
    alpha = jnp.where(ke > 0, sign * jnp.sqrt(jnp.maximum(alpha2, 0.0)), 1.0)
    new = velocities * alpha
    return new, ke - kinetic_energy(new, masses)


def _berendsen_lambda(velocities: Array, masses: Array, ens: Ensemble, n_dof: int, dt: float):
    t_now = jnp.maximum(temperature(velocities, masses, n_dof), 1e-12)
    lam2 = 1.0 + dt / ens.tau * (ens.temperature_k / t_now - 1.0)
    # Same clamp as ASE: a single step never rescales velocities by more than 10 %.
    return jnp.clip(jnp.sqrt(jnp.maximum(lam2, 0.0)), 0.9, 1.1)


def _berendsen_mu(state: MDState, ens: Ensemble, n_dof: int, dt: float) -> Array:
    p_now = pressure(state)
    mu3 = 1.0 - ens.compressibility * dt / ens.taup * (ens.pressure - p_now)
    # Limit one step's volume change to 1 %: a Berendsen barostat is for gentle equilibration.
    return jnp.cbrt(jnp.clip(mu3, 0.99, 1.01))


def step(
    state: MDState,
    evaluate: Any,
    ens: Ensemble,
    dt: float,
    n_dof: int,
) -> tuple[MDState, Any]:
    """One MD step of length ``dt`` (ASE time).

    Scheme: [NHC ½] B ½ · (A ½ · O · A ½ for Langevin, else A) · evaluate · B ½ · [NHC ½]
    · [Bussi rescale over dt] · [Berendsen velocity rescale]. NPT Berendsen scales positions
    and cell by ``mu`` from the pressure at the start of the step, together with the drift, so
    the single force evaluation belongs to the scaled positions.

    Args:
        state: current state (forces belong to its positions).
        evaluate: ``evaluate(state) -> (state, aux)`` filling forces/energy/stress (and
            possibly the neighbour list) for the moved positions.
        ens: ensemble.
        dt: time step, ASE time.
        n_dof: degrees of freedom for temperatures.

    Returns:
        ``(new_state, aux)``, ``aux`` as returned by ``evaluate``.
    """
    m = state.masses
    minv = (1.0 / m)[:, None]
    v = state.velocities
    th = state.thermostat
    key = state.key
    x = state.positions
    cell = state.cell
    heat = th.heat

    if ens.kind == "nose_hoover_chain":
        v, th = _nhc_half_step(v, m, th, ens, n_dof, 0.5 * dt)
    mu = _berendsen_mu(state, ens, n_dof, dt) if ens.kind == "npt_berendsen" else None

    v = v + 0.5 * dt * state.forces * minv
    if ens.kind == "langevin":
        key, sub = jax.random.split(key)
        x = x + 0.5 * dt * v
        v, dq = _langevin_o(v, m, sub, ens, dt)
        heat = heat + dq
        x = x + 0.5 * dt * v
    else:
        x = x + dt * v
    if mu is not None:
        x = x * mu
        cell = cell * mu

    moved = state._replace(
        positions=x, velocities=v, cell=cell, key=key, thermostat=th._replace(heat=heat)
    )
    new, aux = evaluate(moved)
    v = new.velocities + 0.5 * dt * new.forces * minv
    th = new.thermostat
    key = new.key
    if ens.kind == "nose_hoover_chain":
        v, th = _nhc_half_step(v, m, th, ens, n_dof, 0.5 * dt)
    elif ens.kind == "bussi":
        key, sub = jax.random.split(key)
        v, dq = _bussi_rescale(v, m, sub, ens, n_dof, dt)
        th = th._replace(heat=th.heat + dq)
    elif ens.kind == "npt_berendsen":
        ke0 = kinetic_energy(v, m)
        v = v * _berendsen_lambda(v, m, ens, n_dof, dt)
        th = th._replace(heat=th.heat + ke0 - kinetic_energy(v, m))
    return new._replace(velocities=v, thermostat=th, key=key, step=state.step + 1), aux


def conserved_energy(state: MDState, ens: Ensemble, n_dof: int) -> Array:
    """The quantity each ensemble conserves up to integration error, eV.

    NVE: E_pot + E_kin. Langevin and Bussi: E_pot + E_kin + heat given to the bath. Nosé–Hoover
    chain: the extended energy E + Σ Q v_η²/2 + n_dof kT η_1 + kT Σ_{k>1} η_k. Berendsen NPT
    has none (its scaling is not Hamiltonian): NaN.
    """
    ke = kinetic_energy(state.velocities, state.masses)
    base = state.energy + ke
    if ens.kind == "nve":
        return base
    if ens.kind in ("langevin", "bussi"):
        return base + state.thermostat.heat
    if ens.kind == "nose_hoover_chain":
        q = jnp.asarray(nhc_masses(ens, n_dof))
        th = state.thermostat
        ext = 0.5 * jnp.sum(q * th.v_eta**2) + ens.kt * (n_dof * th.eta[0] + jnp.sum(th.eta[1:]))
        return base + ext
    return jnp.full((), jnp.nan)
