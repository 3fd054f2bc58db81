"""Errors and rank-0 work under MPI: every rank raises when any rank fails, so none hangs.

A collective loop must not leave ranks waiting in a collective call that a failed rank will never
reach. The helpers here exchange a small description of an exception (type name and message) so
that every rank raises an equivalent error at the same point, and the command line reports it once
and exits (see :func:`fenics_red.cli.main`).
"""

from __future__ import annotations

from collections.abc import Callable

from mpi4py import MPI

__all__ = ["describe", "interruption", "raise_shared", "on_root", "raise_local_or_shared",
           "check_all", "exit_with_launcher", "on_every_rank", "raised_on_every_rank",
           "failed_together"]

_ERROR_TYPES = {cls.__name__: cls for cls in (ValueError, FileExistsError, FileNotFoundError,
                                              PermissionError, OSError, RuntimeError, KeyError,
                                              IndexError, TypeError, KeyboardInterrupt)}


def interruption(error: BaseException | None) -> KeyboardInterrupt | None:
    """The ``KeyboardInterrupt`` (or subclass, e.g. the command line's SIGTERM) that ``error``
    is or was caused by, or None: Ctrl-C inside a PETSc callback (a Python preconditioner) comes
    back from PETSc as ``PETSc.Error`` (error code -1) with the ``KeyboardInterrupt`` as its
    cause."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def describe(error: BaseException | None):
    """``(type name, message)`` of an exception (``None`` for no error): small and picklable;
    an interruption (:func:`interruption`) is described as ``KeyboardInterrupt``."""
    if interruption(error) is not None:
        return "KeyboardInterrupt", ""
    return None if error is None else (type(error).__name__, str(error))


def on_every_rank(error: BaseException) -> BaseException:
    """Mark ``error`` as raised on every rank at once (by the helpers here), so that the command
    line reports it once (rank 0) and ends every rank cleanly instead of aborting the job."""
    error.fenics_red_every_rank = True
    return error


def raised_on_every_rank(error: BaseException) -> bool:
    """Whether ``error`` was raised on every rank at once (:func:`on_every_rank`)."""
    return bool(getattr(error, "fenics_red_every_rank", False))


def raise_shared(comm: MPI.Comm, description, collective: bool = True) -> None:
    """Raise the first error described by any rank (``collective``) or by ``description``."""
    descriptions = comm.allgather(description) if collective else [description]
    for item in descriptions:
        if item is not None:
            name, message = item
            cls = _ERROR_TYPES.get(name)
            if cls is None:
                raise on_every_rank(RuntimeError(f"{name}: {message}"))
            raise on_every_rank(cls(message))


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
        raise on_every_rank(error)
    raise_shared(comm, description, collective=False)
    return result


def raise_local_or_shared(comm: MPI.Comm, error: BaseException | None) -> None:
    """Collective: raise ``error`` where it happened and an equivalent one on every other rank."""
    descriptions = comm.allgather(describe(error))
    if error is not None:
        raise on_every_rank(error)
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


def exit_with_launcher(interval: float = 1.0) -> bool:
    """End this process when its launcher (``mpirun``) is gone: a daemon thread checks every
    ``interval`` seconds that the parent process is still the one this process started under,
    and when it is not (the launcher was killed, ``SIGKILL`` included, and the rank was handed to
    ``init``) prints one line and exits with status 3 at once, releasing the rank's files and
    locks instead of running on alone. Returns ``False`` (and watches nothing) when the parent
    is already ``init``, so there is no launcher to watch."""
    import os
    import sys
    import threading
    import time

    parent = os.getppid()
    if parent <= 1:
        return False

    def watch():
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                try:  # the launcher held the other end of stderr: this may fail
                    print(f"fenics-red: the launcher of this process (pid {parent}) is gone; "
                          f"stopping (pid {os.getpid()})", file=sys.stderr, flush=True)
                finally:
                    os._exit(3)

    threading.Thread(target=watch, name="fenics-red-launcher-watch", daemon=True).start()
    return True


#: Message tags of :func:`failed_together` (apart from those of the library's own messages).
_TAG_ERROR, _TAG_VERDICT = 7301, 7302


def failed_together(comm: MPI.Comm, error: BaseException, wait: float = 3.0) -> bool:
    """Whether every rank of ``comm`` failed with the same error as this one (called by each
    failing rank, outside any collective call): the ranks send their error to rank 0, which
    answers once it has heard from all of them or after ``wait`` seconds. Point-to-point
    messages with their own tags, so a rank still busy elsewhere is not disturbed; ``False``
    when a rank does not report in time (it is then still running: abort)."""
    import time

    if comm.size == 1 or raised_on_every_rank(error):
        return True
    mine = describe(error)
    deadline = time.monotonic() + wait
    if comm.rank != 0:
        comm.isend(mine, dest=0, tag=_TAG_ERROR)
        while time.monotonic() < deadline + wait:
            if comm.iprobe(source=0, tag=_TAG_VERDICT):
                return bool(comm.recv(source=0, tag=_TAG_VERDICT))
            time.sleep(0.01)
        return False
    heard = {}
    while len(heard) < comm.size - 1 and time.monotonic() < deadline:
        status = MPI.Status()
        if comm.iprobe(source=MPI.ANY_SOURCE, tag=_TAG_ERROR, status=status):
            heard[status.source] = comm.recv(source=status.source, tag=_TAG_ERROR)
        else:
            time.sleep(0.01)
    verdict = len(heard) == comm.size - 1 and all(d == mine for d in heard.values())
    for rank in heard:
        comm.isend(verdict, dest=rank, tag=_TAG_VERDICT)
    return verdict
