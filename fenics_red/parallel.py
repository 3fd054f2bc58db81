"""Errors and rank-0 work under MPI: every rank raises when any rank fails, so none hangs.

A collective loop must not leave ranks waiting in a collective call that a failed rank will never
reach. The helpers here exchange a small description of an exception (type name and message) so
that every rank raises an equivalent error at the same point, and the command line reports it once
and exits (see :func:`fenics_red.cli.main`).
"""

from __future__ import annotations

from collections.abc import Callable

from mpi4py import MPI

__all__ = ["describe", "raise_shared", "on_root", "raise_local_or_shared", "check_all"]

_ERROR_TYPES = {cls.__name__: cls for cls in (ValueError, FileExistsError, FileNotFoundError,
                                              PermissionError, OSError, RuntimeError, KeyError,
                                              IndexError, TypeError, KeyboardInterrupt)}


def describe(error: BaseException | None):
    """``(type name, message)`` of an exception (``None`` for no error): small and picklable."""
    return None if error is None else (type(error).__name__, str(error))


def raise_shared(comm: MPI.Comm, description, collective: bool = True) -> None:
    """Raise the first error described by any rank (``collective``) or by ``description``."""
    descriptions = comm.allgather(description) if collective else [description]
    for item in descriptions:
        if item is not None:
            name, message = item
            cls = _ERROR_TYPES.get(name)
            if cls is None:
                raise RuntimeError(f"{name}: {message}")
            raise cls(message)


def on_root(comm: MPI.Comm, fn: Callable[[], object]):
    """Run ``fn`` on rank 0 and broadcast its result, or raise its error on every rank."""
    result = error = None
    if comm.rank == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised on every rank below
            error = exc
    result, description = comm.bcast((result, describe(error)), root=0)
    if error is not None:
        raise error
    raise_shared(comm, description, collective=False)
    return result


def raise_local_or_shared(comm: MPI.Comm, error: BaseException | None) -> None:
    """Collective: raise ``error`` where it happened and an equivalent one on every other rank."""
    descriptions = comm.allgather(describe(error))
    if error is not None:
        raise error
    first = next((d for d in descriptions if d is not None), None)
    raise_shared(comm, first, collective=False)


def check_all(comm: MPI.Comm, fn: Callable[[], object]):
    """Run ``fn`` on every rank; if it fails anywhere, raise on every rank. Returns its result."""
    result = error = None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    raise_local_or_shared(comm, error)
    return result
