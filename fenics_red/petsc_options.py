"""The one way this package gives options to PETSc objects (KSP, PC, SNES, ...).

Every solver of the package has its own options prefix (``fenics_red_forward_3_``,
``fenics_red_gamma_``, ``fenics_red_gn_cg_0_``, ...). :func:`set_options` puts the solver's
defaults and the caller's overrides into PETSc's global options database under that prefix, calls
``setFromOptions`` and then restores the database to what it was, so that

* options given on the command line (``-fenics_red_gamma_ksp_monitor``) are kept and win over the
  defaults, but lose to explicit ``overrides`` (settings of the caller);
* no temporary entry is left behind (PETSc would report it as an unused option, and it would leak
  into the next object created with the same prefix).

MUMPS reads its ``mat_mumps_icntl_N``/``mat_mumps_cntl_N`` options only at the first
factorisation, long after the database is restored: for a KSP with a MUMPS factorisation those
entries of ``defaults``/``overrides`` are set on its factor matrix directly instead (command-line
entries stay in the database, where MUMPS reads them, and then win).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from petsc4py import PETSc

__all__ = ["set_options", "set_mumps_options"]


def set_options(obj, prefix: str, defaults: Mapping | None = None,
                overrides: Mapping | None = None) -> None:
    """Give ``obj`` (any PETSc object with ``setOptionsPrefix``/``setFromOptions``) its options.

    Sets the prefix, puts ``defaults`` (only where the database has no entry yet, e.g. from the
    command line) and ``overrides`` (always) into the database under ``prefix``, calls
    ``obj.setFromOptions()`` and restores the database: entries set here are removed, replaced
    entries get their old values back. Option names are given without the prefix and without
    the leading dash. Collective on ``obj``'s communicator (as ``setFromOptions`` is).
    """
    obj.setOptionsPrefix(prefix)
    db = PETSc.Options(prefix)
    saved: dict[str, str | None] = {}
    mumps: dict[str, object] = {}
    try:
        for key, value in (defaults or {}).items():
            if not db.hasName(key):
                saved[key] = None
                db[key] = value
                if _MUMPS.fullmatch(key):
                    mumps[key] = value
        for key, value in (overrides or {}).items():
            if key not in saved:
                saved[key] = db.getString(key) if db.hasName(key) else None
            db[key] = value
            if _MUMPS.fullmatch(key):
                mumps[key] = value
        obj.setFromOptions()
        if mumps:
            set_mumps_options(obj, mumps)
    finally:
        for key, old in saved.items():
            if old is None:
                db.delValue(key)
            else:
                db[key] = old


_MUMPS = re.compile(r"mat_mumps_(icntl|cntl)_(\d+)")


def set_mumps_options(obj, options: Mapping) -> None:
    """Set ``mat_mumps_icntl_N``/``mat_mumps_cntl_N`` on the MUMPS factor matrix of the KSP
    ``obj`` (created here, before the first factorisation; a no-op without MUMPS)."""
    if not isinstance(obj, PETSc.KSP):
        return
    pc = obj.getPC()
    if pc.getType() not in ("lu", "cholesky") or pc.getFactorSolverType() != "mumps":
        return
    pc.setFactorSetUpSolverType()
    factor = pc.getFactorMatrix()
    for key, value in options.items():
        kind, number = _MUMPS.fullmatch(key).groups()
        if kind == "icntl":
            factor.setMumpsIcntl(int(number), int(value))
        else:
            factor.setMumpsCntl(int(number), float(value))
