"""Turn a :data:`~mlipctl.config.reference.ReferenceConfig` into a fresh ASE calculator.

Every call builds a new calculator, so callers never share state (results caches, SCF guesses)
between structures they did not mean to. Optional packages (tblite, pyscf) are imported only when
their kind is requested, and their absence is a :class:`~mlipctl.errors.UserInputError` that says
what to install.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import typing
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator, Calculator, all_changes
from ase.data import chemical_symbols
from ase.units import Bohr, Hartree
from pydantic import TypeAdapter, ValidationError

from mlipctl.config.reference import (
    FINNIS_SINCLAIR_ELEMENTS,
    EAMReference,
    EMTReference,
    FinnisSinclairReference,
    ImportReference,
    LJReference,
    MorseReference,
    PySCFReference,
    ReferenceConfig,
    TBLiteReference,
)
from mlipctl.errors import UserInputError

_ADAPTER: TypeAdapter[Any] = TypeAdapter(ReferenceConfig)
_VARIANTS: tuple[type, ...] = typing.get_args(typing.get_args(ReferenceConfig)[0])

# GFN1/GFN2-xTB are parametrised for Z = 1 (H) ... 86 (Rn).
_XTB_MAX_Z = 86

_EAM_FORMS = {".alloy": "alloy", ".fs": "fs", ".eam": "eam", ".adp": "adp"}
_MATSCIPY_KINDS = {".alloy": "eam/alloy", ".fs": "eam/fs", ".eam": "eam"}


def as_reference(cfg: ReferenceConfig | dict[str, Any]) -> ReferenceConfig:
    """Validate a plain mapping (e.g. ``{"kind": "emt"}``) into a reference config.

    Raises:
        UserInputError: the mapping is not a valid reference config.
    """
    if isinstance(cfg, _VARIANTS):
        return cfg
    try:
        return _ADAPTER.validate_python(cfg)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'reference'}: {e['msg']}" for e in exc.errors()
        )
        raise UserInputError(f"invalid reference calculator config: {problems}") from None


def make_calculator(cfg: ReferenceConfig | dict[str, Any]) -> BaseCalculator:
    """A new ASE calculator for ``cfg`` (never a shared instance).

    Raises:
        UserInputError: an optional package is missing, the EAM file does not exist or cannot be
            read, or an ``import`` path fails (bad module, bad attribute, not a calculator,
            rejected keyword arguments).
    """
    cfg = as_reference(cfg)
    if isinstance(cfg, EMTReference):
        from ase.calculators.emt import EMT

        return EMT()
    if isinstance(cfg, LJReference):
        from ase.calculators.lj import LennardJones

        return LennardJones(
            epsilon=cfg.epsilon, sigma=cfg.sigma, rc=cfg.rc, ro=cfg.ro, smooth=cfg.smooth
        )
    if isinstance(cfg, MorseReference):
        from ase.calculators.morse import MorsePotential

        rc, onset = cfg.cutoffs()
        # ASE takes the cutoffs in units of r0.
        return MorsePotential(
            epsilon=cfg.epsilon,
            r0=cfg.r0,
            rho0=cfg.rho0_value(),
            rcut1=onset / cfg.r0,
            rcut2=rc / cfg.r0,
        )
    if isinstance(cfg, EAMReference):
        return _make_eam(cfg)
    if isinstance(cfg, FinnisSinclairReference):
        from mlipctl.reference.finnis_sinclair import FinnisSinclair, fs_parameters

        return FinnisSinclair(fs_parameters(cfg.element, **cfg.overrides()))
    if isinstance(cfg, TBLiteReference):
        try:
            from tblite.ase import TBLite
        except ImportError as exc:
            raise UserInputError(
                f"the 'tblite' reference needs the tblite package, which is not installed "
                f"({exc}); install it with: pip install mlipctl[dft]"
            ) from None
        return TBLite(
            method=cfg.method,
            accuracy=cfg.accuracy,
            electronic_temperature=cfg.electronic_temperature_k,
            charge=cfg.charge,
            multiplicity=cfg.multiplicity,
            verbosity=0,
        )
    if isinstance(cfg, PySCFReference):
        try:
            import pyscf  # noqa: F401
        except ImportError as exc:
            raise UserInputError(
                f"the 'pyscf' reference needs the pyscf package, which is not installed "
                f"({exc}); install it with: pip install mlipctl[dft]"
            ) from None
        return PySCFCalculator(
            basis=cfg.basis, xc=cfg.xc, charge=cfg.charge, spin=cfg.spin, conv_tol=cfg.conv_tol
        )
    if isinstance(cfg, ImportReference):
        return _make_imported(cfg)
    raise AssertionError(f"unhandled reference kind {cfg!r}")  # the union is exhaustive


def supported_elements(cfg: ReferenceConfig | dict[str, Any]) -> set[str] | None:
    """Chemical symbols the reference can treat, or None when it sets no known limit.

    EMT: from ASE's EMT parameter table; EAM: the elements in the potential file; Finnis-Sinclair:
    its element, or all seven tabulated ones when none is set; tblite: H-Rn.
    Pair potentials (LJ, Morse) apply one parameter set to any element, and for PySCF or an
    imported calculator the limit is not knowable up front: those return None.
    """
    cfg = as_reference(cfg)
    if isinstance(cfg, EMTReference):
        from ase.calculators.emt import parameters

        return set(parameters)
    if isinstance(cfg, EAMReference):
        return set(_read_eam_ase(cfg).elements)
    if isinstance(cfg, FinnisSinclairReference):
        return {cfg.element} if cfg.element is not None else set(FINNIS_SINCLAIR_ELEMENTS)
    if isinstance(cfg, TBLiteReference):
        return set(chemical_symbols[1 : _XTB_MAX_Z + 1])
    return None


def _eam_path(cfg: EAMReference) -> Path:
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserInputError(f"EAM potential file {path} {what}")
    return path


def _read_eam_ase(cfg: EAMReference) -> Any:
    from ase.calculators.eam import EAM

    path = _eam_path(cfg)
    try:
        return EAM(potential=str(path), form=_EAM_FORMS[path.suffix.lower()])
    except Exception as exc:  # a malformed file fails anywhere in ASE's parser
        raise UserInputError(
            f"cannot read EAM potential {path}: {type(exc).__name__}: {exc}"
        ) from None


def _make_eam(cfg: EAMReference) -> BaseCalculator:
    if cfg.backend == "ase":
        return _read_eam_ase(cfg)
    from matscipy.calculators.eam import EAM

    path = _eam_path(cfg)
    try:
        return EAM(str(path), kind=_MATSCIPY_KINDS[path.suffix.lower()])
    except Exception as exc:
        raise UserInputError(
            f"cannot read EAM potential {path} with matscipy: {type(exc).__name__}: {exc}"
        ) from None


def _make_imported(cfg: ImportReference) -> BaseCalculator:
    module_name, attr_path = cfg.split()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserInputError(
            f"cannot import module '{module_name}' for reference {cfg.class_path!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    target: Any = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise UserInputError(
                f"module '{module_name}' has no attribute '{attr_path}' "
                f"(reference {cfg.class_path!r})"
            )
        target = getattr(target, part)
    if isinstance(target, type):
        if not issubclass(target, BaseCalculator):
            raise UserInputError(
                f"{cfg.class_path} is not an ASE calculator: class {target.__name__} does not "
                "subclass ase.calculators.calculator.Calculator (or BaseCalculator)"
            )
    elif not callable(target):
        raise UserInputError(
            f"{cfg.class_path} is neither a calculator class nor a function returning one "
            f"(it is a {type(target).__name__})"
        )
    _reject_unknown_kwargs(target, cfg.kwargs, cfg.class_path)
    try:
        calc = target(**cfg.kwargs)
    except TypeError as exc:
        raise UserInputError(
            f"{cfg.class_path} rejected its kwargs {sorted(cfg.kwargs)}: {exc}"
        ) from None
    except Exception as exc:
        raise UserInputError(
            f"constructing {cfg.class_path}(**kwargs) failed: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(calc, BaseCalculator):
        raise UserInputError(
            f"{cfg.class_path} returned a {type(calc).__name__}, not an ASE calculator"
        )
    return calc


def _reject_unknown_kwargs(target: Any, kwargs: dict[str, Any], name: str) -> None:
    """Name keyword arguments the target will not use, before calling it.

    ASE calculators take ``**kwargs`` and store unknown ones silently, so for a Calculator class
    the accepted names are its constructors' named parameters plus ``default_parameters``.
    Targets that take ``**kwargs`` without such a table cannot be checked here.
    """
    if not kwargs:
        return
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):  # some builtins have no signature; the call will tell
        return
    named = _named_parameters(sig)
    takes_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    if takes_var_kw:
        table = getattr(target, "default_parameters", None) if isinstance(target, type) else None
        if not isinstance(table, dict) or not table:
            return
        named |= set(table)
        for klass in target.__mro__:  # **kwargs are forwarded up to the base constructors
            init = klass.__dict__.get("__init__")
            if init is not None:
                with contextlib.suppress(TypeError, ValueError):
                    named |= _named_parameters(inspect.signature(init)) - {"self"}
    bad = sorted(set(kwargs) - named)
    if bad:
        raise UserInputError(
            f"{name} does not accept keyword argument(s) {', '.join(map(repr, bad))}; "
            f"accepted: {', '.join(sorted(named)) or '(none)'}"
        )


def _named_parameters(sig: inspect.Signature) -> set[str]:
    return {
        n
        for n, p in sig.parameters.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }


class PySCFCalculator(Calculator):
    """Minimal ASE calculator over PySCF molecular SCF: energy and analytic forces.

    Non-periodic systems only (molecules, clusters): PySCF's periodic code is a different API and
    ASE ships no wrapper for it. Restricted (RHF/RKS) for ``spin == 0``, else unrestricted.
    """

    implemented_properties = ["energy", "free_energy", "forces"]
    default_parameters: dict[str, Any] = {
        "basis": "def2-svp",
        "xc": "PBE",
        "charge": 0,
        "spin": 0,
        "conv_tol": 1e-9,
    }

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | tuple[str, ...] = ("energy",),
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties, system_changes)
        assert self.atoms is not None  # set by Calculator.calculate
        if self.atoms.pbc.any():
            raise UserInputError(
                "the pyscf reference handles molecules and clusters only (non-periodic); this "
                f"structure has pbc={self.atoms.pbc.tolist()}"
            )
        from pyscf import dft, gto, scf

        p = self.parameters
        mol = gto.M(
            atom=[
                (s, tuple(float(x) for x in r))
                for s, r in zip(
                    self.atoms.get_chemical_symbols(), self.atoms.positions, strict=True
                )
            ],
            unit="Angstrom",
            basis=p.basis,
            charge=int(p.charge),
            spin=int(p.spin),
            verbose=0,
        )
        restricted = int(p.spin) == 0
        if str(p.xc).upper() == "HF":
            mf = scf.RHF(mol) if restricted else scf.UHF(mol)
        else:
            mf = dft.RKS(mol) if restricted else dft.UKS(mol)
            mf.xc = p.xc
        mf.conv_tol = float(p.conv_tol)
        energy = mf.kernel()
        if not mf.converged:
            raise RuntimeError(f"PySCF SCF did not converge ({p.xc}/{p.basis})")
        grad = np.asarray(mf.nuc_grad_method().kernel())  # (n_atoms, 3), Hartree/Bohr
        self.results["energy"] = float(energy) * Hartree
        self.results["free_energy"] = self.results["energy"]
        self.results["forces"] = -grad * (Hartree / Bohr)
