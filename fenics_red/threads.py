"""Threads per MPI rank: ``mpirun -n N`` runs at full speed as written.

Every rank would otherwise start as many OpenMP/BLAS/torch threads as the machine has cores, so
``N`` ranks on one node oversubscribe it ``N`` times (measured on 2 cores, 4 RED runs at 64²: 55 s
on 2 ranks with torch's default threads, 9.2 s with one thread per rank). The command line calls
:func:`set_thread_environment` before NumPy, PETSc or torch load: each rank gets the job's CPUs
on its node (Slurm's count, or the control group's CPU set, or the node's) divided by the ranks
on the node (Open MPI's, MPICH's or ``srun``'s count), and no more than its own CPU set. A
user's own ``OMP_NUM_THREADS`` (or ``FENICS_RED_THREADS``) wins when it is a whole number of
threads; anything else is warned about and replaced. ``import fenics_red`` does the same, so
that scripts (the demos, the benchmarks) run as written too; a pool that NumPy already started
is limited through threadpoolctl (OpenMP's and BLAS's, each only where the user set nothing).

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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

__all__ = ["ranks_on_node", "job_cpus", "threads_per_rank", "set_thread_environment",
           "set_spin_environment", "root_call_threads", "torch_threads", "THREAD_VARIABLES",
           "SPIN_DEFAULTS"]

#: The environment variable of each thread pool (OpenMP's, which torch's reads too, OpenBLAS's,
#: MKL's, BLIS's) -> the pool as threadpoolctl names it (a user API, or a library's file name
#: prefix), to limit a pool already loaded.
_POOLS = {"OMP_NUM_THREADS": "openmp", "OPENBLAS_NUM_THREADS": "libopenblas",
          "MKL_NUM_THREADS": "libmkl_rt", "BLIS_NUM_THREADS": "libblis"}

#: Environment variables read by the thread pools of OpenMP, OpenBLAS, MKL, BLIS and torch.
THREAD_VARIABLES = tuple(_POOLS)

#: Idle-wait settings: OpenBLAS workers spin 2²⁰ cycles (about 0.3 ms) instead of 2²⁸ before
#: sleeping. Measured (2026-12-01, 2 cores, 1 rank, RED at 64² and 45 dB, 3 phantoms): denoiser
#: call inside the loop 90 ms → 12 ms (12 ms alone), RED loop 1.75 → 0.53 s on the slowest
#: phantom, same estimates; MUMPS LU at 24³ cells 1.55 s either way (2.12 s with one BLAS thread).
SPIN_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "20"}

#: The most threads per CPU of the node a user's setting may ask for (more is never faster here,
#: and 100000 crashed libgomp).
MAX_PER_CPU = 4

# launchers' variables for the number of ranks on this node: Open MPI, MPICH/Hydra
_LOCAL_SIZE = ("OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS")


def ranks_on_node(env: Mapping[str, str] | None = None) -> int:
    """The number of MPI ranks on this node, from the launcher's environment (1 without one):
    Open MPI's and MPICH's variables, or under Slurm's ``srun`` the tasks of the step per node
    (``SLURM_STEP_TASKS_PER_NODE``, when every node has the same number, e.g. ``4(x2)``)."""
    env = os.environ if env is None else env
    for name in _LOCAL_SIZE:
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    counts = {part.split("(")[0] for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(",")}
    if "SLURM_STEP_ID" in env and len(counts) == 1:
        count = counts.pop()
        if count.isdigit() and int(count) > 0:
            return int(count)
    return 1


def job_cpus(env: Mapping[str, str] | None = None) -> int:
    """The CPUs this node gives the job: Slurm's ``SLURM_CPUS_ON_NODE``, else the CPU set of the
    process's control group (a container's or a batch system's share), else all of the node's."""
    env = os.environ if env is None else env
    value = env.get("SLURM_CPUS_ON_NODE", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    cpus = _cgroup_cpus()
    return cpus if cpus else (os.cpu_count() or 1)


def _cgroup_cpus() -> int | None:
    """The number of CPUs in the cgroup v2 ``cpuset.cpus.effective`` of this process (``None``
    when there is none to read)."""
    try:
        with open("/proc/self/cgroup") as f:
            path = next(line.split(":", 2)[2].strip() for line in f if line.startswith("0::"))
        with open(f"/sys/fs/cgroup{path}/cpuset.cpus.effective") as f:
            listed = f.read().strip()
    except (OSError, StopIteration, IndexError):
        return None
    count = 0
    for part in filter(None, listed.split(",")):
        low, _, high = part.partition("-")
        if not (low.isdigit() and (not high or high.isdigit())):
            return None
        count += int(high or low) - int(low) + 1
    return count or None


def _chosen(env: Mapping[str, str], name: str) -> int | None:
    """A thread count the user set in ``name``: a whole number from 1 to :data:`MAX_PER_CPU`
    times the node's CPUs; ``None`` when unset, and a warning (one line) when it is not such a
    number, which is then treated as unset (0, ``abc`` or 100000 made the thread pools fail or
    crash)."""
    value = env.get(name)
    if value is None:
        return None
    cpus = MAX_PER_CPU * (os.cpu_count() or 1)
    if value.strip().isdigit() and 1 <= int(value) <= cpus:
        return int(value)
    if env.get("OMPI_COMM_WORLD_RANK", env.get("PMI_RANK", "0")) == "0":  # one line per run
        # (not warnings.warn: this runs when fenics_red is imported, before the command line
        # has set its one-line format)
        sys.stderr.write(f"fenics-red: warning: {name}={value!r} is not a number of threads "
                         f"from 1 to {cpus} ({MAX_PER_CPU} per CPU of this node); it is ignored "
                         "and the threads per "
                         "rank are chosen by fenics-red\n")
    return None


def threads_per_rank(cores: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """``FENICS_RED_THREADS`` if set, else the job's CPUs on this node (``cores``, default
    :func:`job_cpus`) over the ranks on the node, within this process's own CPU set (≥ 1)."""
    env = os.environ if env is None else env
    chosen = _chosen(env, "FENICS_RED_THREADS")
    if chosen is not None:
        return chosen
    share = max(1, (job_cpus(env) if cores is None else cores) // ranks_on_node(env))
    if cores is None and hasattr(os, "sched_getaffinity"):  # a rank bound to fewer CPUs
        share = min(share, len(os.sched_getaffinity(0)))
    return share


def set_thread_environment(env: dict[str, str] | None = None) -> int:
    """Set the thread variables (those the user did not set) to :func:`threads_per_rank`.

    Call before NumPy, PETSc or torch are imported. A user's valid ``OMP_NUM_THREADS`` is kept
    unless ``FENICS_RED_THREADS`` is set; an invalid value of either is warned about and
    replaced. Returns the number of threads chosen.
    """
    global _USER_CHOSE
    env = os.environ if env is None else env
    set_spin_environment(env)
    forced = _chosen(env, "FENICS_RED_THREADS")
    if forced is None:
        env.pop("FENICS_RED_THREADS", None)  # an invalid value is unset (it was warned about)
        mine = _chosen(env, "OMP_NUM_THREADS")
        if mine is not None:
            _USER_CHOSE = _USER_CHOSE or env is os.environ
            return mine
        env.pop("OMP_NUM_THREADS", None)
    elif env is os.environ:
        _USER_CHOSE = True
    threads = threads_per_rank(env=env)
    set_here = [name for name in THREAD_VARIABLES if name not in env or forced is not None]
    for name in set_here:
        env[name] = str(threads)
    if env is os.environ:
        _limit_loaded_pools(threads, set_here)
    return threads


#: Whether the user chose this process's threads (``OMP_NUM_THREADS`` or ``FENICS_RED_THREADS``):
#: then :func:`root_call_threads` keeps them.
_USER_CHOSE = False


def root_call_threads(comm) -> int | None:
    """Threads for a call that rank 0 of ``comm`` makes while its other ranks wait for the
    result (the denoiser: :func:`fenics_red.parallel.on_root`): the threads per rank times the
    ranks of ``comm`` on rank 0's node, whose cores would otherwise idle through the call
    (measured: 95-106 ms for a denoiser call at 64² on one of two ranks' threads, 21-24 ms on
    both; ``benchmarks/results/red.md``). ``None`` (keep the threads) on one rank or when the user
    set the threads. Collective."""
    from mpi4py import MPI

    if comm.size == 1:
        return None
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        on_node = node.size
    finally:
        node.Free()
    threads = _chosen(os.environ, "OMP_NUM_THREADS") or 1
    return None if _USER_CHOSE or on_node == 1 else threads * on_node


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block (``None``: unchanged)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_spin_environment(env: dict[str, str] | None = None) -> None:
    """Set :data:`SPIN_DEFAULTS` where the user did not (before NumPy loads OpenBLAS)."""
    env = os.environ if env is None else env
    for name, value in SPIN_DEFAULTS.items():
        env.setdefault(name, value)


def _limit_loaded_pools(threads: int, variables: list[str]) -> None:
    """Limit the pools of libraries loaded before the variables were set (their pools read them
    once, at load), each only where its variable was set here (``variables``), not by the
    user."""
    if not any(name in sys.modules for name in ("numpy", "scipy", "torch", "petsc4py")):
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - docker/packages.txt installs it
        return
    limits = {api: threads for name, api in _POOLS.items() if name in variables}
    if limits:
        threadpool_limits(limits=limits)

