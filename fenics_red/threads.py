"""Threads per MPI rank: ``mpirun -n N`` runs at full speed as written.

Every rank would otherwise start as many OpenMP/BLAS/torch threads as the machine has cores, so
``N`` ranks on one node oversubscribe it ``N`` times (measured on 2 cores, 4 RED runs at 64²: 55 s
on 2 ranks with torch's default threads, 9.2 s with one thread per rank). The command line calls
:func:`set_thread_environment` before NumPy, PETSc or torch load: each rank gets the cores it
may use divided by the number of ranks on its node. A user's own ``OMP_NUM_THREADS`` (or
``FENICS_RED_THREADS``) always wins. ``import fenics_red`` does the same under a launcher with
several ranks on the node, so that scripts (the demos, the benchmarks) run as written too; a pool
that NumPy already started (OpenBLAS) is limited through threadpoolctl.

Idle threads also cost: OpenBLAS's workers spin for 2²⁸ cycles (about 0.1 s) after each call
before they sleep, so on a rank that alternates MUMPS (on OpenBLAS) and the denoiser (torch's
OpenMP threads) the two pools fight for the same cores. :data:`SPIN_DEFAULTS` shortens that
wait; ``import fenics_red`` sets it (when the user has not) on any number of ranks. OpenBLAS
reads it once, when it loads: a script must import ``fenics_red`` before NumPy, or run under
``scripts/env``, which sets it too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

__all__ = ["ranks_on_node", "threads_per_rank", "set_thread_environment", "set_spin_environment",
           "THREAD_VARIABLES", "SPIN_DEFAULTS"]

#: Environment variables read by the thread pools of OpenMP, OpenBLAS, MKL, BLIS and torch.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "BLIS_NUM_THREADS")

#: Idle-wait settings: OpenBLAS workers spin 2²⁰ cycles (about 0.3 ms) instead of 2²⁸ before
#: sleeping. Measured (2026-12-01, 2 cores, 1 rank, RED at 64² and 45 dB, 3 phantoms): denoiser
#: call inside the loop 90 ms → 12 ms (12 ms alone), RED loop 1.75 → 0.53 s on the slowest
#: phantom, same estimates; MUMPS LU at 24³ cells 1.55 s either way (2.12 s with one BLAS thread).
SPIN_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "20"}

# launchers' variables for the number of ranks on this node: Open MPI, MPICH/Hydra (under
# Slurm's srun, set FENICS_RED_THREADS)
_LOCAL_SIZE = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def ranks_on_node(env: Mapping[str, str] | None = None) -> int:
    """The number of MPI ranks on this node, from the launcher's environment (1 without one)."""
    env = os.environ if env is None else env
    for name in _LOCAL_SIZE:
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def threads_per_rank(cores: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """``FENICS_RED_THREADS`` if set, else the usable cores over the ranks on the node (≥ 1)."""
    env = os.environ if env is None else env
    chosen = env.get("FENICS_RED_THREADS", "")
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    if cores is None:  # the node's cores (a rank's own binding may be narrower)
        cores = os.cpu_count() or 1
        if hasattr(os, "sched_getaffinity"):
            allowed = len(os.sched_getaffinity(0))
            return max(1, min(allowed, cores // ranks_on_node(env)))
    return max(1, cores // ranks_on_node(env))


def set_thread_environment(env: dict[str, str] | None = None) -> int:
    """Set the thread variables (those the user did not set) to :func:`threads_per_rank`.

    Call before NumPy, PETSc or torch are imported. Returns the number of threads chosen.
    """
    env = os.environ if env is None else env
    set_spin_environment(env)
    if "OMP_NUM_THREADS" in env and "FENICS_RED_THREADS" not in env:
        return int(env["OMP_NUM_THREADS"]) if env["OMP_NUM_THREADS"].isdigit() else 1
    threads = threads_per_rank(env=env)
    for name in THREAD_VARIABLES:
        if name not in env or "FENICS_RED_THREADS" in env:
            env[name] = str(threads)
    if env is os.environ:
        _limit_loaded_pools(threads)
    return threads


def set_spin_environment(env: dict[str, str] | None = None) -> None:
    """Set :data:`SPIN_DEFAULTS` where the user did not (before NumPy loads OpenBLAS)."""
    env = os.environ if env is None else env
    for name, value in SPIN_DEFAULTS.items():
        env.setdefault(name, value)


def _limit_loaded_pools(threads: int) -> None:
    """Limit the BLAS/OpenMP pools of libraries loaded before the variables were set (their
    pools read them once, at load)."""
    if not any(name in sys.modules for name in ("numpy", "scipy", "torch", "petsc4py")):
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - docker/packages.txt installs it
        return
    threadpool_limits(limits=threads)
